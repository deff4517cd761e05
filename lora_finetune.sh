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

if [[ "${1:-}" == --demo ]]; then shift; prepare_demo lora; fi
CONFIG=${CONFIG:-configs/lora.yaml}
MODEL_PATH=${MODEL_PATH:-openbmb/MiniCPM-2B-sft-bf16}
DATA_DIR=${DATA_DIR:-data/advertisegen_chat}
OUTPUT_DIR=${OUTPUT_DIR:-output/lora/$(date +%Y%m%d-%H%M%S)}
GPU=${GPU:-0}                           # which GPU to train on (DEVICE=cpu: the CPU)
MODEL_MAX_LENGTH=${MODEL_MAX_LENGTH:-}  # default: the config's

[[ -f "$CONFIG" ]] || die "CONFIG $CONFIG: file not found"
check_model_path "$MODEL_PATH"
find_data_files "$DATA_DIR"
echo "LoRA fine-tuning $MODEL_PATH on $DATA_DIR with $CONFIG -> $OUTPUT_DIR"

CUDA_VISIBLE_DEVICES=$GPU python finetune.py "$CONFIG" \
  --model_name_or_path "$MODEL_PATH" \
  --train_data_path "$TRAIN_FILE" --eval_data_path "$EVAL_FILE" ${TEST_FILE:+--test_data_path "$TEST_FILE"} \
  --output_dir "$OUTPUT_DIR" \
  ${MODEL_MAX_LENGTH:+--model_max_length "$MODEL_MAX_LENGTH"} \
  $(device_args) \
  "$@"
echo "done: $OUTPUT_DIR"
