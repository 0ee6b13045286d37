"""Task-aware response lengths: max_new_tokens unset comes from the task and levels (the longest
worked solution with room to reason), is printed with why, recorded in config.json and kept on
resume; a value set that cannot fit the longest reference solution gets a warning."""

import json
import math
import random
from pathlib import Path

import pytest

from rlad.cli import main
from rlad.launch import train
from rlad.preflight import preflight
from rlad.rollout import encode_text
from rlad.tasks import get_task
from rlad.tasks.budget import ANSWER_ONLY_FLOOR


def _longest(tok, texts):
    return max(len(encode_text(tok, t)) + 1 for t in texts)  # + the EOS


def test_knights_budget_fits_every_worked_solution_with_room(tok):
    task = get_task("knights")
    budget = task.response_budget(tok, [3, 4, 5])
    # an independent draw (another seed than the budget's): every solution, and its answer line, fits
    rng = random.Random(12345)
    fresh = [task.make(rng, lv) for lv in (3, 4, 5) for _ in range(100)]
    fresh_longest = _longest(tok, [e.solution for e in fresh])
    assert fresh_longest + 16 <= budget.tokens  # fits, with room to reason
    assert abs(fresh_longest - budget.longest) <= 0.05 * budget.longest  # the fixed sample finds about the longest
    assert budget.tokens == max(math.ceil(1.5 * budget.longest), budget.longest + 16)
    # the answer line alone is 25 tokens at n=5 (the count): the old default of 32 could not hold the solution
    assert max(len(encode_text(tok, f"#### {e.answer}")) for e in fresh if e.level == 5) == 25
    assert budget.longest > 100 and budget.answers_only == 0


def test_short_answers_get_at_least_16_tokens_of_room(tok):
    budget = get_task("echo").response_budget(tok, [1])
    assert budget.longest == _longest(tok, ["#### 7"]) and budget.tokens == budget.longest + 16


def test_jsonl_budget_uses_solutions_and_a_floor_for_bare_answers(tmp_path, tok):
    p = tmp_path / "data.jsonl"
    long = "Alice is a knight, so Bob is a knave, and so on for a while. #### 12"
    p.write_text(json.dumps({"prompt": "Q1", "answer": "12", "solution": long}) + "\n"
                 + json.dumps({"prompt": "Q2", "answer": "7", "solution": "#### 7", "level": 2}) + "\n")
    task = get_task(f"jsonl:{p}")
    both = task.response_budget(tok, [0, 2])
    assert both.longest == _longest(tok, [long]) and both.answers_only == 0
    assert task.response_budget(tok, [2]).longest == _longest(tok, ["#### 7"])  # only the levels asked for
    p.write_text(json.dumps({"prompt": "Q1", "answer": "12"}) + "\n")
    bare = get_task(f"jsonl:{p}").response_budget(tok, [0])
    assert bare.answers_only == 1 and bare.tokens == ANSWER_ONLY_FLOOR
    assert "no worked solution" in bare.explain()


def test_unset_max_new_tokens_is_resolved_before_the_run_and_printed(tiny_config, tok, capsys):
    cfg = tiny_config(task="knights", levels=[3, 4, 5], max_new_tokens=None)
    setup = preflight(cfg)
    want = get_task("knights").response_budget(tok, [3, 4, 5])
    assert setup.cfg.max_new_tokens == want.tokens and cfg.max_new_tokens is None
    out = capsys.readouterr().out
    assert f"max_new_tokens: {want.tokens}, from the task (the longest worked solution (256 drawn per level) of " \
           f"knights levels [3, 4, 5] is {want.longest} tokens with its EOS" in out


def test_an_explicit_value_wins_and_one_too_short_is_warned_about(tiny_config, tok, capsys):
    setup = preflight(tiny_config(task="knights", levels=[3, 4, 5], max_new_tokens=32))
    assert setup.cfg.max_new_tokens == 32
    longest = get_task("knights").response_budget(tok, [3, 4, 5]).longest
    assert f"warning: max_new_tokens=32 cannot fit the longest worked solution (256 drawn per level) of knights " \
           f"levels [3, 4, 5] ({longest} tokens with its EOS)" in capsys.readouterr().out
    preflight(tiny_config(task="echo", levels=[1], max_new_tokens=longest))
    assert "warning" not in capsys.readouterr().out


def test_the_resolved_value_is_recorded_and_a_resume_keeps_it(tiny_config, tok, capsys):
    cfg = tiny_config(max_new_tokens=None, steps=1)
    train(cfg)
    want = get_task("echo").response_budget(tok, [1]).tokens
    saved = json.loads((Path(cfg.out_dir) / "config.json").read_text())
    assert saved["max_new_tokens"] == want
    capsys.readouterr()
    train(tiny_config(max_new_tokens=None, steps=2, resume=True))  # unset again: the same value, no change refused
    assert "resumed from" in capsys.readouterr().out


def test_eval_takes_its_default_from_the_task_too(tmp_path, capsys):
    assert main(["eval", "--model", "preset:micro", "--task", "echo", "--levels", "2", "--prompts", "2",
                 "--quiet"]) == 0
    assert "max_new_tokens: 21, from the task" in capsys.readouterr().out


@pytest.mark.parametrize("value", [0, -3])
def test_a_value_below_one_is_still_refused(tiny_config, value):
    with pytest.raises(ValueError, match=f"config: max_new_tokens={value}: must be >= 1"):
        tiny_config(max_new_tokens=value)
