"""rlad_kernels: fused lm_head ops for RL-aware distillation of reasoning LLMs.

Per-token log-probs (+ entropy) and the TRRD / GRPO / KDRL policy loss, computed straight from
hidden states and the lm_head weight without materializing the ``[tokens x vocab]`` logits.

The public names are loaded on first use (PEP 562), so importing a light module of the package
(``rlad_kernels.ops.policy_loss.options``, the options a trainer's flags are made of) does not
import torch and Triton.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "LMHead": ".ops.common.head",
    "TokenInputs": ".ops.policy_loss.math",
    "linear_logprobs": ".ops.logprobs.api",
    "linear_policy_loss": ".losses",
    "linear_divergence": ".ops.divergence.api",
    "PolicyLossConfig": ".ops.policy_loss.config",
    "PolicyOptions": ".ops.policy_loss.options",
    "PolicyLossOutput": ".losses",
    "LinearLogprobs": ".modules",
    "LinearPolicyLoss": ".modules",
    "LinearDivergence": ".modules",
    "apply_rlad_kernels": ".integrations.transformers",
    "remove_rlad_kernels": ".integrations.transformers",
    "TritonConfig": ".ops.common.launch",
    "triton_config": ".ops.common.launch",
}

__all__ = [
    "LMHead",
    "TokenInputs",
    "linear_logprobs",
    "linear_policy_loss",
    "linear_divergence",
    "PolicyLossConfig",
    "PolicyOptions",
    "PolicyLossOutput",
    "LinearLogprobs",
    "LinearPolicyLoss",
    "LinearDivergence",
    "apply_rlad_kernels",
    "remove_rlad_kernels",
    "TritonConfig",
    "triton_config",
    "__version__",
]

if TYPE_CHECKING:
    from .integrations.transformers import apply_rlad_kernels, remove_rlad_kernels
    from .losses import PolicyLossOutput, linear_policy_loss
    from .modules import LinearDivergence, LinearLogprobs, LinearPolicyLoss
    from .ops.common.head import LMHead
    from .ops.common.launch import TritonConfig, triton_config
    from .ops.divergence.api import linear_divergence
    from .ops.logprobs.api import linear_logprobs
    from .ops.policy_loss.config import PolicyLossConfig
    from .ops.policy_loss.math import TokenInputs
    from .ops.policy_loss.options import PolicyOptions


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value  # the next lookup finds it directly
    return value


def __dir__():
    return sorted([*globals(), *_EXPORTS])
