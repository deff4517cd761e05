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

from minicpm_finetune.training.arguments import parse_args
from minicpm_finetune.training.checks import check_against_model, read_model_config, run_settings
from minicpm_finetune.cli import command, fail, load_error, print_error
from minicpm_finetune.evaluation.curves import plot_training_curves
from minicpm_finetune.data import IGNORE_INDEX, DataError, check_files, load_conversations, tokenize_dataset
from minicpm_finetune.data.audit import check_template_parity
from minicpm_finetune.models.families import note
from minicpm_finetune.evaluation.generation import generation_kwargs
from minicpm_finetune.evaluation.metrics import parse_metric_names
from minicpm_finetune.data.tokenizer import load_chat_tokenizer
from minicpm_finetune.models.loading import load_model
from minicpm_finetune.data.packing import PackingCollator, pack_dataset, packing_summary
from minicpm_finetune.training.outputs import (check_output_dir, clear_previous_run, lock_output_dir, out_of_space,
                                      save_final_model, unlock_output_dir)
from minicpm_finetune.evaluation.prompts import eval_samples
from minicpm_finetune.export.parity import MAX_PROMPTS, save_check_prompts
from minicpm_finetune.evaluation.results import save_metrics, save_predictions
from minicpm_finetune.training.safety import (AlreadyTrained, NonFiniteLossError, NothingLeftToTrain, ProcessReport,
                                              StopOnSignal, checkpoint_step, latest_checkpoint, resolve_resume)
from minicpm_finetune.training.trainer import MiniCPMTrainer


def claim_output_dir(model_args, training_args, settings) -> None:
    """The data is good: the first process locks the output folder for this run (until it exits, even by a
    kill), checks it again under the lock (a run that ended meanwhile may have filled it), and with
    --overwrite_output_dir removes the earlier run."""
    if training_args.process_index != 0:
        return
    lock_output_dir(training_args.output_dir)
    check_output_dir(training_args.output_dir, settings, training_args.resume_from_checkpoint,
                     training_args.overwrite_output_dir, check_lock=False)
    if training_args.overwrite_output_dir and not training_args.resume_from_checkpoint:
        removed = clear_previous_run(training_args.output_dir)
        if removed:
            print(f"--overwrite_output_dir: removed the earlier run's {len(removed)} file(s) and checkpoint(s) "
                  f"from {training_args.output_dir}")


def train_and_save(trainer, training_args, finish) -> None:
    """Train (resuming when asked), save the final model whole, then ``finish()`` (the evaluation).

    A NaN loss, Ctrl-C, SIGTERM or a full disk ends the run with one line saying what is kept and how to go on.
    """
    saved = False
    signals = StopOnSignal()
    trainer.add_callback(signals)
    trainer.add_callback(NothingLeftToTrain())
    with signals.installed():
        try:  # resume_from_checkpoint: a complete checkpoint folder (main resolves "true"/"latest")
            try:
                trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
            except AlreadyTrained as e:  # the checkpoint is the final model: save it whole, then evaluate
                if trainer.is_world_process_zero():
                    print(f"{e}; saving it as the final model")
            # LoRA: the adapter; full: the whole model (gathered under ZeRO-3); both + tokenizer. Staged and
            # moved in, config last: a kill during the save leaves no config beside partial weights.
            save_final_model(trainer)
            trainer.save_state()
            saved = True
            finish()
        except NonFiniteLossError as e:
            fail(e)
        except KeyboardInterrupt:
            stop(trainer, *signals.reason(), saved)
        except Exception as e:
            reason = out_of_space(e, training_args.output_dir)
            if reason is None:
                raise
            stop(trainer, f"cannot write to {training_args.output_dir} ({reason})", 2, saved,
                 "free some space, then continue")
    unlock_output_dir(training_args.output_dir)  # the run is over (main may be called again in one process)


def stop(trainer, why: str, status: int, saved: bool, then: str = "continue") -> None:
    """The run cannot go on: one line saying what is kept on disk and how to go on from it."""
    good, _ = latest_checkpoint(trainer.args.output_dir)
    if saved:
        kept = f"the trained model is saved in {trainer.args.output_dir}; only the final evaluation is missing"
    elif good:
        kept = (f"kept {good} (step {checkpoint_step(good)}); {then} with the same command and "
                "--resume_from_checkpoint true")
    else:
        kept = "no complete checkpoint was saved yet; run the command again to start over"
    print_error(f"{why} at step {trainer.state.global_step}: {kept}")
    sys.stdout.flush()
    os._exit(status)  # no interpreter teardown: dataloader and process-group threads could print tracebacks


def load_tokenizer_of(model_args):
    """The model's tokenizer with the chat template we train with (saved with every output); one that cannot be
    found (a hub id not in the cache, no tokenizer files) is bad input."""
    try:
        tokenizer = load_chat_tokenizer(model_args.model_name_or_path, model_args.chat_template,
                                        trust_remote_code=model_args.trust_remote_code)
    except OSError as e:
        raise load_error(model_args.model_name_or_path, e) from None
    tokenizer.padding_side = "right"  # training pads on the right; generation switches to left
    return tokenizer


def prepare_data(data_args, training_args, tokenizer):
    """Check, load and tokenize every split; print what was truncated or skipped.

    Returns the tokenized datasets and the (prompt, reference) samples of eval/test for generation (and of the
    first few training conversations under "train", for the parity check of the run's exports).
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
            if name == "train":  # the ids and masks to train on, checked against the template's own rendering
                check_template_parity(conversations, tokenizer, path, data_args.enable_thinking,
                                      data_args.template_audit)
            datasets[name], stats = tokenize_dataset(conversations, tokenizer, training_args.model_max_length,
                                                     data_args.preprocessing_num_workers, source=path,
                                                     skip_bad_samples=data_args.skip_bad_samples,
                                                     enable_thinking=data_args.enable_thinking)
            if name != "train":
                samples[name] = eval_samples(conversations, training_args.eval_every_turn, tokenizer,
                                             data_args.enable_thinking)
            else:  # the first prompts, stored with the run for the parity check of its exports (export/parity.py)
                first = [conversations[i] for i in range(min(MAX_PROMPTS, len(conversations)))]
                samples[name] = eval_samples(first, enable_thinking=data_args.enable_thinking)
            if training_args.process_index == 0:
                print(stats.summary(f"{name} ({path})"))
            if not len(datasets[name]):
                raise DataError(f"{path}: no sample has a token left to learn at --model_max_length "
                                f"{training_args.model_max_length}")
    return datasets, samples


def final_split(datasets) -> str:
    """The split evaluated at the end: the test set, else the validation set."""
    return "test" if "test" in datasets else "eval"


def scored_samples(samples, args) -> dict:
    """The samples generation scores, by metric prefix (``MiniCPMTrainer``): the first --eval_num_samples
    validation samples at each evaluation, and the whole split evaluated at the end."""
    if not args.eval_generation:
        return {}
    return {"eval": samples["eval"][:args.eval_num_samples], "test": samples[final_split(samples)]}


def evaluate_at_end(trainer, datasets, args, test_samples=None):
    """Loss and metrics on the test set (else validation) to test_metrics.json; with ``test_samples`` (the
    samples the trainer scores under "test") their predictions to test_predictions.jsonl; then the
    training-curve PNG. Files written by the first process."""
    split = final_split(datasets)
    metrics = trainer.evaluate(datasets[split], metric_key_prefix="test")
    if not trainer.is_world_process_zero():
        return
    metrics["test_split"] = "test" if split == "test" else "validation"
    save_metrics(os.path.join(args.output_dir, "test_metrics.json"), metrics)
    if test_samples:
        save_predictions(os.path.join(args.output_dir, "test_predictions.jsonl"), test_samples,
                         trainer.last_predictions)
    try:
        plot_training_curves(trainer.state.log_history, os.path.join(args.output_dir, "training_curves.png"))
    except ValueError as e:  # nothing logged yet (a very short run)
        print(f"note: no training curves: {e}")


def start_distributed(training_args) -> None:
    """DeepSpeed on the CPU: accelerate has started a gloo process group (while TrainingArguments was made)
    without telling DeepSpeed; hand it over, so that ZeRO sees the real world size."""
    if training_args.deepspeed and training_args.use_cpu:
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")


@command  # the project's own errors (bad flags, data, output folder) end the run with one line, exit 2
def main(argv=None):
    """parse -> start distributed -> resolve the checkpoint to resume -> check the flags against the model's
    config -> check the output folder -> data -> model -> train (and save, evaluate); returns the trainer."""
    model_args, data_args, training_args = parse_args(argv)
    start_distributed(training_args)
    # "true"/"latest": the newest complete checkpoint-N in --output_dir
    training_args.resume_from_checkpoint = resolve_resume(training_args.resume_from_checkpoint,
                                                          training_args.output_dir)
    config = read_model_config(model_args)  # config.json alone, no weights (None: a hub id offline, remote code)
    check_against_model(model_args, training_args, config)
    # The output folder: free, or this run's own to resume (outputs.py); rank 0 alone takes its lock.
    settings = run_settings(model_args, config)
    check_output_dir(training_args.output_dir, settings, training_args.resume_from_checkpoint,
                     training_args.overwrite_output_dir, check_lock=training_args.process_index == 0)
    family_note = note(config)  # a model family without the chunked loss, or one the table does not know
    if family_note and training_args.process_index == 0:
        print(family_note)
    set_seed(training_args.seed)
    if training_args.stage == "dpo":
        return train_preferences(model_args, data_args, training_args, settings)

    tokenizer = load_tokenizer_of(model_args)
    datasets, samples = prepare_data(data_args, training_args, tokenizer)

    # Pad each batch to its own longest sample, never to model_max_length; or pack samples into full rows.
    collator = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=IGNORE_INDEX)
    if training_args.packing:
        packed = pack_dataset(datasets["train"], training_args.model_max_length)
        if training_args.process_index == 0:
            print(packing_summary(datasets["train"], packed, training_args.model_max_length))
        datasets["train"] = packed
        flash = (model_args.attn_implementation or "").startswith("flash_attention")
        collator = PackingCollator(tokenizer, flatten=flash, fallback=collator)

    claim_output_dir(model_args, training_args, settings)
    check_prompts = [list(prompt) for prompt, _ in samples.pop("train")]
    if training_args.process_index == 0:
        save_check_prompts(training_args.output_dir, check_prompts)
    model = load_model(model_args, training_args)
    generation_samples = scored_samples(samples, training_args)
    trainer = MiniCPMTrainer(
        model=model,
        args=training_args,
        train_dataset=datasets["train"],
        eval_dataset=datasets["eval"],
        processing_class=tokenizer,
        data_collator=collator,
        # ROUGE/BLEU of generated replies next to the loss at each evaluation and at the end.
        generation_samples=generation_samples,
        generation_config=dict(max_new_tokens=training_args.max_new_tokens,
                               metrics=parse_metric_names(training_args.eval_metrics), **generation_kwargs(
            training_args.generation_num_beams, training_args.do_sample, training_args.temperature,
            training_args.top_p)),
        callbacks=[ProcessReport()] + ([EarlyStoppingCallback(training_args.early_stopping_patience)]
                                       if training_args.early_stopping_patience else []),
    )

    def finish():
        state = trainer.state
        if training_args.load_best_model_at_end and state.best_model_checkpoint and trainer.is_world_process_zero():
            print(f"best eval_{training_args.metric_for_best_model.removeprefix('eval_')} {state.best_metric:.4g} "
                  f"at {state.best_model_checkpoint} (loaded; training stopped at step {state.global_step})")
        trainer.remove_callback(EarlyStoppingCallback)  # the test evaluation below has no eval_ metric to watch
        evaluate_at_end(trainer, datasets, training_args, generation_samples.get("test"))

    train_and_save(trainer, training_args, finish)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # else gloo's threads can abort the exit ("terminate called")
    return trainer


def train_preferences(model_args, data_args, training_args, settings):
    """--stage dpo: preference pairs -> the model given (an SFT output) tuned by DPO -> saved -> reward metrics
    of the test set (else validation) in test_metrics.json, and the curves."""
    from minicpm_finetune.training.dpo import PreferenceTrainer, load_reference_model
    from minicpm_finetune.data.preference import prepare_preference_data

    tokenizer = load_tokenizer_of(model_args)
    datasets = prepare_preference_data(data_args, training_args, tokenizer)
    claim_output_dir(model_args, training_args, settings)
    model = load_model(model_args, training_args)
    # The reference is the starting model: with LoRA this model with its adapter off, else a frozen copy.
    ref_model = None if model_args.use_lora else load_reference_model(model_args, training_args)
    trainer = PreferenceTrainer(
        model=model, ref_model=ref_model, args=training_args, train_dataset=datasets["train"],
        eval_dataset=datasets["eval"], processing_class=tokenizer, beta=training_args.dpo_beta,
        loss_type=training_args.dpo_loss_type, sft_loss_weight=training_args.sft_loss_weight,
        callbacks=[ProcessReport()])
    train_and_save(trainer, training_args, lambda: evaluate_at_end(trainer, datasets, training_args))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return trainer


def run() -> int:
    """The command: main(), with Ctrl-C while checking or loading as one line (during training, main says
    what was kept). Used by `python finetune.py`, `python -m minicpm_finetune.finetune` and `minicpm-finetune`."""
    try:
        main()
    except KeyboardInterrupt:
        print_error("interrupted (Ctrl-C) before training started; nothing to resume")
        return 130
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Everything is saved and the process group is gone; C++ threads gloo or DeepSpeed leave behind can still
        # abort the interpreter's teardown ("terminate called without an active exception"), failing a good run.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(run())
