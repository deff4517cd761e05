"""The models stage: which model families the toolkit knows and how each is loaded.

- ``families``: the model-family table (one entry per ``model_type``: chat template, LoRA targets, native
  classes, what export and the loss may do with it).
- ``configuration_minicpm``, ``modeling_minicpm``, ``loss``: the native MiniCPM (``model_type: minicpm``),
  shipped as they are in every saved full model; they import only each other.
- ``loading``: the causal LM from a hub id or folder, in the training dtype, with LoRA / QLoRA, compiled.

Imports: the standard library, torch, transformers, PEFT, and ``minicpm_finetune.cli``; nothing of the
other stages.
"""
