"""Build the fair study's teacher and starting student (deterministic, CPU).

    python studies/fair/prepare.py --threads 2   # -> studies/fair/models/{teacher,student_init}

Task ``chains`` levels 2-4 (3 to 5 single-digit operands; level 1, two operands, has only 200
distinct problems, too few for 200 held-out test problems, and both models solve it). The teacher
(0.84M parameters) learns it by supervised fine-tuning on worked solutions; the student (0.12M)
gets a short warm-up on the same solutions: no prose endings, no injected format defect (the miniature's was what the
teacher's signal fell on). The study's test set (``eval_seed`` 0 in study.yaml) and validation
set (``eval_seed`` 1, the sweep's and the preconditions') are held out of both. Whether these
models make a regime where TRRD can act is checked by ``preconditions.py``, before any study runs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from rlad.demo import prepare_student, prepare_teacher
from rlad.heldout import study_task
from rlad.rundir import write_atomic
from rlad.tokenizer import load_tokenizer

TASK, LEVELS = "chains", [2, 3, 4]  # level 1 (200 distinct problems) cannot give 200 test problems
EVAL_PROMPTS, TEST_SEED, VALIDATION_SEED = 200, 0, 1  # as in study.yaml (test) and sweep.yaml (validation)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(Path(__file__).parent / "models"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--teacher-steps", type=int, default=4000)
    p.add_argument("--warmup-steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=32, help="sequences per SFT step")
    p.add_argument("--eval-prompts", type=int, default=EVAL_PROMPTS, help="held-out problems per level (test and "
                   "validation sets each; as study.yaml's eval_prompts)")
    p.add_argument("--teacher-preset", default="preset:tiny-teacher")
    p.add_argument("--student-preset", default="preset:tiny-student")
    p.add_argument("--student-only", action="store_true", help="rebuild the starting student alone, keeping the "
                   "teacher of an earlier run with the same teacher settings (prepare.json)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    tok = load_tokenizer()
    task, _, _ = study_task(TASK, LEVELS, per_level=args.eval_prompts, test_seed=TEST_SEED,
                            validation_seed=VALIDATION_SEED, log=lambda *_: None)
    manifest = {"task": TASK, "levels": LEVELS, "seed": args.seed, "batch": args.batch,
                "held_out": {"test_seed": TEST_SEED, "validation_seed": VALIDATION_SEED,
                             "per_level": args.eval_prompts},
                "teacher": {"preset": args.teacher_preset, "steps": args.teacher_steps},
                "student": {"preset": args.student_preset, "steps": args.warmup_steps, "prose_fraction": 0.0}}
    kept = _kept_teacher(out, manifest) if args.student_only else None
    if args.student_only and kept is not None:
        raise SystemExit(f"--student-only: {kept}; run without it to rebuild both")
    if not args.student_only:
        prepare_teacher(out, tok, task, LEVELS, seed=args.seed, steps=args.teacher_steps, preset=args.teacher_preset,
                        batch=args.batch, quiet=args.quiet)
    prepare_student(out, tok, task, LEVELS, seed=args.seed, steps=args.warmup_steps, prose_fraction=0.0,
                    preset=args.student_preset, batch=args.batch, quiet=args.quiet)
    write_atomic(out / "prepare.json", json.dumps(manifest, indent=2) + "\n")
    print(f"models in {out}; next: python studies/fair/preconditions.py")


def _kept_teacher(out: Path, manifest: dict) -> str | None:
    """Why the teacher in ``out`` is not the one ``manifest`` asks for (None: it is; keep it)."""
    try:
        saved = json.loads((out / "prepare.json").read_text())
    except (OSError, ValueError):
        return f"no readable {out / 'prepare.json'} from an earlier run"
    for key in ("task", "levels", "seed", "batch", "held_out", "teacher"):
        if saved.get(key) != manifest[key]:
            return f"the teacher in {out} was built with {key}={saved.get(key)!r}, not {manifest[key]!r}"
    return None


if __name__ == "__main__":
    main()
