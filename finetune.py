"""Fine-tune a MiniCPM model: arguments -> data -> model -> Trainer -> evaluate -> save.

    python finetune.py --model_name_or_path PATH --train_data_path train.jsonl --eval_data_path dev.jsonl \
        --output_dir OUT [--use_lora] [--deepspeed configs/ds_config_zero3.json] [any TrainingArguments flag]

The same as the `minicpm-finetune` command of the installed package; the code is minicpm_finetune/finetune.py.
`lora_finetune.sh` (one GPU, LoRA) and `sft_finetune.sh` (DeepSpeed, full parameters) call this file.
"""

from minicpm_finetune.finetune import main

if __name__ == "__main__":
    main()
