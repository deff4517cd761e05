"""Causal-LM cross-entropy that never holds full-vocabulary logits for every token.

MiniCPM-2B's 122,753-word vocabulary makes the logits the largest activation in training
(tokens x vocab, in fp32 for the softmax). This loss keeps only the hidden states of labelled
positions and runs lm_head + cross-entropy over them a chunk of rows at a time. Each chunk is
wrapped in ``torch.utils.checkpoint``, so backward recomputes that chunk's logits instead of
keeping them: peak extra memory is one chunk of logits, forward and backward.

The result is the same as transformers' ``ForCausalLMLoss`` on full logits: labels are aligned
with the inputs and shifted here, -100 is ignored, and the reduction is the mean over labelled
tokens, or the sum divided by ``num_items_in_batch`` when that is given.
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

DEFAULT_CHUNK_SIZE = 1024


def _chunk_cross_entropy_sum(project, rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = project(rows).float()
    return F.cross_entropy(logits, targets, reduction="sum")


def _uniform_chunk_count(num_chunks: int, weight: torch.Tensor) -> int:
    """Under DeepSpeed ZeRO-3 every call of lm_head all-gathers its weight across ranks, so every rank
    must make the same number of calls: take the largest chunk count of all ranks."""
    if not hasattr(weight, "ds_id") or not torch.distributed.is_initialized():
        return num_chunks
    count = torch.tensor(num_chunks, device=weight.device)
    torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX)
    return int(count.item())


def causal_lm_loss(
    hidden_states: torch.Tensor,
    lm_head: nn.Module | torch.Tensor,
    labels: torch.Tensor | None,
    num_items_in_batch: torch.Tensor | int | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    ignore_index: int = -100,
    shift_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy of `lm_head(hidden_states)` against the next-token labels, computed in chunks.

    hidden_states: (..., seq, hidden), already scaled the way the model feeds them to lm_head.
    lm_head: the output module (called as a module, so PEFT wrappers and DeepSpeed ZeRO-3 gather
        hooks apply), or a bare (vocab, hidden) weight matrix.
    labels: (..., seq) aligned with the inputs; position t is predicted from hidden state t-1.
    shift_labels: alternative to `labels`, already shifted (position t predicted from hidden state t).
    """
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    project = lm_head if isinstance(lm_head, nn.Module) else (lambda rows: F.linear(rows, lm_head))
    weight = lm_head if isinstance(lm_head, torch.Tensor) else getattr(lm_head, "weight", hidden_states)

    hidden_rows = hidden_states.reshape(-1, hidden_states.shape[-1])
    flat_labels = shift_labels.reshape(-1).to(hidden_rows.device)
    labelled = flat_labels != ignore_index
    rows = hidden_rows[labelled]
    targets = flat_labels[labelled]

    num_chunks = _uniform_chunk_count((rows.shape[0] + chunk_size - 1) // chunk_size, weight)
    # Starts as a zero tied to hidden_states, so a batch without labelled tokens still backpropagates.
    total = rows.sum() * 0.0
    for start in range(0, num_chunks * chunk_size, chunk_size):
        total = total + checkpoint(
            _chunk_cross_entropy_sum,
            project,
            rows[start : start + chunk_size],
            targets[start : start + chunk_size],
            use_reentrant=False,
        )

    if num_items_in_batch is None:
        return total / labelled.sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch
