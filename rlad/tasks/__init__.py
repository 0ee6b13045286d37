"""Built-in verifiable tasks and the JSONL loader: ``get_task("arithmetic")``, ``get_task("jsonl:data.jsonl")``."""

from __future__ import annotations

from .arithmetic import Arithmetic, Echo
from .base import ANSWER_MARK, Example, Task, extract_answer
from .jsonl import JsonlTask, load_reward, read_jsonl
from .knights import KnightsAndKnaves

BUILTIN = {"knights": KnightsAndKnaves, "arithmetic": Arithmetic, "echo": Echo}


def get_task(spec: str, reward: str = "exact") -> Task:
    """A built-in task by name, or ``jsonl:<path>`` for user data (with ``reward``)."""
    if spec.startswith("jsonl:"):
        return JsonlTask(spec[len("jsonl:"):], reward=reward)
    if spec not in BUILTIN:
        raise ValueError(f"unknown task {spec!r}; choose one of {sorted(BUILTIN)} or 'jsonl:<path>'")
    return BUILTIN[spec]()


__all__ = ["ANSWER_MARK", "Example", "Task", "extract_answer", "get_task", "KnightsAndKnaves", "Arithmetic",
           "Echo", "JsonlTask", "read_jsonl", "load_reward", "BUILTIN"]
