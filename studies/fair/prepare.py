"""Build the fair study's teacher and starting student (deterministic, CPU).

    python studies/fair/prepare.py --threads 2   # -> studies/fair/models/{teacher,student_init}

Task ``chains`` levels 2-4 (3 to 5 single-digit operands; level 1, two operands, has only 200
distinct problems, too few for 200 held-out test problems, and both models solve it). The teacher
(0.84M parameters) learns it by supervised fine-tuning on worked solutions; the student (0.12M)
gets a short warm-up on the same solutions: no prose endings, no injected format defect (the miniature's was what the
teacher's signal fell on). The study's test set (``eval_seed`` 0 in study.yaml) and validation
set (``eval_seed`` 1, the sweep's and the preconditions') are held out of both. Whether these
models make a regime where TRRD can act is checked by ``preconditions.py``, before any study runs.

The models are bitwise the same on a second run on the same machine with the same ``--threads``,
not on another CPU or thread count: float reduction order changes the bits, and over 4000 SFT
steps the bits become a different model (docs/studies.md, "The models belong to the machine that
builds them"). ``prepare.json`` records what built them (``built_on``: CPU, torch's CPU kernels,
threads, library versions) and the SHA-256 of each model's weights, which ``preconditions.py``
prints, so two sets of results can be told to come from the same models or not.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
from importlib.metadata import version
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
    kept = _kept_teacher(out, manifest) if args.student_only else None  # its prepare.json
    if kept is None:
        prepare_teacher(out, tok, task, LEVELS, seed=args.seed, steps=args.teacher_steps, preset=args.teacher_preset,
                        batch=args.batch, quiet=args.quiet)
    prepare_student(out, tok, task, LEVELS, seed=args.seed, steps=args.warmup_steps, prose_fraction=0.0,
                    preset=args.student_preset, batch=args.batch, quiet=args.quiet)
    here = built_on()  # a kept teacher keeps the record of where it was built (None: not recorded then)
    manifest["built_on"] = {"teacher": here if kept is None else (kept.get("built_on") or {}).get("teacher"),
                            "student_init": here}
    manifest["sha256"] = {role: weights_sha256(out / role) for role in ("teacher", "student_init")}
    write_atomic(out / "prepare.json", json.dumps(manifest, indent=2) + "\n")
    print(f"models in {out}; next: python studies/fair/preconditions.py")


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def built_on() -> dict:
    """What decides the models' bits besides the settings: the CPU, torch's CPU kernel set
    (``ATEN_CPU_CAPABILITY`` overrides it), the thread count and the library versions."""
    return {"cpu": cpu_name(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "transformers": version("transformers")}


def weights_sha256(folder: Path) -> str:
    """SHA-256 over a saved model's weight files (``*.safetensors``, in name order)."""
    h = hashlib.sha256()
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise SystemExit(f"{folder}: no *.safetensors weights to hash")
    for f in files:
        h.update(f.read_bytes())
    return h.hexdigest()


def _kept_teacher(out: Path, manifest: dict) -> dict:
    """The saved ``prepare.json`` of the teacher in ``out``, when that teacher is the one ``manifest``
    asks for; else ``SystemExit`` saying why."""
    try:
        saved = json.loads((out / "prepare.json").read_text())
    except (OSError, ValueError):
        why = f"no readable {out / 'prepare.json'} from an earlier run"
    else:
        why = next((f"the teacher in {out} was built with {key}={saved.get(key)!r}, not {manifest[key]!r}"
                    for key in ("task", "levels", "seed", "batch", "held_out", "teacher")
                    if saved.get(key) != manifest[key]), None)
    if why is not None:
        raise SystemExit(f"--student-only: {why}; run without it to rebuild both")
    return saved


if __name__ == "__main__":
    main()
