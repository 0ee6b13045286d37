"""The trainer's algorithms, one row each: the only place that says how they differ.

    algorithm        batch              scores          loss                             advantages
    rlad             student rollouts   old, teacher    policy: TRRD ratio (alpha)       group
    grpo             student rollouts   old             policy: PPO ratio (alpha = 1)    group
    kdrl             student rollouts   old, teacher    policy: PPO ratio + KD term      group; KD weights
    opd jsd          student rollouts   -               divergence: JSD_beta             -
    opd reverse_kl   student rollouts   -               divergence: reverse KL           -
    opd sampled      student rollouts   old, teacher    policy: PPO ratio (alpha = 1)    per token: lp_T - lp_old
    sft              teacher solutions  -               NLL                              -
    finetune         task solutions     -               NLL                              -

``batch``: G samples per prompt from the student, rewarded by the task, or correct solutions
drawn from a pool the teacher wrote before training (offline distillation), or the task's own
worked solutions of the step's prompts (supervised fine-tuning, no teacher: how a teacher learns
the task and its answer format in the run's prompt format, chat template included). ``scores``: the
per-token log-probs of the sampled tokens computed (no grad) before the update: the old
student's (the PPO ratio) and the teacher's (the TRRD anchor, the KD term, or the advantage);
the reference model's are added for ``ref_kl_coef > 0`` (policy losses only). ``loss``: the
fused op ``micro_loss`` calls: ``linear_policy_loss`` with ``TrainConfig.policy_config``,
``linear_divergence`` of the given kind, or the token NLL from ``linear_logprobs``.

``train.py`` (``collect``, ``micro_loss``, ``run``), ``models.py`` (which models to load),
``config.py`` (validation) and ``study.py`` (an arm's budget) read these rows; nothing else
branches on ``--algo`` or ``--opd-kind``.
"""

from __future__ import annotations

from dataclasses import dataclass

# the batch a step trains on
ROLLOUTS = "student rollouts"            # group_size samples per prompt from the student, with rewards
TEACHER_SOLUTIONS = "teacher solutions"  # the teacher's correct solutions, sampled once before training
TASK_SOLUTIONS = "task solutions"        # the step's prompts with the task's worked solutions (else "#### answer")

# the loss
POLICY = "policy"          # linear_policy_loss: clipped, advantage-weighted ratio (TRRD / PPO) [+ KD term]
DIVERGENCE = "divergence"  # linear_divergence: full-vocabulary divergence to the teacher at every response token
NLL = "nll"                # -log p of the target tokens

# how the policy loss's per-token advantages are formed
GROUP = "group"                          # (R_i - mean_G R) / (std_G R + 1e-6) on every token of response i
TEACHER_LOG_RATIO = "teacher log-ratio"  # lp_teacher - lp_old per token: the sampled reverse KL as a reward


@dataclass(frozen=True)
class Algorithm:
    algo: str                   # the --algo value
    opd_kind: str | None        # the --opd-kind value this row is for (None: the algorithm has no kinds)
    summary: str
    batch: str                  # ROLLOUTS, TEACHER_SOLUTIONS or TASK_SOLUTIONS
    loss: str                   # POLICY, DIVERGENCE or NLL
    needs_teacher: bool         # refuse to start without --teacher (grpo ignores one)
    scores_old: bool = False    # old-policy log-probs of the sampled tokens
    scores_teacher: bool = False  # teacher log-probs of the sampled tokens
    advantages: str | None = None  # GROUP or TEACHER_LOG_RATIO (policy losses)
    trrd: bool = False          # ratio anchored to pi_old^alpha pi_teacher^(1 - alpha) (else alpha = 1: PPO)
    kd: bool = False            # KDRL: + kd_coef(step) * KD(student || teacher), weighted per response
    divergence: str | None = None  # the linear_divergence kind (loss DIVERGENCE)

    @property
    def name(self) -> str:
        return self.algo if self.opd_kind is None else f"{self.algo} {self.opd_kind}"

    def responses_per_prompt(self, group_size: int) -> int:
        """Sequences a step trains on per prompt: ``group_size`` sampled responses, or one solution
        (the teacher's or the task's)."""
        return group_size if self.batch == ROLLOUTS else 1

    @property
    def teacher_in_policy_loss(self) -> bool:
        """Whether the policy loss receives the teacher's log-probs (the TRRD anchor, the KD term);
        opd sampled uses them only to form its advantages."""
        return self.trrd or self.kd


ALGORITHMS: tuple[Algorithm, ...] = (
    Algorithm("rlad", None, "TRRD: the PPO ratio anchored to pi_old^alpha * pi_teacher^(1 - alpha)",
              batch=ROLLOUTS, loss=POLICY, needs_teacher=True, scores_old=True, scores_teacher=True,
              advantages=GROUP, trrd=True),
    Algorithm("grpo", None, "plain GRPO / PPO-clip",
              batch=ROLLOUTS, loss=POLICY, needs_teacher=False, scores_old=True, advantages=GROUP),
    Algorithm("kdrl", None, "GRPO + beta_t * KD(student || teacher), beta linearly annealed, "
                            "no KD on rewarded responses (kd_reward_mask)",
              batch=ROLLOUTS, loss=POLICY, needs_teacher=True, scores_old=True, scores_teacher=True,
              advantages=GROUP, kd=True),
    Algorithm("opd", "jsd", "on-policy distillation: full-vocabulary JSD_beta to the teacher on student samples",
              batch=ROLLOUTS, loss=DIVERGENCE, needs_teacher=True, divergence="jsd"),
    Algorithm("opd", "reverse_kl", "on-policy distillation: full-vocabulary KL(student || teacher) on student "
                                   "samples",
              batch=ROLLOUTS, loss=DIVERGENCE, needs_teacher=True, divergence="reverse_kl"),
    Algorithm("opd", "sampled", "on-policy distillation, sampled-token form: PPO with the per-token "
                                "advantage -(lp - lp_teacher)",
              batch=ROLLOUTS, loss=POLICY, needs_teacher=True, scores_old=True, scores_teacher=True,
              advantages=TEACHER_LOG_RATIO),
    Algorithm("sft", None, "offline distillation: NLL on the teacher's solutions, kept only when correct",
              batch=TEACHER_SOLUTIONS, loss=NLL, needs_teacher=True),
    Algorithm("finetune", None, "supervised fine-tuning: NLL on the task's worked solutions, no teacher",
              batch=TASK_SOLUTIONS, loss=NLL, needs_teacher=False),
)

ALGOS = tuple(dict.fromkeys(a.algo for a in ALGORITHMS))  # rlad, grpo, kdrl, opd, sft
OPD_KINDS = tuple(a.opd_kind for a in ALGORITHMS if a.opd_kind is not None)  # jsd, reverse_kl, sampled


def find_algorithm(algo: str, opd_kind: str) -> Algorithm:
    """The row of ``--algo`` (and ``--opd-kind`` for the algorithms that have kinds)."""
    for a in ALGORITHMS:
        if a.algo == algo and a.opd_kind in (None, opd_kind):
            return a
    raise ValueError(f"unknown algorithm {algo!r} (opd_kind={opd_kind!r}); choose one of {', '.join(ALGOS)}")
