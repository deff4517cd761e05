#!/usr/bin/env bash
# The GPU measurements of bench/README.md in one command (estimated 6-10 minutes on one H200, most of it
# compiling and saving/quantizing the 4-bit model; never timed as a whole):
#   bash bench/gpu_checks.sh                  # table, then profile: writes bench/results/gpu_*.json|txt|png
#   bash bench/gpu_checks.sh table            # only the table (or: profile), e.g. two calls under a time limit
#   OUT=/some/dir bash bench/gpu_checks.sh    # elsewhere
#   DEVICE=cpu MODEL=tiny ROWS=1 STEPS=1 WARMUP=1 bash bench/gpu_checks.sh   # a dry run of the same commands on a CPU
#   WHEELS=.whl bash bench/gpu_checks.sh      # a machine without internet: install these wheels to /tmp/site first
set -euo pipefail
part=${1:-all}
cd "$(dirname "$0")/.."
out=${OUT:-bench/results}
device=${DEVICE:-cuda}
model=${MODEL:-minicpm-2b}
steps=${STEPS:-5}
rows=${ROWS:-16}
warmup=${WARMUP:-3}  # compiled recipes compile during the warm-up steps
mkdir -p "$out"
if [ -n "${WHEELS:-}" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # the benchmark imports minicpm_finetune: this checkout's
bench() { python3 bench/bench_training.py --device "$device" --model "$model" --steps "$steps" --warmup "$warmup" --rows "$rows" "$@"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null | tee "$out/gpu_machine.txt" || true
# Seed recipe against ours (chunked vs fused loss, checkpointing, compiled layers), LoRA, QLoRA, full bf16 AdamW
# and full with fp32 master weights, ROWS rows of 512. RECIPES="4 6" runs fewer (indices into RECIPES there).
if [[ $part == all || $part == table ]]; then
    bench --recipes ${RECIPES:-0 1 3 4 5 6 7 9 10 11 12 13 14 15 16} --json "$out/gpu_table.json" \
        --plot "$out/gpu_table.png" | tee "$out/gpu_table.txt"
fi
# Where the time goes now: per-op profile of the fastest LoRA recipes (eager and compiled).
if [[ $part == all || $part == profile ]]; then
    bench --recipes 4 6 --profile 2 --profile_rows 25 --json "$out/gpu_profile.json" | tee "$out/gpu_profile.txt"
fi
