"""Truncated (overlong) responses: detected from the sampled tokens, and with drop_truncated
(DAPO's overlong filtering) left out of every algorithm's loss and normalizer, while their
rewards still count in their groups' advantages."""

import json
import os
import random

import pytest
import torch

from rlad.launch import train
from rlad.models import load_model
from rlad.rollout import IGNORE, build_sft_pool, generate, group_advantages, response_lengths, score
from rlad.tasks import Echo
from rlad.train import collect, micro_loss, normalizer_for

from helpers import assert_rel, small_run_config

EOS, PAD = 2, 0


def test_truncated_rows_are_the_responses_without_eos():
    a, b, c = 7, 8, 9
    response = torch.tensor([
        [a, b, EOS, PAD],   # ended early, padded
        [a, b, c, a],       # cut off at max_new_tokens: truncated
        [a, b, c, EOS],     # its EOS is the last allowed token: complete
        [EOS, PAD, PAD, PAD],
        [a, EOS, EOS, EOS],  # padded with EOS (a tokenizer whose pad is its EOS)
    ])
    lengths, ended = response_lengths(response, EOS)
    assert (~ended).tolist() == [False, True, False, False, False] and lengths.tolist() == [3, 4, 4, 1, 2]


def test_generate_marks_the_responses_cut_at_max_new_tokens(models, tok):
    torch.manual_seed(0)
    student = load_model(models["student"], tok)
    exs = Echo().sample(random.Random(1), 8, [3])
    roll = generate(student, tok, exs, Echo(), group_size=4, temperature=1.0, top_p=1.0, max_new_tokens=4,
                    template="{prompt}\n")
    has_eos = ((roll.targets == tok.eos_token_id) & roll.response_mask).any(-1)
    assert torch.equal(roll.truncated, ~has_eos)
    assert 0 < int(roll.truncated.sum()) < len(roll)  # both kinds in the batch: the test sees both
    assert (roll.lengths[roll.truncated] == 4).all()


_cfg = small_run_config


def _rollout(cfg, models, tok):
    """A scored rollout of 8 responses (2 prompts x 4) with mixed rewards, rows 1 and 6 marked
    truncated; the per-algorithm fields filled as ``collect`` fills them."""
    torch.manual_seed(0)
    student, teacher = load_model(models["student"], tok), load_model(models["teacher"], tok)
    exs = Echo().sample(random.Random(1), 2, [1])
    roll = generate(student, tok, exs, Echo(), group_size=4, temperature=1.0, top_p=1.0, max_new_tokens=6,
                    template="{prompt}\n")
    roll.old_logp = score(student, roll, temperature=1.0, micro_batch=64)
    roll.teacher_logp = score(teacher, roll, temperature=1.0, micro_batch=64)
    if cfg.ref_kl_coef > 0:
        roll.ref_logp = score(teacher, roll, temperature=1.0, micro_batch=64) - 0.1
    roll.rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0])
    roll.advantages = group_advantages(roll.rewards, 4)
    roll.token_advantages = (torch.where(roll.response_mask, roll.teacher_logp - roll.old_logp, 0.0)
                             if cfg.algorithm.advantages == "teacher log-ratio" else None)
    if cfg.algorithm.kd:
        roll.kd_weights = (roll.rewards < 1.0).float()[:, None].expand(roll.targets.shape).contiguous()
    roll.truncated = torch.tensor([False, True, False, False, False, False, True, False])
    return student, teacher, roll


def _loss_and_grads(cfg, student, teacher, roll, micro):
    idx = torch.arange(len(roll))
    student.zero_grad(set_to_none=True)
    norm, tw = normalizer_for(cfg, roll, idx)
    total = 0.0
    for m in idx.split(micro):
        loss, _ = micro_loss(cfg, student, teacher, roll.select(m), norm, tw[m] if tw is not None else None,
                             cfg.policy_config(0))
        loss.backward()
        total += float(loss.detach())
    return total, [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in student.parameters()]


LOSSES = [
    dict(algo="rlad"),
    dict(algo="rlad", aggregation="seq_mean", ref_kl_coef=0.05, entropy_coef=0.01),
    dict(algo="grpo", aggregation="constant"),
    dict(algo="kdrl", kd_estimator="k2"),
    dict(algo="kdrl", kd_estimator="full"),
    dict(algo="opd", opd_kind="jsd"),
    dict(algo="opd", opd_kind="sampled", aggregation="seq_mean"),
    dict(algo="sft"),  # its NLL honours the mask too (sft batches are never truncated: see the pool)
]


@pytest.mark.parametrize("kw", LOSSES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_dropped_rows_leave_the_loss_exactly(tmp_path, models, tok, kw):
    """With drop_truncated, the loss and gradient of the batch (in micro-batches of 3) equal those
    of the batch that never had the truncated rows, built by selecting the kept rows (their
    advantages still from all eight rewards).

    The two sides sum the same terms in another order (micro-batches of 3 against one of 8), so
    they are compared in float64: reordering then moves a result by a few units of 2^-52 times the
    terms' magnitude, and rel 1e-9 holds on any CPU (in float32 the same reordering moved the
    gradients by a relative 1.6e-5 on one machine and less than 1e-5 on another)."""
    cfg = _cfg(tmp_path, models, drop_truncated=True, **kw)
    student, teacher, roll = _rollout(cfg, models, tok)
    student.double()
    teacher.double()
    for name in ("old_logp", "teacher_logp", "ref_logp", "advantages", "token_advantages", "kd_weights"):
        if getattr(roll, name, None) is not None:
            setattr(roll, name, getattr(roll, name).double())
    roll.keep = ~roll.truncated
    got, got_grads = _loss_and_grads(cfg, student, teacher, roll, micro=3)

    kept = roll.select(torch.nonzero(~roll.truncated).squeeze(1))
    kept.keep = None
    assert len(kept) == 6
    want, want_grads = _loss_and_grads(cfg, student, teacher, kept, micro=8)
    assert got == pytest.approx(want, rel=1e-9, abs=1e-12)
    assert any(g.abs().sum() > 0 for g in want_grads)
    assert all(g.dtype == torch.float64 for g in want_grads)
    for (name, _), a, b in zip(student.named_parameters(), got_grads, want_grads, strict=True):
        assert_rel(a, b, 1e-9, name)

    # and the truncated rows did matter: without the option they change the loss
    roll.keep = None
    assert _loss_and_grads(cfg, student, teacher, roll, micro=8)[0] != pytest.approx(want, rel=1e-4)


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean", "constant"])
def test_the_normalizer_leaves_out_the_dropped_rows(tmp_path, models, tok, aggregation):
    cfg = _cfg(tmp_path, models, drop_truncated=True, aggregation=aggregation)
    _, _, roll = _rollout(cfg, models, tok)
    roll.keep = ~roll.truncated
    idx = torch.tensor([0, 1, 2, 5, 6])  # a mini-batch holding both truncated rows
    kept_tokens = sum(int((roll.targets[i] != IGNORE).sum()) for i in (0, 2, 5))
    want = {"token_mean": kept_tokens, "seq_mean": 3, "constant": 3 * cfg.max_new_tokens}[aggregation]
    norm, _ = normalizer_for(cfg, roll, idx)
    assert float(norm) == want
    roll.keep = None
    all_tokens = sum(int((roll.targets[i] != IGNORE).sum()) for i in idx.tolist())
    assert float(normalizer_for(cfg, roll, idx)[0]) == {"token_mean": all_tokens, "seq_mean": 5,
                                                        "constant": 5 * cfg.max_new_tokens}[aggregation]


def test_collect_drops_only_from_the_loss_and_keeps_the_rewards_in_the_groups(tmp_path, models, tok):
    """collect with and without drop_truncated, same seed: the same responses, rewards and
    advantages (the truncated responses' rewards count in their groups); only ``keep`` differs."""
    student, teacher = load_model(models["student"], tok), load_model(models["teacher"], tok)
    exs = Echo().sample(random.Random(3), 4, [3])
    rolls = []
    for drop in (False, True):
        cfg = _cfg(tmp_path, models, levels=[3], max_new_tokens=4, drop_truncated=drop)
        torch.manual_seed(5)
        rolls.append(collect(cfg, student, teacher, None, tok, Echo(), exs, None, template=cfg.prompt_template))
    off, on = rolls
    assert torch.equal(off.input_ids, on.input_ids) and torch.equal(off.advantages, on.advantages)
    assert torch.equal(on.advantages, group_advantages(on.rewards, 4))
    assert off.keep is None and torch.equal(on.keep, ~on.truncated)
    assert 0 < int(on.truncated.sum()) < len(on)
    assert torch.equal(on.loss_mask, on.response_mask & ~on.truncated[:, None])


def test_sft_leaves_the_teachers_truncated_solutions_out_of_its_pool(tmp_path, models, tok, capsys):
    """Echo's answer '#### 7' is 3 tokens, its EOS the 4th: with max_new_tokens=3 the teacher's
    correct solutions are all cut off before their EOS. Kept without the option; with it, none is
    left (an error that says why); with room for the EOS, the option changes nothing."""
    teacher = load_model(models["teacher"], tok)

    def pool(**kw):
        cfg = _cfg(tmp_path, models, algo="sft", sft_prompts=8, **kw)
        return build_sft_pool(cfg, teacher, tok, Echo(), [1], 0, template=cfg.prompt_template)

    assert len(pool(max_new_tokens=3)) > 0
    with pytest.raises(ValueError, match=r"drop_truncated left out its \d+ correct solution\(s\) cut off at "
                                         r"max_new_tokens=3"):
        pool(max_new_tokens=3, drop_truncated=True)
    assert pool(max_new_tokens=6, drop_truncated=True) == pool(max_new_tokens=6)


def test_a_run_logs_the_truncated_fraction(tiny_config):
    """An untrained micro student rarely says EOS within 4 tokens. In this seeded run's first step
    every response is truncated: with drop_truncated nothing reaches the loss, which is 0, and so
    is the gradient, and the token metrics (entropy, ratio) are absent: no token is counted."""
    cfg = tiny_config(drop_truncated=True, max_new_tokens=4)
    train(cfg)
    with open(os.path.join(cfg.out_dir, "metrics.jsonl")) as f:
        steps = [r for r in map(json.loads, f) if not r.get("eval")]
    assert all(0.0 <= r["truncated_frac"] <= 1.0 for r in steps)
    first = steps[0]
    assert first["truncated_frac"] == 1.0 and first["response_len"] == 4.0
    assert first["loss"] == 0.0 and first["grad_norm"] == 0.0
    assert "entropy_mean" not in first and "ratio_mean" not in first


def test_a_mini_batch_with_nothing_to_learn_takes_no_optimizer_step(tiny_config, tok):
    """Every response of the first (and only) step is truncated and dropped: with weight decay, an
    AdamW step on the zero gradient would still shrink the weights; none is taken."""
    from safetensors.torch import load_file

    cfg = tiny_config(drop_truncated=True, max_new_tokens=4, weight_decay=0.5, lr=1e-2, steps=1)
    train(cfg)
    with open(os.path.join(cfg.out_dir, "metrics.jsonl")) as f:
        steps = [r for r in map(json.loads, f) if not r.get("eval")]
    assert steps[0]["truncated_frac"] == 1.0
    initial = load_model(cfg.student, tok, seed=cfg.seed).state_dict()
    model_dir = os.path.join(cfg.out_dir, "checkpoints", "step_000001", "model")
    saved = load_file(os.path.join(model_dir, "model.safetensors"))
    assert saved and all(torch.equal(saved[k], initial[k]) for k in saved)
