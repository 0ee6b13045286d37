"""The algorithm table (rlad/algorithms.py) and what the trainer does with each row: the teacher
it requires, the log-probs ``collect`` scores, the advantages and KD weights it forms, the
``PolicyLossConfig`` a TrainConfig builds, and the loss ``micro_loss`` computes."""

import random

import pytest
import torch

from rlad.algorithms import ALGORITHMS, ALGOS, DIVERGENCE, NLL, OPD_KINDS, POLICY, find_algorithm
from rlad.config import TrainConfig
from rlad.models import load_model
from rlad.rollout import group_advantages
from rlad.tasks import Echo
from rlad.train import collect, host_metrics, micro_loss, normalizer_for
from rlad_kernels import PolicyLossConfig

ROWS = {a.name: a for a in ALGORITHMS}

# name: (needs teacher, scores old, scores teacher, loss, advantages, per-token advantages, KD weights)
EXPECTED = {
    "rlad":           (True, True, True, POLICY, True, False, False),
    "grpo":           (False, True, False, POLICY, True, False, False),
    "kdrl":           (True, True, True, POLICY, True, False, True),
    "opd jsd":        (True, False, False, DIVERGENCE, False, False, False),
    "opd reverse_kl": (True, False, False, DIVERGENCE, False, False, False),
    "opd sampled":    (True, True, True, POLICY, False, True, False),
    "sft":            (True, False, False, NLL, False, False, False),
    "finetune":       (False, False, False, NLL, False, False, False),
}


def _id(name):
    return name.replace(" ", "-")


def _settings(name):
    algo, _, kind = name.partition(" ")
    return dict(algo=algo, opd_kind=kind or "jsd")


def test_the_table_has_one_row_per_algorithm_and_kind():
    assert ALGOS == ("rlad", "grpo", "kdrl", "opd", "sft", "finetune")
    assert OPD_KINDS == ("jsd", "reverse_kl", "sampled")
    assert sorted(ROWS) == sorted(EXPECTED)
    for name, row in ROWS.items():
        assert find_algorithm(**_settings(name)) is row
    assert find_algorithm("grpo", "sampled") is ROWS["grpo"]  # opd_kind only picks among opd's rows
    with pytest.raises(ValueError, match="unknown algorithm 'ppo'"):
        find_algorithm("ppo", "jsd")


@pytest.mark.parametrize("name", EXPECTED, ids=_id)
def test_teacher_requirement(name):
    needs_teacher = EXPECTED[name][0]
    assert ROWS[name].needs_teacher == needs_teacher
    if needs_teacher:
        with pytest.raises(ValueError, match=rf"teacher=None: algo='{name.split()[0]}' needs a teacher"):
            TrainConfig(**_settings(name))
    else:
        assert TrainConfig(**_settings(name)).algorithm is ROWS[name]


@pytest.mark.parametrize("name", EXPECTED, ids=_id)
def test_group_size_rule_follows_the_batch(name):
    """G >= 2 where the student samples groups; sft's batch is teacher solutions, one per prompt."""
    kw = dict(_settings(name), teacher="preset:micro", group_size=1)
    if name in ("sft", "finetune"):
        assert TrainConfig(**kw).group_size == 1
    else:
        with pytest.raises(ValueError, match=r"group_size=1: group advantages need at least 2"):
            TrainConfig(**kw)


KNOBS = dict(alpha=0.3, eps_low=0.1, eps_high=0.25, teacher_clamp=None, dual_clip=2.0, mixture="arithmetic",
             kd_estimator="k3", kd_beta=0.01, kd_beta_decay=0.001, kd_beta_min=0.002, ref_kl_coef=0.05,
             entropy_coef=0.01, teacher_clamp_grad="straight_through", teacher_align_threshold=0.4,
             teacher_adv_threshold=0.1)
SHARED = dict(eps_low=0.1, eps_high=0.25, teacher_clamp=None, dual_clip=2.0, mixture="arithmetic", ref_kl_coef=0.05,
              entropy_coef=0.01, teacher_clamp_grad="straight_through", teacher_align_threshold=0.4,
              teacher_adv_threshold=0.1)


POLICY_CONFIGS = [
    ("rlad", PolicyLossConfig(alpha=0.3, **SHARED)),
    ("grpo", PolicyLossConfig(alpha=1.0, **SHARED)),
    ("kdrl", PolicyLossConfig(alpha=1.0, kd_estimator="k3", kd_coef=0.01 - 3 * 0.001, **SHARED)),
    ("opd sampled", PolicyLossConfig(alpha=1.0, **SHARED)),
    ("opd jsd", None),
    ("opd reverse_kl", None),
    ("sft", None),
    ("finetune", None),
]


@pytest.mark.parametrize("name,expected", POLICY_CONFIGS, ids=[_id(c[0]) for c in POLICY_CONFIGS])
def test_policy_config_of_each_algorithm(name, expected):
    """The TRRD ratio takes alpha, every other policy loss the PPO ratio (alpha = 1); only kdrl has
    a KD term, with the annealed coefficient of the step; no policy loss, no PolicyLossConfig."""
    cfg = TrainConfig(**_settings(name), teacher="preset:micro", **KNOBS)
    assert cfg.policy_config(3) == expected


def test_kdrl_rlad_paper_is_the_reference_kl_pointed_at_the_teacher():
    """The RLAD paper's KDRL: k3 at the constant kd_beta (the recipe's estimator, annealing and
    reward mask unused), and the paper's clip by default."""
    cfg = TrainConfig(algo="kdrl", kd_variant="rlad_paper", teacher="preset:micro", kd_estimator="k2", kd_beta=0.05,
                      kd_beta_decay=0.01, kd_beta_min=0.001)
    assert [cfg.kd_coef(t) for t in (0, 3, 1000)] == [0.05, 0.05, 0.05]
    assert cfg.policy_config(1000) == PolicyLossConfig(alpha=1.0, eps_high=0.28, kd_estimator="k3", kd_coef=0.05)


def test_kd_coef_is_annealed_to_its_floor():
    cfg = TrainConfig(algo="kdrl", teacher="preset:micro", kd_beta=5e-3, kd_beta_decay=5e-5, kd_beta_min=1e-3)
    assert [cfg.kd_coef(t) for t in (0, 40, 80, 1000)] == pytest.approx([5e-3, 3e-3, 1e-3, 1e-3])
    assert cfg.policy_config(1000).kd_coef == 1e-3


@pytest.fixture(scope="module")
def loaded(models, tok):
    torch.manual_seed(0)
    return load_model(models["student"], tok), load_model(models["teacher"], tok)


def _collect(loaded, tok, name, **kw):
    student, teacher = loaded
    cfg = TrainConfig(**_settings(name), teacher="teacher", task="echo", levels=[1], prompts_per_step=3,
                      group_size=4, max_new_tokens=6, micro_batch_size=5, **kw)
    task = Echo()
    examples = task.sample(random.Random(1), cfg.prompts_per_step, [1])
    pool = [(ex, ex.answer) for ex in task.sample(random.Random(2), 5, [1])]
    ref = student if cfg.ref_kl_coef > 0 else None
    torch.manual_seed(1)
    return cfg, collect(cfg, student, teacher, ref, tok, task, examples, pool, template=cfg.prompt_template)


@pytest.mark.parametrize("name", EXPECTED, ids=_id)
def test_collect_scores_what_the_row_says(loaded, tok, name):
    _, scores_old, scores_teacher, _, advantages, token_advantages, kd_weights = EXPECTED[name]
    cfg, roll = _collect(loaded, tok, name)
    B = 3 if name in ("sft", "finetune") else 12
    assert len(roll) == B and roll.response_mask.any()
    assert (roll.old_logp is not None) == scores_old
    assert (roll.teacher_logp is not None) == scores_teacher
    assert (roll.advantages is not None) == advantages
    assert (roll.token_advantages is not None) == token_advantages
    assert (roll.kd_weights is not None) == kd_weights
    assert roll.ref_logp is None
    for t in (roll.old_logp, roll.teacher_logp, roll.token_advantages, roll.kd_weights):
        assert t is None or t.shape == roll.targets.shape
    if advantages:
        assert torch.equal(roll.advantages, group_advantages(roll.rewards, 4, cfg.adv_std_norm))
    if name == "sft":  # the teacher's correct solutions, drawn from the pool
        assert roll.group_size == 1 and torch.all(roll.rewards == 1.0)
    if name == "finetune":  # the step's prompts with the task's worked solutions, in the run's template
        examples = Echo().sample(random.Random(1), 3, [1])
        assert roll.group_size == 1 and roll.texts == [e.solution for e in examples]
        for row, mask, e in zip(roll.input_ids, roll.attention_mask, examples, strict=True):
            assert tok.decode(row[mask.bool()]) == f"<bos>{e.prompt}\n{e.solution}<eos>"


def test_opd_sampled_advantage_is_the_teacher_log_ratio(loaded, tok):
    _, roll = _collect(loaded, tok, "opd sampled")
    mask = roll.response_mask
    assert torch.equal(roll.token_advantages[mask], (roll.teacher_logp - roll.old_logp)[mask])
    assert torch.all(roll.token_advantages[~mask] == 0)
    assert roll.token_advantage() is roll.token_advantages


@pytest.mark.parametrize("reward_mask", [True, False], ids=["reward-masked", "unmasked"])
def test_kdrl_weights(loaded, tok, reward_mask):
    _, roll = _collect(loaded, tok, "kdrl", kd_reward_mask=reward_mask)
    keep = (roll.rewards < 1.0) if reward_mask else torch.ones(len(roll), dtype=torch.bool)
    assert torch.equal(roll.kd_weights, keep.float()[:, None].expand(roll.targets.shape))


def test_kdrl_rlad_paper_has_no_reward_mask(loaded, tok):
    _, roll = _collect(loaded, tok, "kdrl", kd_variant="rlad_paper", kd_reward_mask=True)
    assert torch.equal(roll.kd_weights, torch.ones_like(roll.targets, dtype=torch.float32))


def _paper_kdrl_reference(student, roll, cfg, beta):
    """The RLAD paper's KDRL loss in float64, from the model's own logits: per token GRPO's clipped
    term plus beta * k3 of the teacher log-ratio, aggregated as ``cfg.aggregation`` says."""
    logits = student(input_ids=roll.input_ids, attention_mask=roll.attention_mask,
                     position_ids=roll.position_ids).logits[:, :-1]
    lp = torch.log_softmax(logits / cfg.temperature, -1).gather(-1, roll.targets.clamp_min(0)[..., None])[..., 0]
    A = roll.advantages[:, None]
    r = torch.exp(lp - roll.old_logp)
    x = roll.teacher_logp - lp
    L = torch.maximum(-A * r, -A * r.clamp(1 - cfg.eps_low, 1 + cfg.eps_high)) + beta * (torch.exp(x) - x - 1)
    mask = roll.loss_mask
    if cfg.aggregation == "token_mean":
        return (L * mask).sum() / mask.sum()
    assert cfg.aggregation == "rlad_paper"
    seq = (L * mask).sum(-1) / mask.sum(-1).clamp_min(1)  # each response's token mean
    group_means = []
    for g in range(len(roll) // roll.group_size):  # the mean over the group's kept responses, then over the groups
        rows = [i for i in range(g * roll.group_size, (g + 1) * roll.group_size) if roll.keep[i]]
        group_means.append(sum(seq[i] for i in rows) / len(rows))
    return sum(group_means) / len(group_means)


@pytest.mark.parametrize("aggregation", ["token_mean", "rlad_paper"])
def test_kdrl_rlad_paper_loss_and_gradient_match_a_float64_reference(loaded, tok, aggregation):
    """micro_loss of kdrl with kd_variant=rlad_paper against the formula computed here from the
    model's logits, in float64: old log-probs moved off the current ones so that the clip binds on
    both sides, a dropped row (rlad_paper: its group's other responses share the group's weight)."""
    import copy

    beta = 0.1
    cfg, roll = _collect(loaded, tok, "kdrl", kd_variant="rlad_paper", kd_beta=beta, aggregation=aggregation)
    assert cfg.eps_high == 0.28
    student = copy.deepcopy(loaded[0]).double()
    g = torch.Generator().manual_seed(5)
    roll.rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0])
    roll.advantages = group_advantages(roll.rewards, 4).double()
    roll.old_logp = (roll.old_logp.double() + (torch.rand(roll.targets.shape, generator=g) - 0.5) * 0.8)
    roll.teacher_logp = roll.teacher_logp.double()
    roll.kd_weights = roll.kd_weights.double()
    roll.keep = torch.ones(len(roll), dtype=torch.bool)
    roll.keep[1] = False

    want = _paper_kdrl_reference(student, roll, cfg, beta)
    want_grads = torch.autograd.grad(want, list(student.parameters()))
    idx = torch.arange(len(roll))
    norm, tw = normalizer_for(cfg, roll, idx)
    got, metrics = micro_loss(cfg, student, None, roll.select(idx), norm, tw, cfg.policy_config(7))
    got_grads = torch.autograd.grad(got, list(student.parameters()))
    assert float(metrics["clip_frac_pos"]) > 0 and float(metrics["clip_frac_neg"]) > 0
    # the sequence weights (G / K) / |o_i| are float32, as seq_mean's 1 / |o_i| are: float64 up to their rounding
    tol = 1e-10 if aggregation == "token_mean" else 3e-7
    got = got.detach()
    assert float(got) == pytest.approx(float(want.detach()), rel=tol)
    for (name, _), a, b in zip(student.named_parameters(), got_grads, want_grads, strict=True):
        assert float((a - b).norm()) <= 10 * tol * float(b.norm()) + 1e-15, name

    # the same as GRPO's reference-KL term with the teacher's log-probs as the reference's
    as_ref = cfg.policy_config(7).__class__(alpha=1.0, eps_high=0.28, ref_kl_coef=beta)
    mb = roll.select(idx)
    mb.ref_logp, mb.kd_weights = mb.teacher_logp, None
    via_ref = micro_loss(cfg, student, None, mb, norm, tw, as_ref)[0].detach()
    assert float(via_ref) == pytest.approx(float(got), rel=1e-12)


def test_reference_log_probs_for_the_reference_kl(loaded, tok):
    _, roll = _collect(loaded, tok, "grpo", ref_kl_coef=0.1)
    assert roll.ref_logp is not None and torch.equal(roll.ref_logp, roll.old_logp)  # ref = the student here


LOSS_METRICS = [  # (algorithm, metrics its loss reports, metrics it must not report)
    ("rlad", {"ratio_mean", "teacher_gap", "teacher_clamp_frac"}, {"kd_mean"}),
    ("grpo", {"ratio_mean", "clip_frac"}, {"teacher_gap", "kd_mean"}),
    ("kdrl", {"ratio_mean", "kd_mean"}, {"teacher_gap", "teacher_clamp_frac"}),  # alpha = 1: no teacher in the ratio
    ("opd sampled", {"ratio_mean"}, {"teacher_gap", "kd_mean"}),  # the teacher shapes the advantage only
    ("opd jsd", {"divergence"}, {"ratio_mean"}),
    ("opd reverse_kl", {"divergence"}, {"ratio_mean"}),
    ("sft", {"nll"}, {"ratio_mean"}),
    ("finetune", {"nll"}, {"ratio_mean"}),
]


@pytest.mark.parametrize("name,keys,absent", LOSS_METRICS, ids=[_id(c[0]) for c in LOSS_METRICS])
def test_micro_loss_uses_the_rows_loss_and_keeps_metrics_on_device(loaded, tok, name, keys, absent):
    student, teacher = loaded
    cfg, roll = _collect(loaded, tok, name)
    idx = torch.arange(len(roll))
    norm, tw = normalizer_for(cfg, roll, idx)
    loss, metrics = micro_loss(cfg, student, teacher, roll.select(idx), norm, tw, cfg.policy_config(0))
    assert loss.requires_grad and torch.isfinite(loss)
    assert keys <= set(metrics) and not absent & set(metrics), sorted(metrics)
    for k, v in metrics.items():  # detached 0-d tensors: nothing reaches the host per micro-batch
        assert isinstance(v, torch.Tensor) and v.dim() == 0 and not v.requires_grad, k


def test_host_metrics_are_weighted_means():
    vals = [torch.tensor(v, dtype=torch.float32) for v in (0.1, 0.7, 0.35)]
    weights = [torch.tensor(3), torch.tensor(1), 0]
    m = host_metrics({"a": list(zip(vals, weights, strict=True)), "b": [(torch.tensor(3), 1)], "empty": [],
                      "no_tokens": [(torch.tensor(0.5), 0)]})
    assert m == {"a": (3 * float(vals[0]) + float(vals[1])) / 4, "b": 3.0}


def test_step_metrics_are_means_over_the_steps_tokens(loaded, tok):
    """Uneven micro-batches: the token-weighted mean of their metrics is the metric of the whole
    batch (here sft's NLL, a mean over tokens), not the mean of the micro-batch means."""
    student, teacher = loaded
    cfg, roll = _collect(loaded, tok, "grpo")
    cfg = cfg.replace(algo="sft", teacher="preset:tiny-teacher")
    idx = torch.arange(len(roll))
    norm, tw = normalizer_for(cfg, roll, idx)
    _, whole = micro_loss(cfg, student, teacher, roll.select(idx), norm, tw, cfg.policy_config(0))
    stats = {"nll": []}
    for part in (idx[:1], idx[1:]):
        mb = roll.select(part)
        _, m = micro_loss(cfg, student, teacher, mb, norm, tw, cfg.policy_config(0))
        stats["nll"].append((m["nll"], mb.response_mask.sum()))
    unweighted = sum(float(v) for v, _ in stats["nll"]) / 2
    assert abs(unweighted - float(whole["nll"])) > 1e-3  # the plain mean of the two would be wrong here
    assert host_metrics(stats)["nll"] == pytest.approx(float(whole["nll"]), rel=1e-5)
