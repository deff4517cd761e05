# Shared by lora_finetune.sh and sft_finetune.sh: find the data files, check paths, pick the device.

die() { echo "error: $*" >&2; exit 2; }

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
