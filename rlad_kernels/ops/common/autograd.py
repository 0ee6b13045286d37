"""What the ops' ``torch.autograd.Function`` classes share."""

from __future__ import annotations

import functools

import torch


class _RefuseBackward(torch.autograd.Function):
    """Identity on the gradients a fused backward returns; differentiating them raises ``msg``."""

    @staticmethod
    def forward(ctx, msg, *grads):
        ctx.msg = msg
        return tuple(g.clone() for g in grads)

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(ctx.msg)


def first_order_only(op: str):
    """Decorate the ``backward`` of a fused autograd Function whose gradients are not themselves
    differentiable (they are formed by kernels, not by autograd). The backward runs without
    grad; when autograd is building a graph of the gradient (``create_graph=True``), the
    returned gradients carry a node that raises a clear error if they are differentiated
    again, instead of a wrong second derivative or an obscure "does not require grad"."""
    msg = (f"{op} computes first derivatives only (its backward is fused): a second derivative "
           f"(create_graph=True, then differentiating the gradient) needs impl='naive'")

    def wrap(backward):
        @functools.wraps(backward)
        def wrapper(ctx, *grad_outputs):
            with torch.no_grad():
                grads = backward(ctx, *grad_outputs)
            if not torch.is_grad_enabled():
                return grads
            where = [i for i, g in enumerate(grads) if isinstance(g, torch.Tensor)]
            # the gradients need a grad_fn for the refusal to be reached: detached leaves that require grad
            guarded = _RefuseBackward.apply(msg, *(grads[i].detach().requires_grad_() for i in where))
            out = list(grads)
            for i, g in zip(where, guarded, strict=True):
                out[i] = g
            return tuple(out)
        return wrapper
    return wrap
