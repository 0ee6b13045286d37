"""Knights and Knaves logic puzzles (the K&K benchmark of the RLAD paper), levels n = 2..8 people.

Knights always tell the truth, knaves always lie: a consistent assignment makes every
speaker's statement true exactly when the speaker is a knight. Statements are small
propositional formulas over "X is a knight/knave"; a brute-force solver over the 2^n
assignments keeps only puzzles with exactly one solution.
"""

from __future__ import annotations

import itertools
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

from .base import Task
from .example import ANSWER_MARK, Example

NAMES = ("Alice", "Bob", "Carol", "Dave", "Eve", "Frank", "Grace", "Henry", "Ivy", "Jack", "Kate", "Leo")


@dataclass(frozen=True)
class Is:
    """Person ``who`` is a knight (``knight=True``) or a knave."""

    who: int
    knight: bool


@dataclass(frozen=True)
class Op:
    """``kind`` in not / and / or / if / iff over one or two sub-statements."""

    kind: str
    args: tuple[Statement, ...]


Statement = Is | Op


def evaluate(st: Statement, assignment: Sequence[bool]) -> bool:
    if isinstance(st, Is):
        return assignment[st.who] == st.knight
    a = [evaluate(x, assignment) for x in st.args]
    if st.kind == "not":
        return not a[0]
    if st.kind == "and":
        return a[0] and a[1]
    if st.kind == "or":
        return a[0] or a[1]
    if st.kind == "if":
        return (not a[0]) or a[1]
    if st.kind == "iff":
        return a[0] == a[1]
    raise ValueError(f"unknown statement kind {st.kind!r}")


def render(st: Statement, names: Sequence[str]) -> str:
    if isinstance(st, Is):
        return f"{names[st.who]} is a {'knight' if st.knight else 'knave'}"
    a = [render(x, names) for x in st.args]
    if st.kind == "not":
        return f"it is false that {a[0]}"
    if st.kind == "and":
        return f"{a[0]} and {a[1]}"
    if st.kind == "or":
        return f"{a[0]} or {a[1]}"
    if st.kind == "if":
        return f"if {a[0]} then {a[1]}"
    return f"{a[0]} if and only if {a[1]}"


def solutions(statements: Sequence[Statement]) -> list[tuple[bool, ...]]:
    """Every assignment (True = knight) under which each speaker's statement has their truth value."""
    n = len(statements)
    return [a for a in itertools.product((True, False), repeat=n)
            if all(evaluate(st, a) == a[i] for i, st in enumerate(statements))]


def random_statement(rng: random.Random, speaker: int, n: int) -> Statement:
    others = [i for i in range(n) if i != speaker]

    def atom():
        return Is(rng.choice(others) if rng.random() < 0.85 else speaker, rng.random() < 0.5)

    kind = rng.choice(["is", "is", "not", "and", "or", "if", "iff"])
    if kind == "is":
        return atom()
    if kind == "not":
        return Op("not", (atom(),))
    a, b = atom(), atom()
    while b.who == a.who and n > 2:
        b = atom()
    return Op(kind, (a, b))


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:]


def format_assignment(assignment: Sequence[bool], names: Sequence[str]) -> str:
    return ", ".join(f"{nm} is a {'knight' if k else 'knave'}" for nm, k in zip(names, assignment, strict=True))


_CLAIM = re.compile(r"\b([A-Za-z]+)\s+is\s+a\s+(knight|knave)\b", re.IGNORECASE)


def parse_assignment(text: str, names: Sequence[str]) -> tuple[bool, ...] | None:
    """Roles named in ``text`` for every person, or None if someone is missing or contradicted."""
    roles = {}
    lower = {nm.lower(): i for i, nm in enumerate(names)}
    for who, role in _CLAIM.findall(text):
        i = lower.get(who.lower())
        if i is None:
            return None
        knight = role.lower() == "knight"
        if roles.setdefault(i, knight) != knight:
            return None
    if len(roles) != len(names):
        return None
    return tuple(roles[i] for i in range(len(names)))


class KnightsAndKnaves(Task):
    """Level n: n inhabitants, n in 2..8; every puzzle has exactly one solution."""

    name = "knights"
    levels = tuple(range(2, 9))

    def __init__(self, max_tries: int = 10_000):
        self.max_tries = max_tries

    def puzzle(self, rng: random.Random, n: int):
        for _ in range(self.max_tries):
            statements = [random_statement(rng, i, n) for i in range(n)]
            sols = solutions(statements)
            if len(sols) == 1:
                return statements, sols[0]
        raise RuntimeError(f"no unique-solution puzzle with {n} people in {self.max_tries} tries")

    def make(self, rng: random.Random, level: int) -> Example:
        names = rng.sample(NAMES, level)
        statements, sol = self.puzzle(rng, level)
        says = " ".join(f'{names[i]} says: "{_sentence(render(st, names))}."' for i, st in enumerate(statements))
        who = ", ".join(names[:-1]) + " and " + names[-1]
        prompt = (f"On an island, knights always tell the truth and knaves always lie. You meet {level} "
                  f"inhabitants: {who}. {says} Who is a knight and who is a knave?")
        answer = format_assignment(sol, names)
        steps = " ".join(
            f"{names[i]} is a {'knight' if sol[i] else 'knave'}, so \"{render(st, names)}\" is "
            f"{'true' if sol[i] else 'false'}." for i, st in enumerate(statements))
        solution = f"{steps} {ANSWER_MARK} {answer}"
        return Example(prompt=prompt, answer=answer, level=level, solution=solution,
                       meta={"names": names, "solution": list(sol), "statements": statements})

    def check(self, example: Example, answer: str) -> bool:
        got = parse_assignment(answer, example.meta["names"])
        return got is not None and list(got) == list(example.meta["solution"])
