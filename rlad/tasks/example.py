"""What every task and the data it reads share: one problem (``Example``), the answer mark every
response ends with (``#### <answer>``), how the answer is read from a response (after the mark, or
by a pattern), and a prompt's identity for held-out checks. Imports nothing of rlad: every other module may use it.
"""

from __future__ import annotations

import re
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


def extract_answer(response: str, pattern: str | re.Pattern | None = None) -> str | None:
    r"""The text after the last ``####`` on its line, stripped; None when there is no marker.

    With ``pattern`` (a regular expression), the last match in the response instead: its first
    group when the pattern has groups, else the whole match, stripped; None when nothing matches.
    For example ``r"answer is\s*(-?\d+)"`` reads ``12`` from "... so the answer is 12."."""
    if pattern is not None:
        matches = list(re.finditer(pattern, response))
        if not matches:
            return None
        last = matches[-1]
        return (last.group(1) if last.re.groups else last.group(0) or "").strip()
    if ANSWER_MARK not in response:
        return None
    tail = response.rsplit(ANSWER_MARK, 1)[1]
    return tail.strip().splitlines()[0].strip() if tail.strip() else ""
