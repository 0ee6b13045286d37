"""The training system end to end on tiny models (CPU): every algorithm runs, GRPO and RLAD
learn, gradient accumulation is exact, mini-batches split the batch exactly, NaN steps are
skipped, every input is checked before any work, and a run killed with SIGKILL (or whose latest
checkpoint is damaged) and resumed reaches the same parameters as an uninterrupted one."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rlad
from rlad.cli import main
from rlad.launch import train
from rlad.models import load_model
from rlad.report import WALL_CLOCK
from rlad.rollout import generate, group_advantages, score
from rlad.tasks import Echo
from rlad.train import micro_loss, normalizer_for, update

from helpers import assert_rel, small_run_config

REPO = str(Path(rlad.__file__).resolve().parents[1])


_cfg = small_run_config


def _records(cfg):
    with open(os.path.join(cfg.out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _weights(path, tok):
    return load_model(path, tok).state_dict()


ALGOS = [
    dict(algo="rlad"),
    dict(algo="rlad", mixture="arithmetic", dual_clip=3.0, ref_kl_coef=0.05, entropy_coef=0.01),
    dict(algo="grpo", adv_std_norm=False, aggregation="seq_mean"),
    dict(algo="rlad", ratio_level="sequence"),  # GSPO + TRRD
    dict(algo="grpo", objective="cispo", cispo_max=2.0),
    dict(algo="kdrl", kd_estimator="k2"),
    dict(algo="kdrl", kd_estimator="full", aggregation="constant"),
    dict(algo="kdrl", kd_variant="rlad_paper", aggregation="rlad_paper", drop_truncated=True),
    dict(algo="opd", opd_kind="jsd"),
    dict(algo="opd", opd_kind="reverse_kl"),
    dict(algo="opd", opd_kind="sampled"),
    dict(algo="sft"),
]


@pytest.mark.parametrize("kw", ALGOS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_every_algorithm_runs_two_steps(tmp_path, models, tok, kw):
    cfg = _cfg(tmp_path, models, **kw)
    summary = train(cfg)
    steps = [r for r in _records(cfg) if not r.get("eval")]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        assert r["loss"] == r["loss"] and abs(r["loss"]) < 1e3, r  # finite
        assert r["nan_skips"] == 0
    before, after = _weights(models["student"], tok), _weights(summary["checkpoint"] + "/model", tok)
    changed = sum(not torch.equal(before[k], after[k]) for k in before)
    assert changed > 0.5 * len(before)
    assert os.path.isfile(summary["plots"])
    assert (tmp_path / "run" / "summary.md").read_text().startswith(f"# {cfg.algo} on echo")


@pytest.mark.parametrize("algo", ["grpo", "rlad"])
def test_rl_raises_the_reward(tmp_path, models, algo):
    """A real learning test: on echo, seeded, the mean reward of the last steps beats the first."""
    cfg = _cfg(tmp_path, models, algo=algo, steps=12, prompts_per_step=8, group_size=8, mini_batches=1,
               micro_batch_size=64, seed=0)
    train(cfg)
    rewards = [r["reward"] for r in _records(cfg) if not r.get("eval")]
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > first + 0.1, rewards


def _rollout(models, tok, n_prompts=2, G=4):
    torch.manual_seed(0)
    import random

    student = load_model(models["student"], tok)
    teacher = load_model(models["teacher"], tok)
    task = Echo()
    exs = task.sample(random.Random(1), n_prompts, [1])
    roll = generate(student, tok, exs, task, group_size=G, temperature=1.0, top_p=1.0, max_new_tokens=6,
                    template="{prompt}\n")
    roll.old_logp = score(student, roll, temperature=1.0, micro_batch=64)
    roll.teacher_logp = score(teacher, roll, temperature=1.0, micro_batch=64)
    roll.rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0])[: len(roll)]
    roll.advantages = group_advantages(roll.rewards, G)
    return student, teacher, roll


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean", "constant"])
@pytest.mark.parametrize("algo", ["rlad", "opd"])
def test_gradient_accumulation_is_exact(tmp_path, models, tok, aggregation, algo):
    """One micro-batch of 8 sequences and four of 2 give the same gradient."""
    student, teacher, roll = _rollout(models, tok)
    cfg = _cfg(tmp_path, models, algo=algo, aggregation=aggregation)
    idx = torch.arange(len(roll))

    def grads(micro):
        student.zero_grad(set_to_none=True)
        norm, tw = normalizer_for(cfg, roll, idx)
        for m in idx.split(micro):
            loss, _ = micro_loss(cfg, student, teacher, roll.select(m), norm, tw[m] if tw is not None else None,
                             cfg.policy_config(0))
            loss.backward()
        return [p.grad.clone() for p in student.parameters()]

    whole, parts = grads(8), grads(2)
    assert any(g.abs().sum() > 0 for g in whole)
    # float32 sums in a different order: equal up to rounding relative to each tensor's scale
    for (name, _), a, b in zip(student.named_parameters(), whole, parts, strict=True):
        assert_rel(b, a, 1e-5, name)


def test_non_finite_loss_skips_the_step(tmp_path, models, tok, monkeypatch):
    student, teacher, roll = _rollout(models, tok)
    cfg = _cfg(tmp_path, models, algo="rlad", mini_batches=2, ppo_epochs=2)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0)
    before = {k: v.clone() for k, v in student.state_dict().items()}

    def nan_loss(*args, **kwargs):
        loss, m = micro_loss(*args, **kwargs)
        return loss * float("nan"), m

    monkeypatch.setattr("rlad.train.micro_loss", nan_loss)
    state = {"nan_skips": 0}
    update(cfg, student, teacher, roll, opt, sched, 0, lambda: torch.autocast("cpu", enabled=False), state)
    assert state["nan_skips"] == 4  # 2 epochs x 2 mini-batches, all skipped
    for k, v in student.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in student.parameters())
    assert not opt.state  # Adam's moments never saw the NaN


def test_teacher_with_another_vocabulary_is_refused(tmp_path, models):
    cfg_path = tmp_path / "small_vocab.json"
    cfg_path.write_text(json.dumps({"model_type": "llama", "vocab_size": 100, "hidden_size": 32,
                                    "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                                    "num_key_value_heads": 1}))
    cfg = _cfg(tmp_path, models, teacher=f"config:{cfg_path}")
    with pytest.raises(ValueError, match=r"teacher's vocabulary \(100\) is smaller than the student's"):
        train(cfg)


# Kill and resume. The fault is injected from here, not from a hook in rlad/train.py: the test
# writes KILL_DRIVER, a script that wraps rlad.train.update so that in the given step the
# scheduler step following the first optimizer step (where update moves on to the next
# mini-batch) SIGKILLs its own process, and runs the real command line, rlad.cli.main, in a
# subprocess. The uninterrupted run is a plain `python -m rlad.cli train` beside it. Both start
# from scratch in fresh processes: a fresh start's random stream depends on the process (in this
# one, tests/conftest.py's NaN-filling torch.empty makes transformers' from_pretrained draw from
# it). The resumed run restores every random state from the checkpoint, so it runs
# rlad.cli.main([... "--resume", "true"]) right here, once the killed run is dead, without paying
# a process start-up (imports are most of a run's seconds).
KILL_DRIVER = """\
import os
import signal
import sys

import rlad.train
from rlad.cli import main

kill_step = int(sys.argv[1])  # 1-based, as in the log lines
real_update = rlad.train.update


def update(cfg, student, teacher, roll, optimizer, scheduler, step, *args):
    if step + 1 == kill_step:
        scheduler_step = scheduler.step

        def step_then_die():
            scheduler_step()
            print(f"SIGKILL in step {step + 1}, after optimizer step {scheduler.last_epoch}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

        scheduler.step = step_then_die
    return real_update(cfg, student, teacher, roll, optimizer, scheduler, step, *args)


rlad.train.update = update
sys.exit(main(sys.argv[2:]))
"""

TIMING = WALL_CLOCK  # wall-clock metrics: the only ones allowed to differ


def _train_args(out_dir, models, resume=False):
    return ["train", "--out-dir", str(out_dir), "--student", models["student"], "--teacher", models["teacher"],
            "--algo", "rlad", "--task", "echo", "--levels", "1", "--steps", "5", "--save-every", "2",
            "--prompts-per-step", "4", "--group-size", "4", "--max-new-tokens", "6", "--eval-prompts", "4",
            "--eval-every", "0", "--eval-samples", "2", "--threads", "1", "--quiet", "true", "--mini-batches", "2",
            "--micro-batch-size", "4", "--resume", "true" if resume else "false"]


def _start(cmd, log):
    """A subprocess importing this checkout's rlad (not an installed copy), output to ``log``."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
    return subprocess.Popen([sys.executable, *cmd], env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                            text=True)


def _finish(proc, log):
    proc.wait(timeout=600)
    log.seek(0)
    return proc.returncode, log.read()


def _untimed_records(out_dir):
    with open(out_dir / "metrics.jsonl") as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in f]


def test_kill_and_resume_reaches_the_same_parameters(tmp_path, models, tok, capsys):
    """SIGKILL a real `rlad train` in the middle of step 4's update (after its first optimizer step;
    the last checkpoint is step 2's), resume it: the final parameters, optimizer state and every
    non-timing metric are bitwise those of an uninterrupted run."""
    driver = tmp_path / "kill_driver.py"
    driver.write_text(KILL_DRIVER)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    procs = []
    try:
        with open(tmp_path / "straight.log", "w+") as log_a, open(tmp_path / "killed.log", "w+") as log_b:
            procs.append(proc_a := _start(["-m", "rlad.cli", *_train_args(straight, models)], log_a))
            procs.append(proc_b := _start([str(driver), "4", *_train_args(killed, models)], log_b))
            rc_b, out_b = _finish(proc_b, log_b)
            assert rc_b == -signal.SIGKILL, (rc_b, out_b[-2000:])
            assert "SIGKILL in step 4, after optimizer step 7" in out_b  # 3 steps x 2 mini-batches, then 1
            ckpts = sorted(p.name for p in (killed / "checkpoints").iterdir() if p.name.startswith("step_"))
            assert ckpts == ["step_000002"]  # died during step 4, after the step-2 checkpoint
            assert [r["step"] for r in _untimed_records(killed) if not r.get("eval")] == [1, 2, 3]

            capsys.readouterr()
            assert main(_train_args(killed, models, resume=True)) == 0  # while the uninterrupted run goes on
            out = capsys.readouterr().out
            assert "resumed from" in out and "at step 2" in out
            assert "took over the stale lock of PID" in out  # SIGKILL left the lock file; the kernel dropped the lock
            rc_a, out_a = _finish(proc_a, log_a)
            assert rc_a == 0, out_a[-2000:]
    finally:
        for p in procs:  # a failed assertion leaves no process behind
            if p.poll() is None:
                p.kill()
                p.wait()

    a = _weights(str(straight / "checkpoints" / "step_000005" / "model"), tok)
    b = _weights(str(killed / "checkpoints" / "step_000005" / "model"), tok)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    opt_a, opt_b = (torch.load(d / "checkpoints" / "step_000005" / "trainer.pt", weights_only=False)["optimizer"]
                    for d in (straight, killed))
    for i, state in opt_a["state"].items():
        for k, v in state.items():
            assert torch.equal(v, opt_b["state"][i][k]), (i, k)
    # every record (steps 1..5, evaluations at 0 and 5): same values, timing aside
    assert _untimed_records(straight) == _untimed_records(killed)


# ----------------------------------------------------------------------------- mini-batches
def test_mini_batches_that_do_not_divide_the_batch_split_it_exactly(tmp_path, models, tok, monkeypatch):
    """8 sequences in 5 mini-batches: 5 optimizer steps per pass (sizes 2, 2, 2, 1, 1), not the 4
    that chunking into ceil(8 / 5) rows gives, so the schedule has as many steps as it counts."""
    import rlad.train

    student, teacher, roll = _rollout(models, tok)
    cfg = _cfg(tmp_path, models, algo="rlad", mini_batches=5, ppo_epochs=2)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0)
    sizes = []
    real = rlad.train.normalizer_for

    def recording(cfg, roll, idx):
        sizes.append(len(idx))
        return real(cfg, roll, idx)

    monkeypatch.setattr(rlad.train, "normalizer_for", recording)
    update(cfg, student, teacher, roll, opt, sched, 0, lambda: torch.autocast("cpu", enabled=False),
           {"nan_skips": 0})
    assert sizes == [2, 2, 2, 1, 1] * 2
    assert sched.last_epoch == 10


def test_a_linear_schedule_reaches_its_end_with_uneven_mini_batches(tiny_config):
    """A batch of 6 in 4 mini-batches, 2 steps: 8 optimizer steps, so the linear schedule ends at 0."""
    cfg = tiny_config(prompts_per_step=3, group_size=2, mini_batches=4, schedule="linear", steps=2)
    train(cfg)
    steps = [r for r in _records(cfg) if not r.get("eval")]
    assert steps[-1]["lr"] == 0.0
    trainer = torch.load(os.path.join(cfg.out_dir, "checkpoints", "step_000002", "trainer.pt"), weights_only=False)
    assert trainer["scheduler"]["last_epoch"] == 8


# ----------------------------------------------------------------------------- checked before any work
def _non_utf8(tmp_path):
    p = tmp_path / "data.jsonl"
    p.write_bytes(b'{"prompt": "Echo 1.", "answer": 1}\n{"prompt": "\xff", "answer": 2}\n')
    return dict(task=f"jsonl:{p}", levels=[])


def _jsonl(tmp_path, answer):
    p = tmp_path / "data.jsonl"
    p.write_text(json.dumps({"prompt": "Echo 1.", "answer": answer}) + "\n")
    return dict(task=f"jsonl:{p}", levels=[])


def _short_context(tmp_path, tok):
    p = tmp_path / "short.json"
    p.write_text(json.dumps({"model_type": "llama", "vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 64,
                             "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                             "max_position_embeddings": 16}))
    return dict(student=f"config:{p}", max_new_tokens=12)


def _failing_reward(tmp_path, monkeypatch):
    (tmp_path / "bad_reward_module.py").write_text("def score(response, answer):\n    return None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return dict(_jsonl(tmp_path, 1), reward="bad_reward_module:score")


def _out_dir_is_a_file(tmp_path):
    (tmp_path / "afile").write_text("mine")
    return dict(out_dir=str(tmp_path / "afile"))


def _file_at(tmp_path, name):
    from rlad.rundir import claim

    claim(tmp_path / "run")  # a run folder of rlad's, where something took the name of a run file
    (tmp_path / "run" / name).write_text("mine")
    return {}


BEFORE_WORK = [
    pytest.param(lambda t, tok, mp: _out_dir_is_a_file(t),
                 r"config: out_dir='.*afile': is a file, not a folder; choose another out_dir", id="out_dir-is-a-file"),
    pytest.param(lambda t, tok, mp: _file_at(t, "checkpoints"),
                 r"config: out_dir='.*run': .*checkpoints is a file, where the run writes its checkpoints",
                 id="checkpoints-is-a-file"),
    pytest.param(lambda t, tok, mp: dict(levels=[9]),
                 r"config: levels=\[9\]: task 'echo' has levels \[1, 2, 3\], not \[9\]", id="levels"),
    pytest.param(lambda t, tok, mp: _non_utf8(t), r"data.jsonl:2: not valid UTF-8 \(byte 0xff", id="jsonl-not-utf8"),
    pytest.param(lambda t, tok, mp: _jsonl(t, ""), r"data.jsonl:1: 'answer' is empty", id="jsonl-empty-answer"),
    pytest.param(lambda t, tok, mp: dict(student=str(t / "missing")),
                 r"config: student: model folder '.*missing' not found", id="student-missing"),
    pytest.param(lambda t, tok, mp: dict(student=str(t)),
                 r"config: student: folder '.*' has no config.json: it is not a model saved with save_pretrained",
                 id="student-not-a-model"),
    pytest.param(lambda t, tok, mp: dict(algo="rlad", teacher="./no/teacher"),
                 r"config: teacher: model folder './no/teacher' not found", id="teacher-missing"),
    pytest.param(lambda t, tok, mp: dict(ref="../no-ref", ref_kl_coef=0.1),
                 r"config: ref: model folder '../no-ref' not found", id="ref-missing"),
    pytest.param(lambda t, tok, mp: dict(tokenizer=str(t / "no-tokenizer")),
                 r"cannot load the tokenizer '.*no-tokenizer'", id="tokenizer-missing"),
    pytest.param(lambda t, tok, mp: _short_context(t, tok),
                 r"max_new_tokens=12: a prompt of \d+ tokens plus the response exceeds the 16 positions of the student "
                 r"'config:.*short.json'", id="context"),
    pytest.param(lambda t, tok, mp: _failing_reward(t, mp),
                 r"reward 'bad_reward_module:score' on the example at .*data.jsonl:1 \(response '#### 1'\): returned "
                 r"None", id="reward-function"),
]


@pytest.mark.parametrize("setup,msg", BEFORE_WORK)
def test_everything_is_checked_before_any_file_is_written_or_model_loaded(tmp_path, tok, tiny_config, monkeypatch,
                                                                          setup, msg):
    kw = setup(tmp_path, tok, monkeypatch)
    cfg = tiny_config(**kw)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))

    def no_model(*a, **k):
        raise AssertionError("a model was loaded before the checks were done")

    monkeypatch.setattr("rlad.models.load_model", no_model)
    with pytest.raises(ValueError, match=msg) as err:
        train(cfg)
    assert "\n" not in str(err.value)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if "__pycache__" not in p.parts) == \
        [p for p in before if "__pycache__" not in p.parts]


def test_cli_errors_before_work_are_one_line(tmp_path, capsys):
    assert main(["train", "--algo", "grpo", "--out-dir", str(tmp_path / "run"), "--student", str(tmp_path / "nope"),
                 "--quiet", "true"]) == 2
    assert capsys.readouterr().err == f"rlad train: error: config: student: model folder '{tmp_path / 'nope'}' not " \
                                      f"found\n"
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- a damaged checkpoint, resumed past
def test_a_damaged_latest_checkpoint_resumes_from_the_previous_with_the_same_result(tmp_path, models, tok,
                                                                                     monkeypatch, capsys):
    """A run stopped in step 4 (checkpoints 2 and 3 on disk), its step-3 checkpoint then truncated:
    resuming warns, moves step 3 aside, continues from step 2, and ends bitwise where an
    uninterrupted run ends (weights, optimizer, every non-timing record)."""
    import rlad.train

    kw = dict(steps=4, save_every=1, keep_checkpoints=2)
    straight = tmp_path / "straight"
    train(_cfg(tmp_path, models, out_dir=str(straight), **kw))
    broken = tmp_path / "broken"
    real_update = rlad.train.update

    def stop_in_step_4(cfg, student, teacher, roll, optimizer, scheduler, step, *args):
        if step == 3:
            raise KeyboardInterrupt
        return real_update(cfg, student, teacher, roll, optimizer, scheduler, step, *args)

    monkeypatch.setattr(rlad.train, "update", stop_in_step_4)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(tmp_path, models, out_dir=str(broken), **kw))
    monkeypatch.undo()
    root = broken / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step_000002", "step_000003"]
    trainer_pt = root / "step_000003" / "trainer.pt"
    trainer_pt.write_bytes(trainer_pt.read_bytes()[:100])

    capsys.readouterr()
    train(_cfg(tmp_path, models, out_dir=str(broken), resume=True, **kw))
    out = capsys.readouterr().out
    assert f"warning: checkpoint unusable: {root / 'step_000003'}: trainer.pt has 100 bytes" in out
    assert f"moved the unusable checkpoint step_000003 to {root / 'unusable' / 'step_000003'}" in out
    assert f"resumed from {root / 'step_000002'} at step 2" in out

    a = _weights(str(straight / "checkpoints" / "step_000004" / "model"), tok)
    b = _weights(str(root / "step_000004" / "model"), tok)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    opt_a, opt_b = (torch.load(d / "checkpoints" / "step_000004" / "trainer.pt", weights_only=False)["optimizer"]
                    for d in (straight, broken))
    for i, state in opt_a["state"].items():
        for k, v in state.items():
            assert torch.equal(v, opt_b["state"][i][k]), (i, k)
    assert _untimed_records(straight) == _untimed_records(broken)


# ---------------------------------------------------------------- aggregation rlad_paper, groups_equal_frac
def _hand_rollout(token_values, group_size, rewards=None):
    """A Rollout of rows whose response tokens are ``token_values`` (one list per row), for the
    normalizer and the step metrics (no model)."""
    from rlad.rollout import IGNORE, Rollout

    B, T = len(token_values), max(len(v) for v in token_values)
    targets = torch.full((B, T), IGNORE)
    values = torch.zeros(B, T, dtype=torch.float64)
    for i, v in enumerate(token_values):
        targets[i, :len(v)] = 5
        values[i, :len(v)] = torch.tensor(v, dtype=torch.float64)
    ids = torch.zeros(B, T + 1, dtype=torch.long)
    rewards = torch.zeros(B) if rewards is None else torch.tensor(rewards)
    roll = Rollout(ids, torch.ones_like(ids), torch.zeros_like(ids), targets, [None] * (B // group_size), [""] * B,
                   rewards, group_size, truncated=torch.zeros(B, dtype=torch.bool))
    return roll, values


def _aggregate(cfg, roll, values, idx):
    """sum_t w_t L_t / normalizer over rows ``idx``, as micro_loss's op reduces per-token losses ``values``."""
    norm, tw = normalizer_for(cfg, roll, idx)
    w = tw[idx].double() if tw is not None else 1.0
    return float((values[idx] * w * roll.loss_mask[idx]).sum() / norm)


def test_rlad_paper_aggregation_by_hand(tiny_config):
    """Two groups of two: per-token losses [1, 3], [4] | [6, 0, 0], [2, 4] (token means 2, 4 | 2, 3).
    The paper's mean over groups of the mean over each group's responses: (3 + 2.5) / 2 = 2.75, the
    mean over responses (seq_mean) too. With the last row dropped: (3 + 2) / 2 = 2.5, while seq_mean
    gives (2 + 4 + 2) / 3 = 8/3 and token_mean 14/6."""
    roll, values = _hand_rollout([[1, 3], [4], [6, 0, 0], [2, 4]], group_size=2)
    paper, seq, tok = (tiny_config(aggregation=a) for a in ("rlad_paper", "seq_mean", "token_mean"))
    idx = torch.arange(4)
    assert _aggregate(paper, roll, values, idx) == _aggregate(seq, roll, values, idx) == pytest.approx(2.75, rel=1e-7)
    roll.keep = torch.tensor([True, True, True, False])
    assert _aggregate(paper, roll, values, idx) == pytest.approx(2.5, rel=1e-7)
    assert _aggregate(seq, roll, values, idx) == pytest.approx(8 / 3, rel=1e-7)
    assert _aggregate(tok, roll, values, idx) == pytest.approx(14 / 6, rel=1e-7)
    # a mini-batch of rows 1 and 2 (a group split across mini-batches): the rows keep the weights of
    # their groups in the whole batch, 1 and 2, over a normalizer of 1 + 2
    assert _aggregate(paper, roll, values, torch.tensor([1, 2])) == pytest.approx((4 * 1 + 2 * 2) / 3, rel=1e-7)


def test_rlad_paper_is_seq_mean_bit_for_bit_with_every_row_kept(tiny_config):
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 7, (12,), generator=g).tolist()
    roll, _ = _hand_rollout([[0.0] * n for n in lengths], group_size=4)
    paper, seq = tiny_config(aggregation="rlad_paper"), tiny_config(aggregation="seq_mean")
    for idx in (torch.arange(12), torch.tensor([0, 5, 6, 11, 3]), torch.tensor([7])):
        (n1, w1), (n2, w2) = normalizer_for(paper, roll, idx), normalizer_for(seq, roll, idx)
        assert torch.equal(n1, n2) and torch.equal(w1, w2)


def test_rlad_paper_over_ranks_is_the_whole_batch(tiny_config, monkeypatch):
    """Two ranks holding a group each: the normalizer summed over ranks, each rank's sum of
    weighted losses over it, add up to the whole batch's value (a group is whole on its rank)."""
    import rlad.train

    rows = [[1, 3], [4], [6, 0, 0], [2, 4]]
    cfg = tiny_config(aggregation="rlad_paper")
    whole, values = _hand_rollout(rows, group_size=2)
    whole.keep = torch.tensor([True, True, True, False])
    want = _aggregate(cfg, whole, values, torch.arange(4))
    ranks = []
    for part, keep in ((rows[:2], [True, True]), (rows[2:], [True, False])):
        roll, vals = _hand_rollout(part, group_size=2)
        roll.keep = torch.tensor(keep)
        ranks.append((roll, vals, float(normalizer_for(cfg, roll, torch.arange(2))[0])))
    total = sum(n for _, _, n in ranks)
    got = 0.0
    for roll, vals, local in ranks:
        monkeypatch.setattr(rlad.train.D, "all_sum", lambda x, local=local: x - local + total)
        got += _aggregate(cfg, roll, vals, torch.arange(2))
    assert got == pytest.approx(want, rel=1e-7) and want == pytest.approx(2.5, rel=1e-7)


def test_groups_equal_frac_is_logged(tiny_config):
    """Groups of two with rewards (1, 1), (0, 1), (0, 0), (0.5, 0.5): three of four have all their
    rewards equal, so no advantage signal."""
    import time

    from rlad.report import log_line
    from rlad.train import step_metrics

    roll, _ = _hand_rollout([[1]] * 8, group_size=2, rewards=[1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.5, 0.5])
    m = step_metrics(tiny_config(), 0, roll, {}, time.perf_counter(), {"rollout_s": 0.0}, 1e-3, {"nan_skips": 0})
    assert m["groups_equal_frac"] == 0.75
    assert "| eq-groups 0.75 |" in log_line(1, 2, m)
    from types import SimpleNamespace

    roll.examples = [SimpleNamespace(level=lv) for lv in (1, 2, 2, 3)]  # per level: (1, 1) | (0, 1), (0, 0) | 0.5s
    m = step_metrics(tiny_config(levels=[1, 2, 3]), 0, roll, {}, time.perf_counter(), {"rollout_s": 0.0}, 1e-3,
                     {"nan_skips": 0})
    assert (m["groups_equal_frac/L1"], m["groups_equal_frac/L2"], m["groups_equal_frac/L3"]) == (1.0, 0.5, 1.0)
    opd = tiny_config(algo="opd", opd_kind="jsd", teacher="preset:micro")  # no group advantages: not logged
    assert "groups_equal_frac" not in step_metrics(opd, 0, roll, {}, time.perf_counter(), {"rollout_s": 0.0}, 1e-3,
                                                   {"nan_skips": 0})


def test_each_step_logs_its_time_by_phase(tiny_config):
    """Generation, the old and reference scoring and the update are timed apiece (their sum within
    the step's time); an eval record has its own time; every such key is a wall-clock one."""
    from rlad.report import WALL_CLOCK

    cfg = tiny_config(ref_kl_coef=0.1)
    train(cfg)
    records = [json.loads(line) for line in (Path(cfg.out_dir) / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if not r.get("eval")]
    phases = ("generate_s", "score_old_s", "score_ref_s", "update_s")
    for r in steps:
        assert all(r[k] > 0 for k in phases), r
        assert r["generate_s"] + r["score_old_s"] + r["score_ref_s"] <= r["rollout_s"] <= r["step_s"]
        assert r["rollout_s"] + r["update_s"] <= r["step_s"]
        assert "score_teacher_s" not in r  # grpo scores no teacher
    assert all(r["eval_s"] > 0 for r in records if r.get("eval"))
    assert {k for r in records for k in r if k.endswith("_s")} <= set(WALL_CLOCK)
