"""Built-in tasks and the JSONL loader: generators, answer checkers, malformed data."""

import itertools
import json
import random

import pytest

from rlad.tasks import ANSWER_MARK, Arithmetic, Echo, KnightsAndKnaves, extract_answer, get_task, read_jsonl
from rlad.tasks.jsonl import JsonlTask, load_reward
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
@pytest.mark.parametrize("level", Arithmetic.levels)
def test_arithmetic_answers_are_right(level):
    task = Arithmetic()
    rng = random.Random(level)
    for _ in range(50):
        ex = task.make(rng, level)
        assert int(ex.answer) == eval(ex.meta["expr"])  # Python's own arithmetic as the reference
        assert ex.meta["expr"].count("+") + ex.meta["expr"].count("-") == level
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
