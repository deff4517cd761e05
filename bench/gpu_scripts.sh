#!/usr/bin/env bash
# Both scripts end to end on one GPU, as a user runs them: a random MiniCPM-2B-shape checkpoint (real size and
# vocabulary) saved by the project's own code, then `bash lora_finetune.sh` (bf16, packing, configs/lora.yaml)
# and `bash sft_finetune.sh` (DeepSpeed ZeRO-3 on one GPU, configs/sft.yaml), each STEPS steps on the bundled
# AdvertiseGen sample with evaluation and generation metrics on. Writes to OUT (default bench/results):
# gpu_scripts.json (per run: exit status, steps, train runtime, tokens seen and tokens/s, samples/s, the
# Trainer's peak GPU memory, final loss, test metrics) and gpu_{lora,sft}.log.
#   WHEELS=.whl bash bench/gpu_scripts.sh        # on a GPU machine without a package index (scripts/gpu_wheels.sh)
#   SHAPE=tiny DEVICE=cpu STEPS=4 bash bench/gpu_scripts.sh   # a dry run of the same commands on a CPU
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench/results}
shape=${SHAPE:-minicpm-2b}
steps=${STEPS:-150}
work=${WORK:-/tmp/gpu_scripts}
mkdir -p "$out" "$work"
if [ -n "${WHEELS:-}" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$WHEELS"/*.whl || exit
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PATH=/tmp/site/bin:$PATH
fi
if ! command -v python >/dev/null; then  # the scripts call `python`; some images have only python3
    mkdir -p "$work/bin" && ln -sf "$(command -v python3)" "$work/bin/python" && export PATH=$work/bin:$PATH
fi
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
python -c "import minicpm_finetune, transformers, datasets, deepspeed, trl, peft, jieba, nltk, rouge_chinese, torch
print('transformers', transformers.__version__, 'deepspeed', deepspeed.__version__, 'torch', torch.__version__,
      'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())" || exit
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null | tee "$out/gpu_machine.txt"

model=$work/model-$shape
start=$SECONDS
[ -d "$model" ] || python -m minicpm_finetune.tiny --output_dir "$model" --shape "$shape" --pretrain_steps 0 \
    --data data/advertisegen_chat/train.jsonl || exit
echo "model built in $((SECONDS - start)) s"
# The same flags for both: a fixed number of steps, evaluation (loss, then generation and ROUGE/BLEU on a few
# validation samples) at the end, no checkpoints, the Trainer's memory and token counts.
common=(--max_steps "$steps" --eval_steps "$steps" --save_strategy no --eval_num_samples 32 --max_new_tokens 64
        --logging_steps 10 --skip_memory_metrics false --include_num_input_tokens_seen true --disable_tqdm true)
status=()
for run in lora sft; do
    start=$SECONDS
    if [[ $run == lora ]]; then
        MODEL_PATH=$model DATA_DIR=data/advertisegen_chat OUTPUT_DIR=$work/lora bash lora_finetune.sh \
            "${common[@]}" --packing true 2>&1 | tee "$out/gpu_lora.log"
    else
        NUM_GPUS=1 MODEL_PATH=$model DATA_DIR=data/advertisegen_chat OUTPUT_DIR=$work/sft bash sft_finetune.sh \
            "${common[@]}" 2>&1 | tee "$out/gpu_sft.log"
    fi
    status+=("$run=${PIPESTATUS[0]}:$((SECONDS - start))")
done
python - "$work" "$out/gpu_scripts.json" "${status[@]}" <<'EOF'
import json, os, sys

work, target, runs = sys.argv[1], sys.argv[2], {}
for item in sys.argv[3:]:
    name, rest = item.split("=")
    code, seconds = rest.split(":")
    folder = os.path.join(work, name)
    state, test = ({} if not os.path.isfile(os.path.join(folder, f)) else json.load(open(os.path.join(folder, f)))
                   for f in ("trainer_state.json", "test_metrics.json"))
    history = state.get("log_history", [])
    train = next((e for e in reversed(history) if "train_runtime" in e), {})
    losses = [e["loss"] for e in history if "loss" in e]
    tokens = train.get("num_input_tokens_seen") or state.get("num_input_tokens_seen")
    runs[name] = {"exit_status": int(code), "wall_s": int(seconds), "steps": state.get("global_step"),
                  "train_runtime_s": train.get("train_runtime"), "num_input_tokens_seen": tokens,
                  "tokens_per_s": round(tokens / train["train_runtime"]) if tokens and train.get("train_runtime") else None,
                  "train_samples_per_second": train.get("train_samples_per_second"),
                  "gpu_mib": {k: round(v / 2**20) for k, v in train.items() if "mem_gpu" in k},
                  "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
                  "test_metrics": test}
json.dump(runs, open(target, "w"), indent=2)
print(json.dumps(runs, indent=2))
EOF
