"""Command-line arguments: model, data and training (every transformers.TrainingArguments flag works).

The first argument may be a YAML or JSON config file of flag names and values (``python finetune.py
configs/lora.yaml --learning_rate 1e-4``): its values come first and the flags after it override them.
Impossible combinations are rejected in one line (ArgumentError) before any model is loaded (checks.py): each
group in its dataclass's ``__post_init__``, what spans groups in ``check_together``, what the model's
config.json tells in ``check_against_model`` (called by finetune.main).
"""

from __future__ import annotations

import difflib
import json
import os
import sys
from dataclasses import dataclass, field, fields

import transformers

from ..cli import ArgumentError, OneLineParser
from ..data.checks import FORMATS
from .checks import (check_data_arguments, check_deepspeed_config, check_model_arguments, check_together,
                     check_training_arguments, explain_training_error)


@dataclass
class ModelArguments:
    model_name_or_path: str = field(default="openbmb/MiniCPM-2B-sft-bf16",
                                    metadata={"help": "hub id or local folder of the base model"})
    trust_remote_code: bool = field(default=False, metadata={
        "help": "run the model's own Python code; not needed for MiniCPM-1/2/3/4 (native here)"})
    attn_implementation: str | None = field(default=None, metadata={
        "help": "eager, sdpa or flash_attention_2 (default: transformers' choice, sdpa)"})
    chat_template: str | None = field(default=None, metadata={
        "help": "minicpm, chatml or a Jinja file (default: the tokenizer's, else by model type)"})
    use_lora: bool = field(default=False, metadata={"help": "train a LoRA adapter instead of all weights"})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (scale = alpha / r)"})
    lora_dropout: float = field(default=0.1, metadata={"help": "LoRA dropout"})
    lora_target_modules: str | None = field(default=None, metadata={
        "help": "comma-separated module names or all-linear (default: q_proj,v_proj for MiniCPM/Llama)"})
    qlora: bool = field(default=False, metadata={
        "help": "QLoRA: base weights in 4-bit NF4 (bitsandbytes; on the CPU bitsandbytes >= 0.50), LoRA adapter in "
                "fp32; implies --use_lora"})

    def __post_init__(self):
        if self.qlora:  # QLoRA is LoRA over 4-bit weights: --qlora implies --use_lora
            self.use_lora = True
        check_model_arguments(self)


@dataclass
class DataArguments:
    train_data_path: str | None = field(default=None, metadata={
        "help": "training data: JSON / JSON Lines / Parquet file, datasets.save_to_disk folder or hub dataset name"})
    eval_data_path: str | None = field(default=None, metadata={"help": "validation data (required)"})
    test_data_path: str | None = field(default=None, metadata={"help": "test data, evaluated after training"})
    data_format: str = field(default="auto", metadata={"help": "record format (default: detected per file)",
                                                       "choices": list(FORMATS)})
    skip_bad_samples: bool = field(default=False, metadata={"help": "drop bad records instead of stopping"})
    preprocessing_num_workers: int | None = field(default=None, metadata={
        "help": "processes that tokenize the data (default: one; the tokenizer itself uses every core)"})
    enable_thinking: bool | None = field(default=None, metadata={
        "help": "true/false: passed to a hybrid-reasoning chat template (MiniCPM4.1/5) for the samples that do not "
                "set their own enable_thinking (default: the template's own default)"})
    template_audit: int = field(default=32, metadata={
        "help": "conversations of the training data whose ids and masks are compared with the chat template's own "
                "rendering before the model loads; a difference stops the run (0: no audit)"})

    def __post_init__(self):
        check_data_arguments(self)


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    model_max_length: int = field(default=512, metadata={"help": "longest sample in tokens; longer ones are cut"})
    # Batches of similar lengths waste less compute on padding.
    train_sampling_strategy: str = field(default="group_by_length", metadata={
        "help": "random, sequential, group_by_length (default here) or batch_rebalance"})
    logging_steps: float = field(default=10)
    # Generation-based evaluation (ROUGE-1/2/L, BLEU-4) at each evaluation and on the test set after training.
    eval_generation: bool = field(default=True, metadata={
        "help": "generate replies for the validation set at each evaluation and log ROUGE/BLEU "
                "(--eval_generation false: loss only)"})
    eval_num_samples: int | None = field(default=None, metadata={
        "help": "score the first N validation samples during training (default: all; the test set is always whole)"})
    eval_every_turn: bool = field(default=False, metadata={
        "help": "every assistant turn of a conversation is a sample (default: the last one)"})
    max_new_tokens: int = field(default=128, metadata={"help": "longest generated reply in tokens"})
    generation_num_beams: int = field(default=1, metadata={"help": "beam search width (1: greedy)"})
    do_sample: bool = field(default=False, metadata={"help": "sample instead of greedy decoding"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (with --do_sample)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling threshold (with --do_sample)"})
    packing: bool = field(default=False, metadata={
        "help": "pack training samples into rows of up to model_max_length tokens (no padding; attention and "
                "labels stay inside each sample); per_device_train_batch_size then counts rows"})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "replace the model, adapter, state and checkpoints of an earlier run in --output_dir (default: "
                "a folder holding another run is refused)"})
    compile_layers: bool = field(default=False, metadata={
        "help": "torch.compile each decoder layer in place (regional compilation): fuses the norms, rotary, "
                "SwiGLU and residual scalings; the first training steps are slower while it compiles, and "
                "evaluation and generation run eager"})
    early_stopping_patience: int | None = field(default=None, metadata={
        "help": "stop training when --metric_for_best_model (loss, rouge-1, rouge-2, rouge-l or bleu-4) has not "
                "improved for N evaluations in a row; needs --load_best_model_at_end, which keeps and loads the "
                "best checkpoint"})
    # What generated replies are scored by; accuracy suits label tasks (classification), ROUGE/BLEU free text.
    eval_metrics: str = field(default="rouge,bleu", metadata={
        "help": "comma-separated generation metrics: rouge (ROUGE-1/2/L), bleu (BLEU-4), accuracy (exact match "
                "of the normalised reply, for label tasks)"})
    # Preference tuning (DPO) from the same entry point; preference.py and dpo.py.
    stage: str = field(default="sft", metadata={
        "help": "sft (supervised) or dpo (preference pairs: prompt, chosen, rejected)", "choices": ["sft", "dpo"]})
    dpo_beta: float = field(default=0.1, metadata={
        "help": "DPO beta: how far the tuned model may move from the reference (higher: less)"})
    dpo_loss_type: str = field(default="sigmoid", metadata={
        "help": "DPO loss: sigmoid (the DPO paper), hinge or ipo", "choices": ["sigmoid", "hinge", "ipo"]})
    sft_loss_weight: float = field(default=0.0, metadata={
        "help": "weight of an SFT term (mean negative log-likelihood of the chosen replies) added to the DPO loss"})

    def __post_init__(self):
        super().__post_init__()
        # Non-reentrant checkpointing works with frozen (LoRA) weights and under DeepSpeed.
        if self.activation_checkpointing and not self.activation_checkpointing_kwargs:
            self.activation_checkpointing_kwargs = {"use_reentrant": False}
        check_training_arguments(self)


CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


class _DuplicateKey(ValueError):
    pass


def _no_duplicate_keys(pairs):
    """A mapping from (key, value) pairs, refusing a key given twice (both parsers would keep the last one)."""
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(f"{key!r} is given twice")
        seen[key] = value
    return seen


def _yaml_loader():
    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            self.flatten_mapping(node)
            return _no_duplicate_keys((self.construct_object(key, deep=deep), self.construct_object(value, deep=deep))
                                      for key, value in node.value)

    return Loader


def read_config_file(path: str) -> dict:
    """A YAML or JSON config file: a mapping of flag names (without "--") to values, each given once."""
    if not os.path.isfile(path):
        raise ArgumentError(f"{path}: config file not found")
    import yaml

    kind = "JSON" if path.endswith(".json") else "YAML"
    try:
        with open(path, encoding="utf-8") as f:
            values = (json.load(f, object_pairs_hook=_no_duplicate_keys) if kind == "JSON"
                      else yaml.load(f, Loader=_yaml_loader()))  # noqa: S506 - a SafeLoader
    except _DuplicateKey as e:
        raise ArgumentError(f"{path}: {e} (only one value can count; keep one)") from None
    except OSError as e:  # a file that cannot be read (permissions, an I/O error)
        raise ArgumentError(f"{path}: cannot read ({e.strerror or e})") from None
    except (ValueError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ArgumentError(f"{path}: not valid {kind} ({' '.join(str(e).split())})") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ArgumentError(f"{path}: expected a mapping of flag names to values, got {type(values).__name__}")
    return values


def config_file_argv(path: str, parser) -> list[str]:
    """The config file as command-line flags, to be placed before the real ones (the last value of a flag
    wins in argparse, so flags after the file override it). Unknown keys are one error naming the file."""
    known = {f.name for dataclass_type in parser.dataclass_types for f in fields(dataclass_type) if f.init}
    takes_list = {action.dest for action in parser._actions if action.nargs in ("+", "*")}
    argv = []
    for key, value in read_config_file(path).items():
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            raise ArgumentError(f"{path}: unknown key '{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
        if value is None:  # "key: null" leaves the default
            continue
        if isinstance(value, list) and key not in takes_list:
            raise ArgumentError(f"{path}: {key} takes one value, not a list (write it as on the command line, "
                                "e.g. lora_target_modules: q_proj,v_proj)")
        if isinstance(value, dict):
            argv += [f"--{key}", json.dumps(value)]
        elif isinstance(value, list):
            argv += [f"--{key}", *map(str, value)]
        else:
            argv += [f"--{key}", str(value)]
    return argv


class ArgumentParser(transformers.HfArgumentParser):
    error = OneLineParser.error  # a bad value (--learning_rate abc): one line, not the whole usage


def parse_args(argv=None):
    """Parse the command line into (model, data, training) arguments, checked: each group in its
    ``__post_init__``, then what spans groups (check_together). Nothing is started, printed or resolved here.

    A first argument ending in .yaml/.yml/.json is a config file (see the module docstring).
    The DeepSpeed config path is checked before TrainingArguments reads it, so a typo is one line.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = ArgumentParser(
        (ModelArguments, DataArguments, TrainingArguments),
        usage="python finetune.py [CONFIG.yaml|CONFIG.json] [--flag value ...]  "
              "(flags after a config file override it)")
    at = 1 if argv and argv[0].startswith("--local_rank=") else 0  # the DeepSpeed launcher puts it first
    if len(argv) > at and argv[at].endswith(CONFIG_SUFFIXES) and not argv[at].startswith("-"):
        argv = argv[:at] + config_file_argv(argv[at], parser) + argv[at + 1:]
    if "--deepspeed" in argv:
        check_deepspeed_config(argv[len(argv) - argv[::-1].index("--deepspeed"):])  # the last one given wins
    try:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    except ValueError as e:  # TrainingArguments' own checks (bf16 support, fp16 with bf16, ...)
        raise ArgumentError(explain_training_error(str(e))) from None
    check_together(model_args, data_args, training_args)
    return model_args, data_args, training_args
