#!/usr/bin/env bash
# LoRA fine-tuning on one GPU (or the CPU when there is none). No DeepSpeed needed.
# The hyperparameters are in CONFIG (configs/lora.yaml); the variables below can be set in the environment;
# extra arguments go to finetune.py and override the config:
#   MODEL_PATH=openbmb/MiniCPM-2B-sft-bf16 DATA_DIR=data/my_data bash lora_finetune.sh --num_train_epochs 3
# The demo (tiny model and sample data, built when missing): bash lora_finetune.sh --demo
# After a crash: OUTPUT_DIR=<the same folder> bash lora_finetune.sh --resume_from_checkpoint true
set -euo pipefail
cd "$(dirname "$0")"
source scripts/common.sh

set_defaults lora "${1:-}"
if [[ "${1:-}" == --demo ]]; then shift; fi
GPU=${GPU:-0}  # which GPU to train on (DEVICE=cpu: the CPU)
prepare_run
echo "LoRA fine-tuning $MODEL_PATH on $DATA_DIR with $CONFIG -> $OUTPUT_DIR"

CUDA_VISIBLE_DEVICES=$GPU python finetune.py "$CONFIG" "${FINETUNE_ARGS[@]}" "$(device_args)" "$@"
echo "done: $OUTPUT_DIR"
