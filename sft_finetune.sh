#!/usr/bin/env bash
# Full-parameter fine-tuning with DeepSpeed ZeRO on one node of several GPUs, or several nodes (HOSTFILE).
# Every setting below can be overridden from the environment; extra arguments go to finetune.py:
#   NUM_GPUS=8 DS_CONFIG=configs/ds_config_zero2.json bash sft_finetune.sh --num_train_epochs 3
# Several nodes: HOSTFILE=hostfile MASTER_ADDR=10.0.0.1 bash sft_finetune.sh (see docs/faults.md, Several nodes).
# After a crash: OUTPUT_DIR=<the same folder> bash sft_finetune.sh --resume_from_checkpoint true
set -euo pipefail
cd "$(dirname "$0")"
source scripts/common.sh

MODEL_PATH=${MODEL_PATH:-openbmb/MiniCPM-2B-sft-bf16}
DATA_DIR=${DATA_DIR:-data/advertisegen_chat}
OUTPUT_DIR=${OUTPUT_DIR:-output/sft/$(date +%Y%m%d-%H%M%S)}
NUM_GPUS=${NUM_GPUS:-$(gpu_count)}     # GPUs per node
HOSTFILE=${HOSTFILE:-}                  # "host slots=N" per line, for several nodes
MASTER_ADDR=${MASTER_ADDR:-}            # first node's address (multi-node)
MASTER_PORT=${MASTER_PORT:-29500}
DS_CONFIG=${DS_CONFIG:-configs/ds_config_zero3.json}
MODEL_MAX_LENGTH=${MODEL_MAX_LENGTH:-512}
LAUNCHER_ARGS=${LAUNCHER_ARGS:-}        # more deepspeed launcher flags, e.g. "--no_ssh --node_rank 1"
check_settings

check_model_path "$MODEL_PATH"
find_data_files "$DATA_DIR"
[[ -f "$DS_CONFIG" ]] || die "DS_CONFIG $DS_CONFIG: file not found"
if [[ -n "$HOSTFILE" ]]; then
  [[ -f "$HOSTFILE" ]] || die "HOSTFILE $HOSTFILE: file not found"
  launcher=(deepspeed --hostfile "$HOSTFILE" --master_port "$MASTER_PORT" ${MASTER_ADDR:+--master_addr "$MASTER_ADDR"})
else
  launcher=(deepspeed --num_gpus "$NUM_GPUS" --master_port "$MASTER_PORT")
fi
echo "Full fine-tuning $MODEL_PATH on $DATA_DIR with $DS_CONFIG -> $OUTPUT_DIR"

# shellcheck disable=SC2086  # LAUNCHER_ARGS is a list of flags
"${launcher[@]}" $LAUNCHER_ARGS finetune.py \
  --deepspeed "$DS_CONFIG" \
  --model_name_or_path "$MODEL_PATH" \
  --train_data_path "$TRAIN_FILE" --eval_data_path "$EVAL_FILE" ${TEST_FILE:+--test_data_path "$TEST_FILE"} \
  --output_dir "$OUTPUT_DIR" \
  --model_max_length "$MODEL_MAX_LENGTH" \
  --per_device_train_batch_size 4 --per_device_eval_batch_size 4 --gradient_accumulation_steps 1 \
  --learning_rate 1e-5 --weight_decay 0.1 --warmup_steps 20 --lr_scheduler_type cosine \
  --num_train_epochs 1 \
  --eval_strategy steps --eval_steps 200 --save_strategy steps --save_steps 200 --save_total_limit 3 \
  --logging_steps 10 \
  $(device_args) \
  "$@"
echo "done: $OUTPUT_DIR"
