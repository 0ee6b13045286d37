"""``PolicyLossConfig``: every non-tensor option of the policy loss, validated once."""

from __future__ import annotations

from dataclasses import dataclass

from ...utils.validation import check_choice, check_float_param

MIXTURES = ("geometric", "arithmetic")
CLAMP_GRADS = ("zero", "straight_through")
KD_ESTIMATORS = (None, "k1", "k2", "k3", "full")
RATIO_LEVELS = ("token", "sequence")
OBJECTIVES = ("clip", "cispo")
ENTROPY_AGGREGATIONS = ("loss", "token_mean")


@dataclass(frozen=True)
class PolicyLossConfig:
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

    Fields:
        alpha: weight of the old policy in the TRRD anchor, in [0, 1].
        eps_low, eps_high: PPO clip range ``[1 - eps_low, 1 + eps_high]``; 0 <= eps_low < 1, eps_high >= 0.
        teacher_clamp: bound ``c > 0`` on ``|lp - lp_T|`` in the geometric TRRD ratio, or None.
        teacher_clamp_grad: derivative of the clamped term where the clamp is active: "zero" (the
            clamp's own derivative, so ``d log_r / d lp = alpha`` there) or "straight_through" (an
            ablation: the forward value is unchanged but ``d log_r / d lp = 1`` as if unclamped).
        teacher_align_threshold: gate (> 0, or None: off): drop the teacher term of tokens with
            ``|lp_old - lp_T|`` above it.
        teacher_adv_threshold: gate (>= 0, or None: off): drop the teacher term of tokens with
            ``|A|`` below it.
        dual_clip: dual-clip constant (> 1) bounding the loss of A < 0 tokens, or None.
        mixture: "geometric" (RLAD) or "arithmetic".
        kd_estimator: None, "k1", "k2", "k3" (sampled-token reverse-KL estimators of KDRL) or
            "full" (exact reverse KL; the call then needs teacher_hidden and teacher_weight).
        kd_coef: weight of the KD term (>= 0).
        ref_kl_coef: weight of the k3 KL to a reference policy (>= 0; needs ref_logp when > 0).
        entropy_coef: entropy bonus weight (the loss subtracts ``entropy_coef * entropy``).
        compute_entropy: compute per-token entropy for the metrics even when entropy_coef == 0.
        ratio_level: "token" (PPO / GRPO / TRRD) or "sequence" (GSPO: one ratio per row of targets).
        objective: "clip" (the PPO clipped surrogate) or "cispo" (the clipped-IS-weight REINFORCE of
            MiniMax-M1: no token loses its gradient; eps_low / eps_high are unused, dual_clip must be None).
        cispo_max: the CISPO cap on the importance weight, an absolute bound on the ratio (> 0; TRL's
            ``epsilon_high`` under ``loss_type="cispo"``, e.g. 5.0), not an offset from 1.
        entropy_aggregation: "loss" (the bonus is a term of L_t: weighted by w_t, divided by the
            normalizer) or "token_mean" (TRL's: a plain mean over valid tokens, see above).
    """

    alpha: float = 0.5
    eps_low: float = 0.2
    eps_high: float = 0.2
    teacher_clamp: float | None = 1.0
    teacher_clamp_grad: str = "zero"
    teacher_align_threshold: float | None = None
    teacher_adv_threshold: float | None = None
    dual_clip: float | None = None
    mixture: str = "geometric"
    kd_estimator: str | None = None
    kd_coef: float = 0.0
    ref_kl_coef: float = 0.0
    entropy_coef: float = 0.0
    compute_entropy: bool = True
    ratio_level: str = "token"
    objective: str = "clip"
    cispo_max: float = 5.0
    entropy_aggregation: str = "loss"

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
