"""Triton policy-loss epilogue of the streaming log-prob forward kernel.

``policy_epilogue`` evaluates, per token, the loss of ``math.policy_token_loss`` and its
derivatives ``dL/dlogp`` and ``dL/dentropy`` in closed form (the tests check it against
autograd through the torch definition on every branch). ``logprobs/kernels.py`` calls it after
the last vocabulary tile of a token block, so one launch yields the per-token gradient factors
(kept for the backward), the per-block loss sums and the metric counters. Nothing but O(N)
leaves the kernel.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Keep in sync with math.LOG_RATIO_CAP and math.STAT_FIELDS (the tests compare all paths).
LOG_RATIO_CAP = tl.constexpr(20.0)


@triton.jit
def _clamp(x, lo, hi):
    # comparisons keep NaN as NaN (tl.minimum/maximum may drop it)
    return tl.where(x < lo, lo, tl.where(x > hi, hi, x))


@triton.jit
def policy_epilogue(
    b_lp, b_ent, valid, o_n, i_blk,
    adv_ptr, old_ptr, teach_ptr, ref_ptr, tw_ptr, kdw_ptr, glp_ptr, gent_ptr, stat_ptr,
    alpha, eps_low, eps_high, clamp_c, dual_c, kd_coef, ref_coef, ent_coef, log_a, log_1ma,
    TEACHER: tl.constexpr, HAS_CLAMP: tl.constexpr, HAS_DUAL: tl.constexpr, KD: tl.constexpr,
    HAS_REF: tl.constexpr, ENTROPY: tl.constexpr, ENT_BONUS: tl.constexpr, HAS_TW: tl.constexpr,
    HAS_KDW: tl.constexpr, NSTAT: tl.constexpr, m_n,
):
    """TEACHER: 0 none (GRPO), 1 geometric TRRD, 2 arithmetic mixture. KD: 0 none, 1/2/3 = k1/k2/k3."""
    b_a = tl.load(adv_ptr + o_n, mask=valid, other=0.0).to(tl.float32)
    b_old = tl.load(old_ptr + o_n, mask=valid, other=0.0).to(tl.float32)
    b_one = tl.full(b_lp.shape, 1.0, dtype=tl.float32)
    b_zero = tl.zeros(b_lp.shape, dtype=tl.float32)
    b_dlogr = b_one  # d log_r / d logp
    b_clamped = b_zero
    b_gap = b_zero
    b_lt = b_zero
    if TEACHER == 0:
        b_logr = b_lp - b_old
    else:
        b_lt = tl.load(teach_ptr + o_n, mask=valid, other=0.0).to(tl.float32)
        b_gap = b_old - b_lt
        if TEACHER == 1:
            b_d = b_lp - b_lt
            if HAS_CLAMP:
                is_clamped = (b_d < -clamp_c) | (b_d > clamp_c)
                b_clamped = tl.where(is_clamped, 1.0, 0.0)
                b_d = _clamp(b_d, -clamp_c, clamp_c)
                b_dlogr = tl.where(is_clamped, alpha, 1.0)
            b_logr = alpha * (b_lp - b_old) + (1.0 - alpha) * b_d
        else:
            b_u = b_old + log_a
            b_v = b_lt + log_1ma
            b_mx = tl.maximum(b_u, b_v)
            b_logm = b_mx + tl.log(tl.exp(b_u - b_mx) + tl.exp(b_v - b_mx))
            b_logr = b_lp - b_logm
    capped = b_logr > LOG_RATIO_CAP
    b_r = tl.exp(tl.where(capped, LOG_RATIO_CAP, b_logr))
    b_dlogr = tl.where(capped, 0.0, b_dlogr)

    b_pg1 = -b_a * b_r
    b_pg2 = -b_a * _clamp(b_r, 1.0 - eps_low, 1.0 + eps_high)
    clipped = b_pg2 > b_pg1
    b_loss = tl.where(clipped, b_pg2, b_pg1)
    b_g = tl.where(clipped, 0.0, -b_a * b_r)  # dL/dlog_r
    b_dual = b_zero
    if HAS_DUAL:
        b_pg3 = -b_a * dual_c
        dual_on = (b_a < 0) & (b_pg3 < b_loss)
        b_dual = tl.where(dual_on, 1.0, 0.0)
        b_loss = tl.where(dual_on, b_pg3, b_loss)
        b_g = tl.where(dual_on, 0.0, b_g)
    b_g = b_g * b_dlogr

    b_kl = b_zero
    if HAS_REF:
        b_x = tl.load(ref_ptr + o_n, mask=valid, other=0.0).to(tl.float32) - b_lp
        b_xc = _clamp(b_x, -LOG_RATIO_CAP, LOG_RATIO_CAP)
        b_ex = tl.exp(b_xc)
        b_kl = b_ex - b_xc - 1.0
        b_loss += ref_coef * b_kl
        b_g += ref_coef * tl.where((b_x < -LOG_RATIO_CAP) | (b_x > LOG_RATIO_CAP), 0.0, 1.0 - b_ex)

    b_kd = b_zero
    if KD != 0:
        b_R = b_lt - b_lp
        if KD == 1:
            b_kd = -b_R
            b_dkd = b_one
        elif KD == 2:
            b_kd = 0.5 * b_R * b_R
            b_dkd = -b_R
        else:
            b_Rc = _clamp(b_R, -LOG_RATIO_CAP, LOG_RATIO_CAP)
            b_eR = tl.exp(b_Rc)
            b_kd = b_eR - b_Rc - 1.0
            b_dkd = tl.where((b_R < -LOG_RATIO_CAP) | (b_R > LOG_RATIO_CAP), 0.0, 1.0 - b_eR)
        if HAS_KDW:
            b_kw = tl.load(kdw_ptr + o_n, mask=valid, other=0.0).to(tl.float32)
        else:
            b_kw = b_one
        b_loss += kd_coef * b_kw * b_kd
        b_g += kd_coef * b_kw * b_dkd

    if ENT_BONUS:
        b_loss -= ent_coef * b_ent

    # non-finite constants (A, lp_old, lp_T, lp_ref, kd weight) give NaN loss and gradient
    # (x - x is NaN exactly when x is inf or NaN)
    b_chk = (b_a - b_a) + (b_old - b_old)
    if TEACHER != 0:
        b_chk += b_lt - b_lt
    if HAS_REF:
        b_chk += b_x - b_x
    if KD != 0:
        b_chk += b_kw - b_kw
    bad = b_chk != 0.0
    b_loss = tl.where(bad, float("nan"), b_loss)
    b_g = tl.where(bad, float("nan"), b_g)

    if HAS_TW:
        b_w = tl.load(tw_ptr + o_n, mask=valid, other=0.0).to(tl.float32)
    else:
        b_w = b_one
    b_w = tl.where(valid, b_w, 0.0)
    tl.store(glp_ptr + o_n, tl.where(valid, b_w * b_g, 0.0), mask=m_n)
    if ENT_BONUS:
        tl.store(gent_ptr + o_n, tl.where(valid, -ent_coef * b_w, 0.0), mask=m_n)

    # per-block sums over valid tokens, in math.STAT_FIELDS order
    p_s = stat_ptr + i_blk * NSTAT
    tl.store(p_s + 0, tl.sum(tl.where(valid, b_w * b_loss, 0.0), axis=0))
    tl.store(p_s + 1, tl.sum(b_w, axis=0))
    tl.store(p_s + 2, tl.sum(tl.where(valid, 1.0, 0.0), axis=0))
    tl.store(p_s + 3, tl.sum(tl.where(valid & (b_a > 0), 1.0, 0.0), axis=0))
    tl.store(p_s + 4, tl.sum(tl.where(valid & (b_a < 0), 1.0, 0.0), axis=0))
    tl.store(p_s + 5, tl.sum(tl.where(valid & (b_a > 0) & clipped, 1.0, 0.0), axis=0))
    tl.store(p_s + 6, tl.sum(tl.where(valid & (b_a < 0) & clipped, 1.0, 0.0), axis=0))
    tl.store(p_s + 7, tl.sum(tl.where(valid, b_dual, 0.0), axis=0))
    tl.store(p_s + 8, tl.sum(tl.where(valid, b_r, 0.0), axis=0))
    tl.store(p_s + 9, tl.sum(tl.where(valid, b_clamped, 0.0), axis=0))
    tl.store(p_s + 10, tl.sum(tl.where(valid, b_gap, 0.0), axis=0))
    tl.store(p_s + 11, tl.sum(tl.where(valid, b_ent, 0.0), axis=0))
    tl.store(p_s + 12, tl.sum(tl.where(valid, b_kd, 0.0), axis=0))
    tl.store(p_s + 13, tl.sum(tl.where(valid, b_kl, 0.0), axis=0))
