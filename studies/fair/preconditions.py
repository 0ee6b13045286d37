"""Check, before the fair study runs, that its regime lets TRRD act at all (docs/studies.md).

    python studies/fair/preconditions.py                       # the models' checks, after prepare.py
    python studies/fair/preconditions.py --clip-from studies/fair/results/sweep/runs.csv --clip-arm grpo-lr1e-4

Measured on the validation set (``eval_seed`` 1: never the study's test set) and on the starting
student's own samples of training problems; printed as a table, written to ``--out``
(``studies/fair/results/preconditions.{md,json}``, committed with the study); the exit status is
1 if any check fails:

1. the teacher's sampled accuracy (mean@k at T = 0.6) at the hardest level is >= 0.6;
2. the starting student's, at the same level, is in [0.05, 0.3]: it rarely succeeds where the
   teacher usually does (where the paper's gains concentrate);
3. of the tokens of the student's responses with A < 0, >= 10% are teacher-preferred
   (``lp_old - lp_T < 2 log 0.8``, about -0.45: where TRRD at alpha 0.5, c = 1 protects them),
   sampled and scored at the study's training temperature (``--temperature``, study.yaml's);
4. no artificial format defect: prepare.py recorded no prose endings, and every worked solution
   of the warm-up corpus ends in the checkable ``#### answer``;
5. GRPO's clip fraction at the chosen learning rate is >= 1% (``--clip-from``: a study's
   runs.csv, the mean over the runs of ``--clip-arm``): the trust region binds.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import sys
from pathlib import Path

import torch

from rlad.demo import TEMPLATE  # the prompt format both models were trained on
from rlad.diagnostics import TEACHER_PREFERRED, trrd_token_stats
from rlad.evaluate import evaluate, sampled_name
from rlad.heldout import study_task
from rlad.models import load_model
from rlad.report import markdown_table
from rlad.rollout import generate, group_advantages, score
from rlad.rundir import write_atomic
from rlad.tasks import ANSWER_MARK, get_task
from rlad.tokenizer import load_tokenizer

HERE = Path(__file__).parent
TEMPERATURE = 0.6        # the paper's evaluation temperature, and the study's headline
TRAIN_TEMPERATURE = 0.8  # study.yaml's rollout temperature (the probe samples and scores at it)
TEACHER_MIN, STUDENT_RANGE, PREFERRED_MIN, CLIP_MIN = 0.6, (0.05, 0.3), 0.10, 0.01


def measure(teacher, student, tok, task, validation, levels, *, samples: int, probe_prompts: int,
            group_size: int, max_new_tokens: int, train_temperature: float = TRAIN_TEMPERATURE, seed: int = 0) -> dict:
    """The models' measured quantities: sampled accuracy of both at every level on ``validation``,
    and TRRD's token fractions on the student's own samples of ``task``'s training problems (the
    study's test and validation sets held out: ``rlad.heldout.study_task``)."""
    hardest = max(levels)
    out = {"hardest_level": hardest, "temperature": TEMPERATURE, "samples": samples,
           "train_temperature": train_temperature}
    for name, model in (("teacher", teacher), ("student", student)):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            res = evaluate(model, tok, task, validation, template=TEMPLATE, max_new_tokens=max_new_tokens,
                           samples=samples, temperatures=[TEMPERATURE])
        out[name] = res
    key = sampled_name("mean", samples, TEMPERATURE)
    out["teacher_hardest"] = out["teacher"][f"{key}/L{hardest}"]
    out["student_hardest"] = out["student"][f"{key}/L{hardest}"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        examples = task.sample(random.Random(seed + 1), probe_prompts, levels)
        roll = generate(student, tok, examples, task, group_size=group_size, temperature=train_temperature,
                        top_p=1.0, max_new_tokens=max_new_tokens, template=TEMPLATE)
    old = score(student, roll, temperature=train_temperature, micro_batch=64)
    lp_t = score(teacher, roll, temperature=train_temperature, micro_batch=64)
    adv = group_advantages(roll.rewards, group_size, True)[:, None].expand(roll.targets.shape)
    stats = trrd_token_stats(adv, roll.response_mask, old, lp_t, alpha=0.5, clamp=1.0, eps_low=0.2, eps_high=0.28)
    out["probe"] = {k: {"value": float(v), "tokens": int(n)} for k, (v, n) in stats.items()}
    out["probe"]["reward"] = float(roll.rewards.mean())
    out["teacher_pref_frac"] = out["probe"]["teacher_pref_frac"]["value"]
    return out


def corpus_defects(task, levels, draws: int = 2000, seed: int = 0) -> int:
    """How many of ``draws`` worked solutions of the warm-up corpus do not end in ``#### answer``."""
    rng = random.Random(seed)
    bad = 0
    for _ in range(draws):
        ex = task.make(rng, rng.choice(levels))
        bad += not (ex.solution or "").rstrip().endswith(f"{ANSWER_MARK} {ex.answer}")
    return bad


def mean_clip(runs_csv: Path, arm: str) -> tuple[float, int]:
    """The mean over ``arm``'s runs of their mean clip fraction (runs.csv's ``mean_clip_frac``)."""
    with open(runs_csv) as f:
        rows = [r for r in csv.DictReader(f) if r["arm"] == arm and r.get("mean_clip_frac")]
    if not rows:
        raise SystemExit(f"{runs_csv}: no finished run of arm {arm!r} with a clip fraction")
    return sum(float(r["mean_clip_frac"]) for r in rows) / len(rows), len(rows)


def provenance(manifest: dict) -> str:
    """`` (weights' sha256: teacher ab12..., student ...; both built on <cpu>, ...)`` from prepare.json, or ``""``
    for models prepared before it recorded them."""
    sha, env = manifest.get("sha256"), manifest.get("built_on")
    if not sha or not env:
        return ""

    def where(e):
        return "not recorded" if not e else (f"{e['cpu']}, {e['cpu_capability']}, {e['threads']} threads, "
                                             f"torch {e['torch']}, transformers {e['transformers']}")

    teacher, student = where(env.get("teacher")), where(env.get("student_init"))
    built = f"both built on {student}" if teacher == student else f"teacher built on {teacher}, student on {student}"
    return f" (weights' sha256: teacher {sha['teacher'][:16]}, student {sha['student_init'][:16]}; {built})"


def checks(m: dict, prose_fraction: float | None, defects: int, draws: int,
           clip: tuple[float, int, str] | None) -> list[tuple[str, str, str, str]]:
    """(check, measured, rule, PASS / FAIL / not checked) rows."""
    lo, hi = STUDENT_RANGE
    lv = m["hardest_level"]
    rows = [(f"teacher mean@{m['samples']} at T={TEMPERATURE}, level {lv}", f"{m['teacher_hardest']:.3f}",
             f">= {TEACHER_MIN}", m["teacher_hardest"] >= TEACHER_MIN),
            (f"student mean@{m['samples']} at T={TEMPERATURE}, level {lv}", f"{m['student_hardest']:.3f}",
             f"in [{lo}, {hi}]", lo <= m["student_hardest"] <= hi),
            (f"teacher-preferred share of A < 0 tokens (lp_old - lp_T < {TEACHER_PREFERRED:.3f})",
             f"{m['teacher_pref_frac']:.3f} of {m['probe']['teacher_pref_frac']['tokens']} "
             f"(sampled at T={m.get('train_temperature', 1.0):g})",
             f">= {PREFERRED_MIN}", m["teacher_pref_frac"] >= PREFERRED_MIN),
            ("warm-up corpus: prose endings", f"fraction {prose_fraction}, {defects} of {draws} solutions "
             f"without '{ANSWER_MARK} answer'", "none", prose_fraction == 0 and defects == 0)]
    if clip is None:
        rows.append(("GRPO clip fraction at the chosen lr", "not measured yet", f">= {CLIP_MIN}", None))
    else:
        value, n, arm = clip
        rows.append((f"GRPO clip fraction at the chosen lr ({arm}, {n} runs)", f"{value:.4f}", f">= {CLIP_MIN}",
                     value >= CLIP_MIN))
    return [(a, b, c, "not checked" if ok is None else "PASS" if ok else "FAIL") for a, b, c, ok in rows]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=str(HERE / "models"), help="prepare.py's output folder")
    p.add_argument("--out", default=str(HERE / "results"), help="folder of preconditions.md / .json")
    p.add_argument("--eval-prompts", type=int, default=200, help="validation problems per level")
    p.add_argument("--samples", type=int, default=8, help="k of mean@k")
    p.add_argument("--probe-prompts", type=int, default=64, help="training prompts the student samples for the "
                   "token fractions")
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--temperature", type=float, default=TRAIN_TEMPERATURE,
                   help="the study's rollout temperature: the probe of check 3 samples and scores at it")
    p.add_argument("--clip-from", help="a study's runs.csv holding the GRPO runs at the chosen learning rate")
    p.add_argument("--clip-arm", default="grpo", help="the arm of --clip-from to read")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    models = Path(args.models)
    manifest = json.loads((models / "prepare.json").read_text())
    tok = load_tokenizer(str(models / "student_init"))
    levels, seeds = manifest["levels"], manifest["held_out"]
    task, _, validation = study_task(manifest["task"], levels, per_level=args.eval_prompts,
                                     test_seed=seeds["test_seed"], validation_seed=seeds["validation_seed"],
                                     log=lambda *_: None)
    teacher = load_model(str(models / "teacher"), tok).eval()
    student = load_model(str(models / "student_init"), tok).eval()
    draws = 2000
    defects = corpus_defects(get_task(manifest["task"]), levels, draws)
    with torch.no_grad():
        m = measure(teacher, student, tok, task, validation, levels, samples=args.samples,
                    probe_prompts=args.probe_prompts, group_size=args.group_size, max_new_tokens=args.max_new_tokens,
                    train_temperature=args.temperature)
    clip = (*mean_clip(Path(args.clip_from), args.clip_arm), args.clip_arm) if args.clip_from else None
    rows = checks(m, manifest["student"].get("prose_fraction"), defects, draws, clip)
    key = sampled_name("mean", args.samples, TEMPERATURE)
    levels_table = markdown_table(
        ["model", "greedy", key] + [f"{key} L{lv}" for lv in levels],
        [(name, f"{m[name]['accuracy']:.3f}", f"{m[name][key]:.3f} ± {m[name][key + '_se']:.3f}",
          *(f"{m[name][f'{key}/L{lv}']:.3f} ± {m[name][f'{key}_se/L{lv}']:.3f}" for lv in levels))
         for name in ("teacher", "student")])
    text = (f"# Preconditions of the fair study\n\nModels: {models}{provenance(manifest)}; validation set "
            f"(eval_seed 1), {args.eval_prompts} problems per level.\n\n{levels_table}\n\n"
            f"{markdown_table(['check', 'measured', 'rule', 'result'], rows)}\n")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "preconditions.md", text)
    write_atomic(out / "preconditions.json", json.dumps({"measured": m, "checks": rows, "models": {
        k: manifest[k] for k in ("sha256", "built_on") if k in manifest}}, indent=2) + "\n")
    print(text, flush=True)
    return 1 if any(r[3] == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
