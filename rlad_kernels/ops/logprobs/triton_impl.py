"""The ``impl="triton"`` path of ``linear_logprobs``, host side: the autograd op over its kernels.

Forward: one launch (plus a tiny combine launch when the vocabulary is split across programs
to fill the GPU at small N). Stored for backward, per token: the row's shift and log-sum (log p
is re-formed relative to them) and the entropy (O(N)).

Backward: the shared ``common/logprob.py: logprob_backward`` recomputes logit tiles into a
bounded scratch buffer and turns them into dX (per token chunk) and dW / db (per vocabulary
slice) with GEMMs (``common/scratch_backward.py``): no N x V buffer, no float32 V x H buffer.
FLOPs when both dX and dW are needed: 4*N*H*V of logit recompute plus 2*N*H*V per GEMM, with
the GEMMs doubled for 16-bit inputs (the scratch holds two 16-bit parts: ``common/gemm.py``),
so 14*N*H*V in bf16 (10 with ``TritonConfig(split_scratch=False)``, 3-30x less precise at large
logits) and 8*N*H*V in float32.
"""

from __future__ import annotations

import torch

from ..common.autograd import first_order_only
from ..common.launch import check_triton_dtypes, get_config, scan_plan
from ..common.logprob import Rows, logprob_backward, logprob_forward
from ..common.numerics import LogitMap
from .kernels import logprobs_combine_kernel, logprobs_fwd_kernel


class TritonLogprobs(torch.autograd.Function):
    """Autograd op over 2-D ``hidden [N, H]`` and 1-D ``targets [N]``; returns (logp, entropy|None)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, lmap: LogitMap, ignore_index: int, want_entropy: bool):
        cfg = get_config(hidden.device, hidden.dtype)
        plan = scan_plan(hidden.shape[0], weight.shape[0], hidden.device, cfg)
        rows = logprob_forward(logprobs_fwd_kernel, logprobs_combine_kernel, hidden, weight, bias, targets, lmap,
                               ignore_index, want_entropy, plan, cfg)
        ctx.save_for_backward(hidden, weight, bias, targets, *rows)
        ctx.lmap, ctx.ignore_index, ctx.cfg = lmap, ignore_index, cfg  # the backward tiles as the forward's
        return rows.lp, rows.ent

    @staticmethod
    @first_order_only("linear_logprobs(impl='triton')")
    def backward(ctx, g_logp, g_ent):
        hidden, weight, bias, targets, *saved = ctx.saved_tensors
        rows = Rows(*saved)
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_db = bias is not None and ctx.needs_input_grad[2]
        if g_logp is None:
            g_logp = torch.zeros_like(rows.lp)
        if rows.ent is None:
            g_ent = None
        dx, dw, db = logprob_backward(hidden, weight, bias, targets, rows, g_logp, g_ent, ctx.lmap, ctx.ignore_index,
                                      need_dx, need_dw, need_db, ctx.cfg)
        return dx, dw, db, None, None, None, None


def logprobs_triton(hidden2d, weight, bias, targets1d, lmap: LogitMap, ignore_index, want_entropy):
    check_triton_dtypes(hidden2d, weight)
    return TritonLogprobs.apply(hidden2d, weight, bias, targets1d, lmap, ignore_index, want_entropy)
