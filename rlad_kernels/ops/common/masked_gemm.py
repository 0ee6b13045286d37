"""The weight gradient's GEMM over valid rows only: ``dW[slice] = dl[:, slice].T @ x[valid]``.

The backward forms the logit gradient ``dl [N, S]`` of a vocabulary slice (zero on ignored
rows) and needs ``dl.T @ x``. A library GEMM multiplies every row, and ``0 * NaN`` is NaN: a
NaN or inf in an ignored row's hidden state (padding under some attention implementations)
would poison the whole weight gradient. This kernel reads the rows of ``x`` (and ``dl``)
through the row mask instead, so an ignored row contributes exactly nothing, whatever it
holds, without copying the hidden states.

The reduction runs over the N rows; when the output ``[S, H]`` has too few tiles to fill the
GPU, the rows are split across programs (``split_k``) into float32 partials summed in a fixed
order, so the result is deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...utils.dispatch import triton_interpreting
from .launch import TritonConfig, dot_precision, num_sms
from .tiles import dot


@triton.jit(do_not_specialize=["K", "k_per_split"])
def masked_tn_gemm_kernel(
    a_ptr, b_ptr, valid_ptr, out_ptr, K, M, N, k_per_split,
    stride_ak, stride_am, stride_bk, stride_bn, stride_os, stride_om, stride_on,
    GROUP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """out[i_s, m, n] = sum over valid k in split i_s of a[k, m] * b[k, n] (fp32 accumulation)."""
    i_pid = tl.program_id(0).to(tl.int64)
    i_s = tl.program_id(1).to(tl.int64)
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    i_grp = i_pid // (GROUP * num_n)
    first_m = i_grp * GROUP
    size_m = tl.minimum(num_m - first_m, GROUP)
    i_m = first_m + (i_pid % (GROUP * num_n)) % size_m
    i_n = (i_pid % (GROUP * num_n)) // size_m
    o_m = i_m * BM + tl.arange(0, BM)
    o_n = i_n * BN + tl.arange(0, BN)
    m_m = o_m < M
    m_n = o_n < N
    k_lo = i_s * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    b_acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BK):
        o_k = k0 + tl.arange(0, BK)
        m_k = (o_k < k_hi) & (tl.load(valid_ptr + o_k, mask=o_k < k_hi, other=0) != 0)
        b_a = tl.load(a_ptr + o_k[:, None] * stride_ak + o_m[None, :] * stride_am, mask=m_k[:, None] & m_m[None, :],
                      other=0.0)
        b_b = tl.load(b_ptr + o_k[:, None] * stride_bk + o_n[None, :] * stride_bn, mask=m_k[:, None] & m_n[None, :],
                      other=0.0)
        b_acc = dot(tl.trans(b_a), b_b, b_acc, DOT_PRECISION, UPCAST)
    tl.store(out_ptr + i_s * stride_os + o_m[:, None] * stride_om + o_n[None, :] * stride_on,
             b_acc.to(out_ptr.dtype.element_ty), mask=m_m[:, None] & m_n[None, :])


def split_k(K: int, M: int, N: int, device: torch.device, cfg: TritonConfig) -> int:
    """Row splits so that output tiles x splits fill the GPU (each split keeps >= 4 row blocks)."""
    if cfg.dw_split_k is not None:
        return max(1, min(cfg.dw_split_k, triton.cdiv(K, cfg.dw_block_k)))
    tiles = triton.cdiv(M, cfg.dw_block_m) * triton.cdiv(N, cfg.dw_block_n)
    return max(1, min(triton.cdiv(2 * num_sms(device), tiles), K // (4 * cfg.dw_block_k)))


def masked_tn_gemm(a: torch.Tensor, b: torch.Tensor, valid: torch.Tensor, out: torch.Tensor, cfg: TritonConfig) -> None:
    """``out [M, N] = a[valid].T @ b[valid]`` for ``a [K, M]``, ``b [K, N]`` (any strides) and the
    row mask ``valid [K]`` (uint8); ``out`` may be a slice of a larger tensor (any dtype)."""
    K, M = a.shape
    N = b.shape[1]
    split = split_k(K, M, N, a.device, cfg)
    dst = out if split == 1 else torch.empty((split, M, N), dtype=torch.float32, device=a.device)
    strides = (0, out.stride(0), out.stride(1)) if split == 1 else dst.stride()
    grid = (triton.cdiv(M, cfg.dw_block_m) * triton.cdiv(N, cfg.dw_block_n), split)
    masked_tn_gemm_kernel[grid](
        a, b, valid, dst, K, M, N, triton.cdiv(triton.cdiv(K, split), cfg.dw_block_k) * cfg.dw_block_k,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), *strides,
        GROUP=cfg.group, BM=cfg.dw_block_m, BN=cfg.dw_block_n, BK=cfg.dw_block_k, DOT_PRECISION=dot_precision(a.dtype),
        UPCAST=triton_interpreting(), num_warps=cfg.dw_num_warps, num_stages=cfg.dw_num_stages,
    )
    if split > 1:  # a fixed-order sum of the partials: deterministic
        out.copy_(dst.sum(0))
