"""What every task and the data it reads share: one problem (``Example``), the answer mark every
response ends with (``#### <answer>``), how the answer is read from a response, and a prompt's
identity for held-out checks. Imports nothing of rlad: every other module may use it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ANSWER_MARK = "####"


@dataclass
class Example:
    """One problem. ``solution`` is a worked solution ending with ``#### answer`` (for SFT)."""

    prompt: str
    answer: str
    level: int = 0
    solution: str | None = None
    meta: dict = field(default_factory=dict)


def prompt_key(prompt: str) -> str:
    """A prompt's identity for held-out checks: case-folded, whitespace collapsed."""
    return " ".join(prompt.casefold().split())


def extract_answer(response: str) -> str | None:
    """The text after the last ``####`` on its line, stripped; None when there is no marker."""
    if ANSWER_MARK not in response:
        return None
    tail = response.rsplit(ANSWER_MARK, 1)[1]
    return tail.strip().splitlines()[0].strip() if tail.strip() else ""
