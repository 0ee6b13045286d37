"""The backward's GEMMs over the logit-gradient scratch: ``out = (A_hi + A_lo)^T B`` in float32.

The backward forms the logit gradient ``dl`` of a region in a scratch buffer and multiplies it
with the weight (dX) or the hidden states (dW). Two things make a library GEMM the wrong tool:

* **Precision.** With 16-bit inputs the scratch would hold ``dl`` in 16 bits. A softmax gradient
  row sums to zero, so ``dX = dl @ W`` cancels most of W's component common to all vocabulary
  rows; rounding each ``dl`` to bf16 breaks that cancellation, and with large or anisotropic
  logits the error grows with the scale (measured: 3-30x eager float32 autograd's error). So
  the scratch holds ``dl`` as two 16-bit parts, ``hi = bf16(dl)`` and ``lo = bf16(dl - hi)``
  (16 significant bits, the same bytes as one float32 buffer), and this kernel multiplies both
  with the same B tile into one float32 accumulator: the error is back at the 16-bit output's
  own rounding, at twice the tensor-core work of these two GEMMs (``TritonConfig.split_scratch``
  turns it off).
* **Ignored rows.** ``dW = dl.T @ X`` with a library GEMM multiplies every row of X, and
  ``0 * NaN`` is NaN: a NaN or inf in an ignored row's hidden state (padding under some
  attention implementations) would poison the whole weight gradient. The kernel reads the
  rows through the row mask instead, so an ignored row contributes exactly nothing, without
  copying the hidden states.

The reduction (over vocabulary rows for dX, tokens for dW) is split across programs when the
output has too few tiles to fill the GPU (``split_k``), into float32 partials summed in a fixed
order, so the result is deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...utils.dispatch import triton_interpreting
from .launch import TritonConfig, dot_precision, num_sms
from .tiles import dot, grouped_order


@triton.jit(do_not_specialize=["K", "k_per_split"])
def tn_gemm_kernel(
    a_ptr, b_ptr, valid_ptr, out_ptr, K, M, N, k_per_split,
    stride_ap, stride_ak, stride_am, stride_bk, stride_bn, stride_os, stride_om, stride_on,
    HAS_LO: tl.constexpr, MASKED: tl.constexpr, GROUP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    BK: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """out[i_s, m, n] = sum over (valid) k in split i_s of (a[0] + a[1])[k, m] * b[k, n] (fp32)."""
    i_pid = tl.program_id(0).to(tl.int64)
    i_s = tl.program_id(1).to(tl.int64)
    i_m, i_n = grouped_order(i_pid, tl.cdiv(M, BM), tl.cdiv(N, BN), GROUP)
    o_m = i_m * BM + tl.arange(0, BM)
    o_n = i_n * BN + tl.arange(0, BN)
    m_m = o_m < M
    m_n = o_n < N
    k_lo = i_s * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    b_acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BK):
        o_k = k0 + tl.arange(0, BK)
        m_k = o_k < k_hi
        if MASKED:
            m_k = m_k & (tl.load(valid_ptr + o_k, mask=m_k, other=0) != 0)
        p_a = a_ptr + o_k[:, None] * stride_ak + o_m[None, :] * stride_am
        m_a = m_k[:, None] & m_m[None, :]
        b_b = tl.load(b_ptr + o_k[:, None] * stride_bk + o_n[None, :] * stride_bn, mask=m_k[:, None] & m_n[None, :],
                      other=0.0)
        b_acc = dot(tl.trans(tl.load(p_a, mask=m_a, other=0.0)), b_b, b_acc, DOT_PRECISION, UPCAST)
        if HAS_LO:
            b_acc = dot(tl.trans(tl.load(p_a + stride_ap, mask=m_a, other=0.0)), b_b, b_acc, DOT_PRECISION, UPCAST)
    tl.store(out_ptr + i_s * stride_os + o_m[:, None] * stride_om + o_n[None, :] * stride_on,
             b_acc.to(out_ptr.dtype.element_ty), mask=m_m[:, None] & m_n[None, :])


def split_k(K: int, M: int, N: int, device: torch.device, cfg: TritonConfig) -> int:
    """Reduction splits so that output tiles x splits fill the GPU (each split keeps >= 4 steps)."""
    if cfg.dw_split_k is not None:
        return max(1, min(cfg.dw_split_k, triton.cdiv(K, cfg.dw_block_k)))
    tiles = triton.cdiv(M, cfg.dw_block_m) * triton.cdiv(N, cfg.dw_block_n)
    return max(1, min(triton.cdiv(2 * num_sms(device), tiles), K // (4 * cfg.dw_block_k)))


def tn_gemm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, cfg: TritonConfig,
            valid: torch.Tensor | None = None) -> None:
    """``out [M, N] = a_sum[valid].T @ b[valid]`` for ``a [P, K, M]`` (P = 1, or 2 parts hi and lo
    that are summed), ``b [K, N]`` (any strides) and an optional row mask ``valid [K]`` (uint8);
    ``out`` may be a slice of a larger tensor (any dtype)."""
    P, K, M = a.shape
    N = b.shape[1]
    split = split_k(K, M, N, a.device, cfg)
    # float32 partials, summed here, when the reduction is split; also under Triton's CPU
    # interpreter, whose float32 -> 16-bit conversion truncates where a GPU rounds to nearest
    staged = split > 1 or (triton_interpreting() and out.dtype != torch.float32)
    dst = torch.empty((split, M, N), dtype=torch.float32, device=a.device) if staged else out
    strides = dst.stride() if staged else (0, out.stride(0), out.stride(1))
    grid = (triton.cdiv(M, cfg.dw_block_m) * triton.cdiv(N, cfg.dw_block_n), split)
    tn_gemm_kernel[grid](
        a, b, valid if valid is not None else a, dst, K, M, N,
        triton.cdiv(triton.cdiv(K, split), cfg.dw_block_k) * cfg.dw_block_k,
        a.stride(0), a.stride(1), a.stride(2), b.stride(0), b.stride(1), *strides,
        HAS_LO=P == 2, MASKED=valid is not None, GROUP=cfg.group, BM=cfg.dw_block_m, BN=cfg.dw_block_n,
        BK=cfg.dw_block_k, DOT_PRECISION=dot_precision(a.dtype), UPCAST=triton_interpreting(),
        num_warps=cfg.dw_num_warps, num_stages=cfg.dw_num_stages,
    )
    if staged:  # a fixed-order sum of the partials: deterministic
        out.copy_(dst.sum(0))
