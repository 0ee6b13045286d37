"""Held-out evaluation (rlad/heldout.py): eval prompts never reach training, by normalized prompt
text, for built-in tasks and JSONL files; the eval set is fixed per level; accuracies carry
standard errors."""

import json
import math
import random

import pytest

from rlad.config import TrainConfig
from rlad.evaluate import mean_se
from rlad.heldout import build_held_out, generated_eval_set
from rlad.preflight import preflight
from rlad.tasks import Arithmetic, Echo, get_task, prompt_key


def test_prompt_key_normalizes_case_and_whitespace():
    assert prompt_key("  Compute 3+4.\n") == prompt_key("compute\t3+4.") == "compute 3+4."
    assert prompt_key("Compute 3+4.") != prompt_key("Compute 3-4.")


def test_builtin_training_draws_never_hit_the_eval_set():
    task = Arithmetic()
    held = build_held_out(task, [1, 2], per_level=60, seed=0)
    assert held.sizes == {1: 60, 2: 60} and held.dropped_from_training == 0
    assert len(held.keys) == 120  # distinct
    # level 1 has exactly 200 distinct problems (a, b < 10; + or -): 60 held out leaves 140
    draws = task.sample(random.Random(5), 3000, [1, 2])
    assert not {prompt_key(e.prompt) for e in draws} & held.keys
    level1 = {prompt_key(e.prompt) for e in draws if e.level == 1}
    assert len(level1) == 140
    # without the hold-out, the same draws would have covered the eval set
    free = {prompt_key(e.prompt) for e in Arithmetic().sample(random.Random(5), 3000, [1])}
    assert {k for k in held.keys if k in free}


def test_the_eval_set_is_fixed_per_level():
    a, _ = generated_eval_set(Arithmetic(), [1, 3], 20, seed=0)
    b, _ = generated_eval_set(Arithmetic(), [3], 20, seed=0)  # another choice of training levels
    c, _ = generated_eval_set(Arithmetic(), [3], 20, seed=1)
    level3 = [e.prompt for e in a if e.level == 3]
    assert level3 == [e.prompt for e in b]
    assert level3 != [e.prompt for e in c]


def test_a_small_level_keeps_half_of_its_problems_for_training():
    task = Echo()  # level 1: ten distinct problems
    notes = []
    held = build_held_out(task, [1], per_level=128, seed=0, log=notes.append)
    assert held.sizes == {1: 5}
    assert "level 1 of task 'echo' has only about 10 distinct problems; 5 of them are held out" in notes[0]
    assert len({e.prompt for e in task.sample(random.Random(0), 200, [1])}) == 5


def test_a_level_with_nothing_left_to_train_on_is_refused():
    task = Echo()
    task.hold_out({prompt_key(f"Echo {d}.") for d in "0123456789"})
    with pytest.raises(ValueError, match="level 1 draws only held-out"):
        task.sample(random.Random(0), 1, [1])


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_split_is_disjoint_and_keeps_duplicates_together(tmp_path):
    rows = [{"prompt": f"Q{i}?", "answer": str(i)} for i in range(30)]
    rows += [{"prompt": f"  q{i}? ", "answer": str(i)} for i in range(5)]  # the same prompts, written differently
    p = _write(tmp_path / "data.jsonl", rows)
    task = get_task(f"jsonl:{p}")
    notes = []
    held = build_held_out(task, task.levels, per_level=100, seed=0, eval_split=0.2, log=notes.append)
    assert held.sizes == {0: 6}  # 20% of the 30 distinct prompts
    # the split is what holds those rows out, not an overlap to warn about
    assert notes == [f"note: the eval split holds 6 distinct prompt(s) ({held.dropped_from_training} row(s)) out of "
                     f"training"]
    train_keys = {prompt_key(e.prompt) for e in task.examples}
    assert not train_keys & held.keys
    assert len(train_keys) == 24 and len(task.examples) + held.dropped_from_training == 35


def test_jsonl_eval_task_overlap_is_dropped_from_training_with_a_count(tmp_path):
    train_rows = [{"prompt": f"Q{i}?", "answer": str(i), "level": 1} for i in range(10)]
    p = _write(tmp_path / "train.jsonl", train_rows)
    e = _write(tmp_path / "eval.jsonl", [{"prompt": "q3?", "answer": "3", "level": 1},
                                         {"prompt": "Q4? ", "answer": "4", "level": 1},
                                         {"prompt": "new?", "answer": "0", "level": 1}])
    task = get_task(f"jsonl:{p}")
    notes = []
    held = build_held_out(task, [1], per_level=10, seed=0, eval_task=f"jsonl:{e}", log=notes.append)
    assert held.sizes == {1: 3} and held.dropped_from_training == 2
    assert notes == ["warning: 2 training example(s) of 'jsonl' share a prompt with the eval set and are left out of "
                     "training"]
    assert sorted(x.prompt for x in task.examples) == sorted(f"Q{i}?" for i in range(10) if i not in (3, 4))
    assert held.task is not task and held.task.path == str(e)


def test_jsonl_eval_task_that_covers_a_training_level_is_refused(tmp_path):
    p = _write(tmp_path / "train.jsonl", [{"prompt": "a?", "answer": "1", "level": 2}])
    e = _write(tmp_path / "eval.jsonl", [{"prompt": "A?", "answer": "1", "level": 2}])
    with pytest.raises(ValueError, match=r"every prompt of level\(s\) \[2\] is in the eval set"):
        build_held_out(get_task(f"jsonl:{p}"), [2], per_level=5, seed=0, eval_task=f"jsonl:{e}")


def test_jsonl_too_small_to_split_is_refused(tmp_path):
    p = _write(tmp_path / "data.jsonl", [{"prompt": "a?", "answer": "1"}])
    with pytest.raises(ValueError, match="level 0 has 1 distinct prompt"):
        build_held_out(get_task(f"jsonl:{p}"), [0], per_level=5, seed=0)


def test_preflight_holds_the_eval_set_out_of_the_run(tmp_path):
    cfg = TrainConfig(out_dir=str(tmp_path / "run"), algo="grpo", student="preset:micro", task="arithmetic",
                      levels=[1], eval_prompts=100, quiet=True)
    setup = preflight(cfg)
    assert setup.held.sizes == {1: 100} and setup.held.task is setup.task
    draws = setup.task.sample(random.Random(cfg.seed), 2000, [1])
    assert not {prompt_key(e.prompt) for e in draws} & setup.held.keys


@pytest.mark.parametrize("kw,msg", [
    (dict(eval_split=0.1), "only splits a jsonl task"),
    (dict(eval_split=1.0), r"must be in \(0, 1\)"),
    (dict(eval_task="jsonl:/nonexistent.jsonl"), "JSONL file not found"),
])
def test_eval_settings_are_validated(kw, msg):
    with pytest.raises(ValueError, match=msg):
        TrainConfig(algo="grpo", **kw)


def test_standard_error_by_hand():
    mean, se = mean_se([1.0, 0.0, 1.0, 1.0])
    assert mean == 0.75 and se == pytest.approx(math.sqrt(0.75 * 0.25 / 4))  # binomial
    mean, se = mean_se([0.25, 0.5, 1.0])
    var = sum((x - 7 / 12) ** 2 for x in (0.25, 0.5, 1.0)) / 3
    assert mean == pytest.approx(7 / 12) and se == pytest.approx(math.sqrt(var / 3))


def test_the_summary_records_eval_sizes_and_standard_errors(tiny_config):
    from rlad.launch import train

    summary = train(tiny_config(eval_prompts=3))
    assert summary["eval_sizes"] == {"L1": 3} and summary["eval_task"] == "echo"
    final = summary["final"]
    assert final["n"] == 3 and final["n/L1"] == 3
    p = final["accuracy"]
    assert final["accuracy_se"] == pytest.approx(math.sqrt(p * (1 - p) / 3))


# ---------------------------------------------------------------- rlad eval rebuilds a run's held-out set
def _eval_prompts(monkeypatch, argv, capsys=None):
    """The prompts (and levels) ``rlad eval argv`` scores, and its exit status."""
    import rlad.evaluate
    from rlad.cli import main

    seen, real = [], rlad.evaluate.evaluate

    def recording(model, tok, task, examples, **kw):
        seen.append([(e.prompt, e.level) for e in examples])
        return real(model, tok, task, examples, **kw)

    monkeypatch.setattr(rlad.evaluate, "evaluate", recording)
    assert main(argv) == 0
    assert len(seen) == 1
    return seen[0]


def test_rlad_eval_of_a_run_scores_exactly_its_held_out_prompts(tmp_path, tiny_config, monkeypatch, capsys):
    """``rlad eval --task jsonl:F`` after training on F scored training prompts. Given the run
    (``--run``, or a model inside it: its checkpoint, the checkpoint's model/, an export of it),
    rlad eval rebuilds the run's held-out set from its config.json: the very prompts the run
    evaluated, none of them a training row; flags given still override."""
    import rlad.train
    from rlad.checkpoint import export_checkpoint
    from rlad.launch import train

    p = _write(tmp_path / "data.jsonl", [{"prompt": f"Echo {i}.", "answer": str(i), "level": 1 + i % 2}
                                         for i in range(30)])
    run_evals, real = [], rlad.train.evaluate

    def recording(model, tok, task, examples, **kw):
        run_evals.append([(e.prompt, e.level) for e in examples])
        return real(model, tok, task, examples, **kw)

    monkeypatch.setattr(rlad.train, "evaluate", recording)
    cfg = tiny_config(task=f"jsonl:{p}", levels=[], eval_split=0.2, eval_seed=3, eval_prompts=4, steps=1)
    train(cfg)
    monkeypatch.undo()
    held = run_evals[0]
    assert all(e == held for e in run_evals) and len(held) == 6  # 3 of each level's 15 prompts (20%)
    task = get_task(f"jsonl:{p}")
    build_held_out(task, [1, 2], per_level=4, seed=3, eval_split=0.2)
    trained = {prompt_key(e.prompt) for e in task.examples}
    assert not trained & {prompt_key(q) for q, _ in held} and len(trained) + len(held) == 30

    run = tmp_path / "run"
    checkpoint = run / "checkpoints" / "step_000001"
    export_checkpoint(checkpoint, tmp_path / "export")
    for argv in (["--run", str(run)], ["--model", str(checkpoint / "model")], ["--model", str(checkpoint)],
                 ["--model", str(run)], ["--model", str(tmp_path / "export")],
                 ["--model", str(checkpoint / "model"), "--task", f"jsonl:{p}"],
                 ["--run", str(run), "--model", "preset:micro"]):
        assert _eval_prompts(monkeypatch, ["eval", *argv, "--quiet"]) == held, argv
    out = capsys.readouterr().out
    assert f"the held-out set of the run {run}" in out
    # without the run, the same flags as the run's settings give the same set
    assert _eval_prompts(monkeypatch, ["eval", "--model", "preset:micro", "--task", f"jsonl:{p}", "--eval-split",
                                       "0.2", "--eval-seed", "3", "--prompts", "4", "--max-new-tokens", "4",
                                       "--quiet"]) == held
    # a flag given overrides the run's setting: another seed, another split
    other = _eval_prompts(monkeypatch, ["eval", "--run", str(run), "--eval-seed", "4", "--quiet"])
    assert len(other) == 6 and other != held
    # a JSONL task without the run scores its first prompts, with a note that says so
    capsys.readouterr()
    _eval_prompts(monkeypatch, ["eval", "--model", "preset:micro", "--task", f"jsonl:{p}", "--prompts", "2",
                                "--max-new-tokens", "4", "--quiet"])
    assert "give --run RUN_DIR" in capsys.readouterr().out
    # its output never replaces one of the run's own files
    from rlad.cli import main

    config = (run / "config.json").read_text()
    assert main(["eval", "--run", str(run), "--out", str(run / "config.json"), "--quiet"]) == 2
    assert "is one of the run's own files" in capsys.readouterr().err and (run / "config.json").read_text() == config


def test_rlad_eval_run_errors_are_one_line(tmp_path, capsys):
    from rlad.cli import main

    assert main(["eval", "--run", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"rlad eval: error: --run {tmp_path}: no config.json of an rlad run in it; " \
                                      f"give the run's out_dir\n"
    assert main(["eval"]) == 2
    assert capsys.readouterr().err == "rlad eval: error: give --model, or --run RUN_DIR (its newest checkpoint's " \
                                      "model, on its held-out set)\n"


def test_rlad_eval_of_a_run_with_an_eval_task_scores_that_task_and_another_task_its_own(tmp_path, tiny_config,
                                                                                      monkeypatch, capsys):
    import rlad.train
    from rlad.launch import train

    e = _write(tmp_path / "eval.jsonl", [{"prompt": f"Echo {i}{i}.", "answer": f"{i}{i}", "level": 1}
                                         for i in range(5)])
    run_evals, real = [], rlad.train.evaluate

    def recording(model, tok, task, examples, **kw):
        run_evals.append(([(x.prompt, x.level) for x in examples], task.path))
        return real(model, tok, task, examples, **kw)

    monkeypatch.setattr(rlad.train, "evaluate", recording)
    train(tiny_config(eval_task=f"jsonl:{e}", eval_prompts=3, steps=1))
    monkeypatch.undo()
    held, path = run_evals[-1]
    assert len(held) == 3 and path == str(e)
    run = str(tmp_path / "run")
    assert _eval_prompts(monkeypatch, ["eval", "--run", run, "--quiet"]) == held
    capsys.readouterr()
    more = _eval_prompts(monkeypatch, ["eval", "--run", run, "--prompts", "5", "--quiet"])  # a flag overrides
    assert len(more) == 5 and more[:3] == held
    arithmetic = _eval_prompts(monkeypatch, ["eval", "--run", run, "--task", "arithmetic", "--levels", "1",
                                             "--prompts", "2", "--max-new-tokens", "4", "--quiet"])
    assert [lv for _, lv in arithmetic] == [1, 1] and all(q.startswith("Compute") for q, _ in arithmetic)
    assert "--task arithmetic is not the task of the run" in capsys.readouterr().out
