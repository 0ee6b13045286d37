"""Triton kernels for per-token log-probs (+ entropy) straight from ``hidden @ weight.T``.

Vocabulary (fla style): ``i_`` program ids (int64), ``o_`` offsets, ``m_`` masks, ``b_`` block
values, dims ``N H V``, blocks ``BN BV BH``. Derivations in ``README.md``.

* ``lm_head_fwd_kernel``: one program per (token block, vocab split). It streams the split's
  vocabulary in ``BV`` tiles, each a ``BN x BV`` logit tile accumulated over ``H`` in ``BH``
  steps (fp32), and keeps an online max / sum-exp / entropy moment / target logit per row.
  With one split it finishes the rows in the same launch, including the policy-loss epilogue
  when ``POLICY``; otherwise it writes O(N x SPLIT) partials that ``lm_head_combine_kernel``
  reduces and finishes.
* ``dlogits_kernel``: recomputes a rectangular region of logit tiles and writes the gradient
  w.r.t. the raw logits ``x @ w.T + b`` into a bounded scratch buffer; the host turns that
  into dX (token chunks x full vocab) and dW / db (all tokens x vocab slices) with GEMMs.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..policy_loss.epilogue import policy_epilogue


@triton.jit
def _dot(a, b, acc, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # UPCAST: Triton's CPU interpreter mis-multiplies bf16 operands; fp32 products of bf16
    # values are exact, so upcasting there computes the same result as the GPU's bf16 MMA.
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def logits_tile(x_ptr, w_ptr, b_ptr, o_n, m_x, o_v, m_v, H, stride_xn, stride_xh, stride_wv, stride_wh,
                scale, HAS_BIAS: tl.constexpr, BN: tl.constexpr, BV: tl.constexpr, BH: tl.constexpr,
                DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """z [BN, BV] fp32 = (x[o_n] @ w[o_v].T + b[o_v]) * scale; rows outside m_x read zeros,
    columns outside m_v are -inf (padded vocabulary never enters the softmax)."""
    b_acc = tl.zeros((BN, BV), dtype=tl.float32)
    for h0 in range(0, H, BH):
        o_h = h0 + tl.arange(0, BH)
        m_h = o_h < H
        b_x = tl.load(x_ptr + o_n[:, None] * stride_xn + o_h[None, :] * stride_xh,
                      mask=m_x[:, None] & m_h[None, :], other=0.0)
        b_w = tl.load(w_ptr + o_v[None, :] * stride_wv + o_h[:, None] * stride_wh,
                      mask=m_v[None, :] & m_h[:, None], other=0.0)
        b_acc = _dot(b_x, b_w, b_acc, DOT_PRECISION, UPCAST)
    if HAS_BIAS:
        b_acc += tl.load(b_ptr + o_v, mask=m_v, other=0.0).to(tl.float32)[None, :]
    b_z = b_acc * scale
    return tl.where(m_v[None, :], b_z, float("-inf"))


@triton.jit
def token_split(N, V, tiles_per_split, BN: tl.constexpr, BV: tl.constexpr):
    """Program -> (split, token block) of a forward grid, and the block's rows and vocab range.
    Programs running together share a vocab split, so they stream the same W tiles (L2 reuse)."""
    i_pid = tl.program_id(0).to(tl.int64)
    num_nb = tl.cdiv(N, BN)
    i_s = i_pid // num_nb
    i_n = i_pid % num_nb
    o_n = i_n * BN + tl.arange(0, BN)
    v_lo = i_s * tiles_per_split * BV
    v_hi = tl.minimum(v_lo + tiles_per_split * BV, V)
    return i_s, i_n, o_n, o_n < N, v_lo, v_hi


@triton.jit
def region_tile(row0, n_rows, col0, n_cols, GROUP: tl.constexpr, BN: tl.constexpr, BV: tl.constexpr):
    """Program -> one BN x BV tile of a backward region (rows row0.., columns col0..), in grouped
    order: GROUP row blocks sweep the columns together, sharing W tiles in L2. Returns local row
    offsets/mask, global token ids, local column offsets/mask, global vocab ids."""
    i_pid = tl.program_id(0).to(tl.int64)
    num_r = tl.cdiv(n_rows, BN)
    num_c = tl.cdiv(n_cols, BV)
    i_grp = i_pid // (GROUP * num_c)
    first_r = i_grp * GROUP
    size_r = tl.minimum(num_r - first_r, GROUP)
    i_r = first_r + (i_pid % (GROUP * num_c)) % size_r
    i_c = (i_pid % (GROUP * num_c)) // size_r
    o_r = i_r * BN + tl.arange(0, BN)
    o_c = i_c * BV + tl.arange(0, BV)
    return o_r, o_r < n_rows, row0 + o_r, o_c, o_c < n_cols, col0 + o_c


@triton.jit
def scan_vocab(x_ptr, w_ptr, b_ptr, b_y, o_n, m_x, v_lo, v_hi, H, stride_xn, stride_xh, stride_wv,
               stride_wh, scale, HAS_BIAS: tl.constexpr, ENTROPY: tl.constexpr, BN: tl.constexpr,
               BV: tl.constexpr, BH: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Online statistics over columns [v_lo, v_hi): running max m, l = sum exp(z - m),
    s = sum exp(z - m) * (z - m) and the target logit t (0 when the target is outside the range).
    s is kept relative to m so the entropy log(l) - s/l never subtracts two large numbers."""
    b_m = tl.full((BN,), float("-inf"), dtype=tl.float32)
    b_l = tl.zeros((BN,), dtype=tl.float32)
    b_s = tl.zeros((BN,), dtype=tl.float32)
    b_t = tl.zeros((BN,), dtype=tl.float32)
    for v0 in range(v_lo, v_hi, BV):
        o_v = v0 + tl.arange(0, BV)
        m_v = o_v < v_hi
        b_z = logits_tile(x_ptr, w_ptr, b_ptr, o_n, m_x, o_v, m_v, H, stride_xn, stride_xh, stride_wv,
                          stride_wh, scale, HAS_BIAS, BN, BV, BH, DOT_PRECISION, UPCAST)
        b_m_new = tl.maximum(b_m, tl.max(b_z, axis=1))
        # -inf is the max identity; while a row has seen only -inf, shift by 0 instead.
        b_shift = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)
        b_rescale = tl.exp(b_m - b_shift)
        b_e = tl.exp(b_z - b_shift[:, None])
        if ENTROPY:  # move s to the new reference: s' = r (s + (m - m') l)
            b_s = b_rescale * (b_s + tl.where(b_l > 0, (b_m - b_shift) * b_l, 0.0))
            b_s += tl.sum(tl.where(b_e == 0, 0.0, b_e * (b_z - b_shift[:, None])), axis=1)
        b_l = b_l * b_rescale + tl.sum(b_e, axis=1)
        b_t += tl.sum(tl.where(o_v[None, :] == b_y[:, None], b_z, 0.0), axis=1)
        b_m = b_m_new
    return b_m, b_l, b_s, b_t


@triton.jit
def finish_row(b_m, b_l, b_s, b_t, b_y, valid, V):
    """lse, logp, E_p[z] and entropy of finished rows; ignored rows give 0, out-of-range ids NaN."""
    b_shift = tl.where(b_m == float("-inf"), 0.0, b_m)
    b_l = tl.where(valid, b_l, 1.0)  # skipped rows have l = 0
    b_lse = b_shift + tl.log(b_l)
    b_ez = b_shift + b_s / b_l
    bad = valid & ((b_y < 0) | (b_y >= V))
    b_lp = tl.where(bad, float("nan"), b_t - b_lse)
    b_lp = tl.where(valid, b_lp, 0.0)
    b_ent = tl.where(valid, tl.log(b_l) - b_s / b_l, 0.0)
    return b_lse, b_ez, b_lp, b_ent


@triton.jit
def combine_splits(m_ptr, l_ptr, s_ptr, t_ptr, o_n, m_n, N, SPLIT: tl.constexpr, BN: tl.constexpr):
    """Merge per-split partial statistics (layout [SPLIT, N]) into whole-vocabulary ones."""
    b_m = tl.full((BN,), float("-inf"), dtype=tl.float32)
    for i in range(SPLIT):
        b_m = tl.maximum(b_m, tl.load(m_ptr + i * N + o_n, mask=m_n, other=float("-inf")))
    b_shift = tl.where(b_m == float("-inf"), 0.0, b_m)
    b_l = tl.zeros((BN,), dtype=tl.float32)
    b_s = tl.zeros((BN,), dtype=tl.float32)
    b_t = tl.zeros((BN,), dtype=tl.float32)
    for i in range(SPLIT):
        b_mi = tl.load(m_ptr + i * N + o_n, mask=m_n, other=float("-inf"))
        b_li = tl.load(l_ptr + i * N + o_n, mask=m_n, other=0.0)
        b_r = tl.exp(b_mi - b_shift)
        b_si = tl.load(s_ptr + i * N + o_n, mask=m_n, other=0.0)
        b_s += b_r * (b_si + tl.where(b_li > 0, (b_mi - b_shift) * b_li, 0.0))
        b_l += b_li * b_r
        b_t += tl.load(t_ptr + i * N + o_n, mask=m_n, other=0.0)
    return b_m, b_l, b_s, b_t


# Options of the fused policy-loss epilogue (see ../policy_loss/epilogue.py); with POLICY=False
# the launcher passes placeholders and they are compiled out.
@triton.jit
def finish_block(b_m, b_l, b_s, b_t, b_y, valid, o_n, m_n, i_blk, V,
                 lp_ptr, ent_ptr, lse_ptr, ez_ptr,
                 adv_ptr, old_ptr, teach_ptr, ref_ptr, tw_ptr, kdw_ptr, glp_ptr, gent_ptr, stat_ptr,
                 alpha, eps_low, eps_high, clamp_c, dual_c, kd_coef, ref_coef, ent_coef, log_a, log_1ma,
                 ENTROPY: tl.constexpr, POLICY: tl.constexpr, TEACHER: tl.constexpr, HAS_CLAMP: tl.constexpr,
                 HAS_DUAL: tl.constexpr, KD: tl.constexpr, HAS_REF: tl.constexpr, ENT_BONUS: tl.constexpr,
                 HAS_TW: tl.constexpr, HAS_KDW: tl.constexpr, NSTAT: tl.constexpr):
    """Finish the rows of one token block: store logp/lse (+ entropy, E_p[z]) and, for the
    policy loss, run the epilogue (gradient factors and per-block sums)."""
    b_lse, b_ez, b_lp, b_ent = finish_row(b_m, b_l, b_s, b_t, b_y, valid, V)
    tl.store(lp_ptr + o_n, b_lp, mask=m_n)
    tl.store(lse_ptr + o_n, b_lse, mask=m_n)
    if ENTROPY:
        tl.store(ent_ptr + o_n, b_ent, mask=m_n)
        tl.store(ez_ptr + o_n, b_ez, mask=m_n)
    if POLICY:
        policy_epilogue(b_lp, b_ent, valid, o_n, i_blk,
                        adv_ptr, old_ptr, teach_ptr, ref_ptr, tw_ptr, kdw_ptr, glp_ptr, gent_ptr, stat_ptr,
                        alpha, eps_low, eps_high, clamp_c, dual_c, kd_coef, ref_coef, ent_coef, log_a, log_1ma,
                        TEACHER, HAS_CLAMP, HAS_DUAL, KD, HAS_REF, ENTROPY, ENT_BONUS, HAS_TW, HAS_KDW, NSTAT,
                        m_n)


@triton.jit
def lm_head_fwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr,
    lp_ptr, ent_ptr, lse_ptr, ez_ptr,          # per-token outputs [N] (written when SPLIT == 1)
    pm_ptr, pl_ptr, ps_ptr, pt_ptr,            # partials [SPLIT, N] (SPLIT > 1)
    adv_ptr, old_ptr, teach_ptr, ref_ptr, tw_ptr, kdw_ptr, glp_ptr, gent_ptr, stat_ptr,  # POLICY
    N, V, H, stride_xn, stride_xh, stride_wv, stride_wh, scale, ignore_index, tiles_per_split,
    alpha, eps_low, eps_high, clamp_c, dual_c, kd_coef, ref_coef, ent_coef, log_a, log_1ma,
    HAS_BIAS: tl.constexpr, ENTROPY: tl.constexpr, SPLIT: tl.constexpr,
    POLICY: tl.constexpr, TEACHER: tl.constexpr, HAS_CLAMP: tl.constexpr, HAS_DUAL: tl.constexpr,
    KD: tl.constexpr, HAS_REF: tl.constexpr, ENT_BONUS: tl.constexpr, HAS_TW: tl.constexpr,
    HAS_KDW: tl.constexpr, NSTAT: tl.constexpr,
    BN: tl.constexpr, BV: tl.constexpr, BH: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    i_s, i_n, o_n, m_n, v_lo, v_hi = token_split(N, V, tiles_per_split, BN, BV)
    b_y = tl.load(y_ptr + o_n, mask=m_n, other=ignore_index)
    valid = m_n & (b_y != ignore_index)
    b_m = tl.full((BN,), float("-inf"), dtype=tl.float32)
    b_l = tl.zeros((BN,), dtype=tl.float32)
    b_s = tl.zeros((BN,), dtype=tl.float32)
    b_t = tl.zeros((BN,), dtype=tl.float32)
    if tl.sum(valid.to(tl.int32), axis=0) > 0:  # a block of ignored tokens skips the GEMM
        b_m, b_l, b_s, b_t = scan_vocab(x_ptr, w_ptr, b_ptr, b_y, o_n, valid, v_lo, v_hi, H, stride_xn,
                                        stride_xh, stride_wv, stride_wh, scale, HAS_BIAS, ENTROPY,
                                        BN, BV, BH, DOT_PRECISION, UPCAST)
    if SPLIT == 1:
        finish_block(b_m, b_l, b_s, b_t, b_y, valid, o_n, m_n, i_n, V, lp_ptr, ent_ptr, lse_ptr, ez_ptr,
                     adv_ptr, old_ptr, teach_ptr, ref_ptr, tw_ptr, kdw_ptr, glp_ptr, gent_ptr, stat_ptr,
                     alpha, eps_low, eps_high, clamp_c, dual_c, kd_coef, ref_coef, ent_coef, log_a, log_1ma,
                     ENTROPY, POLICY, TEACHER, HAS_CLAMP, HAS_DUAL, KD, HAS_REF, ENT_BONUS, HAS_TW, HAS_KDW,
                     NSTAT)
    else:
        tl.store(pm_ptr + i_s * N + o_n, b_m, mask=m_n)
        tl.store(pl_ptr + i_s * N + o_n, b_l, mask=m_n)
        tl.store(ps_ptr + i_s * N + o_n, b_s, mask=m_n)
        tl.store(pt_ptr + i_s * N + o_n, b_t, mask=m_n)


@triton.jit
def lm_head_combine_kernel(
    y_ptr, lp_ptr, ent_ptr, lse_ptr, ez_ptr, pm_ptr, pl_ptr, ps_ptr, pt_ptr,
    adv_ptr, old_ptr, teach_ptr, ref_ptr, tw_ptr, kdw_ptr, glp_ptr, gent_ptr, stat_ptr,
    N, V, ignore_index,
    alpha, eps_low, eps_high, clamp_c, dual_c, kd_coef, ref_coef, ent_coef, log_a, log_1ma,
    ENTROPY: tl.constexpr, SPLIT: tl.constexpr,
    POLICY: tl.constexpr, TEACHER: tl.constexpr, HAS_CLAMP: tl.constexpr, HAS_DUAL: tl.constexpr,
    KD: tl.constexpr, HAS_REF: tl.constexpr, ENT_BONUS: tl.constexpr, HAS_TW: tl.constexpr,
    HAS_KDW: tl.constexpr, NSTAT: tl.constexpr, BN: tl.constexpr,
):
    """Second launch when the vocabulary was split: merge partials, then finish the rows."""
    i_n = tl.program_id(0).to(tl.int64)
    o_n = i_n * BN + tl.arange(0, BN)
    m_n = o_n < N
    b_y = tl.load(y_ptr + o_n, mask=m_n, other=ignore_index)
    valid = m_n & (b_y != ignore_index)
    b_m, b_l, b_s, b_t = combine_splits(pm_ptr, pl_ptr, ps_ptr, pt_ptr, o_n, m_n, N, SPLIT, BN)
    finish_block(b_m, b_l, b_s, b_t, b_y, valid, o_n, m_n, i_n, V, lp_ptr, ent_ptr, lse_ptr, ez_ptr,
                 adv_ptr, old_ptr, teach_ptr, ref_ptr, tw_ptr, kdw_ptr, glp_ptr, gent_ptr, stat_ptr,
                 alpha, eps_low, eps_high, clamp_c, dual_c, kd_coef, ref_coef, ent_coef, log_a, log_1ma,
                 ENTROPY, POLICY, TEACHER, HAS_CLAMP, HAS_DUAL, KD, HAS_REF, ENT_BONUS, HAS_TW, HAS_KDW, NSTAT)


@triton.jit
def dlogits_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, lse_ptr, ez_ptr, glp_ptr, gent_ptr, dl_ptr,
    row0, n_rows, col0, n_cols, H, stride_xn, stride_xh, stride_wv, stride_wh, stride_dr, stride_dc,
    scale, ignore_index,
    HAS_BIAS: tl.constexpr, HAS_GENT: tl.constexpr, GROUP: tl.constexpr,
    BN: tl.constexpr, BV: tl.constexpr, BH: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """dl[r, c] = scale * (g_lp (onehot - p) - g_ent p (z - E_p[z])) for rows row0 + r, columns
    col0 + c of the logits; rows that are ignored or have zero upstream gradient give 0."""
    o_r, m_r, o_n, o_c, m_c, o_v = region_tile(row0, n_rows, col0, n_cols, GROUP, BN, BV)
    b_y = tl.load(y_ptr + o_n, mask=m_r, other=ignore_index)
    valid = m_r & (b_y != ignore_index)
    b_glp = tl.load(glp_ptr + o_n, mask=valid, other=0.0)
    active = valid & (b_glp != 0.0)
    if HAS_GENT:
        b_gent = tl.load(gent_ptr + o_n, mask=valid, other=0.0)
        active = active | (valid & (b_gent != 0.0))
    b_dl = tl.zeros((BN, BV), dtype=tl.float32)
    if tl.sum(active.to(tl.int32), axis=0) > 0:  # tiles with no gradient skip the GEMM
        b_z = logits_tile(x_ptr, w_ptr, b_ptr, o_n, active, o_v, m_c, H, stride_xn, stride_xh, stride_wv,
                          stride_wh, scale, HAS_BIAS, BN, BV, BH, DOT_PRECISION, UPCAST)
        # inactive rows: lse = +inf makes p = 0 there (no overflow in exp)
        b_lse = tl.load(lse_ptr + o_n, mask=active, other=float("inf"))
        b_p = tl.exp(b_z - b_lse[:, None])
        b_dl = tl.where(o_v[None, :] == b_y[:, None], b_glp[:, None], 0.0) - b_glp[:, None] * b_p
        if HAS_GENT:
            b_ez = tl.load(ez_ptr + o_n, mask=active, other=0.0)
            b_dl -= b_gent[:, None] * tl.where(b_p == 0, 0.0, b_p * (b_z - b_ez[:, None]))
        b_dl = tl.where(active[:, None] & m_c[None, :], b_dl * scale, 0.0)
    tl.store(dl_ptr + o_r[:, None] * stride_dr + o_c[None, :] * stride_dc,
             b_dl.to(dl_ptr.dtype.element_ty), mask=m_r[:, None] & m_c[None, :])
