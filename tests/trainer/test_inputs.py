"""Every bad input is a one-line error before work starts: no traceback, no hang, no file written
and no model loaded (issue 22, section 5). Each case runs ``rlad train`` (``rlad.cli.main``) on
the smallest settings with model loading forbidden, and checks the exit status 2, the one line
on stderr naming the setting or the file:line, and that the out_dir was never made."""

from __future__ import annotations

import json
import math
import random
import shutil
import signal
from contextlib import contextmanager
from fractions import Fraction

import pytest

from rlad.cli import main
from rlad.config import TrainConfig
from rlad.heldout import build_held_out, generated_eval_set
from rlad.tasks import Arithmetic
from rlad.tasks.jsonl import reward_value_problem
from rlad.tokenizer import ASSET


def _args(tmp_path, *extra: str) -> list[str]:
    """``rlad train`` on untrained ``preset:micro`` (grpo on echo level 1, one step of 4 sequences)
    into ``tmp_path / "run"``; ``extra`` flags override."""
    return ["train", "--out-dir", str(tmp_path / "run"), "--algo", "grpo", "--student", "preset:micro", "--task",
            "echo", "--levels", "1", "--steps", "1", "--prompts-per-step", "2", "--group-size", "2",
            "--max-new-tokens", "4", "--micro-batch-size", "8", "--mini-batches", "1", "--eval-prompts", "2",
            "--eval-every", "0", "--save-every", "1", "--quiet", "true", "--threads", "1", *extra]


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model fails the test: every check must come before."""
    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the checks were done")

    monkeypatch.setattr("rlad.models.load_model", refuse)


@contextmanager
def deadline(seconds: int):
    """Fail (instead of hanging the suite) when the block runs longer than ``seconds``."""
    def expire(*_):
        raise TimeoutError(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def refused(argv: list[str], capsys, tmp_path, command: str = "train") -> str:
    """Run ``rlad <argv>``: exit status 2, one line on stderr (returned), no out_dir made."""
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith(f"rlad {command}: ") and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()
    return err


def _jsonl(tmp_path, *lines: str):
    p = tmp_path / "data.jsonl"
    p.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return p


ROWS = [json.dumps({"prompt": f"Echo {i}.", "answer": str(i)}) for i in range(10)]


# ----------------------------------------------------------------------------- distributed: rows per rank
@pytest.mark.parametrize("extra,rows", [
    pytest.param(["--prompts-per-step", "2", "--group-size", "2"], 2, id="grpo"),  # 4 rows, 2 per rank
    pytest.param(["--algo", "sft", "--teacher", "preset:micro", "--prompts-per-step", "4"], 2, id="sft"),
])
def test_two_ranks_holding_fewer_rows_than_mini_batches_are_refused(tmp_path, capsys, monkeypatch, no_model, extra,
                                                                     rows):
    """Each of 2 ranks splits its own rows into mini_batches: fewer rows than mini-batches crashed
    after the step-0 eval (``cannot reshape tensor of 0 elements``); refused at launch."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")

    def preflight(cfg):
        raise AssertionError("the launch was not refused: preflight ran")

    monkeypatch.setattr("rlad.launch.preflight", preflight)
    err = refused(_args(tmp_path, *extra, "--mini-batches", "3"), capsys, tmp_path)
    assert f"mini_batches=3: each of the 2 ranks holds {rows} rows of a step's batch" in err
    assert "rank 0 of 2" in err


# ----------------------------------------------------------------------------- the eval set
def test_eval_set_drawing_stops_when_a_level_runs_out(monkeypatch):
    """Arithmetic level 1 has 200 distinct problems: asking for a million drew 20 million times."""
    calls = {"n": 0}
    make = Arithmetic.make

    def counted(self, rng, level):
        calls["n"] += 1
        if calls["n"] > 50_000:
            raise AssertionError("the eval set's drawing spins")
        return make(self, rng, level)

    monkeypatch.setattr(Arithmetic, "make", counted)
    examples, notes = generated_eval_set(Arithmetic(), [1], 1_000_000, seed=0)
    assert len(examples) == 100 and calls["n"] < 5_000  # about 1200 draws find all 200
    assert "level 1 of task 'arithmetic' has only about 200 distinct problems; 100 of them are held out" in notes[0]


def test_eval_prompts_beyond_the_limit_are_refused(tmp_path, capsys, no_model):
    with deadline(60):
        err = refused(_args(tmp_path, "--eval-prompts", "1000000"), capsys, tmp_path)
    assert "config: eval_prompts=1000000: at most 10000" in err


def test_an_eval_set_that_takes_a_whole_level_is_refused(tmp_path, capsys, no_model):
    """Holding out all 200 problems of arithmetic level 1 left training nothing to draw: the run
    failed at its first step, after the models were loaded and the step-0 eval ran."""
    err = refused(_args(tmp_path, "--task", "arithmetic", "--eval-prompts", "200"), capsys, tmp_path)
    assert ("config: eval_prompts=200: level 1 of task 'arithmetic' has about 200 distinct problems and the eval set "
            "holds out 200 of them, leaving 0 to train on") in err


def test_an_eval_set_that_leaves_most_of_a_level_is_kept():
    task = Arithmetic()
    held = build_held_out(task, [1], per_level=128, seed=0)  # the default: 72 problems left to train on
    assert held.sizes == {1: 128}
    assert len({e.prompt for e in task.sample(random.Random(0), 2000, [1])}) == 72
    with pytest.raises(ValueError, match=r"eval_prompts=195: .* leaving 5 to train on"):
        build_held_out(Arithmetic(), [1], per_level=195, seed=0)


# ----------------------------------------------------------------------------- JSONL data
@pytest.fixture
def no_long_tokenizing(monkeypatch):
    """Tokenizing a text of more than 100k characters fails the test."""
    import rlad.preflight
    import rlad.tasks.budget

    def guard(module, name):
        real = getattr(module, name)

        def wrapped(tok, texts, *a, **k):
            assert max(map(len, texts), default=0) < 100_000, f"{name} tokenized a text of {max(map(len, texts))} chars"
            return real(tok, texts, *a, **k)

        monkeypatch.setattr(module, name, wrapped)

    guard(rlad.preflight, "prompt_lengths")
    guard(rlad.tasks.budget, "token_counts")


@pytest.mark.parametrize("field", ["prompt", "answer", "solution"])
def test_a_text_longer_than_any_context_is_refused_before_tokenizing(tmp_path, capsys, no_model, no_long_tokenizing,
                                                                      field):
    row = {"prompt": "Echo 10.", "answer": "10", field: "x " * 500_000}  # a prompt of its own
    data = _jsonl(tmp_path, *ROWS, json.dumps(row))
    err = refused(_args(tmp_path, "--task", f"jsonl:{data}", "--levels", "0"), capsys, tmp_path)
    assert f"{data}:11: '{field}' has 1000000 characters" in err
    assert "the 1024 positions of the student 'preset:micro'" in err


@pytest.mark.parametrize("field", ["prompt", "answer", "solution"])
def test_a_lone_surrogate_in_jsonl_is_refused_with_its_line(tmp_path, capsys, no_model, field):
    row = {"prompt": "Echo 10.", "answer": "10", field: "\ud800 x"}
    data = _jsonl(tmp_path, *ROWS, json.dumps(row))  # json writes it as the escape \ud800, which JSON allows
    assert "\\ud800" in data.read_text()
    err = refused(_args(tmp_path, "--task", f"jsonl:{data}", "--levels", "0"), capsys, tmp_path)
    assert f"{data}:11: '{field}' holds a lone surrogate (\\ud800" in err


def test_a_reward_too_large_for_a_float_is_a_reward_error(tmp_path, capsys, monkeypatch, no_model):
    (tmp_path / "huge_reward.py").write_text("def score(response, answer):\n    return 10**400\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    data = _jsonl(tmp_path, *ROWS)
    err = refused(_args(tmp_path, "--task", f"jsonl:{data}", "--levels", "0", "--reward", "huge_reward:score"),
                  capsys, tmp_path)
    assert "reward 'huge_reward:score' on the example at" in err
    assert "returned a number of about 10^400, too large for a float (not a finite number)" in err


@pytest.mark.parametrize("value,magnitude", [(10**400, "10^400"), (-(10**5000), "-10^5000"),
                                             (Fraction(10**400, 3), "10^399")], ids=["int", "negative", "fraction"])
def test_reward_values_too_large_for_a_float(value, magnitude):
    assert reward_value_problem(value) == f"returned a number of about {magnitude}, too large for a float (not a " \
                                          f"finite number)"
    assert reward_value_problem(2000) == "returned 2000, outside [-1000, 1000]"
    assert reward_value_problem(math.inf) == "returned inf, not a finite number"


# ----------------------------------------------------------------------------- seeds
@pytest.mark.parametrize("flag", ["--seed", "--eval-seed"])
@pytest.mark.parametrize("value", [2**64, -(2**63) - 1])
def test_a_seed_out_of_range_is_refused(tmp_path, capsys, no_model, flag, value):
    err = refused(_args(tmp_path, flag, str(value)), capsys, tmp_path)
    name = flag[2:].replace("-", "_")
    assert f"config: {name}={value}: must be an integer in [-2**63, 2**63)" in err


def test_the_largest_seeds_are_accepted():
    TrainConfig(algo="grpo", seed=2**63 - 1, eval_seed=-(2**63))


@pytest.mark.parametrize("flag", ["--seed", "--eval-seed"])
def test_rlad_eval_refuses_a_seed_out_of_range(tmp_path, capsys, monkeypatch, flag):
    monkeypatch.setattr("rlad.models.load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    err = refused(["eval", "--model", "preset:micro", "--task", "echo", "--levels", "1", "--prompts", "2",
                   "--max-new-tokens", "4", "--quiet", flag, str(2**64)], capsys, tmp_path, command="eval")
    assert f"{flag} {2**64}: must be an integer in [-2**63, 2**63)" in err


# ----------------------------------------------------------------------------- models and tokenizers
def _config(tmp_path, name: str, vocab_size: int) -> str:
    p = tmp_path / f"{name}.json"
    p.write_text(json.dumps({"model_type": "llama", "vocab_size": vocab_size, "hidden_size": 32,
                             "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                             "num_key_value_heads": 1, "max_position_embeddings": 256}))
    return f"config:{p}"


def test_a_student_head_smaller_than_the_tokenizer_is_refused(tmp_path, capsys, no_model, tok):
    small = _config(tmp_path, "small", len(tok) - 10)
    err = refused(_args(tmp_path, "--student", small), capsys, tmp_path)
    assert f"config: student: {small!r} has vocab_size {len(tok) - 10} in its config, fewer than the {len(tok)} " \
           f"tokens of the run's tokenizer" in err


@pytest.mark.parametrize("student_rows", [0, 64], ids=["tokenizer-sized-student", "padded-student"])
def test_a_teacher_head_smaller_than_the_students_is_refused(tmp_path, capsys, no_model, tok, student_rows):
    student = "preset:micro" if not student_rows else _config(tmp_path, "student", len(tok) + student_rows)
    teacher = _config(tmp_path, "teacher", len(tok) - 10 + student_rows)
    err = refused(_args(tmp_path, "--student", student, "--algo", "rlad", "--teacher", teacher), capsys, tmp_path)
    assert f"config: teacher: the teacher's vocabulary ({len(tok) - 10 + student_rows}) is smaller than the " \
           f"student's ({len(tok) + student_rows}): {teacher!r} has vocab_size" in err


@pytest.mark.parametrize("keep", [(), ("pad_token",)], ids=["no-eos-no-pad", "pad-only"])
def test_a_tokenizer_without_eos_is_refused(tmp_path, capsys, no_model, keep):
    folder = tmp_path / "tokenizer"
    shutil.copytree(ASSET, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    for name in {"eos_token", "pad_token"} - set(keep):
        config.pop(name)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    err = refused(_args(tmp_path, "--tokenizer", str(folder)), capsys, tmp_path)
    assert f"the tokenizer {str(folder)!r} has no EOS token" in err
