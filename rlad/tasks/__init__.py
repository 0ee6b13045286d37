"""Built-in verifiable tasks and the JSONL loader: ``get_task("arithmetic")``, ``get_task("jsonl:data.jsonl")``."""

from __future__ import annotations

from .arithmetic import Arithmetic, Chains, Echo
from .base import Task
from .example import ANSWER_MARK, Example, extract_answer, prompt_key
from .jsonl import JsonlTask, RewardError, load_reward, read_jsonl
from .knights import KnightsAndKnaves

BUILTIN = {"knights": KnightsAndKnaves, "arithmetic": Arithmetic, "chains": Chains, "echo": Echo}


def get_task(spec: str, reward: str = "exact", *, reward_timeout: float = 60.0, reward_errors: str = "fail") -> Task:
    """A built-in task by name, or ``jsonl:<path>`` for user data (with ``reward``, and for a
    ``module:function`` reward its per-call timeout and failure policy: see ``rlad.tasks.jsonl``)."""
    if spec.startswith("jsonl:"):
        return JsonlTask(spec[len("jsonl:"):], reward=reward, timeout=reward_timeout, on_error=reward_errors)
    if spec not in BUILTIN:
        raise ValueError(f"unknown task {spec!r}; choose one of {sorted(BUILTIN)} or 'jsonl:<path>'")
    return BUILTIN[spec]()


__all__ = ["ANSWER_MARK", "Example", "Task", "extract_answer", "get_task", "KnightsAndKnaves", "Arithmetic", "Chains",
           "Echo", "prompt_key", "JsonlTask", "RewardError", "read_jsonl", "load_reward", "BUILTIN"]
