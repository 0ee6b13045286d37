"""The training system end to end on tiny models (CPU): every algorithm runs, GRPO and RLAD
learn, gradient accumulation is exact, NaN steps are skipped, and a run killed with SIGKILL
and resumed reaches the same parameters as an uninterrupted one."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from helpers import assert_rel

from rlad.config import TrainConfig
from rlad.models import load_model
from rlad.rollout import generate, group_advantages, score
from rlad.tasks import Echo
from rlad.train import FAULT_KILL_STEP, micro_loss, normalizer_for, train, update


def _cfg(tmp_path, models, **kw):
    base = dict(out_dir=str(tmp_path / "run"), student=models["student"], teacher=models["teacher"], task="echo",
                levels=[1], steps=2, prompts_per_step=4, group_size=4, max_new_tokens=6, micro_batch_size=8,
                mini_batches=2, eval_prompts=4, eval_every=0, save_every=0, quiet=True, threads=1, lr=1e-3,
                sft_prompts=16)
    base.update(kw)
    return TrainConfig(**base)


def _records(cfg):
    with open(os.path.join(cfg.out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _weights(path, tok):
    return load_model(path, tok).state_dict()


ALGOS = [
    dict(algo="rlad"),
    dict(algo="rlad", mixture="arithmetic", dual_clip=3.0, ref_kl_coef=0.05, entropy_coef=0.01),
    dict(algo="grpo", adv_std_norm=False, aggregation="seq_mean"),
    dict(algo="kdrl", kd_estimator="k2"),
    dict(algo="kdrl", kd_estimator="full", aggregation="constant"),
    dict(algo="opd", opd_kind="jsd"),
    dict(algo="opd", opd_kind="reverse_kl"),
    dict(algo="opd", opd_kind="sampled"),
    dict(algo="sft"),
]


@pytest.mark.parametrize("kw", ALGOS, ids=lambda kw: "-".join(str(v) for v in kw.values()))
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
            loss, _ = micro_loss(cfg, student, teacher, roll.select(m), norm, tw[m] if tw is not None else None, 0)
            loss.backward()
        return [p.grad.clone() for p in student.parameters()]

    whole, parts = grads(8), grads(2)
    assert any(g.abs().sum() > 0 for g in whole)
    # float32 sums in a different order: equal up to rounding relative to each tensor's scale
    for (name, _), a, b in zip(student.named_parameters(), whole, parts):
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


def _cli(out_dir, models, extra_env=None, resume=False):
    args = [sys.executable, "-m", "rlad.cli", "train", "--out-dir", str(out_dir), "--student", models["student"],
            "--teacher", models["teacher"], "--algo", "rlad", "--task", "echo", "--levels", "1", "--steps", "5",
            "--save-every", "2", "--prompts-per-step", "4", "--group-size", "4", "--max-new-tokens", "6",
            "--eval-prompts", "4", "--eval-every", "0", "--eval-samples", "2", "--threads", "1", "--quiet", "true",
            "--mini-batches", "2", "--micro-batch-size", "4", "--resume", "true" if resume else "false"]
    env = dict(os.environ)
    env.pop(FAULT_KILL_STEP, None)
    env.update(extra_env or {})
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)


def test_kill_and_resume_reaches_the_same_parameters(tmp_path, models, tok):
    straight = _cli(tmp_path / "straight", models)
    assert straight.returncode == 0, straight.stderr[-2000:]

    killed = _cli(tmp_path / "killed", models, extra_env={FAULT_KILL_STEP: "3"})
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr[-2000:])
    ckpts = sorted(p.name for p in (tmp_path / "killed" / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert ckpts == ["step_000002"]  # died during step 4, after the step-2 checkpoint

    resumed = _cli(tmp_path / "killed", models, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout and "at step 2" in resumed.stdout

    a = _weights(str(tmp_path / "straight" / "checkpoints" / "step_000005" / "model"), tok)
    b = _weights(str(tmp_path / "killed" / "checkpoints" / "step_000005" / "model"), tok)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = lambda d: [(r["step"], r["reward"]) for r in map(json.loads, open(d / "metrics.jsonl")) if "reward" in r]
    assert steps(tmp_path / "straight") == steps(tmp_path / "killed")
