"""Causal-LM cross-entropy that never holds full-vocabulary logits for every token.

MiniCPM-2B's 122,753-word vocabulary makes the logits the largest activation in training
(tokens x vocab, in fp32 for the softmax). This loss keeps only the hidden states of labelled
positions and runs lm_head + cross-entropy over them a chunk of rows at a time, so peak extra memory
is one chunk of logits. Two ways, same result:

- fused (a plain, unhooked ``nn.Linear`` head or a bare weight): each chunk's gradients are computed
  right after its loss, in the forward pass (as Liger's fused linear cross-entropy does), so backward
  does not compute the chunk's logits a second time; and the chunk is computed transposed,
  ``weight @ rows.T`` with rows padded to a multiple of 8, because a ``[rows, 122753]`` result has a row
  stride that is not 16-byte aligned and cuBLAS then falls back to slow kernels (H200 profile);
- checkpointed (any other head: PEFT-wrapped, or partitioned by DeepSpeed ZeRO-3, whose hooks must
  run): lm_head is called as a module inside ``torch.utils.checkpoint``, and backward recomputes it.

The result is the same as transformers' ``ForCausalLMLoss`` on full logits: labels are aligned
with the inputs and shifted here, -100 is ignored, and the reduction is the mean over labelled
tokens, or the sum divided by ``num_items_in_batch`` when that is given.
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

DEFAULT_CHUNK_SIZE = 1024
ALIGN_ROWS = 8  # 8 bf16/fp16 values = 16 bytes, the alignment tensor-core GEMMs want


class FusedLinearCrossEntropy(torch.autograd.Function):
    """Sum over rows of cross_entropy(rows @ weight.T, targets), a chunk at a time, with the gradients
    made in forward and only scaled by backward. Rows whose target is `ignore_index` add nothing."""

    @staticmethod
    def forward(ctx, rows, weight, targets, chunk_size, ignore_index):
        want_rows_grad, want_weight_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_rows = torch.empty_like(rows) if want_rows_grad else None
        # Accumulated in the weight's dtype, as autograd accumulates the per-chunk gradients of the plain path.
        grad_weight = torch.zeros_like(weight) if want_weight_grad else None
        total = torch.zeros((), dtype=torch.float32, device=rows.device)
        for start in range(0, rows.shape[0], chunk_size):
            chunk, chunk_targets = rows[start : start + chunk_size], targets[start : start + chunk_size]
            count = chunk.shape[0]
            pad = -count % ALIGN_ROWS
            if pad:
                chunk = F.pad(chunk, (0, 0, 0, pad))
                chunk_targets = F.pad(chunk_targets, (0, pad), value=ignore_index)
            logits = (weight @ chunk.T).float()  # (vocab, rows): every operand and the result aligned
            valid = chunk_targets != ignore_index
            safe_targets = chunk_targets.masked_fill(~valid, 0)[None]
            log_normalizer = torch.logsumexp(logits, dim=0)
            total += ((log_normalizer - logits.gather(0, safe_targets)[0]) * valid).sum()
            if not (want_rows_grad or want_weight_grad):
                continue
            # d(sum of cross-entropies) / d logits = softmax - one_hot(target), zero for ignored rows.
            grad_logits = logits.sub_(log_normalizer).exp_()
            grad_logits.scatter_add_(0, safe_targets, -valid[None].to(grad_logits.dtype))
            grad_logits = grad_logits.mul_(valid).to(weight.dtype)
            if want_rows_grad:
                grad_rows[start : start + count] = (grad_logits.T @ weight)[:count]
            if want_weight_grad:
                torch.addmm(grad_weight, grad_logits, chunk, out=grad_weight)
        ctx.save_for_backward(grad_rows, grad_weight)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_rows, grad_weight = ctx.saved_tensors
        scale = lambda grad: None if grad is None else grad * grad_total.to(grad.dtype)  # noqa: E731
        return scale(grad_rows), scale(grad_weight), None, None, None


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


def fusable_weight(lm_head: nn.Module | torch.Tensor) -> torch.Tensor | None:
    """The weight to multiply directly, or None when lm_head must be called as a module (a PEFT
    wrapper, a bias, hooks such as DeepSpeed ZeRO-3's gather, or a partitioned weight)."""
    if isinstance(lm_head, torch.Tensor):
        return lm_head
    plain = type(lm_head) is nn.Linear and lm_head.bias is None
    if not plain or lm_head._forward_hooks or lm_head._forward_pre_hooks or hasattr(lm_head.weight, "ds_id"):
        return None
    return lm_head.weight


def causal_lm_loss(
    hidden_states: torch.Tensor,
    lm_head: nn.Module | torch.Tensor,
    labels: torch.Tensor | None,
    num_items_in_batch: torch.Tensor | int | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    ignore_index: int = -100,
    shift_labels: torch.Tensor | None = None,
    fused: bool = True,
) -> torch.Tensor:
    """Cross-entropy of `lm_head(hidden_states)` against the next-token labels, computed in chunks.

    hidden_states: (..., seq, hidden), already scaled the way the model feeds them to lm_head.
    lm_head: the output module, or a bare (vocab, hidden) weight matrix.
    labels: (..., seq) aligned with the inputs; position t is predicted from hidden state t-1.
    shift_labels: alternative to `labels`, already shifted (position t predicted from hidden state t).
    fused: gradients in forward when lm_head allows it (see the module docstring); False forces the
        checkpointed path.
    """
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    hidden_rows = hidden_states.reshape(-1, hidden_states.shape[-1])
    flat_labels = shift_labels.reshape(-1).to(hidden_rows.device)
    labelled = flat_labels != ignore_index
    rows = hidden_rows[labelled]
    targets = flat_labels[labelled]

    weight = fusable_weight(lm_head) if fused else None
    if weight is not None:
        if not torch.is_grad_enabled():  # evaluation: the loss only, no gradients made in forward
            rows, weight = rows.detach(), weight.detach()
        # rows.sum() * 0.0 keeps a batch without labelled tokens connected to the graph.
        total = FusedLinearCrossEntropy.apply(rows, weight, targets, chunk_size, ignore_index) + rows.sum() * 0.0
    else:
        project = lm_head if isinstance(lm_head, nn.Module) else (lambda chunk: F.linear(chunk, lm_head))
        head_weight = getattr(lm_head, "weight", hidden_states) if isinstance(lm_head, nn.Module) else lm_head
        num_chunks = _uniform_chunk_count((rows.shape[0] + chunk_size - 1) // chunk_size, head_weight)
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
