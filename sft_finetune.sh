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

set_defaults sft "${1:-}"
if [[ "${1:-}" == --demo ]]; then shift; fi
NUM_GPUS=${NUM_GPUS:-$(gpu_count)}     # GPUs per node
HOSTFILE=${HOSTFILE:-}                  # "host slots=N" per line, for several nodes
MASTER_ADDR=${MASTER_ADDR:-}            # first node's address (multi-node)
MASTER_PORT=${MASTER_PORT:-29500}
DS_CONFIG=${DS_CONFIG:-configs/ds_config_zero3.json}
LAUNCHER_ARGS=${LAUNCHER_ARGS:-}        # more deepspeed launcher flags, e.g. "--no_ssh --node_rank 1"
prepare_run
[[ -f "$DS_CONFIG" ]] || die "DS_CONFIG $DS_CONFIG: file not found"
if [[ -n "$HOSTFILE" ]]; then
  [[ -f "$HOSTFILE" ]] || die "HOSTFILE $HOSTFILE: file not found"
  launcher=(deepspeed --hostfile "$HOSTFILE" --master_port "$MASTER_PORT" ${MASTER_ADDR:+--master_addr "$MASTER_ADDR"})
else
  launcher=(deepspeed --num_gpus "$NUM_GPUS" --master_port "$MASTER_PORT")
fi
echo "Full fine-tuning $MODEL_PATH on $DATA_DIR with $CONFIG and $DS_CONFIG -> $OUTPUT_DIR"

# shellcheck disable=SC2086  # LAUNCHER_ARGS is a list of flags
"${launcher[@]}" $LAUNCHER_ARGS finetune.py "$CONFIG" --deepspeed "$DS_CONFIG" "${FINETUNE_ARGS[@]}" "$(device_args)" "$@"
echo "done: $OUTPUT_DIR"
