"""User data: a JSONL file of ``{"prompt": ..., "answer": ...}`` (optional ``"level"``), with a
pluggable reward.

Rewards: ``exact`` (string equality after stripping), ``numeric`` (numbers equal within 1e-6),
``contains`` (the reference occurs in the extracted answer), or ``module:function``: a
callable ``f(response: str, answer: str) -> float`` importable from the Python path.
"""

from __future__ import annotations

import importlib
import json
import math
import random
from collections.abc import Callable
from pathlib import Path

from .base import Example, Task, extract_answer


def _exact(response: str, answer: str) -> float:
    got = extract_answer(response)
    return float(got is not None and got.strip() == answer.strip())


def _numeric(response: str, answer: str) -> float:
    got = extract_answer(response)
    try:
        return float(got is not None and math.isclose(float(got.replace(",", "")), float(answer), rel_tol=1e-6,
                                                         abs_tol=1e-6))
    except ValueError:
        return 0.0


def _contains(response: str, answer: str) -> float:
    got = extract_answer(response)
    return float(got is not None and answer.strip() in got)


REWARDS = {"exact": _exact, "numeric": _numeric, "contains": _contains}


def load_reward(spec: str) -> Callable[[str, str], float]:
    if spec in REWARDS:
        return REWARDS[spec]
    if ":" not in spec:
        raise ValueError(f"unknown reward {spec!r}: use one of {sorted(REWARDS)} or 'module:function'")
    mod, fn = spec.split(":", 1)
    try:
        f = getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot load reward function {spec!r}: {e}") from e
    if not callable(f):
        raise ValueError(f"reward {spec!r} is not callable")
    return f


def read_jsonl(path) -> list[Example]:
    """Examples of a JSONL file; a malformed line raises ValueError naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"JSONL task file not found: {path}")
    out = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected an object with 'prompt' and 'answer', got {type(row).__name__}")
            missing = [k for k in ("prompt", "answer") if k not in row]
            if missing:
                raise ValueError(f"{where}: missing key(s) {missing}; each line needs 'prompt' and 'answer'")
            if not isinstance(row["prompt"], str) or not row["prompt"].strip():
                raise ValueError(f"{where}: 'prompt' must be a non-empty string")
            if not isinstance(row["answer"], (str, int, float)) or isinstance(row["answer"], bool):
                raise ValueError(f"{where}: 'answer' must be a string or a number, got {type(row['answer']).__name__}")
            level = row.get("level", 0)
            if not isinstance(level, int) or isinstance(level, bool):
                raise ValueError(f"{where}: 'level' must be an integer, got {level!r}")
            out.append(Example(prompt=row["prompt"], answer=str(row["answer"]), level=level,
                               solution=row.get("solution"), meta={"line": lineno}))
    if not out:
        raise ValueError(f"{path}: no examples")
    return out


class JsonlTask(Task):
    """Examples are drawn (with replacement) from the file; levels are those found in it."""

    name = "jsonl"

    def __init__(self, path, reward: str = "exact"):
        self.path = str(path)
        self.examples = read_jsonl(path)
        self.reward_fn = load_reward(reward)
        self.levels = tuple(sorted({e.level for e in self.examples}))

    def make(self, rng: random.Random, level: int) -> Example:
        pool = [e for e in self.examples if e.level == level]
        return rng.choice(pool)

    def reward(self, example: Example, response: str) -> float:
        r = float(self.reward_fn(response, example.answer))
        if not math.isfinite(r):
            raise ValueError(f"reward function returned {r} for line {example.meta.get('line')} of {self.path}")
        return r
