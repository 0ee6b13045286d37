"""Triton kernels for full-vocabulary teacher-student divergences from hidden states.

Each tile holds a student logit tile ``x_s @ w_s.T`` and the matching teacher tile
``x_t @ w_t.T`` (different hidden sizes, same vocabulary columns; a padded teacher vocabulary
is cut at the student's V). Per token, only O(1) statistics leave the kernels:

* ``div_stats_kernel``: per (token block, vocab split), online max / sum-exp of both logits
  and, for the KL kinds, the moment ``A = sum e^(u - sh_u) ((u - sh_u) - (v - sh_v))`` with
  ``u`` the first argument of the KL; with one split it finishes the rows (each
  distribution's shift and log-sum, the ``norms``, and the KL), otherwise
  ``div_combine_kernel`` merges the partials and finishes them. log p and log q are always
  re-formed as ``(z - shift) - log_sum``, never as ``z - lse`` (no cancellation of two numbers
  of the size of the logits).
* ``jsd_sums_kernel``: second pass of the JSD, once both log-normalizers are known.
* ``div_dlogits_kernel``: recomputes both tiles of a region and writes the gradient w.r.t.
  the raw student logits into a scratch buffer (``common/scratch_backward.py`` does the GEMMs).

``KIND`` picks the divergence: ``RKL``, ``FKL`` or ``JSD``, the codes that ``kinds.py`` defines
once for both paths (with the public names that map to them).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..common.tiles import (
    logaddexp,
    logit_slope,
    logits_tile,
    mul_safe,
    online_max,
    region_tile,
    rescale_moment,
    row_block,
    shift,
    split_max,
    split_part,
    store_region,
    token_split,
)
from .kinds import FKL, JSD, RKL


@triton.jit
def pair_tiles(hs, ht, HS, HT, o_n, m_x, o_v, m_v, HAS_BS: tl.constexpr, HAS_BT: tl.constexpr,
               CAP_S: tl.constexpr, CAP_T: tl.constexpr, BN: tl.constexpr, BV: tl.constexpr, BH: tl.constexpr,
               DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """The student's and the teacher's logit tiles over the same rows and vocabulary columns."""
    b_zs = logits_tile(hs, HS, o_n, m_x, o_v, m_v, HAS_BS, CAP_S, BN, BV, BH, DOT_PRECISION, UPCAST)
    b_zt = logits_tile(ht, HT, o_n, m_x, o_v, m_v, HAS_BT, CAP_T, BN, BV, BH, DOT_PRECISION, UPCAST)
    return b_zs, b_zt


@triton.jit
def load_valid(valid_ptr, o_n, m_n):
    return m_n & (tl.load(valid_ptr + o_n, mask=m_n, other=0) != 0)


@triton.jit
def finish_div_rows(norms, d_ptr, b_ms, b_ls, b_mt, b_lt, b_a, o_n, m_n, KIND: tl.constexpr):
    """Both distributions' shift and log-sum and, for the KL kinds, the divergence (rows that are
    not valid hold garbage)."""
    b_log_ls = tl.log(b_ls)
    b_log_lt = tl.log(b_lt)
    tl.store(norms.sh_s + o_n, shift(b_ms), mask=m_n)
    tl.store(norms.logl_s + o_n, b_log_ls, mask=m_n)
    tl.store(norms.sh_t + o_n, shift(b_mt), mask=m_n)
    tl.store(norms.logl_t + o_n, b_log_lt, mask=m_n)
    if KIND == RKL:
        tl.store(d_ptr + o_n, b_a / b_ls - b_log_ls + b_log_lt, mask=m_n)
    elif KIND == FKL:
        tl.store(d_ptr + o_n, b_a / b_lt - b_log_lt + b_log_ls, mask=m_n)


@triton.jit
def log_probs(b_zs, b_zt, norms, o_n, mask):
    """log p and log q of one tile from the rows' shifts and log-sums; rows outside ``mask`` get
    -inf (p = q = 0 there)."""
    b_shs = tl.load(norms.sh_s + o_n, mask=mask, other=0.0)
    b_logls = tl.load(norms.logl_s + o_n, mask=mask, other=float("inf"))
    b_sht = tl.load(norms.sh_t + o_n, mask=mask, other=0.0)
    b_loglt = tl.load(norms.logl_t + o_n, mask=mask, other=float("inf"))
    return (b_zs - b_shs[:, None]) - b_logls[:, None], (b_zt - b_sht[:, None]) - b_loglt[:, None]


@triton.jit(do_not_specialize=["N", "tiles_per_split"])
def div_stats_kernel(
    hs, ht, valid_ptr, norms, d_ptr, parts, N, V, HS, HT, tiles_per_split,
    KIND: tl.constexpr, HAS_BS: tl.constexpr, HAS_BT: tl.constexpr, CAP_S: tl.constexpr, CAP_T: tl.constexpr,
    SPLIT: tl.constexpr,
    BN: tl.constexpr, BV: tl.constexpr, BH: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    i_s, i_n, o_n, m_n, v_lo, v_hi = token_split(N, V, tiles_per_split, BN, BV)
    valid = load_valid(valid_ptr, o_n, m_n)
    b_ms = tl.full((BN,), float("-inf"), dtype=tl.float32)
    b_mt = tl.full((BN,), float("-inf"), dtype=tl.float32)
    b_ls = tl.zeros((BN,), dtype=tl.float32)
    b_lt = tl.zeros((BN,), dtype=tl.float32)
    b_a = tl.zeros((BN,), dtype=tl.float32)
    if tl.sum(valid.to(tl.int32), axis=0) > 0:
        for v0 in range(v_lo, v_hi, BV):
            o_v = v0 + tl.arange(0, BV)
            m_v = o_v < v_hi
            b_zs, b_zt = pair_tiles(hs, ht, HS, HT, o_n, valid, o_v, m_v, HAS_BS, HAS_BT, CAP_S, CAP_T, BN, BV, BH,
                                    DOT_PRECISION, UPCAST)
            b_ms_new, b_shs, b_rs, b_us = online_max(b_ms, b_zs)
            b_mt_new, b_sht, b_rt, b_ut = online_max(b_mt, b_zt)
            b_es = tl.exp(b_us)
            b_et = tl.exp(b_ut)
            b_ds = shift(b_ms) - b_shs
            b_dt = shift(b_mt) - b_sht
            if KIND == RKL:
                b_a = rescale_moment(b_a, b_rs, b_ds - b_dt, b_ls) + tl.sum(mul_safe(b_es, b_us - b_ut), axis=1)
            elif KIND == FKL:
                b_a = rescale_moment(b_a, b_rt, b_dt - b_ds, b_lt) + tl.sum(mul_safe(b_et, b_ut - b_us), axis=1)
            b_ls = b_ls * b_rs + tl.sum(b_es, axis=1)
            b_lt = b_lt * b_rt + tl.sum(b_et, axis=1)
            b_ms = b_ms_new
            b_mt = b_mt_new
    if SPLIT == 1:
        finish_div_rows(norms, d_ptr, b_ms, b_ls, b_mt, b_lt, b_a, o_n, m_n, KIND)
    else:
        o_p = i_s * N + o_n
        tl.store(parts.ms + o_p, b_ms, mask=m_n)
        tl.store(parts.ls + o_p, b_ls, mask=m_n)
        tl.store(parts.mt + o_p, b_mt, mask=m_n)
        tl.store(parts.lt + o_p, b_lt, mask=m_n)
        tl.store(parts.a + o_p, b_a, mask=m_n)


@triton.jit(do_not_specialize=["N"])
def div_combine_kernel(norms, d_ptr, parts, N, KIND: tl.constexpr, SPLIT: tl.constexpr, BN: tl.constexpr):
    """Second launch when the vocabulary was split: merge partials (README.md, 'Splits'), finish the rows."""
    i_n, o_n, m_n = row_block(N, BN)
    b_ms = split_max(parts.ms, o_n, m_n, N, SPLIT, BN)
    b_mt = split_max(parts.mt, o_n, m_n, N, SPLIT, BN)
    b_shs = shift(b_ms)
    b_sht = shift(b_mt)
    b_ls = tl.zeros((BN,), dtype=tl.float32)
    b_lt = tl.zeros((BN,), dtype=tl.float32)
    b_a = tl.zeros((BN,), dtype=tl.float32)
    for i in range(SPLIT):
        b_lsi, b_rsi, b_dsi = split_part(parts.ms, parts.ls, i, o_n, m_n, N, b_shs)
        b_lti, b_rti, b_dti = split_part(parts.mt, parts.lt, i, o_n, m_n, N, b_sht)
        if KIND != JSD:
            b_ai = tl.load(parts.a + i * N + o_n, mask=m_n, other=0.0)
            if KIND == RKL:
                b_a += rescale_moment(b_ai, b_rsi, b_dsi - b_dti, b_lsi)
            else:
                b_a += rescale_moment(b_ai, b_rti, b_dti - b_dsi, b_lti)
        b_ls += b_rsi * b_lsi
        b_lt += b_rti * b_lti
    finish_div_rows(norms, d_ptr, b_ms, b_ls, b_mt, b_lt, b_a, o_n, m_n, KIND)


@triton.jit
def log_mixture(b_lp, b_lq, log_b, log_1mb):
    """log M = log(beta q + (1 - beta) p)."""
    return logaddexp(b_lq + log_b, b_lp + log_1mb)


@triton.jit(do_not_specialize=["N", "tiles_per_split"])
def jsd_sums_kernel(
    hs, ht, valid_ptr, norms, d_ptr, k_ptr,        # d, k: partials [SPLIT, N]
    N, V, HS, HT, tiles_per_split, beta, log_b, log_1mb,
    HAS_BS: tl.constexpr, HAS_BT: tl.constexpr, CAP_S: tl.constexpr, CAP_T: tl.constexpr,
    BN: tl.constexpr, BV: tl.constexpr, BH: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """D = beta KL(q || M) + (1 - beta) KL(p || M) and k = KL(p || M), per split."""
    i_s, i_n, o_n, m_n, v_lo, v_hi = token_split(N, V, tiles_per_split, BN, BV)
    valid = load_valid(valid_ptr, o_n, m_n)
    b_d = tl.zeros((BN,), dtype=tl.float32)
    b_k = tl.zeros((BN,), dtype=tl.float32)
    if tl.sum(valid.to(tl.int32), axis=0) > 0:
        for v0 in range(v_lo, v_hi, BV):
            o_v = v0 + tl.arange(0, BV)
            m_v = o_v < v_hi
            b_zs, b_zt = pair_tiles(hs, ht, HS, HT, o_n, valid, o_v, m_v, HAS_BS, HAS_BT, CAP_S, CAP_T, BN, BV, BH,
                                    DOT_PRECISION, UPCAST)
            b_lp, b_lq = log_probs(b_zs, b_zt, norms, o_n, valid)
            b_lm = log_mixture(b_lp, b_lq, log_b, log_1mb)
            b_kp = tl.sum(mul_safe(tl.exp(b_lp), b_lp - b_lm), axis=1)
            b_kq = tl.sum(mul_safe(tl.exp(b_lq), b_lq - b_lm), axis=1)
            b_d += beta * b_kq + (1.0 - beta) * b_kp
            b_k += b_kp
    tl.store(d_ptr + i_s * N + o_n, b_d, mask=m_n)
    tl.store(k_ptr + i_s * N + o_n, b_k, mask=m_n)


@triton.jit(do_not_specialize=["row0", "n_rows", "col0", "n_cols"])
def div_dlogits_kernel(
    hs, ht, valid_ptr, norms, aux_ptr, g_ptr, dl_ptr,
    row0, n_rows, col0, n_cols, HS, HT, stride_dp, stride_dr, stride_dc, beta, log_b, log_1mb,
    KIND: tl.constexpr, HAS_BS: tl.constexpr, HAS_BT: tl.constexpr, CAP_S: tl.constexpr, CAP_T: tl.constexpr,
    SPLIT: tl.constexpr, GROUP: tl.constexpr,
    BN: tl.constexpr, BV: tl.constexpr, BH: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """dl = dz/dr * g * { p (log p - log q - KL) | p - q | (1 - beta) p (log p - log M - KL(p||M)) }."""
    o_r, m_r, o_n, o_c, m_c, o_v = region_tile(row0, n_rows, col0, n_cols, GROUP, BN, BV)
    valid = load_valid(valid_ptr, o_n, m_r)
    b_g = tl.load(g_ptr + o_n, mask=valid, other=0.0)
    active = valid & (b_g != 0.0)
    b_dl = tl.zeros((BN, BV), dtype=tl.float32)
    if tl.sum(active.to(tl.int32), axis=0) > 0:
        b_zs, b_zt = pair_tiles(hs, ht, HS, HT, o_n, active, o_v, m_c, HAS_BS, HAS_BT, CAP_S, CAP_T, BN, BV, BH,
                                DOT_PRECISION, UPCAST)
        b_lp, b_lq = log_probs(b_zs, b_zt, norms, o_n, active)  # inactive rows: p = q = 0
        if KIND == FKL:
            b_dl = tl.exp(b_lp) - tl.exp(b_lq)
        elif KIND == RKL:
            b_aux = tl.load(aux_ptr + o_n, mask=active, other=0.0)
            b_dl = mul_safe(tl.exp(b_lp), b_lp - b_lq - b_aux[:, None])
        else:
            b_aux = tl.load(aux_ptr + o_n, mask=active, other=0.0)
            b_lm = log_mixture(b_lp, b_lq, log_b, log_1mb)
            b_dl = (1.0 - beta) * mul_safe(tl.exp(b_lp), b_lp - b_lm - b_aux[:, None])
        b_dl = tl.where(active[:, None] & m_c[None, :], b_dl * b_g[:, None] * logit_slope(b_zs, hs, CAP_S), 0.0)
    store_region(dl_ptr, b_dl, o_r, m_r, o_c, m_c, stride_dp, stride_dr, stride_dc, SPLIT)
