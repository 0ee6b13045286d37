"""The ``impl="torch"`` path of ``linear_logprobs`` (the CPU default): vocab-chunked PyTorch.

Same contract as the Triton kernels, O(N) + O(chunk) memory: tokens are processed in
``tokens`` x ``vocab`` tiles with an online log-sum-exp; only per-token statistics (the row's
shift and log-sum, and its entropy) are kept between forward and backward, and the backward
recomputes each tile and re-forms log p relative to the shift. Ignored tokens are dropped
before any matmul. Math in ``README.md``.

Memory note: the weight gradient is accumulated in float32. With a float32 weight that buffer
is the gradient itself; with a 16-bit weight it is one extra V x H float32 buffer (the Triton
path, used on GPUs, has none).
"""

from __future__ import annotations

import torch

from ..common.autograd import first_order_only
from ..common.chunked import (
    CHUNKS,
    ChunkSizes,
    ScaledHead,
    accumulate_tile,
    mul_safe,
    online_max,
    rescale_moment,
    shift,
    softmax_dlogits_,
)
from ..common.numerics import LogitMap, compute_dtype


def chunked_stats(xv, weight, bias, yv, lmap: LogitMap, want_ent, chunks: ChunkSizes = CHUNKS):
    """Per-token statistics of compacted valid rows: the shift (running max, 0 when none), the
    log-sum relative to it, the log-prob of the target and (optionally) the entropy."""
    cdt = compute_dtype(xv.dtype)
    head = ScaledHead(weight, bias, lmap, cdt)
    Nv, V = xv.shape[0], weight.shape[0]
    f = dict(dtype=cdt, device=xv.device)
    sh_out, logl_out, lp = torch.empty(Nv, **f), torch.empty(Nv, **f), torch.empty(Nv, **f)
    ent = torch.empty(Nv, **f) if want_ent else None
    for c0 in range(0, Nv, chunks.tokens):
        c1 = min(c0 + chunks.tokens, Nv)
        xs = xv[c0:c1].to(cdt)
        m = torch.full((c1 - c0,), float("-inf"), **f)
        l = torch.zeros_like(m)  # noqa: E741 - the sum-exp, as in the README
        s = torch.zeros_like(m)
        for s0 in range(0, V, chunks.vocab):
            m_new, sh, r, u = online_max(m, head.tile(xs, s0, min(s0 + chunks.vocab, V)))
            e = torch.exp(u)
            if want_ent:  # sum e (z - m), kept relative to the running max (no large cancellations)
                s = rescale_moment(s, r, shift(m) - sh, l) + mul_safe(e, u, head.neg_inf).sum(1)
            l = l * r + e.sum(1)
            m = m_new
        sh = shift(m)
        logl = torch.log(l)
        sh_out[c0:c1], logl_out[c0:c1] = sh, logl
        lp[c0:c1] = (head.target(xs, yv[c0:c1]) - sh) - logl
        if want_ent:
            ent[c0:c1] = logl - s / l
    return sh_out, logl_out, lp, ent


def chunked_grads(x, weight, bias, y, sh, logl, ent, g_lp, g_ent, lmap: LogitMap, need_dx, need_dw, need_db,
                  chunks: ChunkSizes = CHUNKS):
    """Gradients w.r.t. x [Nv, H], weight, bias for upstream per-token g_lp, g_ent (compacted rows);
    ``sh``, ``logl``, ``ent``: the forward's statistics.

    d logp / dz_j = onehot_j - p_j ;  d entropy / dz_j = -p_j (z_j - E_p[z]) = -p_j (log p_j + H).
    """
    cdt = compute_dtype(x.dtype)
    head = ScaledHead(weight, bias, lmap, cdt)
    Nv, V = x.shape[0], weight.shape[0]
    dx = torch.zeros(x.shape, dtype=cdt, device=x.device) if need_dx else None
    dw = torch.zeros(weight.shape, dtype=cdt, device=x.device) if need_dw else None
    db = torch.zeros(V, dtype=cdt, device=x.device) if need_db else None
    s = 1.0 if head.capped else lmap.scale  # w.r.t. the raw output x @ w.T + b: a scale, or a capped tile's slope
    g_lp = g_lp.to(cdt) * s
    g_ent = g_ent.to(cdt) * s if g_ent is not None else None
    for c0 in range(0, Nv, chunks.tokens):
        c1 = min(c0 + chunks.tokens, Nv)
        xc = x[c0:c1].to(cdt)
        glc, shc, loglc = g_lp[c0:c1], sh[c0:c1, None], logl[c0:c1, None]
        gec, entc = (g_ent[c0:c1], ent[c0:c1]) if g_ent is not None else (None, None)
        for s0 in range(0, V, chunks.vocab):
            s1 = min(s0 + chunks.vocab, V)
            z = head.tile(xc, s0, s1)
            slope = head.slope(z) if head.capped else None
            dz = softmax_dlogits_(z.sub_(shc).sub_(loglc), glc, gec, entc, head.neg_inf)
            accumulate_tile(dz.mul_(slope) if slope is not None else dz, xc, head, c0, c1, s0, s1, dx, dw, db)
        yc = y[c0:c1]
        g_y = glc * head.slope(head.target(xc, yc)) if head.capped else glc  # the one-hot part of d logp / dz
        if need_dx:
            dx[c0:c1] += g_y[:, None] * weight.index_select(0, yc).to(cdt)
        if need_dw:
            dw.index_add_(0, yc, g_y[:, None] * xc)
        if need_db:
            db.index_add_(0, yc, g_y)
    return dx, dw, db


class ChunkedLogprobs(torch.autograd.Function):
    """Autograd op over 2-D ``hidden [N, H]`` and 1-D ``targets [N]``; returns (logp, entropy|None)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, lmap: LogitMap, ignore_index: int, want_entropy: bool):
        cdt = compute_dtype(hidden.dtype)
        N = hidden.shape[0]
        idx = (targets != ignore_index).nonzero().squeeze(1)
        xv = hidden.index_select(0, idx)
        yv = targets.index_select(0, idx)
        sh, logl, lp_v, ent_v = chunked_stats(xv, weight, bias, yv, lmap, want_entropy)
        logp = torch.zeros(N, dtype=cdt, device=hidden.device)
        logp.index_copy_(0, idx, lp_v)
        ent = None
        if want_entropy:
            ent = torch.zeros(N, dtype=cdt, device=hidden.device)
            ent.index_copy_(0, idx, ent_v)
        ctx.save_for_backward(hidden, weight, bias, idx, yv, sh, logl, ent_v)
        ctx.lmap = lmap
        return logp, ent

    @staticmethod
    @first_order_only("linear_logprobs(impl='torch')")
    def backward(ctx, g_logp, g_ent):
        hidden, weight, bias, idx, yv, sh, logl, ent = ctx.saved_tensors
        need_dx, need_dw, need_db = ctx.needs_input_grad[0], ctx.needs_input_grad[1], (
            bias is not None and ctx.needs_input_grad[2])
        if g_logp is None:
            g_logp = torch.zeros(hidden.shape[0], dtype=sh.dtype, device=hidden.device)
        g_lp = g_logp.index_select(0, idx)
        g_e = g_ent.index_select(0, idx) if (g_ent is not None and ent is not None) else None
        xv = hidden.index_select(0, idx)
        dxv, dw, db = chunked_grads(xv, weight, bias, yv, sh, logl, ent, g_lp, g_e, ctx.lmap, need_dx, need_dw,
                                    need_db)
        dx = None
        if need_dx:
            dx = torch.zeros_like(hidden)
            dx.index_copy_(0, idx, dxv.to(hidden.dtype))
        return (dx, dw.to(weight.dtype) if need_dw else None, db.to(bias.dtype) if need_db else None,
                None, None, None, None)


def logprobs_chunked(hidden2d, weight, bias, targets1d, lmap: LogitMap, ignore_index, want_entropy):
    return ChunkedLogprobs.apply(hidden2d, weight, bias, targets1d, lmap, ignore_index, want_entropy)
