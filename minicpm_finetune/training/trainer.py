"""The Trainer with generation-based evaluation: ROUGE-1/2/L and BLEU-4 logged next to the validation loss.

A Trainer subclass rather than a TrainerCallback because a callback cannot add to the metrics dict:
here the scores join ``eval_loss`` in one log entry (progress log, ``state.log_history``, TensorBoard)
and are seen by ``metric_for_best_model`` (e.g. ``--metric_for_best_model rouge-l``).
"""

from __future__ import annotations

import contextlib

import torch
from transformers import Trainer

from ..evaluation.generation import evaluate_generation
from ..export.portable import PortableSaves
from .first_loss import FirstLossCheck
from .safety import NonFiniteLossGuard


class MiniCPMTrainer(PortableSaves, NonFiniteLossGuard, FirstLossCheck, Trainer):
    """``Trainer`` that, at an evaluation, also generates replies for the split's samples and scores them
    (and, with ``FirstLossCheck``, prints the first training batch's loss against ln(vocab)).

    generation_samples: (prompt messages, reference) pairs (``prompts.eval_samples``) by the evaluation's
        ``metric_key_prefix``, the name ``Trainer`` gives a split's metrics: e.g. {"eval": validation samples,
        "test": test samples} scores the validation samples at each evaluation during training and the test
        samples at ``evaluate(test_set, metric_key_prefix="test")``. A prefix without samples, or None: loss only.
    generation_config: keyword arguments of ``evaluate_generation`` (max_new_tokens, metrics, num_beams, ...).

    The replies of the latest evaluation that generated are ``last_predictions`` (on every rank): ``evaluate``
    returns the metrics dict that is logged, so the replies are a result read after it, like ``state``.
    """

    def __init__(self, *args, generation_samples=None, generation_config=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.generation_samples = dict(generation_samples or {})
        self.generation_config = dict(generation_config or {})
        self.last_predictions = None

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        # Trainer.evaluate runs this, then logs its metrics once and hands them to the callbacks (early stopping,
        # metric_for_best_model): scores added here join eval_loss in that one log entry.
        with eager_evaluation(self.args):
            output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                             metric_key_prefix)
            samples = self.generation_samples.get(metric_key_prefix)
            if samples:
                # self.model is the (PEFT) model itself, also under DeepSpeed, where ZeRO-3 gathers weights on use.
                predictions, metrics = evaluate_generation(
                    self.model, self.processing_class, samples, batch_size=self.args.per_device_eval_batch_size,
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
