"""The ``impl="torch"`` path of the policy loss (the CPU default): vocab-chunked PyTorch, with the
gradient formed in the forward pass.

The loss is a scalar, so its gradient w.r.t. hidden / weight / bias is known up to the
upstream scalar as soon as each token's log-prob is: for every chunk of C tokens this path
computes the chunk's ``[C, V]`` logits once, the per-token loss and its derivatives (autograd
through ``math.policy_token_loss``, the single definition of the math), and immediately the
chunk's contributions to dX, dW and db. The backward only scales them by ``grad_output``.

That is three GEMMs per token like the eager loss (no recompute), with O(N) + O(C x V) memory
instead of O(N x V): dX and dW are the gradients themselves (float32 accumulation of dW when
the weight is 16-bit). When no gradient is needed, only the loss and metrics are computed.
C follows from ``CHUNKS.block_bytes``.
"""

from __future__ import annotations

import torch

from ..common.autograd import first_order_only
from ..common.chunked import CHUNKS, ScaledHead, mul_safe, shift, softmax_dlogits_
from ..common.normalizer import token_mean_normalizer
from ..common.numerics import LogitMap, compute_dtype
from .math import STAT_FIELDS, STAT_INDEX, TokenInputs, entropy_token_mean, policy_token_loss, reduce_token_stats


class ChunkedPolicyLoss(torch.autograd.Function):
    """Returns (loss, stat sums, logp [N], entropy [N] | None); only ``loss`` is differentiable."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, tok: TokenInputs, normalizer, ent_norm, cfg, lmap: LogitMap,
                ignore_index: int):
        cdt = compute_dtype(hidden.dtype)
        N, V = hidden.shape[0], weight.shape[0]
        dev = hidden.device
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        grads = need_x or need_w or need_b
        head = ScaledHead(weight, bias, lmap, cdt)
        scale = 1.0 if head.capped else lmap.scale  # w.r.t. the raw output: a scale, or a capped block's slope
        idx = (targets != ignore_index).nonzero().squeeze(1)
        Nv = idx.numel()
        t = tok.map(lambda v: v.index_select(0, idx).to(cdt))     # valid tokens only
        w_all = t.token_weights if t.token_weights is not None else torch.ones(Nv, dtype=cdt, device=dev)
        if normalizer is None:
            normalizer = token_mean_normalizer(w_all.sum())
        norm = normalizer.to(cdt)
        # entropy_aggregation="token_mean": dL/dH_t = -entropy_coef / entropy_normalizer on every valid token
        g_e_mean = None
        if cfg.entropy_token_mean:
            g_e_mean = -cfg.entropy_coef * scale / ent_norm.to(cdt)
        want_ent = cfg.needs_entropy
        lp_v = torch.empty(Nv, dtype=cdt, device=dev)
        ent_v = torch.empty(Nv, dtype=cdt, device=dev) if want_ent else None
        dx = torch.zeros((N, hidden.shape[1]), dtype=cdt, device=dev) if need_x else None
        dw = torch.zeros(weight.shape, dtype=cdt, device=dev) if need_w else None
        db = torch.zeros(V, dtype=cdt, device=dev) if need_b else None
        sums = None
        C = max(1, CHUNKS.block_bytes // (V * torch.finfo(cdt).bits // 8))
        W = head.w(0, V)
        for c0 in range(0, Nv, C):
            c1 = min(c0 + C, Nv)
            rows = idx[c0:c1]
            x = hidden.index_select(0, rows).to(cdt)
            z = head.tile(x, 0, V)                                 # [C, V], the only logits block alive
            slope = head.slope(z) if head.capped and grads else None
            # log p = (z - max) - log sum exp(z - max), in place; relative to the max, so no
            # cancellation of two numbers of the size of the logits (a +inf logit gives NaN)
            logp = z.sub_(shift(z.amax(dim=-1))[:, None])
            p = torch.exp(logp)
            total = p.sum(-1, keepdim=True)
            logp.sub_(torch.log(total))
            p.div_(total)
            yc = targets.index_select(0, rows)
            lp = logp.gather(-1, yc[:, None])[:, 0]
            ent = -mul_safe(p, logp, head.neg_inf).sum(-1) if want_ent else None
            # the per-token math, and its derivatives w.r.t. lp and entropy, by autograd
            with torch.enable_grad():
                lp_l = lp.detach().requires_grad_(grads)
                ent_l = ent.detach().requires_grad_(grads and cfg.entropy_in_loss) if ent is not None else None
                loss_t, stats = policy_token_loss(lp_l, t.select(slice(c0, c1)), cfg, entropy=ent_l)
                part = reduce_token_stats(loss_t, stats, w_all[c0:c1], torch.ones_like(lp, dtype=torch.bool))
                if grads:
                    wanted = [lp_l] + ([ent_l] if ent_l is not None and ent_l.requires_grad else [])
                    g = torch.autograd.grad(part[0], wanted)
            sums = part.detach() if sums is None else sums + part.detach()
            lp_v[c0:c1] = lp.detach()
            if ent_v is not None:
                ent_v[c0:c1] = ent
            if not grads:
                continue
            g_lp = g[0] / norm * scale                               # w.r.t. the unscaled logits
            g_e = g[1] / norm * scale if len(g) > 1 else None
            if g_e_mean is not None:
                g_e = g_e_mean.expand_as(lp)
            dz = softmax_dlogits_(logp, g_lp, g_e, ent, head.neg_inf, p=p)   # -p (g + h (log p + H))
            dz.scatter_add_(1, yc[:, None], g_lp[:, None])           # + g onehot
            if slope is not None:
                dz.mul_(slope)
            if need_x:
                dx.index_copy_(0, rows, dz @ W)
            if need_w:
                dw.addmm_(dz.T, x)
            if need_b:
                db += dz.sum(0)
        if sums is None:  # no valid token
            sums = torch.zeros(len(STAT_FIELDS), dtype=cdt, device=dev)
        loss = sums[0] / norm
        if cfg.entropy_token_mean:
            loss = loss + entropy_token_mean(sums[STAT_INDEX["entropy"]], cfg, ent_norm)
        lp_out = torch.zeros(N, dtype=cdt, device=dev).index_copy_(0, idx, lp_v)
        ent_out = torch.zeros(N, dtype=cdt, device=dev).index_copy_(0, idx, ent_v) if want_ent else None
        ctx.save_for_backward(dx, dw, db)
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        ctx.mark_non_differentiable(sums, lp_out, *([ent_out] if ent_out is not None else []))
        return loss, sums, lp_out, ent_out

    @staticmethod
    @first_order_only("linear_policy_loss(impl='torch')")
    def backward(ctx, g_loss, _g_sums, _g_lp, _g_ent):
        # the gradients were formed in the forward; scale them in place (no second V x H buffer),
        # which is why this backward can run only once per forward
        if getattr(ctx, "consumed", False):
            raise RuntimeError("the torch policy loss forms its gradients in the forward pass, so its backward can "
                               "run once per forward; recompute the loss instead of backward(retain_graph=True)")
        ctx.consumed = True
        dx, dw, db = ctx.saved_tensors
        hd, wd, bd = ctx.dtypes

        def out(t, dt):
            return t.mul_(g_loss.to(t.dtype)).to(dt) if t is not None else None
        return out(dx, hd), out(dw, wd), out(db, bd), None, None, None, None, None, None, None


def policy_loss_chunked(x, w, b, y, tok: TokenInputs, normalizer, ent_norm, cfg, lmap: LogitMap, ignore_index):
    """``tok``: the used per-token inputs, flattened to [N]; ``ent_norm``: the entropy normalizer of
    ``entropy_aggregation="token_mean"`` (None: the number of valid tokens)."""
    return ChunkedPolicyLoss.apply(x, w, b, y, tok, normalizer, ent_norm, cfg, lmap, ignore_index)
