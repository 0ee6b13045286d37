"""User data: a JSONL file of ``{"prompt": ..., "answer": ...}`` (optional ``"level"``), with a
pluggable reward.

Rewards: ``exact`` (string equality after stripping), ``numeric`` (numbers equal within 1e-6),
``contains`` (the reference occurs in the extracted answer), or ``module:function``: a
callable ``f(response: str, answer: str) -> float`` importable from the Python path.

A number answer keeps its text as written (``1e2`` stays "1e2"); the same prompt with two
different answers is refused, naming both lines. With a built-in reward, answers that no response
could ever match (several lines, the ``####`` marker) and empty answers (which any response ending
in ``####`` matches) are refused with the file and line; answers that are not numbers get a
warning under ``numeric``.

A ``module:function`` reward must return a finite real number in [-REWARD_LIMIT, REWARD_LIMIT]
(``True``/``False`` count as 1/0; accuracy counts rewards >= 1 as correct). Each call runs in a
helper thread with a timeout. A call that raises or returns anything else either stops the run
with an error naming the reward, the example and the value (``on_error="fail"``), or scores that
response 0 and is counted (``"zero"``); a call that times out, or that tries to end the process
(``sys.exit()``, any ``BaseException`` that is not an ``Exception``), always stops the run with a
``RewardError``. A ``KeyboardInterrupt`` in the main thread (Ctrl-C) still interrupts the run.
"""

from __future__ import annotations

import importlib
import json
import math
import numbers
import os
import random
import threading
from collections.abc import Callable
from pathlib import Path

from .base import Task
from .budget import response_budget
from .example import ANSWER_MARK, Example, extract_answer, prompt_key

REWARD_LIMIT = 1000.0
ON_ERROR = ("fail", "zero")


def _exact(response: str, answer: str, pattern: str | None = None) -> float:
    got = extract_answer(response, pattern)
    return float(got is not None and got.strip() == answer.strip())


def _numeric(response: str, answer: str, pattern: str | None = None) -> float:
    got = extract_answer(response, pattern)
    try:
        return float(got is not None and math.isclose(float(got.replace(",", "")), float(answer), rel_tol=1e-6,
                                                         abs_tol=1e-6))
    except ValueError:
        return 0.0


def _contains(response: str, answer: str, pattern: str | None = None) -> float:
    got = extract_answer(response, pattern)
    return float(got is not None and answer.strip() in got)


REWARDS = {"exact": _exact, "numeric": _numeric, "contains": _contains}


class RewardError(ValueError):
    """A user reward function that failed, timed out or returned something other than a number."""


def load_reward(spec: str) -> Callable[[str, str], float]:
    if spec in REWARDS:
        return REWARDS[spec]
    if ":" not in spec:
        raise ValueError(f"unknown reward {spec!r}: use one of {sorted(REWARDS)} or 'module:function'")
    mod, fn = spec.split(":", 1)
    try:
        f = getattr(importlib.import_module(mod), fn)
    except Exception as e:  # the user's module: any error while importing it
        raise ValueError(f"cannot load reward function {spec!r}: {type(e).__name__}: {e}") from None
    if not callable(f):
        raise ValueError(f"reward {spec!r} is not callable")
    return f


def _answer_problem(answer: str, reward: str) -> str | None:
    """Why no response, or every response, would get a built-in ``reward`` for ``answer``."""
    if not answer.strip():
        return (f"'answer' is empty: with reward={reward}, any response that ends in '{ANSWER_MARK}' would be "
                f"rewarded; give the answer, or use a module:function reward")
    if len(answer.strip().splitlines()) > 1:
        return (f"'answer' spans several lines, but reward={reward} reads a response's answer from the one line "
                f"after '{ANSWER_MARK}', so no response could match it; put it on one line, or use a "
                f"module:function reward")
    if ANSWER_MARK in answer:
        return (f"'answer' contains the answer marker '{ANSWER_MARK}', but a response's answer is read after its "
                f"last marker, so no response could match it")
    return None


def _is_number(answer: str) -> bool:
    try:
        return math.isfinite(float(answer))
    except ValueError:
        return False


class _Number(str):
    """A JSON number as written in the file: an answer ``1e2`` stays "1e2" (``float`` would make it
    "100.0", which ``exact`` never matches against the file's answer)."""


def _numbers(value):
    """``value`` with its JSON numbers (``_Number``) read as int or float, for every field but the answer."""
    if isinstance(value, _Number):
        return float(value) if any(c in value for c in ".eEIN") else int(value)  # I, N: Infinity, NaN
    if isinstance(value, list):
        return [_numbers(v) for v in value]
    if isinstance(value, dict):
        return {k: _numbers(v) for k, v in value.items()}
    return value


def _same_answer(a: str, b: str, reward: str) -> bool:
    a, b = a.strip(), b.strip()
    return a == b or (reward == "numeric" and _is_number(a) and _is_number(b) and float(a) == float(b))


def _surrogate_at(text: str) -> int | None:
    """Where ``text`` holds a lone surrogate (which no UTF-8 text can), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return e.start
    return None


def read_jsonl(path, reward: str = "exact") -> list[Example]:
    """Examples of a JSONL file (UTF-8); a malformed line raises ValueError naming the file and
    line. A number answer keeps its text as written (``1e2``, ``0.0``, ``1.50``). The same prompt
    (``prompt_key``) with two different answers is refused, naming both lines. With a built-in
    ``reward``, answers it could never (or would always) reward are refused."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"JSONL task file not found: {path}")
    out = []
    first: dict[str, Example] = {}  # the first example of each prompt_key
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{where}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                                 f"save the file as UTF-8") from None
            if lineno == 1:
                line = line.removeprefix("\ufeff")  # a byte-order mark
            if not line.strip():
                continue
            try:
                row = json.loads(line, parse_int=_Number, parse_float=_Number, parse_constant=_Number)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected an object with 'prompt' and 'answer', got "
                                 f"{type(_numbers(row)).__name__}")
            row = {k: v if k == "answer" else _numbers(v) for k, v in row.items()}
            missing = [k for k in ("prompt", "answer") if k not in row]
            if missing:
                raise ValueError(f"{where}: missing key(s) {missing}; each line needs 'prompt' and 'answer'")
            if not isinstance(row["prompt"], str) or not row["prompt"].strip():
                raise ValueError(f"{where}: 'prompt' must be a non-empty string")
            for key in ("prompt", "answer", "solution"):  # a \ud800 escape: valid JSON, not text
                if isinstance(row.get(key), str) and (i := _surrogate_at(row[key])) is not None:
                    raise ValueError(f"{where}: '{key}' holds a lone surrogate (\\u{ord(row[key][i]):04x} at "
                                     f"character {i + 1}), which is not text; fix its \\u escape")
            if not isinstance(row["answer"], (str, int, float)) or isinstance(row["answer"], bool):
                raise ValueError(f"{where}: 'answer' must be a string or a number, got {type(row['answer']).__name__}")
            level = row.get("level", 0)
            if not isinstance(level, int) or isinstance(level, bool):
                raise ValueError(f"{where}: 'level' must be an integer, got {level!r}")
            answer = str(row["answer"])  # a number (_Number): its text in the file, a plain str
            problem = _answer_problem(answer, reward) if reward in REWARDS else None
            if problem:
                raise ValueError(f"{where}: {problem}")
            example = Example(prompt=row["prompt"], answer=answer, level=level, solution=row.get("solution"),
                              meta={"line": lineno})
            earlier = first.setdefault(prompt_key(example.prompt), example)
            if not _same_answer(earlier.answer, answer, reward):
                line0 = earlier.meta["line"]
                raise ValueError(f"{where}: the prompt of line {line0} (the same after case-folding and collapsing "
                                 f"whitespace) with another answer: {answer!r:.80} here, {earlier.answer!r:.80} on "
                                 f"line {line0}; give each prompt one answer")
            out.append(example)
    if not out:
        raise ValueError(f"{path}: no examples")
    if reward == "numeric":
        odd = [e.meta["line"] for e in out if not _is_number(e.answer)]
        if odd:
            print(f"warning: {path}: {len(odd)} answer(s) are not numbers (first on line {odd[0]}): reward=numeric "
                  f"never rewards them", flush=True)
    return out


def reward_value_problem(value) -> str | None:
    """Why a user reward's return value is not a reward (a finite real number within
    +-REWARD_LIMIT), or None."""
    if not isinstance(value, numbers.Real):
        hint = {str: "return a number, not its text", type(None): "does a branch miss its return?"}
        extra = hint.get(type(value), "return a Python float, e.g. value.item() for a tensor")
        return f"returned {value!r:.80} ({type(value).__name__}), not a real number ({extra})"
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an int (or a fraction) too large for a float: its magnitude
        return f"returned a number of about {'-' if value < 0 else ''}10^{_log10(abs(value))}, too large for a float " \
               f"(not a finite number)"
    if not finite:
        return f"returned {value}, not a finite number"
    if abs(value) > REWARD_LIMIT:
        return f"returned {value:g}, outside [-{REWARD_LIMIT:g}, {REWARD_LIMIT:g}]"
    return None


def _log10(value) -> int:
    """floor(log10(value)) of a positive real too large for a float (an int, a fraction, ...)."""
    if isinstance(value, numbers.Rational):
        n, d = int(value.numerator), int(value.denominator)
        return math.floor(math.log10(n) - math.log10(d))
    return math.floor(math.log10(int(value)))


class _Timeout(Exception):
    pass


class _Ended(Exception):
    """A call that raised a ``BaseException`` that is not an ``Exception`` (``sys.exit()``,
    ``KeyboardInterrupt`` raised by the function itself, ...): it asked to end the process."""

    def __init__(self, error: BaseException):
        super().__init__(error)
        self.error = error

    def describe(self) -> str:
        e = self.error
        if isinstance(e, SystemExit):
            return f"called sys.exit({'' if e.code is None else repr(e.code)})"
        return f"raised {type(e).__name__}" + (f": {e}" if str(e) else "")


def _end_a_fork(pid: int) -> None:
    """A copy of the trainer forked inside the reward (``os.fork()`` without an exec) ends as the
    reward returns in it, before it runs any of the trainer's code (rlad.signals.check_writer
    also stops it at any write)."""
    if os.getpid() != pid:
        os._exit(0)


def call_with_timeout(fn: Callable, args: tuple, timeout: float):
    """``fn(*args)`` in a daemon thread, waiting at most ``timeout`` seconds (0: no limit, called
    here). A call that overruns raises ``_Timeout``; its thread is left behind (Python cannot stop
    it) and, being a daemon, does not keep the process alive. A call that raises a
    ``BaseException`` that is not an ``Exception`` (``sys.exit()``) raises ``_Ended``: never the
    caller's exit. Called here (no limit), a ``KeyboardInterrupt`` propagates (it may be Ctrl-C);
    in the thread it can only come from the function, since signals reach the main thread."""
    pid = os.getpid()
    if not timeout:
        try:
            value = fn(*args)
        except (Exception, KeyboardInterrupt):
            raise
        except BaseException as e:  # SystemExit, GeneratorExit, ...
            raise _Ended(e) from None
        finally:
            _end_a_fork(pid)
        return value
    box = {}

    def target():
        try:
            box["value"] = fn(*args)
        except BaseException as e:  # handed to the caller
            box["error"] = e
        finally:
            _end_a_fork(pid)

    worker = threading.Thread(target=target, name=f"rlad-reward-{getattr(fn, '__name__', 'fn')}", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise _Timeout
    if "error" in box:
        if not isinstance(box["error"], Exception):
            raise _Ended(box["error"])
        raise box["error"]
    return box["value"]


class JsonlTask(Task):
    """Examples are drawn (with replacement) from the file; levels are those found in it."""

    name = "jsonl"

    def __init__(self, path, reward: str = "exact", *, timeout: float = 60.0, on_error: str = "fail"):
        if on_error not in ON_ERROR:
            raise ValueError(f"reward on_error={on_error!r}: choose one of {', '.join(ON_ERROR)}")
        self.path = str(path)
        self.examples = read_jsonl(path, reward)
        self.reward_name = reward
        self.reward_fn = load_reward(reward)
        self.user_reward = reward not in REWARDS  # a module:function: checked, timed, its failures counted
        self.timeout, self.on_error = timeout, on_error
        self.failures = 0  # responses scored 0 because the user reward failed (on_error="zero")
        self.warned = False
        self.by_level = _by_level(self.examples)  # indexed once: a draw does not scan the file
        self.levels = tuple(sorted(self.by_level))

    def make(self, rng: random.Random, level: int) -> Example:
        return rng.choice(self.by_level[level])

    def hold_out(self, keys: set[str]) -> int:
        """Drop the rows whose prompt is in ``keys`` (the eval set). ``levels`` stays that of the
        file; ``build_held_out`` refuses a trained level left without rows."""
        keep = [e for e in self.examples if prompt_key(e.prompt) not in keys]
        dropped = len(self.examples) - len(keep)
        self.examples = keep
        self.by_level = _by_level(keep)
        return dropped

    def response_budget(self, tokenizer, levels):
        """Every example of ``levels``: its ``solution``, else its ``#### answer`` line (see
        ``rlad.tasks.budget``)."""
        return response_budget([e for lv in levels for e in self.by_level[lv]], tokenizer,
                               f"reference response in {self.path} (its 'solution', else '{ANSWER_MARK} answer')")

    def reward(self, example: Example, response: str) -> float:
        if not self.user_reward:
            return float(self.reward_fn(response, example.answer, self.answer_pattern))
        where = f"reward {self.reward_name!r} on the example at {self.path}:{example.meta.get('line')} (response " \
                f"{response[:80]!r})"
        try:
            value = call_with_timeout(self.reward_fn, (response, example.answer), self.timeout)
        except _Timeout:
            raise RewardError(f"{where}: took more than reward_timeout={self.timeout:g} s; fix the function, or "
                              f"raise reward_timeout") from None
        except _Ended as e:  # never scored 0: the function wanted the process to end
            raise RewardError(f"{where}: {e.describe()}; a reward must return a number, not end the process; fix "
                              f"the function") from None
        except Exception as e:
            problem = f"raised {type(e).__name__}: {e}"
        else:
            problem = reward_value_problem(value)
            if problem is None:
                return float(value)
        message = f"{where}: {problem}"
        if self.on_error == "fail":
            raise RewardError(f"{message}; fix the function, or set reward_errors=zero to score such responses 0")
        self.failures += 1
        if not self.warned:  # the first failure in full; the log lines count the others
            self.warned = True
            print(f"warning: {message}; scored 0 (reward_errors=zero); failures are counted in the metrics as "
                  f"reward_errors", flush=True)
        return 0.0

    def check_reward(self) -> None:
        """Call a user reward once, on the first example and a response that states its answer, so
        a function that cannot be called, raises, hangs or returns a non-number is caught before
        any work starts (the failure policy applies; the call is not counted)."""
        if self.user_reward:
            ex = self.examples[0]
            self.reward(ex, f"{ANSWER_MARK} {ex.answer}")
            self.failures = 0
            self.warned = False


def _by_level(examples: list[Example]) -> dict[int, list[Example]]:
    """The examples of each level, in file order."""
    out: dict[int, list[Example]] = {}
    for e in examples:
        out.setdefault(e.level, []).append(e)
    return out
