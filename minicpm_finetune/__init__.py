"""minicpm-finetune: fine-tune MiniCPM models with LoRA or full-parameter DeepSpeed training.

One folder per stage, imports pointing one way (``tests/test_layout.py`` checks it):

- ``models/``: the model-family table, the native MiniCPM, loading (with LoRA / QLoRA);
- ``data/``: sources, formats, checks, chat templates, tokenizers, encoding and masks, packing, preference
  pairs, the data preview;
- ``evaluation/``: prompts, generation, metrics, result files, curves, inference;
- ``export/``: what every saved folder carries, merge and Llama export;
- ``training/``: the pipeline ``finetune.py`` runs, its arguments and checks, the trainers, safety, outputs.

Beside them: ``cli`` (what every command shares: errors, the one-line parser, atomic writes; it imports
nothing of the package), the commands ``tiny`` and ``advertisegen``, and ``metrics`` and ``curves``, the old
names of two evaluation modules (the README's ``minicpm_finetune.metrics.compute_metrics``, ``python -m
minicpm_finetune.curves``).

Importing the package registers the native implementations of the model-family table (models/families.py;
MiniCPM-1/2/4, ``model_type: minicpm``) with transformers' Auto classes, so official checkpoints load
without remote code.
"""

import logging
import warnings

# bitsandbytes' CPU backend (imported by PEFT whenever it is installed) warns on stderr that the optional
# `kernels` package is missing and uses its plain torch path instead: noise in every command, and it
# would break the one-line error messages. Real bitsandbytes errors (ERROR level) still show.
# Entry points import this package before torch, transformers or PEFT (finetune.py does it first of all), so
# the level is set before bitsandbytes is imported and logs it.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
# Where `kernels` is installed, bitsandbytes asks it for a hub kernel; offline (HF_HUB_OFFLINE=1) it says on
# stderr that it skips the publisher check of a kernel already cached: the same noise.
logging.getLogger("kernels._internals.hf_hub").addFilter(
    lambda record: "Skipping publisher trust check" not in record.getMessage())
# DeepSpeed (imported by transformers when a Trainer starts) says on stdout that it falls back to the CPU,
# in the middle of the run's own output; a filter outlives the level DeepSpeed sets on its logger at import.
logging.getLogger("DeepSpeed").addFilter(lambda record: "Setting accelerator to CPU" not in record.getMessage())

# PEFT reads transformers' deprecated `is_gradient_checkpointing` when it wraps a model: a FutureWarning in every
# LoRA run that the user can do nothing about (our own code uses the activation_checkpointing names).
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)

from .models.families import register_native_classes  # noqa: E402

register_native_classes()
