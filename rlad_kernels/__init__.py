"""rlad_kernels: fused lm_head ops for RL-aware distillation of reasoning LLMs.

Per-token log-probs (+ entropy) and the TRRD / GRPO / KDRL policy loss, computed straight from
hidden states and the lm_head weight without materializing the ``[tokens x vocab]`` logits.
"""

from .integrations.transformers import apply_rlad_kernels, remove_rlad_kernels
from .losses import PolicyLossOutput, linear_policy_loss
from .modules import LinearDivergence, LinearLogprobs, LinearPolicyLoss
from .ops.common.head import LMHead
from .ops.common.launch import TritonConfig, triton_config
from .ops.divergence.api import linear_divergence
from .ops.logprobs.api import linear_logprobs
from .ops.policy_loss.config import PolicyLossConfig
from .ops.policy_loss.math import TokenInputs

__version__ = "0.1.0"

__all__ = [
    "LMHead",
    "TokenInputs",
    "linear_logprobs",
    "linear_policy_loss",
    "linear_divergence",
    "PolicyLossConfig",
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
