"""How strong is the KD term of kdrl's RLAD-paper variant against the advantage term?

The RLAD paper's KDRL baseline is GRPO with its reference KL replaced by KL(student || teacher)
(``--algo kdrl --kd-variant rlad_paper``: ``+ beta * k3(lp_teacher - lp)`` on every token); the paper
does not give beta. This script measures, on the demo's tiny models (``rlad demo``'s teacher and
mixed-style student on arithmetic level 1, built here with the same settings), the ratio

    ||grad of beta * KD term|| / ||grad of the advantage term||

over the student's parameters, on rollout batches of the starting student (16 prompts x 8, as the
demo; the first optimizer step of a batch, lp = lp_old, so no token is clipped), for a few beta.
Both terms are averaged by the same aggregation and the KD term is linear in beta, so the ratio
is beta times the ratio at beta = 1. A study can pick a beta at which the KD term is not negligible.

    python studies/kd_ratio.py                          # builds the models (about 1 min on 2 cores)
    python studies/kd_ratio.py --models runs/demo       # or reuses rlad demo's (teacher/, student_init/)
    python studies/kd_ratio.py --study studies/fair/study.yaml --arm kdrl   # a study arm's models and settings

With ``--study``, the arm's own configuration (models, task, levels, batch, temperature,
aggregation) is used, on training problems with the study's test and validation sets held out.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
from pathlib import Path

import torch

from rlad.config import TrainConfig
from rlad.demo import prepare_models
from rlad.heldout import build_held_out, study_task
from rlad.models import load_model
from rlad.study import load_study
from rlad.tasks import get_task
from rlad.tokenizer import load_tokenizer
from rlad.train import collect, micro_loss, normalizer_for

BETAS = (0.01, 0.05, 0.1, 0.3)


def grad_norms(cfg: TrainConfig, student, teacher, tok, task, examples, seed: int) -> dict[str, float]:
    """The gradient norms of the advantage term and of the KD term at beta = 1 on one rollout batch,
    and the batch's reward and share of groups with all rewards equal."""
    torch.manual_seed(seed)
    student.eval()
    roll = collect(cfg, student, teacher, None, tok, task, examples, None, template=cfg.prompt_template)
    idx = torch.arange(len(roll))
    norm, tw = normalizer_for(cfg, roll, idx)
    params = [p for p in student.parameters() if p.requires_grad]

    def grad(coef: float) -> torch.Tensor:
        policy = cfg.replace(kd_beta=coef).policy_config(0)
        loss, _ = micro_loss(cfg, student, teacher, roll.select(idx), norm, tw, policy)
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])

    student.train()
    g_adv = grad(0.0)
    g_kd = grad(1.0) - g_adv  # the KD term's gradient at beta = 1 (the loss is linear in beta)
    groups = roll.rewards.view(-1, cfg.group_size)
    gap = (roll.teacher_logp - roll.old_logp)[roll.loss_mask]  # R = lp_T - lp: k3's gradient is beta (1 - e^R)
    return {"adv": float(g_adv.norm()), "kd": float(g_kd.norm()), "reward": float(roll.rewards.mean()),
            "groups_equal": float((groups.amax(-1) == groups.amin(-1)).float().mean()), "max_gap": float(gap.max()),
            "gap_over_3": float((gap > 3).float().mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=None, help="a folder with teacher/ and student_init/ (rlad demo's out-dir), "
                                                   "built there if it has none; default: a temporary folder")
    ap.add_argument("--batches", type=int, default=5, help="rollout batches (each 16 prompts x 8 responses)")
    ap.add_argument("--aggregation", default="token_mean", help="token_mean (the default) or rlad_paper")
    ap.add_argument("--study", help="a study file: measure on its --arm's models and settings instead of the demo's")
    ap.add_argument("--arm", default="kdrl", help="with --study: the arm (a kdrl kd_variant=rlad_paper arm)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    if args.study:
        return study_ratio(args)
    tok = load_tokenizer()
    task = get_task("arithmetic")
    build_held_out(task, [1], per_level=100, seed=0)  # the demo's eval set, held out of the models' training
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.models) if args.models else Path(tmp)
        if not (root / "teacher").is_dir():
            prepare_models(root, tok, task, [1], seed=args.seed, teacher_steps=500, warmup_steps=300,
                           prose_fraction=0.6, quiet=True)
        student = load_model(str(root / "student_init"), tok)
        teacher = load_model(str(root / "teacher"), tok)
        cfg = TrainConfig(algo="kdrl", kd_variant="rlad_paper", student=str(root / "student_init"),
                          teacher=str(root / "teacher"), task="arithmetic", levels=[1], prompts_per_step=16,
                          group_size=8, max_new_tokens=32, aggregation=args.aggregation)
        rng = random.Random(args.seed)
        rows = [grad_norms(cfg, student, teacher, tok, task, task.sample(rng, cfg.prompts_per_step, [1]),
                           args.seed + 100 + b) for b in range(args.batches)]
    report(rows, f"kdrl kd_variant=rlad_paper, aggregation={args.aggregation}, {args.batches} batches of "
                 f"{cfg.prompts_per_step} x {cfg.group_size}, the demo's starting student and teacher")


def study_ratio(args) -> None:
    """The ratio on a study arm's own models, task and settings (its first seed's configuration)."""
    study = load_study(args.study)
    runs = [r for r in study.runs if r.arm == args.arm]
    if not runs:
        raise SystemExit(f"{args.study}: no arm {args.arm!r} (arms: {sorted({r.arm for r in study.runs})})")
    cfg = runs[0].config
    if cfg.algo != "kdrl" or cfg.kd_variant != "rlad_paper":
        raise SystemExit(f"arm {args.arm!r} is algo={cfg.algo}, kd_variant={cfg.kd_variant}: the ratio is defined "
                         "for kdrl's rlad_paper variant")
    torch.set_num_threads(cfg.threads or torch.get_num_threads())
    tok = load_tokenizer(cfg.student)
    task, _, _ = study_task(cfg.task, cfg.levels, per_level=cfg.eval_prompts, test_seed=0, validation_seed=1,
                            log=lambda *_: None)
    student, teacher = load_model(cfg.student, tok), load_model(cfg.teacher, tok)
    rng = random.Random(args.seed)
    rows = [grad_norms(cfg, student, teacher, tok, task, task.sample(rng, cfg.prompts_per_step, cfg.levels),
                       args.seed + 100 + b) for b in range(args.batches)]
    report(rows, f"{args.study} arm {args.arm}: {args.batches} batches of {cfg.prompts_per_step} x "
                 f"{cfg.group_size} at T={cfg.temperature:g}, aggregation={cfg.aggregation}, kd_beta={cfg.kd_beta:g} "
                 f"in the study", beta=cfg.kd_beta)


def report(rows: list[dict], title: str, beta: float | None = None) -> None:
    """Print each batch and the ratio's median / min / max at each beta (``beta``, the arm's, among
    them). A batch whose groups all have equal rewards has no advantage gradient and no ratio: it is
    listed but left out; with no batch left, SystemExit."""
    unit = [r["kd"] / r["adv"] for r in rows if r["adv"] > 0]
    if not unit:
        raise SystemExit(f"{title}: no rollout batch had a group with unequal rewards (no advantage gradient), "
                         "so no ratio; use more --batches or a student that sometimes succeeds")
    print(title)
    for i, r in enumerate(rows):
        print(f"  batch {i}: reward {r['reward']:.3f}, groups with equal rewards {r['groups_equal']:.2f}, "
              f"|g_adv| {r['adv']:.4g}, |g_kd(beta=1)| {r['kd']:.4g}, max(lp_T - lp) {r['max_gap']:.2f}, "
              f"tokens with lp_T - lp > 3: {r['gap_over_3']:.4f}" + ("" if r["adv"] > 0 else " (left out: no "
                                                                     "advantage gradient)"))
    print("\n| beta | ||g_KD|| / ||g_adv||, median | min | max |\n|---|---|---|---|")
    for b in sorted({*BETAS, *([beta] if beta else [])}):
        vals = [b * u for u in unit]
        print(f"| {b:g} | {statistics.median(vals):.3f} | {min(vals):.3f} | {max(vals):.3f} |")


if __name__ == "__main__":
    main()
