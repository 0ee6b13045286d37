"""Triton device helpers shared by every op's kernels.

Kernels built on these take token counts and region offsets (``N``, ``tiles_per_split``,
``row0``...) with ``do_not_specialize``: they change every batch, and a value divisible by 16
would otherwise compile another variant of the kernel for no better code.

Vocabulary (fla style): ``i_`` program ids (int64), ``o_`` offsets, ``m_`` masks, ``b_`` block
values, dims ``N H V``, blocks ``BN BV BH``. A ``head`` is a ``launch.Head``: pointers, strides
and logit scale of one lm_head. The online statistics are derived in
``ops/logprobs/README.md`` (one distribution) and ``ops/divergence/README.md`` (two).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def dot(a, b, acc, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # UPCAST: Triton's CPU interpreter mis-multiplies bf16 operands; fp32 products of bf16
    # values are exact, so upcasting there computes the same result as the GPU's bf16 MMA.
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def shift(m):
    """A running max as a finite shift: 0 while the row has seen only -inf (the max identity)."""
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def mul_safe(a, b):
    """a * b with 0 where a == 0 (0 * -inf on masked logits); NaN in b still propagates."""
    return tl.where(a == 0, 0.0, a * b)


@triton.jit
def tanh(x):
    """tanh, accurate near 0 too: an odd polynomial below 0.1 (error < 3e-11), 1 - 2 / (e^2x + 1)
    above; +-inf give +-1, NaN stays NaN."""
    x2 = x * x
    b_small = x * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0))))
    b_large = 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)
    return tl.where(tl.abs(x) < 0.1, b_small, b_large)


@triton.jit
def logit_slope(b_z, head, SOFTCAP: tl.constexpr):
    """dz/dr of logits z w.r.t. the raw output r = x @ w.T + b: the scale, or with a soft cap
    scale * (1 - tanh^2) = scale * (1 - (z / cap_out)^2)."""
    if SOFTCAP:
        b_t = b_z / head.cap_out
        return head.scale * (1.0 - b_t * b_t)
    else:
        return head.scale


@triton.jit
def logits_tile(head, H, o_n, m_x, o_v, m_v, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, BN: tl.constexpr,
                BV: tl.constexpr, BH: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """z [BN, BV] fp32 = (x[o_n] @ w[o_v].T + b[o_v]) * scale, or soft-capped; rows outside m_x
    read zeros, columns outside m_v are -inf (padded vocabulary never enters the softmax)."""
    b_acc = tl.zeros((BN, BV), dtype=tl.float32)
    for h0 in range(0, H, BH):
        o_h = h0 + tl.arange(0, BH)
        m_h = o_h < H
        b_x = tl.load(head.x + o_n[:, None] * head.stride_xn + o_h[None, :] * head.stride_xh,
                      mask=m_x[:, None] & m_h[None, :], other=0.0)
        b_w = tl.load(head.w + o_v[None, :] * head.stride_wv + o_h[:, None] * head.stride_wh,
                      mask=m_v[None, :] & m_h[:, None], other=0.0)
        b_acc = dot(b_x, b_w, b_acc, DOT_PRECISION, UPCAST)
    if HAS_BIAS:
        b_acc += tl.load(head.b + o_v, mask=m_v, other=0.0).to(tl.float32)[None, :]
    if SOFTCAP:
        b_z = tanh(b_acc * head.cap_in) * head.cap_out
    else:
        b_z = b_acc * head.scale
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
def row_block(N, BN: tl.constexpr):
    """Program -> (token block, its rows, row mask) of a combine grid."""
    i_n = tl.program_id(0).to(tl.int64)
    o_n = i_n * BN + tl.arange(0, BN)
    return i_n, o_n, o_n < N


@triton.jit
def grouped_order(i_pid, num_r, num_c, GROUP: tl.constexpr):
    """Program id -> (row block, column block) in grouped order: GROUP row blocks sweep the
    columns together, so the column tiles they share stay in L2."""
    i_grp = i_pid // (GROUP * num_c)
    first_r = i_grp * GROUP
    size_r = tl.minimum(num_r - first_r, GROUP)
    i_r = first_r + (i_pid % (GROUP * num_c)) % size_r
    i_c = (i_pid % (GROUP * num_c)) // size_r
    return i_r, i_c


@triton.jit
def region_tile(row0, n_rows, col0, n_cols, GROUP: tl.constexpr, BN: tl.constexpr, BV: tl.constexpr):
    """Program -> one BN x BV tile of a backward region (rows row0.., columns col0..), in grouped
    order: GROUP row blocks sweep the columns together, sharing W tiles in L2. Returns local row
    offsets/mask, global token ids, local column offsets/mask, global vocab ids."""
    i_r, i_c = grouped_order(tl.program_id(0).to(tl.int64), tl.cdiv(n_rows, BN), tl.cdiv(n_cols, BV), GROUP)
    o_r = i_r * BN + tl.arange(0, BN)
    o_c = i_c * BV + tl.arange(0, BV)
    return o_r, o_r < n_rows, row0 + o_r, o_c, o_c < n_cols, col0 + o_c


@triton.jit
def store_region(dl_ptr, b_dl, o_r, m_r, o_c, m_c, stride_dp, stride_dr, stride_dc, SPLIT: tl.constexpr):
    """Write one tile of logit gradients into the scratch region (in the scratch dtype); with
    SPLIT, as two parts hi = round(dl) and lo = round(dl - hi), stride_dp apart."""
    p_dl = dl_ptr + o_r[:, None] * stride_dr + o_c[None, :] * stride_dc
    m_dl = m_r[:, None] & m_c[None, :]
    b_hi = b_dl.to(dl_ptr.dtype.element_ty)
    tl.store(p_dl, b_hi, mask=m_dl)
    if SPLIT:
        tl.store(p_dl + stride_dp, (b_dl - b_hi.to(tl.float32)).to(dl_ptr.dtype.element_ty), mask=m_dl)


# Online statistics of rows over vocabulary tiles, and their merge across splits.
@triton.jit
def online_max(b_m, b_z):
    """One tile z [BN, BV] into a running row max m: returns (m', sh', r, u) with the new max,
    its finite shift, the rescale exp(m - sh') of sums kept relative to the old shift, and
    u = z - sh'."""
    b_m_new = tl.maximum(b_m, tl.max(b_z, axis=1))
    b_sh = shift(b_m_new)
    return b_m_new, b_sh, tl.exp(b_m - b_sh), b_z - b_sh[:, None]


@triton.jit
def rescale_moment(b_a, b_r, b_d, b_l):
    """Move a moment a = sum e^(u - sh) f to a new shift: r (a + d l), with d the change of the
    moment's reference and l the sum-exp it was weighted with (rows with l = 0 keep r a).
    The same rule updates a tile and merges vocabulary splits."""
    return b_r * (b_a + tl.where(b_l > 0, b_d * b_l, 0.0))


@triton.jit
def split_max(m_ptr, o_n, m_n, N, SPLIT: tl.constexpr, BN: tl.constexpr):
    """Max over the SPLIT partial maxima of rows o_n (layout [SPLIT, N])."""
    b_m = tl.full((BN,), float("-inf"), dtype=tl.float32)
    for i in range(SPLIT):
        b_m = tl.maximum(b_m, tl.load(m_ptr + i * N + o_n, mask=m_n, other=float("-inf")))
    return b_m


@triton.jit
def split_part(m_ptr, l_ptr, i, o_n, m_n, N, b_sh):
    """Split i's sum-exp l_i, its rescale r_i = exp(m_i - sh) to the merged shift and the change
    of reference d_i = shift(m_i) - sh, for ``rescale_moment``."""
    b_mi = tl.load(m_ptr + i * N + o_n, mask=m_n, other=float("-inf"))
    b_li = tl.load(l_ptr + i * N + o_n, mask=m_n, other=0.0)
    return b_li, tl.exp(b_mi - b_sh), shift(b_mi) - b_sh


@triton.jit
def logaddexp(b_u, b_v):
    """log(e^u + e^v), exact when both are -inf (gives -inf)."""
    b_mx = shift(tl.maximum(b_u, b_v))
    return b_mx + tl.log(tl.exp(b_u - b_mx) + tl.exp(b_v - b_mx))
