"""The export stage: what leaves the toolkit.

- ``portable``: what every saved folder carries (the tokenizer trained with, a full MiniCPM's own code).
- ``commands``: ``python -m minicpm_finetune.export merge|llama|gguf``: a LoRA adapter merged into its base, a
  MiniCPM folded into Llama layout, a GGUF file and Ollama Modelfile.
- ``gguf``: the GGUF writer (gguf library) and the Modelfile.
- ``parity``: the check every export and merge runs on its result before moving it into place.

Imports: ``minicpm_finetune.cli``, ``models`` and ``data``; never training or evaluation.
"""

from .commands import ExportError, export_llama, fold_into_llama, main, merge_adapter

__all__ = ["ExportError", "export_llama", "fold_into_llama", "main", "merge_adapter"]
