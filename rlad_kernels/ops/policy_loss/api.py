"""The policy-loss op: the clipped, advantage-weighted loss (TRRD / GRPO / KDRL) of per-token
inputs at token level, fused with the lm_head (``impl="triton"``: the Triton kernels; ``"torch"``:
vocab-chunked). The public ``rlad_kernels.linear_policy_loss`` (``rlad_kernels/losses.py``)
validates the inputs and composes this op with the others (the teacher's log-probs, the naive and
sequence-level paths, the exact KD term); this op imports only ``ops/common`` and ``utils``.
"""

from __future__ import annotations

import torch

from ..common import autotune
from ..common.inputs import LinearInputs
from .chunked import policy_loss_chunked
from .config import PolicyLossConfig
from .math import TokenInputs
from .triton_impl import policy_loss_triton


def fused_policy_loss(li: LinearInputs, tok: TokenInputs, cfg: PolicyLossConfig, norm, ent_norm, ignore_index: int):
    """(loss, STAT_FIELDS sums, logp [N], entropy [N] | None) of ``li.impl`` ("triton" or "torch") at
    token level; ``tok``: the used per-token inputs, flattened to [N] and detached."""
    if li.impl == "triton":
        tok32 = tok.map(lambda t: t.float().contiguous())

        def tune_run():  # forward and backward on detached copies, for RLAD_AUTOTUNE=1
            h, w = li.hidden.detach().requires_grad_(), li.weight.detach().requires_grad_()
            policy_loss_triton(h, w, li.bias, li.targets, tok32, norm, ent_norm, cfg, li.lmap,
                               ignore_index)[0].backward()

        options = (li.bias is not None, tok.present(), cfg)
        with (torch.autocast(li.hidden.device.type, enabled=False),
              autotune.scope(li.impl, "policy_loss", li.hidden, li.weight, options, tune_run)):
            return policy_loss_triton(li.hidden, li.weight, li.bias, li.targets, tok32, norm, ent_norm, cfg, li.lmap,
                                      ignore_index)
    with torch.autocast(li.hidden.device.type, enabled=False):
        return policy_loss_chunked(li.hidden, li.weight, li.bias, li.targets, tok, norm, ent_norm, cfg, li.lmap,
                                   ignore_index)
