"""Triton kernels of ``linear_policy_loss``: the common log-prob scan plus the policy epilogue.

* ``policy_fwd_kernel``: one program per (token block, vocab split) streams its share of the
  vocabulary (``common/logprob.py: scan_rows``); with one split it finishes the rows and runs
  ``policy_epilogue`` in the same launch, otherwise it stores partials and
  ``policy_combine_kernel`` merges them, finishes the rows and runs the epilogue.
* ``policy_epilogue`` evaluates, per token, the loss of ``math.policy_token_loss`` and its
  derivatives ``dL/dlogp`` and ``dL/dentropy`` in closed form (the tests check it against
  autograd through the torch definition on every branch). One launch yields the per-token
  gradient factors (kept for the backward, the shared ``common/logprob.py`` one), the
  per-block loss sums and the metric counters. Nothing but O(N) leaves the kernel.

Epilogue arguments (built by ``triton_impl.epilogue_args``): ``tok``, a ``math.TokenInputs``
of float32 [N] pointers, with ``HAS``, the same type of constexpr presence flags; ``coef``,
an ``EpilogueCoefs`` of floats; ``EPI``, an ``EpilogueFlags`` of constexpr options; ``out``,
the ``EpilogueOut`` pointers.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..common.logprob import finish_rows, load_targets, merge_partials, scan_rows, store_partials
from ..common.tiles import logaddexp, row_block, token_split
from .math import LOG_RATIO_CAP as _CAP
from .math import Stats

LOG_RATIO_CAP = tl.constexpr(_CAP)


class EpilogueCoefs(NamedTuple):
    alpha: float
    eps_low: float
    eps_high: float
    clamp_c: float      # teacher clamp c (unused without EPI.HAS_CLAMP)
    clamp_slope: float  # d log_r / d lp where the clamp is active: alpha, or 1 (straight-through)
    align_c: float      # gate (EPI.GATE): drop the teacher term where |lp_old - lp_T| > align_c (inf: off)
    adv_c: float        # gate: ... or where |A| < adv_c (0: off)
    dual_c: float       # dual-clip constant (unused without EPI.HAS_DUAL)
    kd_coef: float
    ref_coef: float
    ent_coef: float
    log_a: float        # log(alpha), log(1 - alpha): the arithmetic mixture's weights
    log_1ma: float
    cispo_max: float    # CISPO's cap on the importance weight (EPI.CISPO)


class EpilogueFlags(NamedTuple):
    ARITHMETIC: bool    # the arithmetic mixture anchor instead of the geometric one (with a teacher)
    HAS_CLAMP: bool     # teacher clamp
    GATE: bool          # gated TRRD (teacher_align_threshold / teacher_adv_threshold)
    HAS_DUAL: bool      # dual clip
    KD: int             # 0 none, 1 k1, 2 k2, 3 k3
    ENT_BONUS: bool     # the entropy bonus is a term of L_t (entropy_coef != 0, entropy_aggregation="loss")
    CISPO: bool         # objective="cispo": L = -sg(min(r, cispo_max)) A lp instead of the PPO clip


class EpilogueOut(NamedTuple):
    glp: torch.Tensor   # [N] dL/dlogp per token (times its weight), for the backward
    gent: torch.Tensor  # [N] dL/dentropy (with ENT_BONUS; else a placeholder)
    stat: torch.Tensor  # [blocks, len(STAT_FIELDS)] per-block sums


@triton.jit
def _clamp(x, lo, hi):
    # comparisons keep NaN as NaN (tl.minimum/maximum may drop it)
    return tl.where(x < lo, lo, tl.where(x > hi, hi, x))


@triton.jit
def _load(ptr, o_n, valid):
    return tl.load(ptr + o_n, mask=valid, other=0.0).to(tl.float32)


@triton.jit
def policy_epilogue(b_lp, b_ent, valid, m_n, o_n, i_blk, tok, coef, out, HAS: tl.constexpr, EPI: tl.constexpr,
                    ENTROPY: tl.constexpr):
    """Per-token loss, gradient factors and per-block sums of one token block."""
    b_a = _load(tok.advantages, o_n, valid)
    b_old = _load(tok.old_logp, o_n, valid)
    b_one = tl.full(b_lp.shape, 1.0, dtype=tl.float32)
    b_zero = tl.zeros(b_lp.shape, dtype=tl.float32)
    b_dlogr = b_one  # d log_r / d logp
    b_clamp_hi = b_zero
    b_clamp_lo = b_zero
    b_gated = b_zero
    b_gap = b_zero
    b_lt = b_zero
    if HAS.teacher_logp:
        b_lt = _load(tok.teacher_logp, o_n, valid)
        b_gap = b_old - b_lt
        if EPI.ARITHMETIC:  # log r = lp - log(alpha pi_old + (1 - alpha) pi_T)
            b_logr = b_lp - logaddexp(b_old + coef.log_a, b_lt + coef.log_1ma)
        else:  # log r = alpha (lp - lp_old) + (1 - alpha) clamp(lp - lp_T, -c, c)
            b_d = b_lp - b_lt
            if EPI.HAS_CLAMP:
                above = b_d > coef.clamp_c
                below = b_d < -coef.clamp_c
                b_clamp_hi = tl.where(above, 1.0, 0.0)
                b_clamp_lo = tl.where(below, 1.0, 0.0)
                b_d = _clamp(b_d, -coef.clamp_c, coef.clamp_c)
                b_dlogr = tl.where(above | below, coef.clamp_slope, 1.0)
            b_logr = coef.alpha * (b_lp - b_old) + (1.0 - coef.alpha) * b_d
        if EPI.GATE:  # gated TRRD: the GRPO ratio where the gate (inputs only) drops the teacher term
            gate = (tl.abs(b_gap) > coef.align_c) | (tl.abs(b_a) < coef.adv_c)
            b_gated = tl.where(gate, 1.0, 0.0)
            b_logr = tl.where(gate, b_lp - b_old, b_logr)
            b_dlogr = tl.where(gate, 1.0, b_dlogr)
            b_clamp_hi = tl.where(gate, 0.0, b_clamp_hi)
            b_clamp_lo = tl.where(gate, 0.0, b_clamp_lo)
    else:
        b_logr = b_lp - b_old
    capped = b_logr > LOG_RATIO_CAP
    b_r = tl.exp(tl.where(capped, LOG_RATIO_CAP, b_logr))
    b_dlogr = tl.where(capped, 0.0, b_dlogr)

    b_dual = b_zero
    b_cap = b_zero
    if EPI.CISPO:  # L = -sg(min(r, cispo_max)) A lp, so dL/dlp = -min(r, cispo_max) A (no d log_r / d lp)
        clipped = b_r > coef.cispo_max
        b_cap = tl.where(clipped, 1.0, 0.0)
        b_wis = tl.where(clipped, coef.cispo_max, b_r)
        b_loss = -b_wis * b_a * b_lp
        b_g = -b_wis * b_a
    else:
        b_pg1 = -b_a * b_r
        b_pg2 = -b_a * _clamp(b_r, 1.0 - coef.eps_low, 1.0 + coef.eps_high)
        clipped = b_pg2 > b_pg1
        b_loss = tl.where(clipped, b_pg2, b_pg1)
        b_g = tl.where(clipped, 0.0, -b_a * b_r)  # dL/dlog_r
        if EPI.HAS_DUAL:
            b_pg3 = -b_a * coef.dual_c
            dual_on = (b_a < 0) & (b_pg3 < b_loss)
            b_dual = tl.where(dual_on, 1.0, 0.0)
            b_loss = tl.where(dual_on, b_pg3, b_loss)
            b_g = tl.where(dual_on, 0.0, b_g)
        b_g = b_g * b_dlogr

    b_kl = b_zero
    if HAS.ref_logp:  # k3(lp_ref - lp)
        b_x = _load(tok.ref_logp, o_n, valid) - b_lp
        b_xc = _clamp(b_x, -LOG_RATIO_CAP, LOG_RATIO_CAP)
        b_ex = tl.exp(b_xc)
        b_kl = b_ex - b_xc - 1.0
        b_loss += coef.ref_coef * b_kl
        b_g += coef.ref_coef * tl.where((b_x < -LOG_RATIO_CAP) | (b_x > LOG_RATIO_CAP), 0.0, 1.0 - b_ex)

    b_kd = b_zero
    b_kw = b_one
    if EPI.KD != 0:
        b_R = b_lt - b_lp
        if EPI.KD == 1:
            b_kd = -b_R
            b_dkd = b_one
        elif EPI.KD == 2:
            b_kd = 0.5 * b_R * b_R
            b_dkd = -b_R
        else:
            b_Rc = _clamp(b_R, -LOG_RATIO_CAP, LOG_RATIO_CAP)
            b_eR = tl.exp(b_Rc)
            b_kd = b_eR - b_Rc - 1.0
            b_dkd = tl.where((b_R < -LOG_RATIO_CAP) | (b_R > LOG_RATIO_CAP), 0.0, 1.0 - b_eR)
        if HAS.kd_weights:
            b_kw = _load(tok.kd_weights, o_n, valid)
        b_loss += coef.kd_coef * b_kw * b_kd
        b_g += coef.kd_coef * b_kw * b_dkd

    if EPI.ENT_BONUS:
        b_loss -= coef.ent_coef * b_ent

    # non-finite constants (A, lp_old, lp_T, lp_ref, kd weight) give NaN loss and gradient
    # (x - x is NaN exactly when x is inf or NaN)
    b_chk = (b_a - b_a) + (b_old - b_old) + (b_lt - b_lt) + (b_kw - b_kw)
    if HAS.ref_logp:
        b_chk += b_x - b_x
    bad = b_chk != 0.0
    b_loss = tl.where(bad, float("nan"), b_loss)
    b_g = tl.where(bad, float("nan"), b_g)

    b_w = b_one
    if HAS.token_weights:
        b_w = _load(tok.token_weights, o_n, valid)
    b_w = tl.where(valid, b_w, 0.0)
    tl.store(out.glp + o_n, tl.where(valid, b_w * b_g, 0.0), mask=m_n)
    if EPI.ENT_BONUS:
        tl.store(out.gent + o_n, tl.where(valid, -coef.ent_coef * b_w, 0.0), mask=m_n)
    if not ENTROPY:
        b_ent = b_zero

    # per-block sums over valid tokens, stored in math.STAT_FIELDS order
    v = tl.where(valid, 1.0, 0.0)
    sums = Stats(
        loss_sum=tl.sum(tl.where(valid, b_w * b_loss, 0.0), axis=0),
        weight_sum=tl.sum(b_w, axis=0),
        tokens=tl.sum(v, axis=0),
        adv_pos=tl.sum(tl.where(b_a > 0, v, 0.0), axis=0),
        adv_neg=tl.sum(tl.where(b_a < 0, v, 0.0), axis=0),
        clip_pos=tl.sum(tl.where((b_a > 0) & clipped, v, 0.0), axis=0),
        clip_neg=tl.sum(tl.where((b_a < 0) & clipped, v, 0.0), axis=0),
        dual_clip=tl.sum(tl.where(valid, b_dual, 0.0), axis=0),
        ratio=tl.sum(tl.where(valid, b_r, 0.0), axis=0),
        teacher_clamp_hi=tl.sum(tl.where(valid, b_clamp_hi, 0.0), axis=0),
        teacher_clamp_lo=tl.sum(tl.where(valid, b_clamp_lo, 0.0), axis=0),
        teacher_gate=tl.sum(tl.where(valid, b_gated, 0.0), axis=0),
        teacher_gap=tl.sum(tl.where(valid, b_gap, 0.0), axis=0),
        entropy=tl.sum(tl.where(valid, b_ent, 0.0), axis=0),
        kd=tl.sum(tl.where(valid, b_kd, 0.0), axis=0),
        ref_kl=tl.sum(tl.where(valid, b_kl, 0.0), axis=0),
        cispo_cap=tl.sum(tl.where(valid, b_cap, 0.0), axis=0),
    )
    for i in tl.static_range(len(sums)):
        tl.store(out.stat + i_blk * len(sums) + i, sums[i])


@triton.jit(do_not_specialize=["N", "tiles_per_split"])
def policy_fwd_kernel(
    head, y_ptr, rows, parts, tok, coef, out, N, V, H, ignore_index, tiles_per_split,
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, ENTROPY: tl.constexpr, SPLIT: tl.constexpr, HAS: tl.constexpr,
    EPI: tl.constexpr,
    BN: tl.constexpr, BV: tl.constexpr, BH: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    i_s, i_n, o_n, m_n, v_lo, v_hi = token_split(N, V, tiles_per_split, BN, BV)
    b_y, valid = load_targets(y_ptr, o_n, m_n, ignore_index)
    b_m, b_l, b_s, b_t = scan_rows(head, H, b_y, o_n, valid, v_lo, v_hi, HAS_BIAS, SOFTCAP, ENTROPY, BN, BV, BH,
                                   DOT_PRECISION, UPCAST)
    if SPLIT == 1:
        b_lp, b_ent = finish_rows(rows, b_m, b_l, b_s, b_t, b_y, valid, o_n, m_n, V, ENTROPY)
        policy_epilogue(b_lp, b_ent, valid, m_n, o_n, i_n, tok, coef, out, HAS, EPI, ENTROPY)
    else:
        store_partials(parts, i_s, N, o_n, m_n, b_m, b_l, b_s, b_t)


@triton.jit(do_not_specialize=["N"])
def policy_combine_kernel(y_ptr, rows, parts, tok, coef, out, N, V, ignore_index, ENTROPY: tl.constexpr,
                          SPLIT: tl.constexpr, HAS: tl.constexpr, EPI: tl.constexpr, BN: tl.constexpr):
    """Second launch when the vocabulary was split: merge partials, finish the rows, run the epilogue."""
    i_n, o_n, m_n = row_block(N, BN)
    b_y, valid = load_targets(y_ptr, o_n, m_n, ignore_index)
    b_m, b_l, b_s, b_t = merge_partials(parts, o_n, m_n, N, SPLIT, BN)
    b_lp, b_ent = finish_rows(rows, b_m, b_l, b_s, b_t, b_y, valid, o_n, m_n, V, ENTROPY)
    policy_epilogue(b_lp, b_ent, valid, m_n, o_n, i_n, tok, coef, out, HAS, EPI, ENTROPY)
