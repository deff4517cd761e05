"""minicpm-finetune: fine-tune MiniCPM models with LoRA or full-parameter DeepSpeed training.

Importing the package registers the native MiniCPM implementation (``model_type: minicpm``)
with transformers' Auto classes, so official checkpoints load without remote code.
"""
