"""Built-in tasks and the JSONL loader: generators, answer checkers, malformed data."""

import itertools
import json
import random
import sys
import threading

import pytest

from rlad.tasks import ANSWER_MARK, Arithmetic, Chains, Echo, KnightsAndKnaves, extract_answer, get_task, read_jsonl
from rlad.tasks.jsonl import JsonlTask, RewardError, load_reward
from rlad.tasks.knights import Is, Op, evaluate, parse_assignment, solutions


# ---------------------------------------------------------------- knights and knaves
@pytest.mark.parametrize("n", range(2, 9))
def test_every_puzzle_has_exactly_one_solution(n):
    task = KnightsAndKnaves()
    rng = random.Random(n)
    for _ in range(15 if n < 8 else 6):
        ex = task.make(rng, n)
        names = ex.meta["names"]
        assert len(names) == n == len(set(names))
        # brute force over all 2^n assignments of the puzzle's statements
        statements = ex.meta["statements"]
        consistent = [a for a in itertools.product((True, False), repeat=n)
                      if all(evaluate(st, a) == a[i] for i, st in enumerate(statements))]
        assert consistent == [tuple(ex.meta["solution"])]
        assert task.reward(ex, ex.solution) == 1.0


def test_checker_accepts_the_solution_in_any_form_and_rejects_others():
    task = KnightsAndKnaves()
    ex = task.make(random.Random(3), 4)
    names, sol = ex.meta["names"], ex.meta["solution"]

    def say(assignment, order=None):
        order = order or range(len(names))
        return " and ".join(f"{names[i]} is a {'knight' if assignment[i] else 'knave'}" for i in order)

    assert task.reward(ex, f"{ANSWER_MARK} {say(sol)}") == 1.0
    assert task.reward(ex, f"thinking... {ANSWER_MARK} {say(sol, [3, 1, 0, 2]).upper()}") == 1.0
    for i in range(len(names)):  # every single flip is wrong
        wrong = list(sol)
        wrong[i] = not wrong[i]
        assert task.reward(ex, f"{ANSWER_MARK} {say(wrong)}") == 0.0
    assert task.reward(ex, f"{ANSWER_MARK} {say(sol, [0, 1, 2])}") == 0.0  # someone missing
    assert task.reward(ex, f"{ANSWER_MARK} {say(sol)}, {names[0]} is a {'knave' if sol[0] else 'knight'}") == 0.0
    assert task.reward(ex, f"{ANSWER_MARK} {say(sol)}, Zed is a knight") == 0.0  # unknown person
    assert task.reward(ex, say(sol)) == 0.0  # no answer marker


def test_statement_semantics_by_hand():
    # A says "B is a knave"; B says "A and B are both knights" -> A knight, B knave (unique)
    statements = [Is(1, False), Op("and", (Is(0, True), Is(1, True)))]
    assert solutions(statements) == [(True, False)]
    a = (True, False)
    assert evaluate(Op("if", (Is(0, False), Is(1, True))), a)       # false antecedent
    assert not evaluate(Op("iff", (Is(0, True), Is(1, True))), a)
    assert evaluate(Op("or", (Is(0, False), Is(1, False))), a)
    assert evaluate(Op("not", (Is(1, True),)), a)
    assert parse_assignment("alice is a knight, BOB is a knave", ["Alice", "Bob"]) == (True, False)


# ---------------------------------------------------------------- arithmetic and echo
@pytest.mark.parametrize("cls", [Arithmetic, Chains])
@pytest.mark.parametrize("level", Arithmetic.levels)
def test_arithmetic_answers_are_right(cls, level):
    task = cls()
    rng = random.Random(level)
    for _ in range(50):
        ex = task.make(rng, level)
        assert int(ex.answer) == eval(ex.meta["expr"])  # Python's own arithmetic as the reference
        assert ex.meta["expr"].count("+") + ex.meta["expr"].count("-") == level
        operands = ex.meta["expr"].replace("-", "+").split("+")
        assert max(map(int, operands)) < (10 if cls is Chains or level == 1 else 100)
        assert task.reward(ex, ex.solution) == 1.0
        assert task.reward(ex, f"{ANSWER_MARK} {int(ex.answer) + 1}") == 0.0
    assert task.reward(ex, f"{ANSWER_MARK} {ex.answer}.") == 1.0
    assert task.reward(ex, f"{ANSWER_MARK} twelve") == 0.0


def test_echo():
    task = Echo()
    ex = task.make(random.Random(0), 3)
    assert len(ex.answer) == 3 and ex.prompt == f"Echo {ex.answer}."
    assert task.reward(ex, ex.solution) == 1.0 and task.reward(ex, f"{ANSWER_MARK} 000x") == 0.0


def test_extract_answer():
    assert extract_answer("a #### 12\nmore") == "12"
    assert extract_answer("#### 1 #### 2") == "2"
    assert extract_answer("no marker") is None
    assert extract_answer("####") == ""


def test_sample_levels():
    task = Arithmetic()
    exs = task.sample(random.Random(0), 40, [2, 4])
    assert {e.level for e in exs} == {2, 4}
    with pytest.raises(ValueError, match=r"task 'arithmetic' has levels \[1, 2, 3, 4, 5\], got \[9\]"):
        task.sample(random.Random(0), 4, [9])
    with pytest.raises(ValueError, match="unknown task 'chess'"):
        get_task("chess")


# ---------------------------------------------------------------- JSONL user data
def _write(tmp_path, lines):
    p = tmp_path / "data.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


def test_jsonl_task(tmp_path):
    p = _write(tmp_path, [json.dumps({"prompt": "2+2?", "answer": 4, "level": 1}),
                          "", json.dumps({"prompt": "capital of France?", "answer": "Paris", "level": 2})])
    task = get_task(f"jsonl:{p}", reward="exact")
    assert isinstance(task, JsonlTask) and task.levels == (1, 2)
    ex = task.make(random.Random(0), 1)
    assert ex.answer == "4" and ex.meta["line"] == 1
    assert task.reward(ex, "#### 4") == 1.0 and task.reward(ex, "#### 5") == 0.0
    num = JsonlTask(p, reward="numeric")
    assert num.reward(num.make(random.Random(0), 1), "#### 4.0000001") == 1.0
    cont = JsonlTask(p, reward="contains")
    assert cont.reward(cont.make(random.Random(0), 2), "#### it is Paris.") == 1.0


@pytest.mark.parametrize("line,msg", [
    ('{"prompt": "x", "answer": 1', "invalid JSON"),
    ('["x", 1]', "expected an object"),
    ('{"prompt": "x"}', r"missing key\(s\) \['answer'\]"),
    ('{"prompt": "", "answer": 1}', "'prompt' must be a non-empty string"),
    ('{"prompt": "x", "answer": [1]}', "'answer' must be a string or a number"),
    ('{"prompt": "x", "answer": 1, "level": "hard"}', "'level' must be an integer"),
])
def test_jsonl_errors_name_file_and_line(tmp_path, line, msg):
    p = _write(tmp_path, [json.dumps({"prompt": "ok", "answer": 1}), line])
    with pytest.raises(ValueError, match=rf"data.jsonl:2: {msg}"):
        read_jsonl(p)


def test_jsonl_missing_and_empty(tmp_path):
    with pytest.raises(FileNotFoundError, match="JSONL task file not found"):
        read_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="no examples"):
        read_jsonl(_write(tmp_path, [""]))


def test_pluggable_reward():
    f = load_reward("rlad.tasks.jsonl:_contains")
    assert f("#### abc", "b") == 1.0
    with pytest.raises(ValueError, match="unknown reward 'fuzzy'"):
        load_reward("fuzzy")
    with pytest.raises(ValueError, match="cannot load reward function 'nosuchmod:f'"):
        load_reward("nosuchmod:f")


# ---------------------------------------------------------------- JSONL answers no response could match
@pytest.mark.parametrize("answer,msg", [
    pytest.param("", r"'answer' is empty: with reward=exact, any response that ends in '####' would be rewarded",
                 id="empty"),
    pytest.param("   ", r"'answer' is empty", id="whitespace"),
    pytest.param("12\n13", r"'answer' spans several lines, but reward=exact reads a response's answer from the one "
                           r"line after '####', so no response could match it", id="newline"),
    pytest.param("a\u2028b", r"'answer' spans several lines", id="line-separator"),
    pytest.param("#### 12", r"'answer' contains the answer marker '####'", id="marker"),
])
def test_jsonl_answers_that_are_always_or_never_rewarded_are_refused(tmp_path, answer, msg):
    p = _write(tmp_path, [json.dumps({"prompt": "ok", "answer": 1}), json.dumps({"prompt": "x", "answer": answer})])
    with pytest.raises(ValueError, match=rf"data.jsonl:2: {msg}"):
        read_jsonl(p)
    assert len(read_jsonl(p, reward="mymodule:score")) == 2  # a user reward decides what its answers mean


def test_jsonl_numeric_answers_that_are_not_numbers_are_reported(tmp_path, capsys):
    p = _write(tmp_path, [json.dumps({"prompt": "ok", "answer": 1}), json.dumps({"prompt": "x", "answer": "Paris"})])
    read_jsonl(p, reward="numeric")
    assert "data.jsonl: 1 answer(s) are not numbers (first on line 2): reward=numeric never rewards them" in \
        capsys.readouterr().out


def test_jsonl_that_is_not_utf8_names_the_file_and_line(tmp_path):
    p = tmp_path / "data.jsonl"
    p.write_bytes(json.dumps({"prompt": "ok", "answer": 1}).encode() + b'\n{"prompt": "caf\xe9", "answer": 1}\n')
    with pytest.raises(ValueError, match=r"data.jsonl:2: not valid UTF-8 \(byte 0xe9 at column 16\); save the file "
                                         r"as UTF-8"):
        read_jsonl(p)


# ---------------------------------------------------------------- JSONL: number answers, one answer per prompt
def test_jsonl_number_answers_keep_the_text_written_in_the_file(tmp_path):
    """``1e2`` was stored as "100.0" and ``1.50`` as "1.5", which a response writing the file's
    answer never matched under ``exact``; every number keeps its text (levels are still integers)."""
    lines = ['{"prompt": "a", "answer": 0.0}', '{"prompt": "b", "answer": 1e2, "level": 2}',
             '{"prompt": "c", "answer": 1.50}', '{"prompt": "d", "answer": -0}', '{"prompt": "e", "answer": 4}',
             '{"prompt": "f", "answer": 12345678901234567890123}', '{"prompt": "g", "answer": 2.0E-3}']
    examples = read_jsonl(_write(tmp_path, lines))
    assert [e.answer for e in examples] == ["0.0", "1e2", "1.50", "-0", "4", "12345678901234567890123", "2.0E-3"]
    assert [e.level for e in examples] == [0, 2, 0, 0, 0, 0, 0] and isinstance(examples[1].level, int)
    task = JsonlTask(_write(tmp_path, lines))
    assert all(task.reward(e, f"#### {e.answer}") == 1.0 for e in task.examples)
    numeric = JsonlTask(_write(tmp_path, lines), reward="numeric")
    assert numeric.reward(numeric.examples[1], "#### 100") == 1.0
    with pytest.raises(ValueError, match=r"data.jsonl:1: 'level' must be an integer, got 1.0"):
        read_jsonl(_write(tmp_path, ['{"prompt": "a", "answer": 1, "level": 1.0}']))
    with pytest.raises(ValueError, match=r"data.jsonl:1: 'prompt' must be a non-empty string"):
        read_jsonl(_write(tmp_path, ['{"prompt": 5, "answer": 1}']))


def test_jsonl_the_same_prompt_with_two_answers_is_refused_with_both_lines(tmp_path):
    rows = [json.dumps({"prompt": "What is 2+2?", "answer": 4}), json.dumps({"prompt": "other", "answer": 1}),
            json.dumps({"prompt": "  what is 2+2? ", "answer": "5", "level": 3})]
    with pytest.raises(ValueError, match=r"^.*data.jsonl:3: the prompt of line 1 \(the same after case-folding and "
                                         r"collapsing whitespace\) with another answer: '5' here, '4' on line 1; give "
                                         r"each prompt one answer$"):
        read_jsonl(_write(tmp_path, rows))
    # the same answer twice is a duplicate row, not a contradiction; so are 2 and 2.0 under numeric
    same = [json.dumps({"prompt": "Q", "answer": 4}), json.dumps({"prompt": "q", "answer": " 4"})]
    assert len(read_jsonl(_write(tmp_path, same))) == 2
    numbers = ['{"prompt": "Q", "answer": 2}', '{"prompt": "Q", "answer": 2.0}']
    assert len(read_jsonl(_write(tmp_path, numbers), reward="numeric")) == 2
    with pytest.raises(ValueError, match=r"data.jsonl:2: the prompt of line 1 .* '2.0' here, '2' on line 1"):
        read_jsonl(_write(tmp_path, numbers), reward="exact")


# ---------------------------------------------------------------- JSONL: indexed once
class _NoScan(list):
    def __iter__(self):
        raise AssertionError("make() scanned every example")


def test_jsonl_draws_do_not_rescan_the_file(tmp_path):
    """Examples are indexed by level once; a draw picks from its level's list (the same draws as
    filtering the file each time)."""
    rows = [json.dumps({"prompt": f"p{i}", "answer": i, "level": i % 3}) for i in range(30)]
    task = JsonlTask(_write(tmp_path, rows))
    examples = list(task.examples)
    expect_rng, rng = random.Random(7), random.Random(7)
    expected = [expect_rng.choice([e for e in examples if e.level == lv]) for lv in [0, 2, 1, 2, 0]]
    task.examples = _NoScan(examples)
    assert [task.make(rng, lv) for lv in [0, 2, 1, 2, 0]] == expected


# ---------------------------------------------------------------- user reward functions
REWARDS_MODULE = '''
import threading

import torch

release = threading.Event()

def raises(response, answer):
    raise ZeroDivisionError("boom")

def none(response, answer):
    return None

def text(response, answer):
    return "1"

def huge(response, answer):
    return 1e300

def nan(response, answer):
    return float("nan")

def tensor(response, answer):
    return torch.tensor(1.0)

def boolean(response, answer):
    return answer in response

def partial(response, answer):
    return 0.25

def hangs(response, answer):
    release.wait(600)
    return 1.0

def fails_without_marker(response, answer):
    if "####" not in response:
        raise KeyError("no marker")
    return 1.0

def exits(response, answer):
    import sys
    sys.exit(3)

def exits_quietly(response, answer):
    raise SystemExit

def interrupts(response, answer):
    raise KeyboardInterrupt
'''


@pytest.fixture
def user_rewards(tmp_path, monkeypatch):
    """A module ``user_rewards`` of reward functions, importable, and a one-line JSONL file."""
    (tmp_path / "user_rewards.py").write_text(REWARDS_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "user_rewards", raising=False)  # this test's copy, its event not yet set
    yield _write(tmp_path, [json.dumps({"prompt": "Echo 5.", "answer": 5})])
    if "user_rewards" in sys.modules:
        sys.modules["user_rewards"].release.set()  # let a hung call's thread finish


@pytest.mark.parametrize("fn,problem", [
    pytest.param("raises", r"raised ZeroDivisionError: boom", id="raises"),
    pytest.param("none", r"returned None \(NoneType\), not a real number \(does a branch miss its return\?\)",
                 id="none"),
    pytest.param("text", r"returned '1' \(str\), not a real number \(return a number, not its text\)", id="string"),
    pytest.param("huge", r"returned 1e\+300, outside \[-1000, 1000\]", id="huge"),
    pytest.param("nan", r"returned nan, not a finite number", id="nan"),
    pytest.param("tensor", r"returned tensor\(1.\) \(Tensor\), not a real number \(return a Python float, e.g. "
                           r"value.item\(\) for a tensor\)", id="tensor"),
])
def test_a_failing_user_reward_names_the_reward_the_example_and_the_value(user_rewards, fn, problem):
    task = JsonlTask(user_rewards, reward=f"user_rewards:{fn}")
    ex = task.examples[0]
    with pytest.raises(ValueError, match=rf"^reward 'user_rewards:{fn}' on the example at .*data.jsonl:1 \(response "
                                         rf"'#### 6'\): {problem}; fix the function, or set reward_errors=zero to "
                                         rf"score such responses 0$"):
        task.reward(ex, "#### 6")
    with pytest.raises(ValueError, match=problem):  # caught before any work starts
        task.check_reward()


def test_user_rewards_accept_real_numbers(user_rewards):
    task = JsonlTask(user_rewards, reward="user_rewards:boolean")
    assert task.reward(task.examples[0], "#### 5") == 1.0 and task.reward(task.examples[0], "#### 6") == 0.0
    task = JsonlTask(user_rewards, reward="user_rewards:partial")
    assert task.reward(task.examples[0], "anything") == 0.25


def test_a_hanging_user_reward_times_out(user_rewards):
    task = JsonlTask(user_rewards, reward="user_rewards:hangs", timeout=0.2)
    with pytest.raises(ValueError, match=r"reward 'user_rewards:hangs' on the example at .*data.jsonl:1 \(response "
                                         r"'#### 5'\): took more than reward_timeout=0.2 s; fix the function, or "
                                         r"raise reward_timeout"):
        task.reward(task.examples[0], "#### 5")


def test_reward_errors_zero_scores_a_failing_response_0_and_counts_it(user_rewards, capsys):
    task = JsonlTask(user_rewards, reward="user_rewards:fails_without_marker", on_error="zero")
    ex = task.examples[0]
    assert [task.reward(ex, r) for r in ("#### 5", "no marker", "still none", "#### 5")] == [1.0, 0.0, 0.0, 1.0]
    assert task.failures == 2
    out = capsys.readouterr().out
    assert out.count("warning: reward 'user_rewards:fails_without_marker'") == 1  # the first in full, then counted
    assert "raised KeyError: 'no marker'; scored 0 (reward_errors=zero)" in out
    hang = JsonlTask(user_rewards, reward="user_rewards:hangs", timeout=0.2, on_error="zero")
    with pytest.raises(ValueError, match="took more than reward_timeout"):  # a hang is never scored
        hang.reward(ex, "#### 5")


def test_a_user_reward_module_that_fails_to_import_is_reported(tmp_path, monkeypatch):
    (tmp_path / "broken_rewards.py").write_text("raise RuntimeError('bad module')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match=r"cannot load reward function 'broken_rewards:f': RuntimeError: bad module"):
        load_reward("broken_rewards:f")


# ---------------------------------------------------------------- a reward that ends the process
@pytest.mark.parametrize("timeout", [60.0, 0.0], ids=["thread", "no-timeout"])
@pytest.mark.parametrize("on_error", ["fail", "zero"])
@pytest.mark.parametrize("fn,problem", [("exits", r"called sys.exit\(3\)"), ("exits_quietly", r"called sys.exit\(\)")])
def test_a_user_reward_that_calls_sys_exit_stops_the_run_with_an_error(user_rewards, timeout, on_error, fn, problem):
    """sys.exit() in a reward is never the run's exit (status 0, no summary): it is a RewardError
    naming the reward and the example, whatever reward_errors says (a reward that wants to end the
    process has not scored the response)."""
    task = JsonlTask(user_rewards, reward=f"user_rewards:{fn}", timeout=timeout, on_error=on_error)
    with pytest.raises(RewardError, match=rf"^reward 'user_rewards:{fn}' on the example at .*data.jsonl:1 \(response "
                                          rf"'#### 5'\): {problem}; a reward must return a number, not end the "
                                          rf"process; fix the function$"):
        task.reward(task.examples[0], "#### 5")
    with pytest.raises(RewardError, match=problem):  # caught before any work starts
        task.check_reward()
    assert task.failures == 0


def test_a_keyboard_interrupt_raised_by_a_reward_in_its_thread_is_an_error(user_rewards):
    task = JsonlTask(user_rewards, reward="user_rewards:interrupts", on_error="zero")
    with pytest.raises(RewardError, match=r"data.jsonl:1 \(response '#### 5'\): raised KeyboardInterrupt; a reward "
                                          r"must return a number"):
        task.reward(task.examples[0], "#### 5")
    # without a timeout the reward runs in the main thread, where it cannot be told from Ctrl-C
    with pytest.raises(KeyboardInterrupt):
        JsonlTask(user_rewards, reward="user_rewards:interrupts", timeout=0).reward(task.examples[0], "#### 5")


def test_ctrl_c_while_a_reward_runs_still_interrupts(user_rewards):
    import os
    import signal

    task = JsonlTask(user_rewards, reward="user_rewards:hangs", timeout=30)
    # Python's own Ctrl-C handler, whatever this process inherited: a suite started in the background
    # by a non-interactive shell (`pytest &`) inherits SIGINT ignored, and would wait out the timeout
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT))  # Ctrl-C
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            task.reward(task.examples[0], "#### 5")
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, previous)


def test_rlad_eval_with_a_reward_that_calls_sys_exit_fails_in_one_line(user_rewards, capsys):
    from rlad.cli import main

    assert main(["eval", "--model", "preset:micro", "--task", f"jsonl:{user_rewards}", "--reward",
                 "user_rewards:exits", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rlad eval: error: reward 'user_rewards:exits' on the example at ") and \
        err.endswith("called sys.exit(3); a reward must return a number, not end the process; fix the function\n")
