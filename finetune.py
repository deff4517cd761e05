"""Fine-tune a MiniCPM model: arguments -> data -> model -> Trainer -> evaluate -> save.

    python finetune.py --model_name_or_path PATH --train_data_path train.jsonl --eval_data_path dev.jsonl \
        --output_dir OUT [--use_lora] [--deepspeed configs/ds_config_zero3.json] [any TrainingArguments flag]

`lora_finetune.sh` (one GPU, LoRA) and `sft_finetune.sh` (DeepSpeed, full parameters) call this file.
"""

import json
import os
import sys

from transformers import DataCollatorForSeq2Seq, Trainer, set_seed

from minicpm_finetune.arguments import ArgumentError, parse_args
from minicpm_finetune.data import IGNORE_INDEX, DataError, load_conversations, tokenize_dataset
from minicpm_finetune.model import load_model, load_tokenizer
from minicpm_finetune.packing import PackingCollator, pack_dataset, packing_summary


def fail(message: str) -> None:
    """One line on stderr (from the first process only) and a non-zero exit."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def prepare_data(data_args, training_args, tokenizer):
    """Check, load and tokenize every split; print what was truncated or skipped."""
    splits = {"train": data_args.train_data_path, "eval": data_args.eval_data_path, "test": data_args.test_data_path}
    datasets = {}
    with training_args.main_process_first(desc="tokenizing"):  # the first process fills the cache
        for name, path in splits.items():
            if not path:
                continue
            conversations = load_conversations(path, data_args.data_format, data_args.skip_bad_samples)
            datasets[name], stats = tokenize_dataset(conversations, tokenizer, training_args.model_max_length)
            if training_args.process_index == 0:
                print(stats.summary(f"{name} ({path})"))
            if not len(datasets[name]):
                raise DataError(f"{path}: no sample has a token left to learn at --model_max_length "
                                f"{training_args.model_max_length}")
    if os.path.realpath(splits["train"]) == os.path.realpath(splits["eval"]) and training_args.process_index == 0:
        print("warning: the validation file is the training file; validation loss will not show overfitting")
    return datasets


def main(argv=None):
    try:
        model_args, data_args, training_args = parse_args(argv)
    except ArgumentError as e:
        fail(str(e))
    set_seed(training_args.seed)

    try:
        tokenizer = load_tokenizer(model_args)
        datasets = prepare_data(data_args, training_args, tokenizer)
    except (DataError, ValueError, OSError) as e:
        fail(str(e))

    # Pad each batch to its own longest sample, never to model_max_length; or pack samples into full rows.
    collator = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=IGNORE_INDEX)
    if training_args.packing:
        packed = pack_dataset(datasets["train"], training_args.model_max_length)
        if training_args.process_index == 0:
            print(packing_summary(datasets["train"], packed, training_args.model_max_length))
        datasets["train"] = packed
        flash = (model_args.attn_implementation or "").startswith("flash_attention")
        collator = PackingCollator(tokenizer, flatten=flash, fallback=collator)

    model = load_model(model_args, training_args)
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=datasets["train"],
        eval_dataset=datasets["eval"],
        processing_class=tokenizer,
        data_collator=collator,
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model()  # LoRA: the adapter; full: the whole model (gathered under ZeRO-3); both + tokenizer
    trainer.save_state()

    if "test" in datasets:
        metrics = trainer.evaluate(datasets["test"], metric_key_prefix="test")
        if trainer.is_world_process_zero():
            with open(os.path.join(training_args.output_dir, "test_metrics.json"), "w") as f:
                json.dump(metrics, f, indent=2)
    return trainer


if __name__ == "__main__":
    main()
