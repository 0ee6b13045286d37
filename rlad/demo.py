"""The built-in demo: train a small teacher, then distill a smaller student with RLAD, on CPU.

1. Teacher: a 0.8M-parameter Llama-style model learns the arithmetic task (level 1) by
   supervised fine-tuning on generated worked solutions that end in the checkable ``#### 12``.
2. Student: a 0.1M-parameter model is warmed up on a mixed-style corpus: the same worked
   solutions, but most of them end in prose ("..., so the answer is 12") that the verifier
   cannot read, as a small model distilled from heterogeneous data often does. This is the
   "before" row: it often knows the sum but rarely states it in the checkable form.
3. RLAD and GRPO, each from that same student: it samples its own solutions and gets the
   rule-based reward; with RLAD its PPO ratio is also anchored to the geometric mixture of its old
   policy and the teacher (TRRD). Two mini-batches per step, so the trust region binds.

Evaluation is on 100 level-1 problems held out of every stage (``rlad.heldout``): greedy
accuracy and mean@4 (sampled), each with its standard error, before and after.

Everything is generated on the fly (no download); models, metrics and plots land in
``out_dir`` (a re-run replaces them). ``rlad demo`` runs it; it takes a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from rlad_kernels import LMHead, linear_logprobs

from .config import TrainConfig
from .evaluate import evaluate, with_se
from .heldout import build_held_out
from .launch import train
from .models import decoder_hidden, load_model
from .report import markdown_table
from .rollout import from_pairs
from .rundir import claim
from .runtime import progress
from .tasks import ANSWER_MARK, Example, Task, get_task
from .tokenizer import load_tokenizer

TEMPLATE = "{prompt}\n"
EVAL_SEED = 0


class ProseStyle(Task):
    """``task``'s examples, with a fraction of the worked solutions ending in prose instead of
    ``#### answer`` (the warm-up corpus of the demo's student)."""

    def __init__(self, task: Task, prose_fraction: float):
        self.task, self.prose_fraction = task, prose_fraction
        self.name, self.levels = f"{task.name}-prose", task.levels

    @property
    def held_out(self) -> frozenset[str]:  # the wrapped task's eval set stays out of the corpus
        return self.task.held_out

    def make(self, rng: random.Random, level: int) -> Example:
        ex = self.task.make(rng, level)
        if self.prose_fraction and rng.random() < self.prose_fraction:  # 0: the task's own stream, unchanged
            ex.solution = ex.solution.replace(f"{ANSWER_MARK} ", "so the answer is ")
        return ex


def sft_on_solutions(model, tok, task: Task, levels: Sequence[int], *, steps: int, batch: int, lr: float, seed: int,
                     desc: str, quiet: bool = False) -> float:
    """Supervised fine-tuning on the task's worked solutions (token-mean NLL through the fused op).
    Returns the last loss."""
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / 20) * max(0.05, 1 - i / steps))
    device = next(model.parameters()).device
    model.train()
    bar = progress(quiet, total=steps, desc=desc)
    loss_v = float("nan")
    for _ in range(steps):
        exs = task.sample(rng, batch, levels)
        roll = from_pairs(tok, exs, [e.solution for e in exs], None, template=TEMPLATE, device=device)
        h = decoder_hidden(model, roll.input_ids, roll.attention_mask, roll.position_ids)[:, :-1]
        lp = linear_logprobs(h, LMHead.of(model), roll.targets)
        loss = -lp.sum() / roll.response_mask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        loss_v = float(loss.detach())
        bar.update(1)
        bar.set_postfix(nll=f"{loss_v:.3f}")
    bar.close()
    print(f"{desc}: {steps} steps, final NLL {loss_v:.4f}", flush=True)
    return loss_v


def prepare_models(out: Path, tok, task: Task, levels: Sequence[int], *, seed: int, teacher_steps: int,
                   warmup_steps: int, prose_fraction: float, teacher_preset: str = "preset:tiny-teacher",
                   student_preset: str = "preset:tiny-student", batch: int = 64, quiet: bool = False):
    """The teacher (SFT on the task's worked solutions) and the student's starting point (warm-up on
    the mixed-style corpus), saved to ``out/teacher`` and ``out/student_init``. ``task`` must
    already hold out the eval set (``rlad.heldout``): neither model sees an eval problem."""
    teacher = prepare_teacher(out, tok, task, levels, seed=seed, steps=teacher_steps, preset=teacher_preset,
                              batch=batch, quiet=quiet)
    student = prepare_student(out, tok, task, levels, seed=seed, steps=warmup_steps, prose_fraction=prose_fraction,
                              preset=student_preset, batch=batch, quiet=quiet)
    return teacher, student


def prepare_teacher(out: Path, tok, task: Task, levels: Sequence[int], *, seed: int, steps: int,
                    preset: str = "preset:tiny-teacher", batch: int = 64, quiet: bool = False):
    """``prepare_models``' teacher alone, saved to ``out/teacher``."""
    print(f"teacher: supervised fine-tuning on worked solutions ({steps} steps)", flush=True)
    teacher = load_model(preset, tok, seed=seed + 1)
    sft_on_solutions(teacher, tok, task, levels, steps=steps, batch=batch, lr=3e-3, seed=seed + 11,
                     desc="teacher SFT", quiet=quiet)
    teacher.save_pretrained(out / "teacher")
    tok.save_pretrained(out / "teacher")
    return teacher


def prepare_student(out: Path, tok, task: Task, levels: Sequence[int], *, seed: int, steps: int,
                    prose_fraction: float, preset: str = "preset:tiny-student", batch: int = 64, quiet: bool = False):
    """``prepare_models``' starting student alone (its own seeds: the same model whether or not the
    teacher was trained first in this process), saved to ``out/student_init``."""
    print(f"student: warm-up on a mixed-style corpus ({steps} steps; {prose_fraction:.0%} of the solutions "
          f"end in prose the verifier cannot read)", flush=True)
    student = load_model(preset, tok, seed=seed + 2)
    sft_on_solutions(student, tok, ProseStyle(task, prose_fraction), levels, steps=steps, batch=batch, lr=3e-3,
                     seed=seed + 12, desc="student warm-up", quiet=quiet)
    student.save_pretrained(out / "student_init")
    tok.save_pretrained(out / "student_init")
    return student


def run_demo(out_dir: str = "runs/demo", seed: int = 0, quiet: bool = False, rl_steps: int = 40,
             teacher_steps: int = 500, warmup_steps: int = 300, prose_fraction: float = 0.6) -> dict:
    t_start = time.perf_counter()
    out = Path(out_dir)
    claim(out, "demo", setting="--out-dir")  # a new or empty folder, or an earlier demo's: never someone else's
    torch.manual_seed(seed)
    tok = load_tokenizer()
    task = get_task("arithmetic")
    levels = [1]
    n_eval, k = 100, 4  # level 1 has 200 distinct problems: half are held out, half are trainable
    held = build_held_out(task, levels, per_level=n_eval, seed=EVAL_SEED)  # the same set `rlad train` holds out

    def score_model(model):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 2_000_003)
            return evaluate(model, tok, task, held.examples, template=TEMPLATE, max_new_tokens=32, samples=k)

    print("[1/3] teacher and student's starting point", flush=True)
    teacher, student = prepare_models(out, tok, task, levels, seed=seed, teacher_steps=teacher_steps,
                                      warmup_steps=warmup_steps, prose_fraction=prose_fraction, quiet=quiet)
    teacher_res = score_model(teacher)

    results = {}
    for i, (algo, note) in enumerate((("rlad", "TRRD, alpha 0.5, with the teacher"), ("grpo", "no teacher"))):
        print(f"[{i + 2}/3] {algo}: {rl_steps} steps ({note}), from the same starting student", flush=True)
        cfg = TrainConfig(out_dir=str(out / algo), seed=seed, student=str(out / "student_init"),
                          teacher=str(out / "teacher") if algo == "rlad" else None, algo=algo, task="arithmetic",
                          levels=levels, steps=rl_steps, prompts_per_step=16, group_size=8, max_new_tokens=32,
                          lr=3e-4, warmup_steps=5, schedule="cosine", alpha=0.5, mini_batches=2, eval_every=10,
                          eval_prompts=n_eval, eval_seed=EVAL_SEED, eval_samples=k, save_every=0, quiet=quiet,
                          overwrite=True)  # the demo rebuilds its folder: a re-run replaces the last one
        results[algo] = train(cfg)
    before = results["rlad"]["start"]

    def params(m):
        return f"{sum(p.numel() for p in m.parameters()) / 1e6:.2f}M"

    def row(name, model, res):
        return (name, params(model), with_se(res, "accuracy"), with_se(res, f"mean@{k}"))

    rows = [row("student before RL", student, before), row("student after RLAD", student, results["rlad"]["final"]),
            row("student after GRPO", student, results["grpo"]["final"]), row("teacher", teacher, teacher_res)]
    table = markdown_table(["model", "params", "greedy accuracy", f"mean@{k} (T=1)"], rows)
    minutes = (time.perf_counter() - t_start) / 60
    text = (f"Held-out accuracy (± standard error) on {len(held.examples)} arithmetic problems (level 1) that no "
            f"model trained on:\n\n{table}\n\n{DEMO_SCOPE}\n\n"
            f"plots: {results['rlad']['plots']}, {results['grpo']['plots']}\n"
            f"student checkpoints: {results['rlad']['checkpoint']}/model, {results['grpo']['checkpoint']}/model\n"
            f"wall time: {minutes:.1f} min")
    (out / "demo.md").write_text(text + "\n")
    print("\n" + text, flush=True)
    return {"before": before, "rlad": results["rlad"]["final"], "grpo": results["grpo"]["final"],
            "teacher": teacher_res, "minutes": minutes}


DEMO_SCOPE = ("What this shows: the whole loop runs (teacher, student, rollouts, the fused TRRD loss, held-out "
              "evaluation), and how RLAD and GRPO move the same student in 40 steps, on problems neither saw. What "
              "it does not show: which algorithm is better in general. It is one seed, one easy level, tiny models; "
              "a difference within about two standard errors is noise. `rlad study` (docs/studies.md, \"The fair "
              "study\") compares the algorithms across seeds and levels.")
