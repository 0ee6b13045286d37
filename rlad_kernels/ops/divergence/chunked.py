"""The ``impl="torch"`` path of ``linear_divergence`` (the CPU default): vocab-chunked PyTorch
teacher-student divergences. Math in ``README.md``.

Token x vocabulary tiles of both logits; per token only both distributions' shifts and
log-sums (``Norms``: log p = (z - shift) - log_sum, no cancellation of two numbers of the size of
the logits) and one auxiliary value (the KL itself for reverse KL, ``KL(p_s || M)`` for JSD)
are kept for the backward, which recomputes both tiles. KL kinds take one pass with online statistics; JSD needs both
log-normalizers before its mixture exists, so its forward takes two.
"""

from __future__ import annotations

from typing import NamedTuple

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
)
from ..common.numerics import LogitMap, compute_dtype, log_weights
from .kinds import FKL, RKL


class Norms(NamedTuple):
    """Per-row [N] normalizers of both distributions, kept for the backward (both paths): the
    shift (the row's max logit, 0 when none) and log sum exp(z - shift); log p = (z_s - sh_s) -
    logl_s, log q likewise."""

    sh_s: torch.Tensor
    logl_s: torch.Tensor
    sh_t: torch.Tensor
    logl_t: torch.Tensor


def div_forward(xs, ws, bs, xt, wt, bt, kind: int, beta: float, lmaps: tuple[LogitMap, LogitMap],
                chunks: ChunkSizes = CHUNKS):
    """Per-token (D, Norms, aux) for compacted rows xs [Nv, Hs], xt [Nv, Ht]."""
    cdt = compute_dtype(xs.dtype)
    hs, ht = ScaledHead(ws, bs, lmaps[0], cdt), ScaledHead(wt, bt, lmaps[1], cdt)
    guard = hs.neg_inf or ht.neg_inf
    Nv, V = xs.shape[0], ws.shape[0]
    f = dict(dtype=cdt, device=xs.device)
    D = torch.empty(Nv, **f)
    norms = Norms(*(torch.empty(Nv, **f) for _ in range(4)))
    aux = torch.empty(Nv, **f) if kind != FKL else None
    for c0 in range(0, Nv, chunks.tokens):
        c1 = min(c0 + chunks.tokens, Nv)
        xcs, xct = xs[c0:c1].to(cdt), xt[c0:c1].to(cdt)
        m_s = torch.full((c1 - c0,), float("-inf"), **f)
        m_t, l_s, l_t, A = m_s.clone(), torch.zeros_like(m_s), torch.zeros_like(m_s), torch.zeros_like(m_s)
        for s0 in range(0, V, chunks.vocab):
            s1 = min(s0 + chunks.vocab, V)
            ms_new, sh_s, r_s, us = online_max(m_s, hs.tile(xcs, s0, s1))  # logits minus their shifts
            mt_new, sh_t, r_t, ut = online_max(m_t, ht.tile(xct, s0, s1))
            e_s, e_t = torch.exp(us), torch.exp(ut)
            d_s, d_t = shift(m_s) - sh_s, shift(m_t) - sh_t
            # A = sum e^(u - sh_u) ((u - sh_u) - (v - sh_v)), u the first argument of the KL
            if kind == RKL:
                A = rescale_moment(A, r_s, d_s - d_t, l_s) + mul_safe(e_s, us - ut, guard).sum(1)
            elif kind == FKL:
                A = rescale_moment(A, r_t, d_t - d_s, l_t) + mul_safe(e_t, ut - us, guard).sum(1)
            l_s = l_s * r_s + e_s.sum(1)
            l_t = l_t * r_t + e_t.sum(1)
            m_s, m_t = ms_new, mt_new
        log_ls, log_lt = torch.log(l_s), torch.log(l_t)
        for t, v in zip(norms, (shift(m_s), log_ls, shift(m_t), log_lt), strict=True):
            t[c0:c1] = v
        if kind == RKL:
            D[c0:c1] = A / l_s - log_ls + log_lt
            aux[c0:c1] = D[c0:c1]
        elif kind == FKL:
            D[c0:c1] = A / l_t - log_lt + log_ls
        else:
            d, k = _jsd_sums(xcs, xct, hs, ht, Norms(*(t[c0:c1] for t in norms)), beta, V, chunks)
            D[c0:c1], aux[c0:c1] = d, k
    return D, norms, aux


def _log_probs(zs, zt, nc: Norms):
    """log p and log q of one tile (consumes both tiles)."""
    return zs.sub_(nc.sh_s[:, None]).sub_(nc.logl_s[:, None]), zt.sub_(nc.sh_t[:, None]).sub_(nc.logl_t[:, None])


def _log_mixture(lp, lq, beta):
    """log M = log(beta q + (1 - beta) p)."""
    log_b, log_1mb = log_weights(beta)
    return torch.logaddexp(lq + log_b, lp + log_1mb)


def _jsd_sums(xcs, xct, hs, ht, nc: Norms, beta, V, chunks):
    """Second pass: D = beta KL(q||M) + (1-beta) KL(p||M) and k = KL(p||M)."""
    D = torch.zeros_like(nc.sh_s)
    k = torch.zeros_like(nc.sh_s)
    for s0 in range(0, V, chunks.vocab):
        s1 = min(s0 + chunks.vocab, V)
        lp, lq = _log_probs(hs.tile(xcs, s0, s1), ht.tile(xct, s0, s1), nc)
        lm = _log_mixture(lp, lq, beta)
        kp = mul_safe(lp.exp(), lp - lm, True).sum(1)
        kq = mul_safe(lq.exp(), lq - lm, True).sum(1)
        D += beta * kq + (1.0 - beta) * kp
        k += kp
    return D, k


def div_grads(xs, ws, bs, xt, wt, bt, norms: Norms, aux, g, kind, beta, lmaps: tuple[LogitMap, LogitMap], need_dx,
              need_dw, need_db, chunks: ChunkSizes = CHUNKS):
    """Gradients w.r.t. the student's xs, ws, bs for upstream per-token g (compacted rows):
    reverse KL p (log p - log q - KL); forward KL p - q; JSD (1 - beta) p (log p - log M - KL(p||M))."""
    cdt = compute_dtype(xs.dtype)
    hs, ht = ScaledHead(ws, bs, lmaps[0], cdt), ScaledHead(wt, bt, lmaps[1], cdt)
    guard = hs.neg_inf or ht.neg_inf
    Nv, V = xs.shape[0], ws.shape[0]
    dx = torch.zeros(xs.shape, dtype=cdt, device=xs.device) if need_dx else None
    dw = torch.zeros(ws.shape, dtype=cdt, device=xs.device) if need_dw else None
    db = torch.zeros(V, dtype=cdt, device=xs.device) if need_db else None
    g = g.to(cdt) * (1.0 if hs.capped else hs.scale)  # w.r.t. the raw student output: a scale, or the tile's slope
    for c0 in range(0, Nv, chunks.tokens):
        c1 = min(c0 + chunks.tokens, Nv)
        xc = xs[c0:c1].to(cdt)
        xcs, xct = xc, xt[c0:c1].to(cdt)
        gc, nc = g[c0:c1, None], Norms(*(t[c0:c1] for t in norms))
        for s0 in range(0, V, chunks.vocab):
            s1 = min(s0 + chunks.vocab, V)
            zs = hs.tile(xcs, s0, s1)
            slope = hs.slope(zs) if hs.capped else None
            lp, lq = _log_probs(zs, ht.tile(xct, s0, s1), nc)
            if kind == FKL:
                dz = (lp.exp_() - lq.exp_()).mul_(gc)
            elif kind == RKL:
                dz = mul_safe(lp.exp(), lp - lq - aux[c0:c1, None], guard).mul_(gc)
            else:
                lm = _log_mixture(lp, lq, beta)
                dz = mul_safe(lp.exp(), lp - lm - aux[c0:c1, None], True).mul_(gc * (1.0 - beta))
            accumulate_tile(dz.mul_(slope) if slope is not None else dz, xc, hs, c0, c1, s0, s1, dx, dw, db)
    return dx, dw, db


class ChunkedDivergence(torch.autograd.Function):
    """Per-token divergence [N] over 2-D inputs; rows where ``valid`` is False give 0."""

    @staticmethod
    def forward(ctx, hs, ws, bs, ht, wt, bt, valid, kind: int, beta: float, lmaps: tuple[LogitMap, LogitMap]):
        idx = valid.nonzero().squeeze(1)
        xs, xt = hs.index_select(0, idx), ht.index_select(0, idx)
        D, norms, aux = div_forward(xs, ws, bs, xt, wt, bt, kind, beta, lmaps)
        out = torch.zeros(hs.shape[0], dtype=D.dtype, device=hs.device)
        out.index_copy_(0, idx, D)
        ctx.save_for_backward(hs, ws, bs, ht, wt, bt, idx, aux, *norms)
        ctx.kind, ctx.beta, ctx.lmaps = kind, beta, lmaps
        return out

    @staticmethod
    @first_order_only("linear_divergence(impl='torch')")
    def backward(ctx, g):
        hs, ws, bs, ht, wt, bt, idx, aux, *norms = ctx.saved_tensors
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_db = bs is not None and ctx.needs_input_grad[2]
        xs, xt = hs.index_select(0, idx), ht.index_select(0, idx)
        dxv, dw, db = div_grads(xs, ws, bs, xt, wt, bt, Norms(*norms), aux, g.index_select(0, idx), ctx.kind,
                                ctx.beta, ctx.lmaps, need_dx, need_dw, need_db)
        dx = None
        if need_dx:
            dx = torch.zeros_like(hs)
            dx.index_copy_(0, idx, dxv.to(hs.dtype))
        return (dx, dw.to(ws.dtype) if need_dw else None, db.to(bs.dtype) if need_db else None,
                None, None, None, None, None, None, None)


def divergence_chunked(hs, ws, bs, ht, wt, bt, valid, kind, beta, lmaps: tuple[LogitMap, LogitMap]):
    return ChunkedDivergence.apply(hs, ws, bs, ht, wt, bt, valid, kind, beta, lmaps)
