"""Arithmetic with a short chain of thought, and a trivial echo task for quick learning tests."""

from __future__ import annotations

import random

from .base import Task
from .example import ANSWER_MARK, Example


class Arithmetic(Task):
    """Level L (1..5): L + 1 operands joined by + and -; operands below 10 at level 1, below 100 above.

    The worked solution folds left one operation at a time: ``12+35=47, 47-8=39 #### 39``.
    """

    name = "arithmetic"
    levels = (1, 2, 3, 4, 5)

    def operand_bound(self, level: int) -> int:
        return 10 if level == 1 else 100

    def make(self, rng: random.Random, level: int) -> Example:
        hi = self.operand_bound(level)
        nums = [rng.randrange(hi) for _ in range(level + 1)]
        ops = [rng.choice("+-") for _ in range(level)]
        expr = str(nums[0]) + "".join(f"{o}{x}" for o, x in zip(ops, nums[1:], strict=True))
        acc, steps = nums[0], []
        for o, x in zip(ops, nums[1:], strict=True):
            new = acc + x if o == "+" else acc - x
            steps.append(f"{acc}{o}{x}={new}")
            acc = new
        return Example(prompt=f"Compute {expr}.", answer=str(acc), level=level,
                       solution=f"{', '.join(steps)} {ANSWER_MARK} {acc}", meta={"expr": expr})

    def check(self, example: Example, answer: str) -> bool:
        try:
            return int(answer.strip().rstrip(".")) == int(example.answer)
        except ValueError:
            return False


class Chains(Arithmetic):
    """Level L (1..5): L + 1 single-digit operands joined by + and -. Difficulty is the length of
    the chain alone, which a model of a few hundred thousand parameters can learn: the task of the
    studies (docs/studies.md), where the teacher must be clearly better than the student at the longest chains."""

    name = "chains"

    def operand_bound(self, level: int) -> int:
        return 10


class Echo(Task):
    """Level L: repeat an L-digit number. Trivial on purpose: a tiny model learns it in seconds,
    which makes it the task of the quick learning tests."""

    name = "echo"
    levels = (1, 2, 3)

    def make(self, rng: random.Random, level: int) -> Example:
        x = "".join(rng.choice("0123456789") for _ in range(level))
        return Example(prompt=f"Echo {x}.", answer=x, level=level, solution=f"{ANSWER_MARK} {x}")
