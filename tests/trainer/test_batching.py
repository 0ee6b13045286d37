"""Token-budget micro-batches (``rlad.batching``) and gradient checkpointing: the packing covers
every row once within its budget, in length-sorted runs; a micro-batch cut to its window keeps
every value it needs; the gradient (and SGD's update) and the scored log-probs equal those of the
plain split, and gradient checkpointing on the ``decoder_hidden`` path gives the same gradient.

Tolerances: the paths differ only in how float32 sums are grouped (micro-batch sizes, matmuls
over fewer padded key columns, the order in which micro-batch gradients accumulate), so the
results agree up to float32 rounding relative to each tensor's scale; ``1e-5`` is the bound the
trainer's accumulation test uses (float32's 6e-8 per operation over a few hundred operations)."""

import contextlib
import random
from dataclasses import fields

import pytest
import torch

from rlad.batching import pack, plan, windows
from rlad.config import TrainConfig
from rlad.launch import train
from rlad.models import load_model
from rlad.rollout import IGNORE, SEQ_FIELDS, TOKEN_FIELDS, Rollout, from_pairs, group_advantages, score
from rlad.tasks import Example
from rlad.train import micro_loss, normalizer_for, update

from helpers import assert_rel

TOL = 1e-5


# ----------------------------------------------------------------------------- packing
def _random_windows(rng, n):
    P = rng.randint(3, 12)  # the prompts end at column P, the responses start there
    start = [P - rng.randint(1, P) for _ in range(n)]
    end = [P + rng.randint(1, 60) for _ in range(n)]
    return start, end


@pytest.mark.parametrize("seed", range(20))
def test_pack_covers_every_row_once_within_the_budget_in_sorted_runs(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 40)
    start, end = _random_windows(rng, n)
    budget = rng.choice([1, 16, 50, 64, 100, 300, 10_000])
    groups = pack(start, end, budget)
    flat = [i for g in groups for i in g]
    assert sorted(flat) == list(range(n))  # every row exactly once
    lengths = [end[i] - start[i] for i in flat]
    assert lengths == sorted(lengths, reverse=True)  # consecutive runs of the length-sorted rows
    for g in groups:
        width = max(end[i] for i in g) - min(start[i] for i in g)
        assert len(g) == 1 or len(g) * width <= budget  # a single longer row goes alone
    # greedy: the next group's first row would not have fit into the group before it
    for a, b in zip(groups[:-1], groups[1:], strict=True):
        g = a + [b[0]]
        assert len(g) * (max(end[i] for i in g) - min(start[i] for i in g)) > budget


def test_pack_refuses_a_budget_below_one():
    with pytest.raises(ValueError, match="micro_batch_tokens must be >= 1"):
        pack([0], [3], 0)


def test_windows_of_left_and_right_padded_rows():
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]])
    assert windows(mask) == ([2, 0, 1, 0], [5, 4, 6, 6])


# ----------------------------------------------------------------------------- a rollout
def _rollout(tok, n=10, seed=0):
    """``n`` (prompt, response) rows of varied prompt and response lengths (so that rows are
    left- and right-padded differently), as ``from_pairs`` assembles them."""
    rng = random.Random(seed)
    exs = [Example(prompt="Echo " + " ".join(str(rng.randint(0, 9)) for _ in range(rng.randint(1, 6))), answer="1")
           for _ in range(n)]
    resp = [" ".join(str(rng.randint(0, 9)) for _ in range(rng.randint(1, 25))) + " #### 1" for _ in range(n)]
    return from_pairs(tok, exs, resp, None, template="{prompt}\n", device="cpu")


def test_cut_keeps_every_value_and_cuts_only_padding(tok):
    roll = _rollout(tok)
    roll.old_logp = torch.randn(roll.targets.shape)
    roll.token_advantages = torch.randn(roll.targets.shape)
    idx = torch.arange(len(roll))
    parts = plan(roll.attention_mask, idx, 64)
    assert len(parts) > 1
    seen = []
    for rows, cols in parts:
        full, mb = roll.select(rows), roll.select(rows).cut(cols)
        s, e = cols.start, cols.stop
        assert mb.input_ids.shape == (len(rows), e - s) and mb.targets.shape == (len(rows), e - s - 1)
        assert len(rows) == 1 or len(rows) * (e - s) <= 64
        for name in SEQ_FIELDS:
            assert torch.equal(getattr(mb, name), getattr(full, name)[:, s:e])
        for name in ("targets", "old_logp", "token_advantages"):
            assert torch.equal(getattr(mb, name), getattr(full, name)[:, s:e - 1])
        # what was cut is padding in every row: no attended token, no target
        assert full.attention_mask[:, :s].sum() == 0 and full.attention_mask[:, e:].sum() == 0
        assert (full.targets[:, :s] == IGNORE).all() and (full.targets[:, e - 1:] == IGNORE).all()
        assert torch.equal(mb.loss_mask.sum(-1), full.loss_mask.sum(-1))
        # position ids of the attended tokens are unchanged (they count from each row's first token)
        assert torch.equal(mb.position_ids[mb.attention_mask.bool()], full.position_ids[full.attention_mask.bool()])
        seen += rows.tolist()
    assert sorted(seen) == list(range(len(roll)))


def test_every_per_token_rollout_field_is_cut():
    """A new [B, L] or [B, L-1] field of Rollout must be named in SEQ_FIELDS or TOKEN_FIELDS."""
    tensors = {f.name for f in fields(Rollout)} - {"examples", "texts", "group_size"}
    per_row = {"rewards", "advantages", "truncated", "keep"}
    assert tensors == set(SEQ_FIELDS) | set(TOKEN_FIELDS) | per_row


# ----------------------------------------------------------------------------- gradients
def _models(tok):
    student = load_model("preset:tiny-student", tok, seed=0)
    teacher = load_model("preset:tiny-student", tok, seed=1)
    return student, teacher


def _scored(tok, student, teacher, kd=False, **score_kw):
    torch.manual_seed(0)
    roll = _rollout(tok)
    kw = dict(temperature=1.0, micro_batch=64, **score_kw)
    # the old policy a little off the current one, so the ratio is not 1 and the clip acts on some tokens
    roll.old_logp = score(student, roll, **kw) + 0.3 * torch.randn(roll.targets.shape) * roll.response_mask
    roll.teacher_logp = score(teacher, roll, **kw)
    roll.rewards = torch.tensor([1.0, 0.0] * (len(roll) // 2))
    roll.advantages = group_advantages(roll.rewards, 2)
    if kd:  # kdrl's per-token KD weights: no KD on the rewarded rows
        roll.kd_weights = (roll.rewards < 1)[:, None].float().expand(roll.targets.shape).contiguous()
    roll.keep = torch.ones(len(roll), dtype=torch.bool)
    roll.keep[3] = False  # drop_truncated: a row out of the loss
    return roll


def _cfg(tmp_path, **kw):
    base = dict(out_dir=str(tmp_path / "run"), student="preset:tiny-student", teacher="preset:tiny-student",
                task="echo", levels=[1], mini_batches=1, micro_batch_size=64, lr=1e-2, max_new_tokens=32)
    base.update(kw)
    return TrainConfig(**base)


def _grads(cfg, student, teacher, roll, *, size, tokens):
    student.zero_grad(set_to_none=True)
    idx = torch.arange(len(roll))
    norm, tw = normalizer_for(cfg, roll, idx)
    n = 0
    for mb, mtw in roll.micro_batches(idx, tw, size=size, tokens=tokens):
        loss, _ = micro_loss(cfg, student, teacher, mb, norm, mtw, cfg.policy_config(0))
        loss.backward()
        n += 1
    return {k: p.grad.clone() for k, p in student.named_parameters() if p.grad is not None}, n


@pytest.mark.parametrize("kw", [dict(algo="rlad"), dict(algo="rlad", aggregation="seq_mean"),
                                dict(algo="kdrl", kd_estimator="full", aggregation="constant"),
                                dict(algo="opd", opd_kind="jsd"), dict(algo="sft")],
                         ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_token_budget_gives_the_gradient_of_one_micro_batch(tmp_path, tok, kw):
    student, teacher = _models(tok)
    roll = _scored(tok, student, teacher, kd=kw["algo"] == "kdrl")
    cfg = _cfg(tmp_path, **kw)
    whole, _ = _grads(cfg, student, teacher, roll, size=len(roll), tokens=0)
    budget, n = _grads(cfg, student, teacher, roll, size=len(roll), tokens=80)
    assert n > 2  # the budget split the rows
    assert whole.keys() == budget.keys() and any(g.abs().sum() > 0 for g in whole.values())
    for name in whole:
        assert_rel(budget[name], whole[name], TOL, name)


def test_one_update_with_a_token_budget_moves_the_parameters_as_one_micro_batch(tmp_path, tok):
    """``update`` itself: parameters after one SGD step (SGD, not AdamW, whose first step is
    lr * sign(g) and would magnify rounding on near-zero gradients into full steps). The large
    learning rate makes the step large against the float32 rounding of the parameters themselves
    (the step is read back as ``after - before``)."""
    student, teacher = _models(tok)
    roll = _scored(tok, student, teacher)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    moved = {}
    for tokens, size in ((0, len(roll)), (60, 64)):
        cfg = _cfg(tmp_path, algo="rlad", micro_batch_tokens=tokens, micro_batch_size=size)
        student.load_state_dict(before)
        opt = torch.optim.SGD(student.parameters(), lr=100.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0)
        torch.manual_seed(0)
        stats = update(cfg, student, teacher, roll, opt, sched, 0, contextlib.nullcontext, {"nan_skips": 0})
        moved[tokens] = {k: v - before[k] for k, v in student.state_dict().items()}
        assert len(stats["loss"]) == 1
    assert any(d.abs().sum() > 0 for d in moved[0].values())
    for name in moved[0]:
        assert_rel(moved[60][name], moved[0][name], TOL, name)


def test_scoring_with_a_token_budget_gives_the_same_log_probs(tok):
    student, _ = _models(tok)
    roll = _rollout(tok)
    plain = score(student, roll, temperature=0.7, micro_batch=3)
    budget = score(student, roll, temperature=0.7, micro_batch=3, micro_batch_tokens=70)
    assert (plain[~roll.response_mask] == 0).all() and (budget[~roll.response_mask] == 0).all()
    assert_rel(budget, plain, TOL, "log-probs")


# ----------------------------------------------------------------------------- gradient checkpointing
@pytest.mark.parametrize("tokens", [0, 80], ids=["micro_batch_size", "micro_batch_tokens"])
def test_gradient_checkpointing_gives_the_same_gradient(tmp_path, tok, tokens):
    """On the trainer's path (``decoder_hidden``, then the fused loss), with and without a token
    budget: the decoder layers really recompute in the backward (each runs twice per step), and
    the gradient is the same up to rounding."""
    student, teacher = _models(tok)
    roll = _scored(tok, student, teacher)
    cfg = _cfg(tmp_path, algo="rlad")
    student.train()
    plain, _ = _grads(cfg, student, teacher, roll, size=4, tokens=tokens)
    student.gradient_checkpointing_enable()  # as rlad.train does
    # count the calls of a module inside a layer: the recomputation runs no module hooks, so wrap its forward
    mlp, calls = student.get_decoder().layers[0].mlp, []
    forward = mlp.forward
    mlp.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)
    ckpt, n = _grads(cfg, student, teacher, roll, size=4, tokens=tokens)
    assert len(calls) == 2 * n  # forward, and its recomputation in the backward
    assert plain.keys() == ckpt.keys()
    for name in plain:
        assert_rel(ckpt[name], plain[name], TOL, name)


# ----------------------------------------------------------------------------- the trainer
def test_a_run_with_a_token_budget_and_checkpointing_trains(tiny_config):
    cfg = tiny_config(micro_batch_tokens=24, gradient_checkpointing=True, prompts_per_step=4, save_every=0)
    summary = train(cfg)
    assert summary["nan_skips"] == 0


def test_micro_batch_tokens_is_resume_safe_and_checked(tiny_config):
    cfg = tiny_config()
    assert cfg.resume_changes({**cfg.to_dict(), "micro_batch_tokens": 4096}) == []
    with pytest.raises(ValueError, match="micro_batch_tokens"):
        tiny_config(micro_batch_tokens=-1)
