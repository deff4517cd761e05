"""Checks of the flags, before anything is loaded: each group's on its own (called by the dataclasses'
``__post_init__`` in arguments.py), what spans groups (``check_together``), the DeepSpeed config, and what
the model's config.json tells (``check_against_model``, called by finetune.main once the checkpoint to
resume is known). Each impossible setting is one ArgumentError line.
"""

from __future__ import annotations

import json
import os

from ..cli import ArgumentError, check_count, check_output_path, looks_local
from ..evaluation.metrics import parse_metric_names
from ..models.families import sparse_attention_refusal
from .outputs import SHAPE_KEYS


LORA_FLAGS = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules")
# What SFT's generation-based evaluation reads (DPO reports rewards instead).
GENERATION_FLAGS = ("eval_num_samples", "eval_every_turn", "max_new_tokens", "generation_num_beams", "do_sample",
                    "temperature", "top_p", "eval_metrics")


def check_model_arguments(model_args) -> None:
    """The model and LoRA flags on their own (ModelArguments.__post_init__)."""
    path = model_args.model_name_or_path
    if looks_local(path) and not os.path.isdir(path):
        raise ArgumentError(f"--model_name_or_path {path}: folder not found")
    if os.path.isdir(path):  # adapters record their base: usable from any directory
        model_args.model_name_or_path = path = os.path.abspath(path)
    if not model_args.use_lora:
        defaults = type(model_args).__dataclass_fields__
        changed = [f"--{name}" for name in LORA_FLAGS if getattr(model_args, name) != defaults[name].default]
        if changed:
            raise ArgumentError(f"{', '.join(changed)} given without --use_lora (full fine-tuning has no adapter)")
        return
    if os.path.isfile(os.path.join(path, "adapter_config.json")):
        raise ArgumentError(f"--model_name_or_path {path} is already a LoRA adapter: "
                            "merge it first (python -m minicpm_finetune.export merge) or give its base model")
    if model_args.lora_r <= 0:
        raise ArgumentError(f"--lora_r must be positive, got {model_args.lora_r}")


def check_data_arguments(data_args) -> None:
    """The data flags on their own (DataArguments.__post_init__)."""
    for name in ("train_data_path", "eval_data_path"):
        if not getattr(data_args, name):
            raise ArgumentError(f"--{name} is required")
    for name in ("train_data_path", "eval_data_path", "test_data_path"):
        path = getattr(data_args, name)
        if path and not os.path.exists(path) and looks_local(path.split(":")[0]):  # else a hub dataset name
            raise ArgumentError(f"--{name} {path}: file not found")
    if data_args.preprocessing_num_workers is not None and data_args.preprocessing_num_workers <= 0:
        raise ArgumentError(f"--preprocessing_num_workers must be positive, got {data_args.preprocessing_num_workers}")
    if data_args.template_audit < 0:
        raise ArgumentError(f"--template_audit must be 0 (no audit) or a number of conversations, got "
                            f"{data_args.template_audit}")


def check_training_arguments(training_args) -> None:
    """The training flags on their own (TrainingArguments.__post_init__)."""
    for name in ("model_max_length", "eval_num_samples", "max_new_tokens"):
        check_count(f"--{name}", getattr(training_args, name))
    if training_args.compile_layers:
        check_compile_layers(training_args)
    try:
        parse_metric_names(training_args.eval_metrics)
    except ValueError as e:
        raise ArgumentError(f"--eval_metrics: {e}") from None
    check_best_model_metric(training_args)
    check_numbers(training_args)
    check_integrations(training_args)
    check_output_path(training_args.output_dir)


def check_together(model_args, data_args, training_args) -> None:
    """What needs flags of several groups. (What the model's config tells is checked by finetune.main, after
    the checkpoint to resume is known: check_against_model.)"""
    if model_args.qlora:
        check_qlora(training_args)
    if training_args.stage == "dpo":
        check_dpo(data_args, training_args)
    check_packages(model_args, training_args)


def check_numbers(training_args) -> None:
    """Learning rate, batch sizes and accumulation that no step could use."""
    import math

    lr = training_args.learning_rate
    if not math.isfinite(lr) or lr <= 0:
        raise ArgumentError(f"--learning_rate must be a positive number, got {lr}")
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        if getattr(training_args, name) <= 0:
            raise ArgumentError(f"--{name} must be at least 1, got {getattr(training_args, name)}")
    for name in ("weight_decay", "num_train_epochs", "max_grad_norm", "warmup_ratio"):
        value = getattr(training_args, name, None)
        if isinstance(value, float) and not math.isfinite(value):
            raise ArgumentError(f"--{name} must be a finite number, got {value}")


# pip package of each --report_to backend whose name differs from it
REPORT_TO_PACKAGES = {"azure_ml": "azureml-core", "comet_ml": "comet-ml", "trackio": "trackio"}


def check_integrations(training_args) -> None:
    """--report_to backends must be known and installed: one line now instead of a traceback after the data
    is tokenized and the model loaded."""
    from transformers.integrations.integration_utils import (INTEGRATION_TO_CALLBACK,
                                                             get_available_reporting_integrations)

    available = set(get_available_reporting_integrations())
    for backend in training_args.report_to or []:
        if backend == "kubeflow":  # added by transformers itself when kubeflow is there
            continue
        if backend not in INTEGRATION_TO_CALLBACK:
            raise ArgumentError(f"--report_to {backend}: unknown; choose from none, all, "
                                f"{', '.join(sorted(INTEGRATION_TO_CALLBACK))}")
        if backend not in available:
            package = REPORT_TO_PACKAGES.get(backend, backend)
            raise ArgumentError(f"--report_to {backend}: {package} is not installed (pip install {package}), "
                                "or use --report_to none")


def check_packages(model_args, training_args) -> None:
    """Flags that need an optional package: one line now, not an ImportError after minutes of loading."""
    needs = []
    if model_args.attn_implementation == "flash_attention_2":
        needs.append(("--attn_implementation flash_attention_2", "flash_attn", "flash-attn"))
    if training_args.eval_generation and training_args.stage != "dpo":  # the scorers of metrics.py
        metrics = parse_metric_names(training_args.eval_metrics)
        scorers = {"rouge": (("jieba", "jieba"), ("rouge_chinese", "rouge-chinese")),
                   "bleu": (("jieba", "jieba"), ("nltk", "nltk"))}
        needs += [(f"--eval_metrics {name}", module, package) for name in metrics for module, package in
                  scorers.get(name, ())]
    for flag, module, package in needs:
        if not is_installed(module):
            hint = ", or --eval_generation false for the loss only" if flag.startswith("--eval_metrics") else ""
            raise ArgumentError(f"{flag} needs {package}: pip install {package}{hint}")


def is_installed(module: str) -> bool:
    from importlib.util import find_spec

    return find_spec(module) is not None


def read_model_config(model_args):
    """The model's config (cheap: no weights), or None when it cannot be read now (a hub id offline,
    remote code); a local folder without config.json is an error."""
    from transformers import AutoConfig

    path = model_args.model_name_or_path
    if looks_local(path) and not os.path.isfile(os.path.join(path, "config.json")):
        raise ArgumentError(f"--model_name_or_path {path}: no config.json in this folder (not a model folder, "
                            "or its download is incomplete)")
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=model_args.trust_remote_code)
    except Exception:  # noqa: BLE001 - loading the model reports it with the full story
        return None


def check_against_model(model_args, training_args, config) -> None:
    """What the config tells before the weights load: LoRA target names, the context length, sparse attention,
    Liger."""
    if config is None:
        if getattr(training_args, "use_liger_kernel", False):
            check_liger(None)
        return
    refusal = sparse_attention_refusal(config, training_args.model_max_length)
    if refusal:
        raise ArgumentError(refusal)
    limit = getattr(config, "max_position_embeddings", None)
    if limit and training_args.model_max_length > limit and int(os.environ.get("RANK", "0")) == 0:
        print(f"warning: --model_max_length {training_args.model_max_length} is beyond the model's {limit} "
              "positions; samples that long may train badly")
    if model_args.use_lora:
        check_lora_targets(model_args, config)
    if getattr(training_args, "use_liger_kernel", False):
        check_liger(config)


def check_liger(config) -> None:
    """Liger patches only the model types it knows; for MiniCPM it would log a warning and do nothing.
    (The native MiniCPM here already computes its loss in chunks without full logits: loss.py.)"""
    from ..models.families import family_of

    family = family_of(config)
    if config is not None and not family.liger_kernel:
        done = ("the native model already computes the loss in chunks without full logits" if family.chunked_loss
                else "the loss is computed from full logits")
        raise ArgumentError(f"--use_liger_kernel has no effect on {config.model_type} (Liger Kernel does not patch "
                            f"it; {done}): drop the flag")
    if not is_installed("liger_kernel"):
        raise ArgumentError("--use_liger_kernel needs liger-kernel: pip install liger-kernel")


def empty_model(model_args, config):
    """The model built on the meta device (no memory, no weights) for its module names; None if it cannot be."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=model_args.trust_remote_code)
    except Exception:  # noqa: BLE001 - PEFT will check the names on the real model
        return None


# Layer types PEFT's LoRA can wrap.
LORA_LAYER_TYPES = ("Linear", "Embedding", "Conv1d", "Conv2d", "Conv3d", "Conv1D", "MultiheadAttention")


def check_lora_targets(model_args, config) -> None:
    """Every --lora_target_modules name must match a layer LoRA can wrap (PEFT's rule: the module's full
    name, or its ending after a dot); a misspelled one among valid ones is an error too."""
    from ..models.loading import lora_target_modules

    targets = lora_target_modules(model_args, config)
    if targets == "all-linear":
        return
    model = empty_model(model_args, config)
    if model is None:
        return
    modules = [(name, type(module).__name__) for name, module in model.named_modules() if name]
    wrappable = sorted({name.rsplit(".", 1)[-1] for name, kind in modules if kind in LORA_LAYER_TYPES} - {"lm_head"})
    bad = []
    for target in targets:
        kinds = {kind for name, kind in modules if name == target or name.endswith("." + target)}
        if not kinds & set(LORA_LAYER_TYPES):
            bad.append(target if not kinds else f"{target} (a {sorted(kinds)[0]}, not a layer LoRA can wrap)")
    if bad:
        raise ArgumentError(f"--lora_target_modules: {', '.join(bad)} matches no layer of this "
                            f"{config.model_type} model; its layers: {', '.join(wrappable)} (or all-linear)")


def run_settings(model_args, config) -> dict:
    """This run's settings as outputs.settings_of reads them from a saved model or checkpoint."""
    if not model_args.use_lora:
        return {"kind": "full", **{key: getattr(config, key, None) for key in SHAPE_KEYS if config is not None}}
    from ..models.loading import lora_target_modules

    targets = lora_target_modules(model_args, config) if config is not None or model_args.lora_target_modules else None
    if targets == "all-linear":  # PEFT saves the names it expanded to
        model = empty_model(model_args, config) if config is not None else None
        targets = None if model is None else sorted(
            {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
             if type(module).__name__ == "Linear"} - {"lm_head"})
    return {"kind": "LoRA", "lora_r": model_args.lora_r, "lora_alpha": model_args.lora_alpha,
            "lora_dropout": model_args.lora_dropout, "lora_target_modules": sorted(targets) if targets else None,
            "base": model_args.model_name_or_path}


def explain_training_error(message: str) -> str:
    """transformers' message for an impossible TrainingArguments combination, as one line."""
    if "support bf16" in message:
        return ("--bf16: no GPU with bf16 support here (bf16 needs an Ampere or newer GPU); "
                "use --fp16 (PRECISION=fp16 in the scripts) on older GPUs, or --use_cpu")
    return " ".join(message.split())


def check_qlora(training_args) -> None:
    """4-bit QLoRA needs bitsandbytes: any release on a CUDA GPU, 0.50 or newer on the CPU (its CPU
    backend). Say so before anything is loaded."""
    from importlib.metadata import PackageNotFoundError, version

    import torch
    from packaging.version import Version

    try:
        installed = version("bitsandbytes")
    except PackageNotFoundError:
        raise ArgumentError("--qlora needs bitsandbytes: pip install bitsandbytes") from None
    on_cpu = training_args.use_cpu or not torch.cuda.is_available()
    if on_cpu and Version(installed) < Version("0.50"):
        raise ArgumentError(f"--qlora on the CPU needs bitsandbytes >= 0.50 (installed: {installed}); "
                            "upgrade it, use a CUDA GPU, or train with --use_lora")


def check_best_model_metric(training_args) -> None:
    """--metric_for_best_model must be a metric evaluation logs, and --early_stopping_patience needs the best
    model kept: say so before anything is loaded (else a KeyError or a silent no-op at the first evaluation)."""
    from ..evaluation.metrics import metric_keys, parse_metric_names

    patience = training_args.early_stopping_patience
    if patience is not None and (patience < 1 or not training_args.load_best_model_at_end):
        raise ArgumentError(f"--early_stopping_patience {patience} needs a positive N and --load_best_model_at_end "
                            "(with --eval_strategy and --save_strategy both steps or epoch; "
                            "--metric_for_best_model defaults to loss)")
    metric = training_args.metric_for_best_model
    if metric is None or training_args.stage == "dpo":  # DPO's evaluation logs TRL's own metrics
        return
    scored = metric_keys(parse_metric_names(training_args.eval_metrics))
    name = metric.removeprefix("eval_")
    if name != "loss" and name not in scored:
        raise ArgumentError(f"--metric_for_best_model {metric}: evaluation logs loss, {', '.join(scored)} "
                            f"(--eval_metrics {training_args.eval_metrics})")
    if name != "loss" and not training_args.eval_generation:
        raise ArgumentError(f"--metric_for_best_model {metric} is scored on generated replies: "
                            "not with --eval_generation false")


def check_compile_layers(training_args) -> None:
    """--compile_layers excludes whole-model compilation and ZeRO-3: say so before anything is loaded."""
    if training_args.torch_compile:
        raise ArgumentError("--compile_layers and --torch_compile both compile the model; pick one")
    ds_config = getattr(training_args, "hf_deepspeed_config", None)
    if ds_config is not None and ds_config.is_zero3():
        # ZeRO-3's parameter-gathering hooks break each layer's graph into pieces (tried on CPU: ~100 graph
        # breaks and the recompile limit hit on a 2-layer model), so compiling would only cost time.
        raise ArgumentError("--compile_layers does not work under DeepSpeed ZeRO-3 (its parameter hooks break "
                            "the compiled graphs); use a ZeRO-2 config or drop --compile_layers")


def check_dpo(data_args, training_args) -> None:
    """--stage dpo needs TRL and preference data; say what does not apply before anything is loaded."""
    from importlib.util import find_spec

    if find_spec("trl") is None:
        raise ArgumentError("--stage dpo needs TRL: pip install trl")
    if training_args.dpo_beta <= 0:
        raise ArgumentError(f"--dpo_beta must be positive, got {training_args.dpo_beta}")
    if training_args.sft_loss_weight < 0:
        raise ArgumentError(f"--sft_loss_weight must be 0 or more, got {training_args.sft_loss_weight}")
    if training_args.packing:
        raise ArgumentError("--packing does not apply to --stage dpo (chosen and rejected are batched as pairs)")
    if training_args.early_stopping_patience:
        raise ArgumentError("--early_stopping_patience does not apply to --stage dpo (it would be ignored)")
    defaults = type(training_args).__dataclass_fields__
    for name in GENERATION_FLAGS:  # set away from its default: the user expects it to do something
        if getattr(training_args, name) != defaults[name].default:
            raise ArgumentError(f"--{name} does not apply to --stage dpo (no reply is generated: DPO evaluates "
                                "by rewards)")
    if data_args.data_format != "auto":
        raise ArgumentError("--data_format names SFT formats; preference formats are detected (--stage dpo)")


def check_deepspeed_config(after_flag: list[str]) -> None:
    """DeepSpeed installed, and the value of --deepspeed (``after_flag[0]``) an existing JSON object file
    (else TrainingArguments fails with an ImportError or a traceback)."""
    if not is_installed("deepspeed"):
        raise ArgumentError("--deepspeed needs DeepSpeed: pip install deepspeed")
    if not after_flag or after_flag[0].startswith("{"):  # none (argparse says so) or inline JSON
        return
    path = after_flag[0]
    if not os.path.isfile(path):
        raise ArgumentError(f"--deepspeed {path}: config file not found")
    try:
        with open(path, encoding="utf-8") as f:
            ds_config = json.load(f)
    except ValueError as e:
        raise ArgumentError(f"--deepspeed {path}: not valid JSON ({e})") from None
    if not isinstance(ds_config, dict):
        raise ArgumentError(f"--deepspeed {path}: a DeepSpeed config is a JSON object "
                            f"({{...}}), this file holds a {type(ds_config).__name__}")
