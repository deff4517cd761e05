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

# The settings both scripts share, unless set in the environment; $1 is lora or sft. The demo (when "$2" is
# --demo; the caller shifts it away) fills in its own first.
set_defaults() {
  if [[ "${2:-}" == --demo ]]; then prepare_demo "$1"; fi
  CONFIG=${CONFIG:-configs/$1.yaml}
  MODEL_PATH=${MODEL_PATH:-openbmb/MiniCPM-2B-sft-bf16}
  DATA_DIR=${DATA_DIR:-data/advertisegen_chat}
  OUTPUT_DIR=${OUTPUT_DIR:-output/$1/$(date +%Y%m%d-%H%M%S)}
  MODEL_MAX_LENGTH=${MODEL_MAX_LENGTH:-}  # default: the config's
}

# Checks the settings and the paths both scripts take: CONFIG, MODEL_PATH (a folder, or a hub id: the package's
# own rule, its file run alone so that transformers is not imported for it) and DATA_DIR; then sets
# FINETUNE_ARGS, the flags both pass to finetune.py after CONFIG (and before the device's: device_args).
prepare_run() {
  check_settings
  [[ -f "$CONFIG" ]] || die "CONFIG $CONFIG: file not found"
  python minicpm_finetune/cli.py check-model-path "$MODEL_PATH" || exit
  find_data_files "$DATA_DIR"
  FINETUNE_ARGS=(--model_name_or_path "$MODEL_PATH" --train_data_path "$TRAIN_FILE" --eval_data_path "$EVAL_FILE"
                 ${TEST_FILE:+--test_data_path "$TEST_FILE"} --output_dir "$OUTPUT_DIR"
                 ${MODEL_MAX_LENGTH:+--model_max_length "$MODEL_MAX_LENGTH"})
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

# A usable GPU, unless DEVICE=cpu.
gpu_present() {
  [[ "${DEVICE:-auto}" != cpu ]] && command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1
}

# bf16 on a GPU (PRECISION=fp16 for GPUs without bf16); fp32 with --use_cpu when there is no GPU
# or DEVICE=cpu.
device_args() {
  if gpu_present; then
    echo "--${PRECISION:-bf16}"
  else
    if [[ "${DEVICE:-auto}" == cpu ]]; then echo "DEVICE=cpu: training on the CPU" >&2
    else echo "no GPU found: training on the CPU" >&2; fi
    echo "--use_cpu"
  fi
}

# --demo: the bundled AdvertiseGen sample (converted into DATA_DIR when that folder is missing) and, unless
# MODEL_PATH is set, a tiny pretrained MiniCPM built once into DEMO_DIR (default output/demo; delete it to
# rebuild); configs/demo_$1.yaml. Sets DATA_DIR, MODEL_PATH, OUTPUT_DIR and CONFIG unless they are set
# already; $1 is lora or sft.
prepare_demo() {
  DEMO_DIR=${DEMO_DIR:-output/demo}
  if [[ -z "${MODEL_PATH:-}" || -z "${OUTPUT_DIR:-}" ]]; then  # the demo writes there: say so before any work
    { mkdir -p "$DEMO_DIR" && [[ -w "$DEMO_DIR" ]]; } 2>/dev/null || die "DEMO_DIR $DEMO_DIR: cannot be created or written"
  fi
  DATA_DIR=${DATA_DIR:-data/advertisegen_chat}
  if [[ ! -d "$DATA_DIR" ]]; then
    echo "demo: converting the sample data/advertisegen -> $DATA_DIR"
    python -m minicpm_finetune.advertisegen data/advertisegen "$DATA_DIR" || exit
  fi
  if [[ -z "${MODEL_PATH:-}" ]]; then
    MODEL_PATH=$DEMO_DIR/tiny-minicpm
    if [[ ! -d "$MODEL_PATH" ]]; then
      echo "demo: building a tiny pretrained MiniCPM -> $MODEL_PATH"
      find_data_files "$DATA_DIR"  # its tokenizer and pretraining see train and dev, never test
      python -m minicpm_finetune.tiny --output_dir "$MODEL_PATH" --data "$TRAIN_FILE" "$EVAL_FILE" || exit
    fi
  fi
  OUTPUT_DIR=${OUTPUT_DIR:-$DEMO_DIR/$1-$(date +%Y%m%d-%H%M%S)}
  CONFIG=${CONFIG:-configs/demo_$1.yaml}
  if ! gpu_present; then
    # The tiny model's matrices are too small to gain from threads: more threads than cores per process only
    # wait (measured: the ZeRO-3 demo at 2-3 s a step with torch's default threads, 0.1 s with one).
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    if [[ "$1" == sft ]]; then NUM_GPUS=${NUM_GPUS:-2}; fi  # ZeRO-3 over 2 CPU processes
  fi
}
