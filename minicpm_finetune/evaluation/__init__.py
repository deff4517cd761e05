"""The evaluation stage: prompts, generation, scores, result files and plots, and inference.

- ``prompts``: conversations -> prompt ids within the context; generated ids -> replies, streamed.
- ``generation``: batched (and distributed) generation, scored.
- ``metrics``: ROUGE-1/2/L on jieba words, BLEU-4, accuracy.
- ``results``: predictions and metrics files; ``curves``: the training-curve plots.
- ``inference``: ``inference.py``: chat, one prompt, or a whole file with metrics.

Imports: ``minicpm_finetune.cli``, ``models`` and ``data``; never training or export.
"""
