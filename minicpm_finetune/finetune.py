"""Fine-tune a MiniCPM model: arguments -> data -> model -> Trainer -> evaluate -> save.

    python finetune.py --model_name_or_path PATH --train_data_path train.jsonl --eval_data_path dev.jsonl \
        --output_dir OUT [--use_lora] [--deepspeed configs/ds_config_zero3.json] [any TrainingArguments flag]
    python finetune.py configs/lora.yaml --model_name_or_path PATH ...   (a config file first; flags override it)

`--stage dpo` tunes the model on preference pairs (prompt, chosen, rejected) instead: train_preferences.

`lora_finetune.sh` (one GPU, LoRA) and `sft_finetune.sh` (DeepSpeed, full parameters) call this file.
"""

import os
import sys

import torch
from transformers import DataCollatorForSeq2Seq, EarlyStoppingCallback, set_seed

from minicpm_finetune.arguments import ArgumentError, parse_args
from minicpm_finetune.curves import plot_training_curves
from minicpm_finetune.data import IGNORE_INDEX, DataError, check_files, load_conversations, tokenize_dataset
from minicpm_finetune.generation import eval_samples, generation_kwargs, save_metrics, save_predictions
from minicpm_finetune.metrics import parse_metric_names
from minicpm_finetune.model import load_model, load_tokenizer
from minicpm_finetune.packing import PackingCollator, pack_dataset, packing_summary
from minicpm_finetune.safety import NonFiniteLossError, ProcessReport
from minicpm_finetune.trainer import MiniCPMTrainer


def fail(message: str) -> None:
    """One line on stderr (from the first process only) and a non-zero exit."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def prepare_data(data_args, training_args, tokenizer):
    """Check, load and tokenize every split; print what was truncated or skipped.

    Returns the tokenized datasets and the (prompt, reference) samples of eval/test for generation.
    """
    splits = {"train": data_args.train_data_path, "eval": data_args.eval_data_path, "test": data_args.test_data_path}
    splits = {name: path for name, path in splits.items() if path}
    log = print if training_args.process_index == 0 else (lambda *_: None)
    checks = check_files(splits, data_args.data_format, data_args.skip_bad_samples, log)  # every file, one report
    datasets, samples = {}, {}
    with training_args.main_process_first(desc="tokenizing"):  # the first process fills the cache
        for name, path in splits.items():
            conversations = load_conversations(path, data_args.data_format, data_args.skip_bad_samples, log,
                                               check=checks[name])
            datasets[name], stats = tokenize_dataset(conversations, tokenizer, training_args.model_max_length,
                                                     data_args.preprocessing_num_workers, source=path)
            if name != "train":
                samples[name] = eval_samples(conversations, training_args.eval_every_turn)
            if training_args.process_index == 0:
                print(stats.summary(f"{name} ({path})"))
            if not len(datasets[name]):
                raise DataError(f"{path}: no sample has a token left to learn at --model_max_length "
                                f"{training_args.model_max_length}")
    return datasets, samples


def evaluate_at_end(trainer, datasets, samples, args):
    """Loss and generation metrics on the test set (else validation) to test_metrics.json and
    test_predictions.jsonl, then the training-curve PNG; files written by the first process."""
    split = "test" if "test" in datasets else "eval"
    generation_samples = samples[split] if args.eval_generation and split in samples else None
    extra = {"generation_samples": generation_samples} if generation_samples else {}
    metrics = trainer.evaluate(datasets[split], metric_key_prefix="test", **extra)
    if not trainer.is_world_process_zero():
        return
    metrics["test_split"] = "test" if split == "test" else "validation"
    save_metrics(os.path.join(args.output_dir, "test_metrics.json"), metrics)
    if generation_samples:
        save_predictions(os.path.join(args.output_dir, "test_predictions.jsonl"), generation_samples,
                         trainer.last_predictions)
    try:
        plot_training_curves(trainer.state.log_history, os.path.join(args.output_dir, "training_curves.png"))
    except ValueError as e:  # nothing logged yet (a very short run)
        print(f"note: no training curves: {e}")


def main(argv=None):
    try:
        model_args, data_args, training_args = parse_args(argv)
    except ArgumentError as e:
        fail(str(e))
    set_seed(training_args.seed)
    if training_args.stage == "dpo":
        return train_preferences(model_args, data_args, training_args)

    try:
        tokenizer = load_tokenizer(model_args)
        datasets, samples = prepare_data(data_args, training_args, tokenizer)
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
    trainer = MiniCPMTrainer(
        model=model,
        args=training_args,
        train_dataset=datasets["train"],
        eval_dataset=datasets["eval"],
        processing_class=tokenizer,
        data_collator=collator,
        # ROUGE/BLEU of generated replies next to the validation loss at each evaluation.
        generation_samples=samples["eval"][:training_args.eval_num_samples] if training_args.eval_generation else None,
        generation_config=dict(max_new_tokens=training_args.max_new_tokens,
                               metrics=parse_metric_names(training_args.eval_metrics), **generation_kwargs(
            training_args.generation_num_beams, training_args.do_sample, training_args.temperature,
            training_args.top_p)),
        callbacks=[ProcessReport()] + ([EarlyStoppingCallback(training_args.early_stopping_patience)]
                                       if training_args.early_stopping_patience else []),
    )
    try:  # resume_from_checkpoint: a complete checkpoint folder (arguments.py resolves "true"/"latest")
        trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    except NonFiniteLossError as e:
        fail(str(e))
    if training_args.load_best_model_at_end and trainer.state.best_model_checkpoint and trainer.is_world_process_zero():
        print(f"best eval_{training_args.metric_for_best_model.removeprefix('eval_')} {trainer.state.best_metric:.4g} "
              f"at {trainer.state.best_model_checkpoint} (loaded; training stopped at step {trainer.state.global_step})")
    trainer.remove_callback(EarlyStoppingCallback)  # the test evaluation below has no eval_ metric to watch
    trainer.save_model()  # LoRA: the adapter; full: the whole model (gathered under ZeRO-3); both + tokenizer
    trainer.save_state()

    evaluate_at_end(trainer, datasets, samples, training_args)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # else gloo's threads can abort the exit ("terminate called")
    return trainer


def train_preferences(model_args, data_args, training_args):
    """--stage dpo: preference pairs -> the model given (an SFT output) tuned by DPO -> saved -> reward metrics
    of the test set (else validation) in test_metrics.json, and the curves."""
    from minicpm_finetune.dpo import PreferenceTrainer, load_reference_model
    from minicpm_finetune.preference import prepare_preference_data

    try:
        tokenizer = load_tokenizer(model_args)
        datasets = prepare_preference_data(data_args, training_args, tokenizer)
    except (DataError, ValueError, OSError) as e:
        fail(str(e))
    model = load_model(model_args, training_args)
    # The reference is the starting model: with LoRA this model with its adapter off, else a frozen copy.
    ref_model = None if model_args.use_lora else load_reference_model(model_args, training_args)
    trainer = PreferenceTrainer(
        model=model, ref_model=ref_model, args=training_args, train_dataset=datasets["train"],
        eval_dataset=datasets["eval"], processing_class=tokenizer, beta=training_args.dpo_beta,
        loss_type=training_args.dpo_loss_type, sft_loss_weight=training_args.sft_loss_weight,
        callbacks=[ProcessReport()])
    try:
        trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    except NonFiniteLossError as e:
        fail(str(e))
    trainer.save_model()
    trainer.save_state()
    evaluate_at_end(trainer, datasets, {}, training_args)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return trainer


if __name__ == "__main__":
    main()
