"""Torch twins of the tile helpers, for the vocab-chunked ``impl="torch"`` paths (the CPU default).

The same online statistics as the Triton kernels (``tiles.py``), tile by tile: O(N) + O(tile)
memory, never ``N x V``. Each op's ``chunked.py`` composes these.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .numerics import LogitMap


@dataclass
class ChunkSizes:
    """Tile shapes of the torch paths; tests shrink them to exercise every boundary."""

    tokens: int = 1024               # token chunk of the log-prob and divergence tiles
    vocab: int = 8192                # vocabulary chunk of those tiles
    block_bytes: int = 64 << 20      # policy loss: one [C, V] logits block, in the compute dtype


CHUNKS = ChunkSizes()


class ScaledHead:
    """The lm_head in compute dtype with its ``LogitMap``: ``z = s (x W^T) + s b``, or with a soft
    cap ``z = cap_out tanh((x W^T + b) cap_in)``. The scale multiplies the product (BLAS's alpha),
    not the inputs: a scaled input would round every element of x before the product, which
    costs up to a few times the gradient accuracy of eager autograd at temperatures far from 1.
    ``neg_inf`` tells whether -inf logits can occur (a masking bias without a cap), the only
    case where ``0 * -inf`` must be guarded in the entropy and KL terms."""

    def __init__(self, weight, bias, lmap: LogitMap, cdt):
        self.weight, self.lmap, self.cdt = weight, lmap, cdt
        self.scale, self.capped = lmap.scale, lmap.capped
        if bias is None:
            self.bias = None
        else:
            self.bias = bias.to(cdt) if self.capped else bias.to(cdt) * self.scale
        self.neg_inf = (not self.capped) and self.bias is not None and bool(torch.isneginf(self.bias).any())

    def w(self, s0, s1):
        return self.weight[s0:s1].to(self.cdt)

    def tile(self, x, s0, s1):
        """Logits of the rows ``x`` (compute dtype) for vocabulary columns ``[s0, s1)``."""
        if self.capped:
            r = x @ self.w(s0, s1).T if self.bias is None else torch.addmm(self.bias[s0:s1], x, self.w(s0, s1).T)
            return r.mul_(self.lmap.cap_in).tanh_().mul_(self.lmap.cap_out)
        if self.bias is None:
            z = x @ self.w(s0, s1).T
            return z.mul_(self.scale) if self.scale != 1.0 else z
        return torch.addmm(self.bias[s0:s1], x, self.w(s0, s1).T, alpha=self.scale)

    def target(self, x, yc):
        """The logit of each row's target id."""
        r = (x * self.weight.index_select(0, yc).to(self.cdt)).sum(-1)
        if self.capped:
            r = r + self.bias.index_select(0, yc) if self.bias is not None else r
            return self.lmap.apply(r)
        r = r * self.scale
        return r + self.bias.index_select(0, yc) if self.bias is not None else r

    def slope(self, z):
        """``dz/dr`` of logits ``z`` for the raw output ``r = x W^T + b``: a tensor with a cap, the
        scalar scale without one."""
        return self.lmap.slope(z) if self.capped else self.scale


def shift(m: torch.Tensor) -> torch.Tensor:
    """A running max as a finite shift: 0 while the row has seen only -inf (the max identity)."""
    return torch.where(m == float("-inf"), torch.zeros((), dtype=m.dtype, device=m.device), m)


def mul_safe(a, b, guard: bool):
    """a * b, with 0 where a == 0 when ``guard`` (0 * -inf on masked logits)."""
    out = a * b
    return torch.where(a == 0, torch.zeros((), dtype=out.dtype, device=out.device), out) if guard else out


def online_max(m: torch.Tensor, z: torch.Tensor):
    """One tile ``z [C, S]`` into a running row max ``m [C]``: returns ``(m', sh', r, u)`` with the
    new max, its finite shift, the rescale ``exp(m - sh')`` of sums kept relative to the old
    shift, and ``u = z - sh'`` (computed in place: ``z`` is consumed)."""
    m_new = torch.maximum(m, z.amax(dim=1))
    sh = shift(m_new)
    return m_new, sh, torch.exp(m - sh), z.sub_(sh[:, None])


def rescale_moment(a, r, d, l):
    """Move a moment ``a = sum e^(u - sh) f`` to a new shift: ``r (a + d l)``, where ``d`` is the
    change of the moment's reference and ``l`` the sum-exp it was weighted with. Rows with
    ``l = 0`` (nothing seen yet) keep ``r a``. Used for tile updates and split merges alike."""
    return r * (a + torch.where(l > 0, d * l, torch.zeros((), dtype=l.dtype, device=l.device)))


def softmax_dlogits_(logp, g_lp, g_ent=None, ent=None, guard: bool = False, p=None):
    """Gradient w.r.t. the logits of ``g_lp * log p_y + g_ent * entropy`` for one tile, without
    the one-hot term of ``log p_y`` (the caller adds ``g_lp`` at the target column):

        -p (g_lp + g_ent (log p + H))          (z - E_p[z] = log p + H)

    ``logp [C, S]`` is the tile's ``z - lse`` and ``ent [C]`` the rows' entropy H; ``p`` may be
    passed when already computed. Overwrites ``logp`` and ``p``."""
    if g_ent is None:
        p = logp.exp_() if p is None else p
        return p.mul_(-g_lp[:, None])
    p = torch.exp(logp) if p is None else p
    q = logp.add_(ent[:, None]).mul_(g_ent[:, None]).add_(g_lp[:, None])
    return mul_safe(p, q, guard).neg_()


def accumulate_tile(dz, xc, head, c0, c1, s0, s1, dx, dw, db):
    """Add one tile's logit gradient ``dz [c1-c0, s1-s0]`` into dX, dW, db (each may be None)."""
    if dx is not None:
        dx[c0:c1].addmm_(dz, head.w(s0, s1))
    if dw is not None:
        dw[s0:s1].addmm_(dz.T, xc)
    if db is not None:
        db[s0:s1] += dz.sum(0)
