"""Built-in verifiable tasks and the JSONL loader: ``get_task("arithmetic")``, ``get_task("jsonl:data.jsonl")``."""

from __future__ import annotations

from .arithmetic import Arithmetic, Chains, Echo
from .base import Task
from .example import ANSWER_MARK, Example, extract_answer, prompt_key
from .jsonl import JsonlTask, RewardError, load_reward, read_jsonl
from .knights import KnightsAndKnaves

BUILTIN = {"knights": KnightsAndKnaves, "arithmetic": Arithmetic, "chains": Chains, "echo": Echo}


def get_task(spec: str, reward: str = "exact", *, reward_timeout: float = 60.0, reward_errors: str = "fail",
             answer_pattern: str | None = None) -> Task:
    """A built-in task by name, or ``jsonl:<path>`` for user data (with ``reward``, and for a
    ``module:function`` reward its per-call timeout and failure policy: see ``rlad.tasks.jsonl``).
    ``answer_pattern``: how the rewards read a response's answer (``extract_answer``; a
    ``module:function`` reward reads the whole response itself)."""
    if spec.startswith("jsonl:"):
        task = JsonlTask(spec[len("jsonl:"):], reward=reward, timeout=reward_timeout, on_error=reward_errors)
    elif spec in BUILTIN:
        task = BUILTIN[spec]()
    else:
        raise ValueError(f"unknown task {spec!r}; choose one of {sorted(BUILTIN)} or 'jsonl:<path>'")
    task.answer_pattern = answer_pattern
    return task


__all__ = ["ANSWER_MARK", "Example", "Task", "extract_answer", "get_task", "KnightsAndKnaves", "Arithmetic", "Chains",
           "Echo", "prompt_key", "JsonlTask", "RewardError", "read_jsonl", "load_reward", "BUILTIN"]
