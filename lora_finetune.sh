#!/usr/bin/env bash
# LoRA fine-tuning on one GPU (or the CPU when there is none). No DeepSpeed needed.
# Every setting below can be overridden from the environment; extra arguments go to finetune.py:
#   MODEL_PATH=openbmb/MiniCPM-2B-sft-bf16 DATA_DIR=data/my_data bash lora_finetune.sh --num_train_epochs 3
# After a crash: OUTPUT_DIR=<the same folder> bash lora_finetune.sh --resume_from_checkpoint true
set -euo pipefail
cd "$(dirname "$0")"
source scripts/common.sh

MODEL_PATH=${MODEL_PATH:-openbmb/MiniCPM-2B-sft-bf16}
DATA_DIR=${DATA_DIR:-data/advertisegen_chat}
OUTPUT_DIR=${OUTPUT_DIR:-output/lora/$(date +%Y%m%d-%H%M%S)}
GPU=${GPU:-0}                           # which GPU to train on (DEVICE=cpu: the CPU)
MODEL_MAX_LENGTH=${MODEL_MAX_LENGTH:-512}

check_settings
check_model_path "$MODEL_PATH"
find_data_files "$DATA_DIR"
echo "LoRA fine-tuning $MODEL_PATH on $DATA_DIR -> $OUTPUT_DIR"

CUDA_VISIBLE_DEVICES=$GPU python finetune.py \
  --model_name_or_path "$MODEL_PATH" \
  --train_data_path "$TRAIN_FILE" --eval_data_path "$EVAL_FILE" ${TEST_FILE:+--test_data_path "$TEST_FILE"} \
  --output_dir "$OUTPUT_DIR" \
  --use_lora \
  --model_max_length "$MODEL_MAX_LENGTH" \
  --per_device_train_batch_size 8 --per_device_eval_batch_size 8 --gradient_accumulation_steps 1 \
  --learning_rate 5e-4 --weight_decay 0.01 --warmup_steps 20 --lr_scheduler_type cosine \
  --num_train_epochs 1 \
  --eval_strategy steps --eval_steps 200 --save_strategy steps --save_steps 200 --save_total_limit 3 \
  --logging_steps 10 \
  $(device_args) \
  "$@"
echo "done: $OUTPUT_DIR"
