# Shared by lora_finetune.sh and sft_finetune.sh: find the data files, check paths, pick the device.

die() { echo "error: $*" >&2; exit 2; }

# A setting with a typo stops here in one line (else it surfaces deep in the launcher, or not at all).
check_settings() {
  local name
  for name in NUM_GPUS MODEL_MAX_LENGTH MASTER_PORT; do
    [[ -z "${!name:-}" || "${!name}" =~ ^[1-9][0-9]*$ ]] || die "$name=${!name}: expected a whole number of at least 1"
  done
  [[ "${PRECISION:-bf16}" =~ ^(bf16|fp16)$ ]] || die "PRECISION=$PRECISION: expected bf16 or fp16"
  [[ "${DEVICE:-auto}" =~ ^(auto|cpu)$ ]] || die "DEVICE=$DEVICE: expected auto or cpu"
  [[ -z "${GPU:-}" || "$GPU" =~ ^[0-9]+(,[0-9]+)*$ ]] || die "GPU=$GPU: expected a GPU number such as 0 (or a list: 0,1)"
}

# GPUs on this node, at least 1 (a CPU-only node runs one process).
gpu_count() {
  local n
  n=$(nvidia-smi -L 2>/dev/null | wc -l) || n=0
  if (( n > 0 )); then echo "$n"; else echo 1; fi
}

# A hub id looks like owner/name and is not a local path; anything else must exist as a folder.
check_model_path() {
  if [[ -d "$1" ]]; then return; fi
  if [[ "$1" =~ ^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$ && ! "$1" =~ ^\. ]]; then return; fi
  die "MODEL_PATH $1: folder not found"
}

# Sets TRAIN_FILE, EVAL_FILE and (if present) TEST_FILE from DATA_DIR/{train,dev,test}.json[l].
find_data_files() {
  local hint=""
  [[ "$1" == data/advertisegen_chat ]] && hint=" (make it from the sample: python -m minicpm_finetune.advertisegen data/advertisegen data/advertisegen_chat)"
  [[ -d "$1" ]] || die "DATA_DIR $1: folder not found$hint"
  local split
  for split in train dev test; do
    local found=""
    for ext in jsonl json; do
      if [[ -f "$1/$split.$ext" ]]; then found="$1/$split.$ext"; break; fi
    done
    case $split in
      train) [[ -n "$found" ]] || die "DATA_DIR $1: no train.jsonl or train.json"; TRAIN_FILE=$found ;;
      dev) [[ -n "$found" ]] || die "DATA_DIR $1: no dev.jsonl or dev.json (a validation set is required)"; EVAL_FILE=$found ;;
      test) TEST_FILE=$found ;;
    esac
  done
}

# bf16 on a GPU (PRECISION=fp16 for GPUs without bf16); fp32 with --use_cpu when there is no GPU
# or DEVICE=cpu.
device_args() {
  if [[ "${DEVICE:-auto}" != cpu ]] && command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "--${PRECISION:-bf16}"
  else
    if [[ "${DEVICE:-auto}" == cpu ]]; then echo "DEVICE=cpu: training on the CPU" >&2
    else echo "no GPU found: training on the CPU" >&2; fi
    echo "--use_cpu"
  fi
}
