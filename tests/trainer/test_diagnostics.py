"""The study's per-step diagnostics (rlad/diagnostics.py) against hand-computed values, and in a
real run: the first mini-batch's clip fractions, the teacher scored for grpo, KL(old || new)."""

import json
import math

import pytest
import torch

from rlad.diagnostics import TEACHER_PREFERRED, anchor_shift, trrd_token_stats, update_stats

from helpers import small_run_config


def test_trrd_fractions_by_hand():
    # alpha 0.5, c = 1, eps 0.2 / 0.28: s = 0.5 clamp(gap, -1, 1); zeroed if s > log 1.28 = 0.247,
    # protected if s < log 0.8 = -0.223; teacher-preferred if gap < 2 log 0.8 = -0.446
    old = torch.tensor([[-1.0, -1.0, -1.0, -1.0], [-2.0, -2.0, -2.0, -2.0]])
    gap = torch.tensor([[0.6, 3.0, 0.4, -0.5], [-0.5, -0.4, -2.0, 0.9]])
    teacher = old - gap
    A = torch.tensor([[1.0] * 4, [-1.0] * 4])
    mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    s = anchor_shift(old, teacher, 0.5, 1.0)
    assert s[0, 1] == pytest.approx(0.5) and s[1, 2] == pytest.approx(-0.5)  # clamped at +-1
    st = trrd_token_stats(A, mask, old, teacher, alpha=0.5, clamp=1.0, eps_low=0.2, eps_high=0.28)
    # A > 0, masked tokens 0.6 / 3.0 / 0.4: s = 0.3, 0.5, 0.2 -> 2 of 3 past 0.247
    assert float(st["trrd_zeroed_frac"][0]) == pytest.approx(2 / 3) and int(st["trrd_zeroed_frac"][1]) == 3
    # A < 0: gaps -0.5 / -0.4 / -2.0 / 0.9: s = -0.25, -0.2, -0.5, 0.45 -> 2 of 4 below -0.223
    assert float(st["trrd_protected_frac"][0]) == pytest.approx(0.5) and int(st["trrd_protected_frac"][1]) == 4
    # teacher-preferred (gap < -0.446): -0.5 and -2.0 -> 2 of 4
    assert float(st["teacher_pref_frac"][0]) == pytest.approx(0.5)
    assert TEACHER_PREFERRED == pytest.approx(-0.4463, abs=1e-4)


def test_kl_and_room_used_by_hand():
    old = torch.tensor([[-1.0, -1.0, -1.0]])
    new = old + torch.tensor([[0.3, 0.1, -0.2]])
    teacher = old - torch.tensor([[-1.0, -1.0, 0.5]])  # the first two teacher-preferred
    A, mask = torch.ones(1, 3), torch.ones(1, 3, dtype=torch.bool)
    st = update_stats(A, mask, old, new, teacher, eps_high=0.28)
    k3 = [math.expm1(d) - d for d in (0.3, 0.1, -0.2)]
    assert float(st["kl_old_new"][0]) == pytest.approx(sum(k3) / 3, rel=1e-6)  # float32 log-probs: d to ~1e-7
    assert float(st["room_used"][0]) == pytest.approx(0.5) and int(st["room_used"][1]) == 2  # 0.3 > log 1.28
    assert "room_used" not in update_stats(A, mask, old, new, None, eps_high=0.28)
    st = update_stats(A, torch.zeros_like(mask), old, new, teacher, eps_high=0.28)
    assert int(st["kl_old_new"][1]) == 0 and float(st["kl_old_new"][0]) == 0.0  # no token: weight 0, left out


def _steps(out):
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if not r.get("eval")]


def test_a_grpo_run_sees_what_trrd_would_do(tmp_path, models):
    from rlad.launch import train

    train(small_run_config(tmp_path, models, algo="grpo", diagnostics=True, steps=3, levels=[1]))
    steps = _steps(tmp_path / "run")
    for r in steps:
        # the first mini-batch of a step runs the old policy: PPO's ratio is 1, nothing is clipped (a
        # fraction is left out of a step whose first mini-batch has no token of that sign)
        assert r.get("clip_frac_pos_first", 0.0) == 0.0 and r.get("clip_frac_neg_first", 0.0) == 0.0
        assert r["kl_old_new"] >= 0.0 and r["score_new_s"] > 0 and r["score_teacher_s"] > 0
    assert any("trrd_zeroed_frac" in r or "trrd_protected_frac" in r for r in steps)
    assert any("clip_frac_pos_first" in r for r in steps) and any("clip_frac_neg_first" in r for r in steps)
    assert any(r["kl_old_new"] > 0 for r in steps)  # lr 1e-3: two optimizer steps move the policy


def test_rlad_first_mini_batch_clips_what_the_anchor_zeroes(tmp_path, models):
    """With one mini-batch in one micro-batch, the first mini-batch is the whole batch at the old
    policy: the A > 0 tokens it clips are exactly those whose anchor shift alone passes 1 + eps_high
    (the loss recomputes the log-probs the anchor used, equal to float rounding, ~1e-6 nats: a token
    that close to a boundary could fall either way; none does in these batches)."""
    from rlad.launch import train

    train(small_run_config(tmp_path, models, algo="rlad", steps=3, mini_batches=1, micro_batch_size=64))
    steps = [r for r in _steps(tmp_path / "run") if "trrd_zeroed_frac" in r]
    assert steps
    for r in steps:
        assert r["clip_frac_pos_first"] == pytest.approx(r["trrd_zeroed_frac"], abs=1e-6)
        assert r["clip_frac_neg_first"] == pytest.approx(r["trrd_protected_frac"], abs=1e-6)
    assert "kl_old_new" not in steps[0]  # without diagnostics: no extra forward pass
