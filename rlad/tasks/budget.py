"""The default response length (``max_new_tokens``) of a task: room for its longest reference
response, plus room to reason.

Reference responses are what a correct response looks like: a built-in task's worked solutions
(``Example.solution``) of ``BUDGET_SAMPLES`` examples per level, drawn with a fixed seed; a
JSONL task's ``solution`` fields, over every example of the levels (an example without one
counts as its ``#### answer`` line). Each is tokenized as a response (``encode_texts``) plus its
EOS, which ``generate`` counts among the new tokens.

The rule: with ``longest`` the longest reference in tokens, the budget is
``max(ceil(1.5 * longest), longest + 16)``. When some examples have no solution (answers only),
nothing says how long their reasoning is: the budget is then at least ``ANSWER_ONLY_FLOOR``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..tokenizer import encode_texts
from .example import ANSWER_MARK, Example

BUDGET_SAMPLES = 256       # built-in tasks: examples per level whose worked solutions are measured
BUDGET_SEED = 0            # ... drawn with random.Random(BUDGET_SEED + level)
ROOM_FACTOR = 1.5          # the budget is ROOM_FACTOR x the longest reference, rounded up,
ROOM_MIN = 16              # and at least the longest plus ROOM_MIN tokens
ANSWER_ONLY_FLOOR = 256    # the least budget when some references are bare "#### answer" lines


@dataclass(frozen=True)
class ResponseBudget:
    """``tokens``: the default max_new_tokens; ``longest``: the longest reference response in
    tokens (with its EOS); ``answers_only``: how many references were bare answer lines;
    ``what``: what the references were, for messages."""

    tokens: int
    longest: int
    answers_only: int
    what: str

    def explain(self) -> str:
        """Why ``tokens``, in one clause."""
        rule = f"{ROOM_FACTOR:g}x rounded up, at least +{ROOM_MIN}"
        if self.answers_only:
            rule += (f"; {self.answers_only} reference(s) had no worked solution, so at least {ANSWER_ONLY_FLOOR}: "
                     f"set max_new_tokens to fit your reasoning")
        return f"the longest {self.what} is {self.longest} tokens with its EOS; {rule}"


def reference_response(example: Example) -> tuple[str, bool]:
    """(the reference response of ``example``, whether it is only the answer line)."""
    if isinstance(example.solution, str) and example.solution.strip():
        return example.solution, False
    return f"{ANSWER_MARK} {example.answer}", True


def budget_rule(longest: int, answers_only: bool) -> int:
    tokens = max(math.ceil(ROOM_FACTOR * longest), longest + ROOM_MIN)
    return max(tokens, ANSWER_ONLY_FLOOR) if answers_only else tokens


def token_counts(tokenizer, texts: Sequence[str], chunk: int = 1024) -> list[int]:
    """Tokens of each text encoded as a response (``rlad.tokenizer.encode_texts``), without its EOS."""
    return [len(ids) for i in range(0, len(texts), chunk) for ids in encode_texts(tokenizer, texts[i:i + chunk])]


def response_budget(examples: Sequence[Example], tokenizer, what: str) -> ResponseBudget:
    """The budget of ``examples``' reference responses under ``tokenizer``."""
    refs = [reference_response(e) for e in examples]
    lengths = token_counts(tokenizer, [text for text, _ in refs])
    longest = max(lengths) + 1  # the EOS
    bare = sum(only for _, only in refs)
    return ResponseBudget(budget_rule(longest, bare > 0), longest, bare, what)


def builtin_examples(make: Callable[[random.Random, int], Example], levels: Sequence[int]) -> list[Example]:
    """``BUDGET_SAMPLES`` examples of each level, drawn with a fixed seed (the same every run)."""
    out = []
    for level in levels:
        rng = random.Random(BUDGET_SEED + level)
        out += [make(rng, level) for _ in range(BUDGET_SAMPLES)]
    return out
