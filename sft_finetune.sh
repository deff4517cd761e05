#!/usr/bin/env bash
# Full-parameter fine-tuning with DeepSpeed ZeRO on one node of several GPUs, or several nodes (HOSTFILE).
# The hyperparameters are in CONFIG (configs/sft.yaml); the variables below can be set in the environment;
# extra arguments go to finetune.py and override the config:
#   NUM_GPUS=8 DS_CONFIG=configs/ds_config_zero2.json bash sft_finetune.sh --num_train_epochs 3
# The demo (tiny model and sample data, built when missing; ZeRO-3 over 2 CPU processes without a GPU):
#   bash sft_finetune.sh --demo
# Several nodes: HOSTFILE=hostfile MASTER_ADDR=10.0.0.1 bash sft_finetune.sh (see docs/faults.md, Several nodes).
# After a crash: OUTPUT_DIR=<the same folder> bash sft_finetune.sh --resume_from_checkpoint true
set -euo pipefail
cd "$(dirname "$0")"
source scripts/common.sh

if [[ "${1:-}" == --demo ]]; then shift; prepare_demo sft; fi
CONFIG=${CONFIG:-configs/sft.yaml}
MODEL_PATH=${MODEL_PATH:-openbmb/MiniCPM-2B-sft-bf16}
DATA_DIR=${DATA_DIR:-data/advertisegen_chat}
OUTPUT_DIR=${OUTPUT_DIR:-output/sft/$(date +%Y%m%d-%H%M%S)}
NUM_GPUS=${NUM_GPUS:-$(nvidia-smi -L 2>/dev/null | wc -l || echo 1)}   # GPUs per node
HOSTFILE=${HOSTFILE:-}                  # "host slots=N" per line, for several nodes
MASTER_ADDR=${MASTER_ADDR:-}            # first node's address (multi-node)
MASTER_PORT=${MASTER_PORT:-29500}
DS_CONFIG=${DS_CONFIG:-configs/ds_config_zero3.json}
MODEL_MAX_LENGTH=${MODEL_MAX_LENGTH:-}  # default: the config's
LAUNCHER_ARGS=${LAUNCHER_ARGS:-}        # more deepspeed launcher flags, e.g. "--no_ssh --node_rank 1"
[[ "$NUM_GPUS" -ge 1 ]] 2>/dev/null || NUM_GPUS=1

[[ -f "$CONFIG" ]] || die "CONFIG $CONFIG: file not found"
check_model_path "$MODEL_PATH"
find_data_files "$DATA_DIR"
[[ -f "$DS_CONFIG" ]] || die "DS_CONFIG $DS_CONFIG: file not found"
if [[ -n "$HOSTFILE" ]]; then
  [[ -f "$HOSTFILE" ]] || die "HOSTFILE $HOSTFILE: file not found"
  launcher=(deepspeed --hostfile "$HOSTFILE" --master_port "$MASTER_PORT" ${MASTER_ADDR:+--master_addr "$MASTER_ADDR"})
else
  launcher=(deepspeed --num_gpus "$NUM_GPUS" --master_port "$MASTER_PORT")
fi
echo "Full fine-tuning $MODEL_PATH on $DATA_DIR with $CONFIG and $DS_CONFIG -> $OUTPUT_DIR"

# shellcheck disable=SC2086  # LAUNCHER_ARGS is a list of flags
"${launcher[@]}" $LAUNCHER_ARGS finetune.py "$CONFIG" \
  --deepspeed "$DS_CONFIG" \
  --model_name_or_path "$MODEL_PATH" \
  --train_data_path "$TRAIN_FILE" --eval_data_path "$EVAL_FILE" ${TEST_FILE:+--test_data_path "$TEST_FILE"} \
  --output_dir "$OUTPUT_DIR" \
  ${MODEL_MAX_LENGTH:+--model_max_length "$MODEL_MAX_LENGTH"} \
  $(device_args) \
  "$@"
echo "done: $OUTPUT_DIR"
