"""Host side of the Triton divergence kernels: launches, split merging, autograd op."""

from __future__ import annotations

import math

import torch
import triton

from ...utils.dispatch import triton_interpreting
from ..logprobs.triton_impl import check_triton_dtypes, choose_split, dot_precision, get_config
from ..scratch_backward import scratch_backward
from . import kernels as K
from .chunked import FKL, JSD, RKL


def _shift(m):
    return torch.where(m == float("-inf"), torch.zeros_like(m), m)


def merge_splits(ms, ls, mt, lt, a, kind: int):
    """Merge [SPLIT, N] partial statistics -> (lse_s, lse_t, D | None) (README.md, 'Splits')."""
    m_s, m_t = ms.amax(0), mt.amax(0)
    sh_s, sh_t = _shift(m_s), _shift(m_t)
    r_s, r_t = torch.exp(ms - sh_s), torch.exp(mt - sh_t)
    l_s, l_t = (r_s * ls).sum(0), (r_t * lt).sum(0)
    log_ls, log_lt = torch.log(l_s), torch.log(l_t)
    D = None
    if kind == RKL:
        A = (r_s * (a + ((_shift(ms) - sh_s) - (_shift(mt) - sh_t)) * ls)).sum(0)
        D = A / l_s - log_ls + log_lt
    elif kind == FKL:
        A = (r_t * (a + ((_shift(mt) - sh_t) - (_shift(ms) - sh_s)) * lt)).sum(0)
        D = A / l_t - log_lt + log_ls
    return sh_s + log_ls, sh_t + log_lt, D


def _geometry(xs, ws, xt, wt):
    return dict(HS=xs.shape[1], HT=xt.shape[1], s_xs_n=xs.stride(0), s_xs_h=xs.stride(1), s_ws_v=ws.stride(0),
                s_ws_h=ws.stride(1), s_xt_n=xt.stride(0), s_xt_h=xt.stride(1), s_wt_v=wt.stride(0),
                s_wt_h=wt.stride(1))


def _jsd_logs(beta):
    return math.log(beta) if beta > 0 else -math.inf, math.log1p(-beta) if beta < 1 else -math.inf


def div_forward(xs, ws, bs, xt, wt, bt, valid_u8, kind: int, beta: float, scale: float):
    """Per-token (D, lse_s, lse_t, aux) float32 [N]; rows that are not valid hold garbage."""
    cfg = get_config()
    N, V = xs.shape[0], ws.shape[0]
    f32 = dict(dtype=torch.float32, device=xs.device)
    split, per = choose_split(N, V, xs.device, cfg)
    ms, ls, mt, lt, a = (torch.empty((split, N), **f32) for _ in range(5))
    grid = (triton.cdiv(N, cfg.block_n) * split,)
    common = dict(N=N, V=V, **_geometry(xs, ws, xt, wt), scale=scale, tiles_per_split=per,
                  HAS_BS=bs is not None, HAS_BT=bt is not None, BN=cfg.block_n, BV=cfg.block_v, BH=cfg.block_h,
                  DOT_PRECISION=dot_precision(xs.dtype), UPCAST=triton_interpreting(),
                  num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    ptrs = (xs, ws, bs if bs is not None else xs, xt, wt, bt if bt is not None else xt, valid_u8)
    K.div_stats_kernel[grid](*ptrs, ms, ls, mt, lt, a, KIND=kind, **common)
    lse_s, lse_t, D = merge_splits(ms, ls, mt, lt, a, kind)
    aux = D
    if kind == JSD:
        dp, kp = torch.empty((split, N), **f32), torch.empty((split, N), **f32)
        log_b, log_1mb = _jsd_logs(beta)
        K.jsd_sums_kernel[grid](*ptrs, lse_s, lse_t, dp, kp, beta=beta, log_b=log_b, log_1mb=log_1mb, **common)
        D, aux = dp.sum(0), kp.sum(0)
    return D, lse_s, lse_t, aux


def div_backward(xs, ws, bs, xt, wt, bt, valid_u8, lse_s, lse_t, aux, g, kind, beta, scale, need_dx, need_dw,
                 need_db):
    cfg = get_config()
    g = g.contiguous().float()
    log_b, log_1mb = _jsd_logs(beta)

    def fill(dl, row0, n_rows, col0, n_cols):
        grid = (triton.cdiv(n_rows, cfg.bwd_block_n) * triton.cdiv(n_cols, cfg.bwd_block_v),)
        K.div_dlogits_kernel[grid](
            xs, ws, bs if bs is not None else xs, xt, wt, bt if bt is not None else xt, valid_u8, lse_s, lse_t,
            aux if aux is not None else lse_s, g, dl, row0, n_rows, col0, n_cols, **_geometry(xs, ws, xt, wt),
            stride_dr=dl.stride(0), stride_dc=dl.stride(1), scale=scale, beta=beta, log_b=log_b, log_1mb=log_1mb,
            KIND=kind, HAS_BS=bs is not None, HAS_BT=bt is not None, GROUP=cfg.group,
            BN=cfg.bwd_block_n, BV=cfg.bwd_block_v, BH=cfg.bwd_block_h,
            DOT_PRECISION=dot_precision(xs.dtype), UPCAST=triton_interpreting(),
            num_warps=cfg.bwd_num_warps, num_stages=cfg.bwd_num_stages,
        )

    return scratch_backward(xs, ws, bs.dtype if bs is not None else None, fill, need_dx=need_dx, need_dw=need_dw,
                            need_db=need_db, scratch_bytes=cfg.scratch_bytes, row_align=cfg.bwd_block_n,
                            col_align=cfg.bwd_block_v)


class TritonDivergence(torch.autograd.Function):
    """Per-token divergence [N] float32 over 2-D inputs; rows where ``valid`` is False give 0."""

    @staticmethod
    def forward(ctx, hs, ws, bs, ht, wt, bt, valid, kind: int, beta: float, scale: float):
        valid_u8 = valid.to(torch.uint8).contiguous()
        if hs.shape[0] == 0:
            D = lse_s = lse_t = aux = torch.zeros(0, dtype=torch.float32, device=hs.device)
        else:
            D, lse_s, lse_t, aux = div_forward(hs, ws, bs, ht, wt, bt, valid_u8, kind, beta, scale)
        ctx.save_for_backward(hs, ws, bs, ht, wt, bt, valid_u8, lse_s, lse_t, aux)
        ctx.kind, ctx.beta, ctx.scale = kind, beta, scale
        return torch.where(valid, D, torch.zeros_like(D))

    @staticmethod
    def backward(ctx, g):
        hs, ws, bs, ht, wt, bt, valid_u8, lse_s, lse_t, aux = ctx.saved_tensors
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_db = bs is not None and ctx.needs_input_grad[2]
        dx, dw, db = div_backward(hs, ws, bs, ht, wt, bt, valid_u8, lse_s, lse_t, aux, g, ctx.kind, ctx.beta,
                                  ctx.scale, need_dx, need_dw, need_db)
        return dx, dw, db, None, None, None, None, None, None, None


def divergence_triton(hs, ws, bs, ht, wt, bt, valid, kind, beta, scale):
    check_triton_dtypes(hs, ws, "student_")
    check_triton_dtypes(ht, wt, "teacher_")
    return TritonDivergence.apply(hs, ws, bs, ht, wt, bt, valid, kind, beta, scale)
