"""Fine-tune a MiniCPM model: arguments -> data -> model -> Trainer -> evaluate -> save.

    python finetune.py --model_name_or_path PATH --train_data_path train.jsonl --eval_data_path dev.jsonl \
        --output_dir OUT [--use_lora] [--deepspeed configs/ds_config_zero3.json] [any TrainingArguments flag]

The code is minicpm_finetune/training/finetune.py, which the installed package also runs as `minicpm-finetune`.
`lora_finetune.sh` (one GPU, LoRA) and `sft_finetune.sh` (DeepSpeed, full parameters) call this file.
"""

import sys

from minicpm_finetune.training import finetune

if __name__ == "__main__":
    sys.exit(finetune.run())
else:  # `import finetune` gives the package module itself (one module: patching it patches what runs)
    sys.modules[__name__] = finetune
