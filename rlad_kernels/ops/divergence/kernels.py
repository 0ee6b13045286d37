"""Triton kernels for full-vocabulary teacher-student divergences from hidden states.

Each tile holds a student logit tile ``x_s @ w_s.T`` and the matching teacher tile
``x_t @ w_t.T`` (different hidden sizes, same vocabulary columns; a padded teacher vocabulary
is cut at the student's V). Per token, only O(1) statistics leave the kernels:

* ``div_stats_kernel``: per (token block, vocab split), online max / sum-exp of both logits
  and, for the KL kinds, the moment ``A = sum e^(u - sh_u) ((u - sh_u) - (v - sh_v))`` with
  ``u`` the first argument of the KL; the host merges splits (see README.md).
* ``jsd_sums_kernel``: second pass of the JSD, once both log-normalizers are known.
* ``div_dlogits_kernel``: recomputes both tiles of a region and writes the gradient w.r.t.
  the raw student logits into a scratch buffer (``ops/scratch_backward.py`` does the GEMMs).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..logprobs.kernels import logits_tile, region_tile, token_split

RKL: tl.constexpr = tl.constexpr(0)
FKL: tl.constexpr = tl.constexpr(1)
JSD: tl.constexpr = tl.constexpr(2)


@triton.jit
def _shift(m):
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def _mul_safe(a, b):
    # 0 where a == 0 (0 * -inf on masked logits), NaN still propagates through b
    return tl.where(a == 0, 0.0, a * b)


@triton.jit
def _pair_tiles(xs_ptr, ws_ptr, bs_ptr, xt_ptr, wt_ptr, bt_ptr, o_n, m_x, o_v, m_v, HS, HT,
                s_xs_n, s_xs_h, s_ws_v, s_ws_h, s_xt_n, s_xt_h, s_wt_v, s_wt_h, scale,
                HAS_BS: tl.constexpr, HAS_BT: tl.constexpr, BN: tl.constexpr, BV: tl.constexpr,
                BH: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    b_zs = logits_tile(xs_ptr, ws_ptr, bs_ptr, o_n, m_x, o_v, m_v, HS, s_xs_n, s_xs_h, s_ws_v, s_ws_h,
                       scale, HAS_BS, BN, BV, BH, DOT_PRECISION, UPCAST)
    b_zt = logits_tile(xt_ptr, wt_ptr, bt_ptr, o_n, m_x, o_v, m_v, HT, s_xt_n, s_xt_h, s_wt_v, s_wt_h,
                       scale, HAS_BT, BN, BV, BH, DOT_PRECISION, UPCAST)
    return b_zs, b_zt


@triton.jit
def div_stats_kernel(
    xs_ptr, ws_ptr, bs_ptr, xt_ptr, wt_ptr, bt_ptr, valid_ptr,
    ms_ptr, ls_ptr, mt_ptr, lt_ptr, a_ptr,       # partials [SPLIT, N]
    N, V, HS, HT, s_xs_n, s_xs_h, s_ws_v, s_ws_h, s_xt_n, s_xt_h, s_wt_v, s_wt_h, scale, tiles_per_split,
    KIND: tl.constexpr, HAS_BS: tl.constexpr, HAS_BT: tl.constexpr,
    BN: tl.constexpr, BV: tl.constexpr, BH: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    i_s, i_n, o_n, m_n, v_lo, v_hi = token_split(N, V, tiles_per_split, BN, BV)
    valid = m_n & (tl.load(valid_ptr + o_n, mask=m_n, other=0) != 0)
    b_ms = tl.full((BN,), float("-inf"), dtype=tl.float32)
    b_mt = tl.full((BN,), float("-inf"), dtype=tl.float32)
    b_ls = tl.zeros((BN,), dtype=tl.float32)
    b_lt = tl.zeros((BN,), dtype=tl.float32)
    b_a = tl.zeros((BN,), dtype=tl.float32)
    if tl.sum(valid.to(tl.int32), axis=0) > 0:
        for v0 in range(v_lo, v_hi, BV):
            o_v = v0 + tl.arange(0, BV)
            m_v = o_v < v_hi
            b_zs, b_zt = _pair_tiles(xs_ptr, ws_ptr, bs_ptr, xt_ptr, wt_ptr, bt_ptr, o_n, valid, o_v, m_v, HS, HT,
                                     s_xs_n, s_xs_h, s_ws_v, s_ws_h, s_xt_n, s_xt_h, s_wt_v, s_wt_h, scale,
                                     HAS_BS, HAS_BT, BN, BV, BH, DOT_PRECISION, UPCAST)
            b_ms_new = tl.maximum(b_ms, tl.max(b_zs, axis=1))
            b_mt_new = tl.maximum(b_mt, tl.max(b_zt, axis=1))
            b_shs = _shift(b_ms_new)
            b_sht = _shift(b_mt_new)
            b_rs = tl.exp(b_ms - b_shs)
            b_rt = tl.exp(b_mt - b_sht)
            b_us = b_zs - b_shs[:, None]
            b_ut = b_zt - b_sht[:, None]
            b_es = tl.exp(b_us)
            b_et = tl.exp(b_ut)
            if KIND == RKL:
                b_dsh = (_shift(b_ms) - b_shs) - (_shift(b_mt) - b_sht)
                b_a = b_rs * (b_a + b_dsh * b_ls) + tl.sum(_mul_safe(b_es, b_us - b_ut), axis=1)
            elif KIND == FKL:
                b_dsh = (_shift(b_mt) - b_sht) - (_shift(b_ms) - b_shs)
                b_a = b_rt * (b_a + b_dsh * b_lt) + tl.sum(_mul_safe(b_et, b_ut - b_us), axis=1)
            b_ls = b_ls * b_rs + tl.sum(b_es, axis=1)
            b_lt = b_lt * b_rt + tl.sum(b_et, axis=1)
            b_ms = b_ms_new
            b_mt = b_mt_new
    o_p = i_s * N + o_n
    tl.store(ms_ptr + o_p, b_ms, mask=m_n)
    tl.store(ls_ptr + o_p, b_ls, mask=m_n)
    tl.store(mt_ptr + o_p, b_mt, mask=m_n)
    tl.store(lt_ptr + o_p, b_lt, mask=m_n)
    if KIND != JSD:
        tl.store(a_ptr + o_p, b_a, mask=m_n)


@triton.jit
def _jsd_tile(b_zs, b_zt, b_lses, b_lset, log_b, log_1mb):
    b_lp = b_zs - b_lses[:, None]
    b_lq = b_zt - b_lset[:, None]
    b_u = b_lq + log_b
    b_w = b_lp + log_1mb
    b_mx = _shift(tl.maximum(b_u, b_w))
    b_lm = b_mx + tl.log(tl.exp(b_u - b_mx) + tl.exp(b_w - b_mx))
    return b_lp, b_lq, b_lm


@triton.jit
def jsd_sums_kernel(
    xs_ptr, ws_ptr, bs_ptr, xt_ptr, wt_ptr, bt_ptr, valid_ptr, lses_ptr, lset_ptr,
    d_ptr, k_ptr,                                 # partials [SPLIT, N]
    N, V, HS, HT, s_xs_n, s_xs_h, s_ws_v, s_ws_h, s_xt_n, s_xt_h, s_wt_v, s_wt_h, scale, tiles_per_split,
    beta, log_b, log_1mb,
    HAS_BS: tl.constexpr, HAS_BT: tl.constexpr,
    BN: tl.constexpr, BV: tl.constexpr, BH: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """D = beta KL(q || M) + (1 - beta) KL(p || M) and k = KL(p || M), per split."""
    i_s, i_n, o_n, m_n, v_lo, v_hi = token_split(N, V, tiles_per_split, BN, BV)
    valid = m_n & (tl.load(valid_ptr + o_n, mask=m_n, other=0) != 0)
    b_lses = tl.load(lses_ptr + o_n, mask=valid, other=0.0)
    b_lset = tl.load(lset_ptr + o_n, mask=valid, other=0.0)
    b_d = tl.zeros((BN,), dtype=tl.float32)
    b_k = tl.zeros((BN,), dtype=tl.float32)
    if tl.sum(valid.to(tl.int32), axis=0) > 0:
        for v0 in range(v_lo, v_hi, BV):
            o_v = v0 + tl.arange(0, BV)
            m_v = o_v < v_hi
            b_zs, b_zt = _pair_tiles(xs_ptr, ws_ptr, bs_ptr, xt_ptr, wt_ptr, bt_ptr, o_n, valid, o_v, m_v, HS, HT,
                                     s_xs_n, s_xs_h, s_ws_v, s_ws_h, s_xt_n, s_xt_h, s_wt_v, s_wt_h, scale,
                                     HAS_BS, HAS_BT, BN, BV, BH, DOT_PRECISION, UPCAST)
            b_lp, b_lq, b_lm = _jsd_tile(b_zs, b_zt, b_lses, b_lset, log_b, log_1mb)
            b_kp = tl.sum(_mul_safe(tl.exp(b_lp), b_lp - b_lm), axis=1)
            b_kq = tl.sum(_mul_safe(tl.exp(b_lq), b_lq - b_lm), axis=1)
            b_d += beta * b_kq + (1.0 - beta) * b_kp
            b_k += b_kp
    tl.store(d_ptr + i_s * N + o_n, b_d, mask=m_n)
    tl.store(k_ptr + i_s * N + o_n, b_k, mask=m_n)


@triton.jit
def div_dlogits_kernel(
    xs_ptr, ws_ptr, bs_ptr, xt_ptr, wt_ptr, bt_ptr, valid_ptr, lses_ptr, lset_ptr, aux_ptr, g_ptr, dl_ptr,
    row0, n_rows, col0, n_cols, HS, HT, s_xs_n, s_xs_h, s_ws_v, s_ws_h, s_xt_n, s_xt_h, s_wt_v, s_wt_h,
    stride_dr, stride_dc, scale, beta, log_b, log_1mb,
    KIND: tl.constexpr, HAS_BS: tl.constexpr, HAS_BT: tl.constexpr, GROUP: tl.constexpr,
    BN: tl.constexpr, BV: tl.constexpr, BH: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """dl = scale * g * { p (log p - log q - KL) | p - q | (1 - beta) p (log p - log M - KL(p||M)) }."""
    o_r, m_r, o_n, o_c, m_c, o_v = region_tile(row0, n_rows, col0, n_cols, GROUP, BN, BV)
    valid = m_r & (tl.load(valid_ptr + o_n, mask=m_r, other=0) != 0)
    b_g = tl.load(g_ptr + o_n, mask=valid, other=0.0)
    active = valid & (b_g != 0.0)
    b_dl = tl.zeros((BN, BV), dtype=tl.float32)
    if tl.sum(active.to(tl.int32), axis=0) > 0:
        b_zs, b_zt = _pair_tiles(xs_ptr, ws_ptr, bs_ptr, xt_ptr, wt_ptr, bt_ptr, o_n, active, o_v, m_c,
                                 HS, HT, s_xs_n, s_xs_h, s_ws_v, s_ws_h, s_xt_n, s_xt_h, s_wt_v, s_wt_h, scale,
                                 HAS_BS, HAS_BT, BN, BV, BH, DOT_PRECISION, UPCAST)
        # inactive rows: lse = +inf makes p = q = 0 there
        b_lses = tl.load(lses_ptr + o_n, mask=active, other=float("inf"))
        b_lset = tl.load(lset_ptr + o_n, mask=active, other=float("inf"))
        if KIND == FKL:
            b_dl = tl.exp(b_zs - b_lses[:, None]) - tl.exp(b_zt - b_lset[:, None])
        elif KIND == RKL:
            b_aux = tl.load(aux_ptr + o_n, mask=active, other=0.0)
            b_lp = b_zs - b_lses[:, None]
            b_dl = _mul_safe(tl.exp(b_lp), b_lp - (b_zt - b_lset[:, None]) - b_aux[:, None])
        else:
            b_aux = tl.load(aux_ptr + o_n, mask=active, other=0.0)
            b_lp, b_lq, b_lm = _jsd_tile(b_zs, b_zt, b_lses, b_lset, log_b, log_1mb)
            b_dl = (1.0 - beta) * _mul_safe(tl.exp(b_lp), b_lp - b_lm - b_aux[:, None])
        b_dl = tl.where(active[:, None] & m_c[None, :], b_dl * (b_g * scale)[:, None], 0.0)
    tl.store(dl_ptr + o_r[:, None] * stride_dr + o_c[None, :] * stride_dc,
             b_dl.to(dl_ptr.dtype.element_ty), mask=m_r[:, None] & m_c[None, :])
