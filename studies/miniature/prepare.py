"""Build the miniature study's teacher and starting student (deterministic, CPU, about 5 minutes).

    python studies/miniature/prepare.py --threads 1   # -> studies/miniature/models/{teacher,student_init}

The teacher (0.84M parameters) learns the chains task (levels 1-3: 2 to 4 single-digit
operands) by supervised fine-tuning on worked solutions; the student (0.12M) gets a shorter
warm-up on a mixed-style corpus in which some solutions end in prose the verifier cannot read
(``rlad.demo.ProseStyle``). Both are trained with the study's test set (``eval_seed`` 0 in
study.yaml) and the learning-rate sweep's validation set (``eval_seed`` 1 in sweep.yaml) held
out, so neither model sees an eval problem. Then both are scored per level on the test set
(``models/scores.md``): the study starts from a teacher clearly better on the hardest levels.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from rlad.demo import TEMPLATE, prepare_models
from rlad.evaluate import evaluate, with_se
from rlad.heldout import study_task
from rlad.report import markdown_table
from rlad.tokenizer import load_tokenizer

TASK, LEVELS = "chains", [1, 2, 3]
EVAL_PROMPTS, TEST_SEED, VALIDATION_SEED = 48, 0, 1  # as in study.yaml (test) and sweep.yaml (validation)
MAX_NEW_TOKENS = 40


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(Path(__file__).parent / "models"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--teacher-steps", type=int, default=2500)
    p.add_argument("--batch", type=int, default=32, help="sequences per SFT step")
    p.add_argument("--warmup-steps", type=int, default=600)
    p.add_argument("--prose-fraction", type=float, default=0.3)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default; 1 is faster "
                   "when other processes share the cores)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    tok = load_tokenizer()
    task, held, _ = study_task(TASK, LEVELS, per_level=EVAL_PROMPTS, test_seed=TEST_SEED,
                               validation_seed=VALIDATION_SEED)
    teacher, student = prepare_models(out, tok, task, LEVELS, seed=args.seed, teacher_steps=args.teacher_steps,
                                      warmup_steps=args.warmup_steps, prose_fraction=args.prose_fraction,
                                      batch=args.batch, quiet=args.quiet)
    rows, scores = [], {}
    for name, model in (("teacher", teacher), ("student_init", student)):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed)
            res = evaluate(model.eval(), tok, task, held.examples, template=TEMPLATE, max_new_tokens=MAX_NEW_TOKENS)
        scores[name] = res
        rows.append((name, with_se(res, "accuracy"), *(with_se(res, "accuracy", lv) for lv in LEVELS)))
    table = markdown_table(["model", "accuracy", *(f"L{lv}" for lv in LEVELS)], rows)
    (out / "scores.json").write_text(json.dumps(scores, indent=2))
    (out / "scores.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
