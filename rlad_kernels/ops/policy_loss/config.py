"""``PolicyLossConfig``: every non-tensor option of the policy loss, validated once. The options
a user sets are ``PolicyOptions`` (``options.py``, shared with the trainer's configurations); the
op adds the three it is called with by a trainer (``kd_coef``, ``compute_entropy``,
``entropy_aggregation``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ...utils.validation import check_choice, check_float_param
from .options import CLAMP_GRADS, KD_ESTIMATORS, MIXTURES, OBJECTIVES, RATIO_LEVELS, PolicyOptions

__all__ = ["PolicyLossConfig", "PolicyOptions", "MIXTURES", "CLAMP_GRADS", "KD_ESTIMATORS", "RATIO_LEVELS",
           "OBJECTIVES", "ENTROPY_AGGREGATIONS"]

ENTROPY_AGGREGATIONS = ("loss", "token_mean")


@dataclass(unsafe_hash=True)
class PolicyLossConfig(PolicyOptions):
    """Options of :func:`rlad_kernels.linear_policy_loss` (math in ``ops/policy_loss/README.md``).

    Ratio (per valid token, ``lp`` = student log-prob of the sampled token):
        * ``teacher_logp`` given (TRRD, RLAD's core), ``mixture="geometric"``::

              d     = clamp(lp - lp_T, -teacher_clamp, teacher_clamp)   # no clamp if teacher_clamp is None
              log_r = alpha * (lp - lp_old) + (1 - alpha) * d

          ``alpha=1`` is exactly GRPO; ``alpha=0`` anchors the ratio fully to the teacher.
        * ``mixture="arithmetic"``: ``log_r = lp - log(alpha * pi_old + (1 - alpha) * pi_T)``
          (the teacher clamp does not apply: the anchor is bounded below by ``alpha * pi_old``).
        * no ``teacher_logp``: ``log_r = lp - lp_old`` (GRPO / PPO-clip).
        * gated TRRD (either mixture; off by default): where ``|lp_old - lp_T| > teacher_align_threshold``
          or ``|A| < teacher_adv_threshold`` the token's ratio is the GRPO one, ``log_r = lp - lp_old``
          (the teacher term is dropped). This follows the RLAD summary's selective imitation (teacher
          guidance only for rollouts aligned with the teacher and with a large enough advantage); the
          gate depends only on the inputs ``lp_old``, ``lp_T`` and ``A``, never on ``lp``.

    Ratio level (``ratio_level``):
        * ``"token"`` (default): each token's own ratio ``r_t = exp(min(log_r_t, 20))``.
        * ``"sequence"`` (GSPO, Zheng et al. 2025; TRL's ``importance_sampling_level="sequence"``): every
          token of sequence ``i`` (a row of ``targets [..., L]``; all leading dims are rows) takes
          ``s_i = exp(min(mean_{t valid in i} log_r_t, 20))``, the length-normalized mean of the token
          log-ratios above (TRRD, gate and mixture per token, then the mean: GSPO+TRRD). The gradient
          flows through ``s_i`` to every token of the sequence. Needs ``targets.ndim >= 2``.

    Loss per token, with ``r`` the token's ratio (``r_t``, or ``s_i`` at sequence level; the cap at
    ``e^20`` keeps ``r * A`` finite when ``A = 0``)::

        L = max(-A * r, -A * clip(r, 1 - eps_low, 1 + eps_high))    objective="clip" (PPO / GRPO / GSPO)
        L = -sg(min(r, cispo_max)) * A * lp                         objective="cispo" (MiniMax-M1; sg: no gradient)
        L = min(L, -dual_clip * A)                     where A < 0, if dual_clip is set ("clip" only)
          + ref_kl_coef * k3(lp_ref - lp)              if ref_kl_coef != 0 (needs ref_logp)
          + kd_coef * kd_weight * KD(lp_T - lp)        if kd_estimator is set (KDRL; needs teacher_logp)
          - entropy_coef * entropy                     if entropy_coef != 0 and entropy_aggregation="loss"

    with ``k3(x) = exp(x) - x - 1`` and KD ``k1 = -R``, ``k2 = R**2 / 2``, ``k3 = exp(R) - R - 1``
    (``R = lp_T - lp``, sampled-token estimators of KL(student || teacher)), or ``"full"``: the
    exact reverse KL over the whole vocabulary, from the teacher's hidden states and lm_head.
    KDRL is GRPO plus a KD term: set ``alpha=1.0`` with ``kd_estimator`` so the ratio stays the GRPO one.

    With ``entropy_aggregation="token_mean"`` the entropy bonus leaves ``L`` and the total is
    ``sum_t w_t L_t / normalizer - entropy_coef * sum_t H_t / entropy_normalizer`` (valid tokens; the
    call's ``entropy_normalizer``, default its number of valid tokens): TRL's token mean, independent of
    the token weights and of the loss normalizer.

    Fields: the options of ``PolicyOptions`` (each one's meaning in its help: ``options.py``), and

        kd_coef: weight of the KD term (>= 0).
        compute_entropy: compute per-token entropy for the metrics even when entropy_coef == 0.
        entropy_aggregation: "loss" (the bonus is a term of L_t: weighted by w_t, divided by the
            normalizer) or "token_mean" (TRL's: a plain mean over valid tokens, see above).

    A config is immutable once made (as a frozen dataclass; ``dataclasses.replace`` makes another).
    """

    kd_coef: float = field(default=0.0, metadata={"help": "weight of the KD term (>= 0)"})
    compute_entropy: bool = field(default=True, metadata={"help": "per-token entropy in the metrics even when "
                                                                  "entropy_coef == 0"})
    entropy_aggregation: str = field(default="loss", metadata={"help": "loss (a term of L_t) or token_mean (TRL's)"})

    def __post_init__(self):
        check_float_param("PolicyLossConfig.alpha", self.alpha, low=0.0, high=1.0)
        check_float_param("PolicyLossConfig.eps_low", self.eps_low, low=0.0, high=1.0, high_open=True)
        check_float_param("PolicyLossConfig.eps_high", self.eps_high, low=0.0)
        check_float_param("PolicyLossConfig.teacher_clamp", self.teacher_clamp, positive=True, allow_none=True)
        check_choice("PolicyLossConfig.teacher_clamp_grad", self.teacher_clamp_grad, CLAMP_GRADS)
        check_float_param("PolicyLossConfig.teacher_align_threshold", self.teacher_align_threshold, positive=True,
                          allow_none=True)
        check_float_param("PolicyLossConfig.teacher_adv_threshold", self.teacher_adv_threshold, low=0.0,
                          allow_none=True)
        check_float_param("PolicyLossConfig.dual_clip", self.dual_clip, allow_none=True, low=1.0, low_open=True)
        check_choice("PolicyLossConfig.mixture", self.mixture, MIXTURES)
        check_choice("PolicyLossConfig.kd_estimator", self.kd_estimator, KD_ESTIMATORS)
        check_float_param("PolicyLossConfig.kd_coef", self.kd_coef, low=0.0)
        check_float_param("PolicyLossConfig.ref_kl_coef", self.ref_kl_coef, low=0.0)
        check_float_param("PolicyLossConfig.entropy_coef", self.entropy_coef)
        if not isinstance(self.compute_entropy, bool):
            raise TypeError("PolicyLossConfig.compute_entropy must be a bool")
        check_choice("PolicyLossConfig.ratio_level", self.ratio_level, RATIO_LEVELS)
        check_choice("PolicyLossConfig.objective", self.objective, OBJECTIVES)
        check_float_param("PolicyLossConfig.cispo_max", self.cispo_max, positive=True)
        check_choice("PolicyLossConfig.entropy_aggregation", self.entropy_aggregation, ENTROPY_AGGREGATIONS)
        if self.objective == "cispo" and self.dual_clip is not None:
            raise ValueError(f"PolicyLossConfig.dual_clip={self.dual_clip} has no meaning with objective='cispo' "
                             f"(CISPO bounds the importance weight by cispo_max, not the loss); set dual_clip=None")
        object.__setattr__(self, "_made", True)

    def __setattr__(self, name, value):
        if getattr(self, "_made", False):
            raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}: a PolicyLossConfig is immutable; "
                                                  f"make another with dataclasses.replace")
        object.__setattr__(self, name, value)

    @property
    def needs_entropy(self) -> bool:
        return self.compute_entropy or self.entropy_coef != 0.0

    @property
    def gated(self) -> bool:
        """Gated TRRD: a teacher-term gate (alignment or advantage threshold) is set."""
        return self.teacher_align_threshold is not None or self.teacher_adv_threshold is not None

    @property
    def cispo(self) -> bool:
        return self.objective == "cispo"

    @property
    def sequence_level(self) -> bool:
        return self.ratio_level == "sequence"

    @property
    def entropy_in_loss(self) -> bool:
        """The entropy bonus is a term of L_t (weighted, divided by the normalizer)."""
        return self.entropy_coef != 0.0 and self.entropy_aggregation == "loss"

    @property
    def entropy_token_mean(self) -> bool:
        """The entropy bonus is TRL's token mean, outside L_t."""
        return self.entropy_coef != 0.0 and self.entropy_aggregation == "token_mean"

    @property
    def uses_kd(self) -> bool:
        return self.kd_estimator is not None
