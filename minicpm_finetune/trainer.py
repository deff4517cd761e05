"""The Trainer with generation-based evaluation: ROUGE-1/2/L and BLEU-4 logged next to the validation loss.

A Trainer subclass rather than a TrainerCallback because a callback cannot add to the metrics dict:
here the scores join ``eval_loss`` in one log entry (progress log, ``state.log_history``, TensorBoard)
and are seen by ``metric_for_best_model`` (e.g. ``--metric_for_best_model rouge-l``).
"""

from __future__ import annotations

import contextlib

import torch
from transformers import Trainer

from .generation import evaluate_generation
from .portable import PortableSaves
from .safety import NonFiniteLossGuard


class MiniCPMTrainer(PortableSaves, NonFiniteLossGuard, Trainer):
    """``Trainer`` that, at each evaluation, also generates replies for ``generation_samples`` and scores them.

    generation_samples: (prompt messages, reference) pairs for the validation set (``eval_samples``);
        None turns generation-based evaluation off.
    generation_config: keyword arguments of ``evaluate_generation`` (max_new_tokens, metrics, num_beams, do_sample, ...).
    After each ``evaluate`` with generation, ``last_predictions`` holds the replies (on every rank).
    """

    def __init__(self, *args, generation_samples=None, generation_config=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.generation_samples = generation_samples
        self.generation_config = dict(generation_config or {})
        self.last_predictions = None
        self._pending_samples = None

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval", generation_samples=None):
        """As ``Trainer.evaluate``; ``generation_samples`` are scored with it (default: the validation
        samples when evaluating the validation set)."""
        if generation_samples is None and eval_dataset is None:
            generation_samples = self.generation_samples
        self._pending_samples = generation_samples
        try:
            with eager_evaluation(self.args):
                return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        finally:
            self._pending_samples = None

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        # The loss loop runs first; the scores are added to its metrics, which evaluate() then logs.
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                         metric_key_prefix)
        if self._pending_samples:
            # self.model is the (PEFT) model itself, also under DeepSpeed, where ZeRO-3 gathers weights on use.
            predictions, metrics = evaluate_generation(
                self.model, self.processing_class, self._pending_samples,
                batch_size=self.args.per_device_eval_batch_size,
                show_progress=not self.args.disable_tqdm, **self.generation_config)
            self.last_predictions = predictions
            output.metrics.update({f"{metric_key_prefix}_{key}": value for key, value in metrics.items()})
        return output


def eager_evaluation(args):
    """With --compile_layers, evaluation and generation run the layers eager: the compiled graphs are for
    training steps, and a KV cache (whose length grows every step, per layer) would recompile past the limit."""
    if getattr(args, "compile_layers", False):
        return torch.compiler.set_stance("force_eager")
    return contextlib.nullcontext()
