"""Verifiable tasks: a generator of prompts with known answers, and a rule-based reward.

Every response is expected to end with ``#### <answer>``; the reward is 1 when the extracted
answer matches the reference (task-specific normalization), else 0.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Sequence

from .budget import BUDGET_SAMPLES, builtin_examples, response_budget
from .example import Example, extract_answer, prompt_key


class Task(ABC):
    """Base class: subclasses set ``name``, ``levels`` and implement ``make`` (and ``check``)."""

    name: str = "task"
    levels: Sequence[int] = (0,)
    held_out: frozenset[str] = frozenset()  # prompt keys that ``sample`` never returns (the eval set)
    answer_pattern: str | None = None  # how ``reward`` reads the answer (``extract_answer``); None: after ####
    MAX_REJECTS = 10_000  # consecutive held-out draws before a level counts as used up

    @abstractmethod
    def make(self, rng: random.Random, level: int) -> Example:
        """One example of difficulty ``level``, drawn with ``rng``."""

    def check(self, example: Example, answer: str) -> bool:
        return answer.strip() == example.answer.strip()

    def response_budget(self, tokenizer, levels: Sequence[int]):
        """The default ``max_new_tokens`` for ``levels`` (a ``rlad.tasks.budget.ResponseBudget``):
        the longest worked solution of a fixed sample per level, with room to reason."""
        return response_budget(builtin_examples(self.make, levels), tokenizer,
                               f"worked solution ({BUDGET_SAMPLES} drawn per level) of {self.name} levels "
                               f"{list(levels)}")

    def reward(self, example: Example, response: str) -> float:
        answer = extract_answer(response, self.answer_pattern)
        return 1.0 if answer is not None and self.check(example, answer) else 0.0

    def check_reward(self) -> None:
        """Raise if the reward cannot be computed (a user reward function that fails); called once
        before a run starts. The built-in rewards always can."""
        return None

    def sample(self, rng: random.Random, n: int, levels: Sequence[int] | None = None) -> list[Example]:
        """n examples, levels drawn uniformly from ``levels`` (default: all of the task's)."""
        levels = list(levels) if levels else list(self.levels)
        bad = [lv for lv in levels if lv not in self.levels]
        if bad:
            raise ValueError(f"task {self.name!r} has levels {list(self.levels)}, got {bad}")
        return [self._draw(rng, rng.choice(levels)) for _ in range(n)]

    def _draw(self, rng: random.Random, level: int) -> Example:
        if not self.held_out:
            return self.make(rng, level)
        for _ in range(self.MAX_REJECTS):
            ex = self.make(rng, level)
            if prompt_key(ex.prompt) not in self.held_out:
                return ex
        raise ValueError(f"task {self.name!r}: level {level} draws only held-out (eval) problems; lower eval_prompts "
                         f"or train on other levels")

    def hold_out(self, keys: set[str]) -> int:
        """Never draw a problem whose ``prompt_key`` is in ``keys`` for training. Returns how many
        stored examples were removed (0 for a generator, which rejects them as it draws)."""
        self.held_out = frozenset(keys)
        return 0
