"""Vocab-chunked PyTorch implementation of the per-token log-prob op (the CPU default).

Same contract as the Triton kernels, O(N) + O(chunk) memory: tokens are processed in
``tokens`` x ``vocab`` tiles with an online log-sum-exp; only per-token statistics (lse, and
E_p[z] for the entropy) are kept between forward and backward, and the backward recomputes
each tile. Ignored tokens are dropped before any matmul. Math in ``README.md``.

Memory note: the weight gradient is accumulated in float32. With a float32 weight that buffer
is the gradient itself; with a 16-bit weight it is one extra V x H float32 buffer (the Triton
path, used on GPUs, has none).
"""

from __future__ import annotations

from dataclasses import dataclass
import torch

from .naive import compute_dtype


@dataclass
class ChunkSizes:
    """Tile shape of the chunked path; tests shrink it to exercise every boundary."""

    tokens: int = 1024
    vocab: int = 8192


CHUNKS = ChunkSizes()


class ScaledHead:
    """The lm_head in compute dtype with the logit scale folded into the inputs:
    z = (x s) W^T + b s. ``neg_inf`` tells whether -inf logits can occur (a masking bias), the
    only case where ``0 * -inf`` must be guarded in the entropy terms."""

    def __init__(self, weight, bias, scale, cdt):
        self.weight, self.scale, self.cdt = weight, scale, cdt
        self.bias = bias.to(cdt) * scale if bias is not None else None
        self.neg_inf = bool(torch.isneginf(self.bias).any()) if self.bias is not None else False

    def w(self, s0, s1):
        return self.weight[s0:s1].to(self.cdt)

    def tile(self, xs, s0, s1):
        if self.bias is None:
            return xs @ self.w(s0, s1).T
        return torch.addmm(self.bias[s0:s1], xs, self.w(s0, s1).T)

    def target(self, xs, yc):
        zt = (xs * self.weight.index_select(0, yc).to(self.cdt)).sum(-1)
        return zt + self.bias.index_select(0, yc) if self.bias is not None else zt


def mul_safe(a, b, guard):
    """a * b, with 0 where a == 0 when ``guard`` (0 * -inf on masked logits)."""
    out = a * b
    return torch.where(a == 0, torch.zeros((), dtype=out.dtype, device=out.device), out) if guard else out


def accumulate_tile(dz, xc, head, c0, c1, s0, s1, dx, dw, db):
    """Add one tile's logit gradient dz [c1-c0, s1-s0] into dX, dW, db (each may be None)."""
    if dx is not None:
        dx[c0:c1].addmm_(dz, head.w(s0, s1))
    if dw is not None:
        dw[s0:s1].addmm_(dz.T, xc)
    if db is not None:
        db[s0:s1] += dz.sum(0)


def chunked_stats(xv, weight, bias, yv, scale, want_ez, chunks: ChunkSizes = CHUNKS):
    """Per-token ``lse``, target logit and (optionally) ``E_p[z]`` and entropy for compacted valid rows."""
    cdt = compute_dtype(xv.dtype)
    head = ScaledHead(weight, bias, scale, cdt)
    Nv, V = xv.shape[0], weight.shape[0]
    lse = torch.empty(Nv, dtype=cdt, device=xv.device)
    ez = torch.empty(Nv, dtype=cdt, device=xv.device) if want_ez else None
    ent = torch.empty(Nv, dtype=cdt, device=xv.device) if want_ez else None
    zt = torch.empty(Nv, dtype=cdt, device=xv.device)
    neg_inf = torch.tensor(float("-inf"), dtype=cdt, device=xv.device)
    zero = torch.zeros((), dtype=cdt, device=xv.device)
    for c0 in range(0, Nv, chunks.tokens):
        c1 = min(c0 + chunks.tokens, Nv)
        xs = xv[c0:c1].to(cdt) * scale
        m = torch.full((c1 - c0,), float("-inf"), dtype=cdt, device=xv.device)
        l = torch.zeros_like(m)
        sz = torch.zeros_like(m)
        for s0 in range(0, V, chunks.vocab):
            z = head.tile(xs, s0, min(s0 + chunks.vocab, V))
            m_new = torch.maximum(m, z.amax(dim=1))
            m_safe = torch.where(m_new == neg_inf, zero, m_new)  # all -inf so far: avoid -inf - -inf
            rescale = torch.exp(m - m_safe)
            zs = z.sub_(m_safe[:, None])
            e = torch.exp(zs)
            if want_ez:  # sum e * (z - m), re-referenced to the new max (no large cancellations)
                sz = rescale * (sz + torch.where(l > 0, (m - m_safe) * l, zero))
                sz = sz + mul_safe(e, zs, head.neg_inf).sum(1)
            l = l * rescale + e.sum(1)
            m = m_new
        m_safe = torch.where(m == neg_inf, zero, m)
        lse[c0:c1] = m_safe + torch.log(l)
        if want_ez:
            ez[c0:c1] = m_safe + sz / l
            ent[c0:c1] = torch.log(l) - sz / l
        zt[c0:c1] = head.target(xs, yv[c0:c1])
    return lse, zt, ez, ent


def chunked_grads(x, weight, bias, y, lse, ez, g_lp, g_ent, scale, need_dx, need_dw, need_db,
                  chunks: ChunkSizes = CHUNKS):
    """Gradients w.r.t. x [Nv, H], weight, bias for upstream per-token g_lp, g_ent (compacted rows).

    d logp / dz_j = onehot_j - p_j ;  d entropy / dz_j = -p_j (z_j - E_p[z]).
    """
    cdt = compute_dtype(x.dtype)
    head = ScaledHead(weight, bias, scale, cdt)
    Nv, V = x.shape[0], weight.shape[0]
    dx = torch.zeros(x.shape, dtype=cdt, device=x.device) if need_dx else None
    dw = torch.zeros(weight.shape, dtype=cdt, device=x.device) if need_dw else None
    db = torch.zeros(V, dtype=cdt, device=x.device) if need_db else None
    g_lp = g_lp.to(cdt) * scale  # gradient w.r.t. the unscaled logits x @ w.T + b
    g_ent = g_ent.to(cdt) * scale if g_ent is not None else None
    for c0 in range(0, Nv, chunks.tokens):
        c1 = min(c0 + chunks.tokens, Nv)
        xc = x[c0:c1].to(cdt)
        xs = xc * scale
        glc, lsec = g_lp[c0:c1], lse[c0:c1]
        for s0 in range(0, V, chunks.vocab):
            s1 = min(s0 + chunks.vocab, V)
            d = head.tile(xs, s0, s1).sub_(lsec[:, None])  # z - lse
            if g_ent is None:
                dz = d.exp_().mul_(-glc[:, None])  # -g p
            else:  # -p (g + h (z - E_p[z])), with z - E_p[z] = (z - lse) + (lse - E_p[z])
                q = (d + (lsec - ez[c0:c1])[:, None]).mul_(g_ent[c0:c1, None]).add_(glc[:, None])
                dz = mul_safe(d.exp_(), q, head.neg_inf).neg_()
            accumulate_tile(dz, xc, head, c0, c1, s0, s1, dx, dw, db)
        yc = y[c0:c1]
        if need_dx:  # the one-hot part of d logp / dz
            dx[c0:c1] += glc[:, None] * weight.index_select(0, yc).to(cdt)
        if need_dw:
            dw.index_add_(0, yc, glc[:, None] * xc)
        if need_db:
            db.index_add_(0, yc, glc)
    return dx, dw, db


class ChunkedLogprobs(torch.autograd.Function):
    """Autograd op over 2-D ``hidden [N, H]`` and 1-D ``targets [N]``; returns (logp, entropy|None)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, scale: float, ignore_index: int, want_entropy: bool):
        cdt = compute_dtype(hidden.dtype)
        N = hidden.shape[0]
        idx = (targets != ignore_index).nonzero().squeeze(1)
        xv = hidden.index_select(0, idx)
        yv = targets.index_select(0, idx)
        lse, zt, ez, ent_v = chunked_stats(xv, weight, bias, yv, scale, want_entropy)
        logp = torch.zeros(N, dtype=cdt, device=hidden.device)
        logp.index_copy_(0, idx, zt - lse)
        ent = None
        if want_entropy:
            ent = torch.zeros(N, dtype=cdt, device=hidden.device)
            ent.index_copy_(0, idx, ent_v)
        ctx.save_for_backward(hidden, weight, bias, idx, yv, lse, ez)
        ctx.scale = scale
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, bias, idx, yv, lse, ez = ctx.saved_tensors
        need_dx, need_dw, need_db = ctx.needs_input_grad[0], ctx.needs_input_grad[1], (
            bias is not None and ctx.needs_input_grad[2])
        if g_logp is None:
            g_logp = torch.zeros(hidden.shape[0], dtype=lse.dtype, device=hidden.device)
        g_lp = g_logp.index_select(0, idx)
        g_e = g_ent.index_select(0, idx) if (g_ent is not None and ez is not None) else None
        xv = hidden.index_select(0, idx)
        dxv, dw, db = chunked_grads(xv, weight, bias, yv, lse, ez, g_lp, g_e, ctx.scale,
                                    need_dx, need_dw, need_db)
        dx = None
        if need_dx:
            dx = torch.zeros_like(hidden)
            dx.index_copy_(0, idx, dxv.to(hidden.dtype))
        return (dx, dw.to(weight.dtype) if need_dw else None, db.to(bias.dtype) if need_db else None,
                None, None, None, None)


def linear_logprobs_chunked(hidden2d, weight, bias, targets1d, scale, ignore_index, want_entropy):
    logp, ent = ChunkedLogprobs.apply(hidden2d, weight, bias, targets1d, scale, ignore_index, want_entropy)
    return logp, ent


__all__ = ["ChunkSizes", "CHUNKS", "ChunkedLogprobs", "linear_logprobs_chunked", "chunked_stats",
           "chunked_grads"]
