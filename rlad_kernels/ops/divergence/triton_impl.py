"""The ``impl="triton"`` path of ``linear_divergence``, host side: launches and the autograd op."""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton

from ..common.autograd import first_order_only
from ..common.launch import TritonConfig, check_triton_dtypes, get_config, head, scan_plan, tiles
from ..common.numerics import LogitMap, log_weights
from ..common.scratch_backward import scratch_backward
from .chunked import Norms
from .kernels import div_combine_kernel, div_dlogits_kernel, div_stats_kernel, jsd_sums_kernel
from .kinds import JSD


class DivPartials(NamedTuple):
    """Per-split statistics [SPLIT, N] float32 of both distributions and the KL moment."""

    ms: torch.Tensor
    ls: torch.Tensor
    mt: torch.Tensor
    lt: torch.Tensor
    a: torch.Tensor


def div_forward(xs, ws, bs, xt, wt, bt, valid_u8, kind: int, beta: float, lmaps: tuple[LogitMap, LogitMap],
                cfg: TritonConfig):
    """Per-token (D, Norms, aux) float32 [N]; rows that are not valid hold garbage."""
    N, V = xs.shape[0], ws.shape[0]
    f32 = dict(dtype=torch.float32, device=xs.device)
    plan = scan_plan(N, V, xs.device, cfg)
    norms = Norms(*(torch.empty(N, **f32) for _ in range(4)))
    d = torch.empty(N, **f32)
    if plan.split > 1:
        parts = DivPartials(*(torch.empty((plan.split, N), **f32) for _ in range(5)))
    else:
        parts = DivPartials(*([d] * 5))  # unused
    grid = (triton.cdiv(N, cfg.block_n) * plan.split,)
    heads = (head(xs, ws, bs, lmaps[0]), head(xt, wt, bt, lmaps[1]), valid_u8)
    common = dict(N=N, V=V, HS=xs.shape[1], HT=xt.shape[1], tiles_per_split=plan.tiles_per_split,
                  HAS_BS=bs is not None, HAS_BT=bt is not None, CAP_S=lmaps[0].capped, CAP_T=lmaps[1].capped,
                  **tiles(xs.dtype, cfg))
    div_stats_kernel[grid](*heads, norms, d, parts, KIND=kind, SPLIT=plan.split, **common)
    if plan.split > 1:
        div_combine_kernel[(plan.blocks,)](norms, d, parts, N=N, KIND=kind, SPLIT=plan.split, BN=cfg.epilogue_block)
    D = aux = d
    if kind == JSD:
        dp, kp = torch.empty((plan.split, N), **f32), torch.empty((plan.split, N), **f32)
        log_b, log_1mb = log_weights(beta)
        jsd_sums_kernel[grid](*heads, norms, dp, kp, beta=beta, log_b=log_b, log_1mb=log_1mb, **common)
        D, aux = dp.sum(0), kp.sum(0)
    return D, norms, aux


def div_backward(xs, ws, bs, xt, wt, bt, valid_u8, norms: Norms, aux, g, kind, beta, lmaps: tuple[LogitMap, LogitMap],
                 need_dx, need_dw, need_db, cfg: TritonConfig):
    g = g.contiguous().float()
    log_b, log_1mb = log_weights(beta)
    heads = (head(xs, ws, bs, lmaps[0]), head(xt, wt, bt, lmaps[1]))
    t = tiles(xs.dtype, cfg, backward=True)

    def fill(dl, row0, n_rows, col0, n_cols):
        grid = (triton.cdiv(n_rows, cfg.bwd_block_n) * triton.cdiv(n_cols, cfg.bwd_block_v),)
        div_dlogits_kernel[grid](
            *heads, valid_u8, norms, aux if aux is not None else norms.sh_s, g, dl, row0, n_rows, col0, n_cols,
            HS=xs.shape[1], HT=xt.shape[1], stride_dp=dl.stride(0), stride_dr=dl.stride(1), stride_dc=dl.stride(2),
            beta=beta, log_b=log_b, log_1mb=log_1mb, KIND=kind, HAS_BS=bs is not None, HAS_BT=bt is not None,
            CAP_S=lmaps[0].capped, CAP_T=lmaps[1].capped, SPLIT=dl.shape[0] == 2, GROUP=cfg.group, **t,
        )

    return scratch_backward(xs, ws, bs.dtype if bs is not None else None, fill, valid_u8, cfg, need_dx=need_dx,
                            need_dw=need_dw, need_db=need_db)


class TritonDivergence(torch.autograd.Function):
    """Per-token divergence [N] float32 over 2-D inputs; rows where ``valid`` is False give 0."""

    @staticmethod
    def forward(ctx, hs, ws, bs, ht, wt, bt, valid, kind: int, beta: float, lmaps: tuple[LogitMap, LogitMap]):
        valid_u8 = valid.to(torch.uint8).contiguous()
        ctx.cfg = get_config(hs.device, hs.dtype)  # the backward tiles as the forward's
        if hs.shape[0] == 0:
            D = aux = torch.zeros(0, dtype=torch.float32, device=hs.device)
            norms = Norms(*[D] * 4)
        else:
            D, norms, aux = div_forward(hs, ws, bs, ht, wt, bt, valid_u8, kind, beta, lmaps, ctx.cfg)
        ctx.save_for_backward(hs, ws, bs, ht, wt, bt, valid_u8, aux, *norms)
        ctx.kind, ctx.beta, ctx.lmaps = kind, beta, lmaps
        return torch.where(valid, D, torch.zeros_like(D))

    @staticmethod
    @first_order_only("linear_divergence(impl='triton')")
    def backward(ctx, g):
        hs, ws, bs, ht, wt, bt, valid_u8, aux, *norms = ctx.saved_tensors
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_db = bs is not None and ctx.needs_input_grad[2]
        dx, dw, db = div_backward(hs, ws, bs, ht, wt, bt, valid_u8, Norms(*norms), aux, g, ctx.kind, ctx.beta,
                                  ctx.lmaps, need_dx, need_dw, need_db, ctx.cfg)
        return dx, dw, db, None, None, None, None, None, None, None


def divergence_triton(hs, ws, bs, ht, wt, bt, valid, kind, beta, lmaps: tuple[LogitMap, LogitMap]):
    check_triton_dtypes(hs, ws, "student_")
    check_triton_dtypes(ht, wt, "teacher_")
    return TritonDivergence.apply(hs, ws, bs, ht, wt, bt, valid, kind, beta, lmaps)
