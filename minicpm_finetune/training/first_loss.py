"""The first-loss check: the loss of the first training batch, under the model as loaded, against ln(vocab).

A uniform guess over the vocabulary scores ln(vocab) nats per token; a random model scores about that, and a
trained one far less. A model that scores well *above* it is confidently wrong, which a trained checkpoint is
only when something between the checkpoint and the trainer is broken: MiniCPM loaded by code that ignores its muP
scalings (the first-step loss blow-up of OpenBMB MiniCPM issue #327), a chat template or tokenizer that is not the
model's, or corrupted weights. Saying so before the first optimizer step costs the user seconds, not GPU hours.

``FirstLossCheck`` (a Trainer mixin) reuses the first training forward pass: no extra pass, one scalar
all-reduce once (every process reaches it at the same point of step 1), one line from the first process. It only
reports; the run goes on.
"""

from __future__ import annotations

import math

import torch

# How far above ln(vocab) the first loss may be before the run warns. A random model with the usual small init
# scores ln(vocab) plus half the variance of its logits (well under 1 nat); a broken pipeline scores tens of nats
# above (the tiny tests' trained model with MiniCPM-2B's scalings removed: +22). 2 nats above means the right token
# gets on average e^2 = 7x less probability than a uniform guess would give it: worse than knowing nothing.
MARGIN = 2.0


def first_loss_lines(loss: float, vocab_size: int, margin: float = MARGIN) -> list[str]:
    """The info line, and the warning line when ``loss`` is more than ``margin`` nats above ln(vocab_size)."""
    uniform = math.log(vocab_size)
    lines = [f"first batch loss: {loss:.3f} (ln(vocab) = {uniform:.3f})"]
    if math.isfinite(loss) and loss > uniform + margin:  # NaN/inf: NonFiniteLossGuard stops the run
        lines.append(
            f"warning: the first batch loss is more than {margin:g} nats above ln(vocab): the model as loaded is "
            "confidently wrong on this data. Likely causes: MiniCPM's muP scalings not applied (loaded by code that "
            "ignores scale_emb, scale_depth and dim_model_base, e.g. as a plain Llama not made by `minicpm-export "
            "llama`), a chat template or tokenizer that is not this model's, or corrupted weights; training goes on, "
            "but check these before spending the GPU hours")
    return lines


def labelled_token_count(inputs) -> torch.Tensor:
    """The tokens a causal-LM loss scores in ``inputs``: its shifted labels that are not -100 (the Trainer's count)."""
    if "shift_labels" in inputs:
        return inputs["shift_labels"].ne(-100).sum()
    return inputs["labels"][..., 1:].ne(-100).sum()


def model_loss(output) -> torch.Tensor | None:
    """A copy of the loss a model's forward returned (the Trainer may scale that tensor in place later)."""
    loss = output.get("loss") if isinstance(output, dict) else None
    return None if loss is None else loss.detach().clone()


class FirstLossCheck:
    """Trainer mixin: print ``first_loss_lines`` for the first training micro-batch, before its backward pass.

    The model's loss is its summed cross-entropy divided by the Trainer's ``num_items_in_batch`` (the labelled
    tokens of every micro-batch of the step on every process), or the micro-batch's mean when that is not given.
    It is read by a forward hook, as the model returned it: the Trainer then multiplies that very tensor in place
    by the number of processes. The sum is recovered from it and, with the count, summed over processes: the mean
    over the first micro-batch of every process, whatever the gradient accumulation or world size.
    """

    first_loss_checked = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.first_loss_checked or not model.training or "labels" not in inputs:  # evaluation calls it too
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self.first_loss_checked = True
        count = labelled_token_count(inputs)  # before the Trainer may pop the labels
        seen = []
        hook = model.register_forward_hook(lambda module, args, output: seen.append(model_loss(output)))
        try:
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        finally:
            hook.remove()
        if seen and seen[0] is not None:  # every process alike: the all-reduce below is reached by all or none
            self._report_first_loss(seen[0], count, num_items_in_batch)
        return result

    def _report_first_loss(self, raw, count, num_items_in_batch):
        divisor = num_items_in_batch if num_items_in_batch is not None and self.model_accepts_loss_kwargs else count
        if torch.is_tensor(divisor):
            divisor = divisor.to(raw.device).float().reshape(-1)
        totals = torch.stack([(raw.float().reshape(-1) * divisor).sum(), count.to(raw.device).float()])
        if self.args.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(totals)
        summed, tokens = totals.tolist()
        vocab_size = getattr(getattr(self.model, "config", None), "vocab_size", None)
        if tokens and vocab_size and self.is_world_process_zero():
            for line in first_loss_lines(summed / tokens, vocab_size):
                print(line, flush=True)
