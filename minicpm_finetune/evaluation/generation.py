"""Batched and distributed generation, and scoring it: shared by evaluation during training (``trainer.py``) and
inference.py. Prompts and replies are made and read by ``prompts.py``.

- ``generate_replies`` feeds each prompt's ids (``prompts.prompt_ids``), generates in left-padded batches and
  stops at the end-of-turn token or eos. Under torch.distributed it splits the prompts across ranks and gathers
  the replies once, so every rank returns the full list. With ``stream`` it writes the reply of a single
  prompt as it is generated (``prompts.ReplyStreamer``), ending with exactly the text it returns.
- ``evaluate_generation`` generates for (prompt, reference) samples and scores the replies (``metrics.py``).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from .metrics import DEFAULT_METRICS, compute_metrics
from .prompts import ReplyStreamer, answer_of, decode_reply, prompt_ids, stop_token_ids


def _rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _zero3_enabled() -> bool:
    from transformers.integrations import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled()


def generate_replies(model, tokenizer, prompts_messages: list[list[dict]], max_new_tokens: int = 128,
                     batch_size: int = 8, show_progress: bool = True, stream: Callable[[str], None] | None = None,
                     **gen_kwargs) -> list[str]:
    """The model's reply to each prompt (decoded new tokens, special tokens skipped, stripped), in order.

    Batches are left-padded so every row ends where generation starts. Prompts are sorted by length
    so a batch carries little padding. Under torch.distributed every rank must call this with the same
    prompts: each generates its share and all ranks return every reply. ``gen_kwargs`` go to
    ``model.generate`` (num_beams, do_sample, temperature, top_p, ...). ``stream`` (one prompt, one process,
    no beam search) is called with each new piece of the reply; the pieces join to the returned reply.
    Prompts are not trimmed here: ``fit_prompt`` them first where they may be too long.
    """
    if not prompts_messages:
        return []
    rank, world = _rank_and_world()
    if stream is not None and (len(prompts_messages) != 1 or world != 1):
        raise ValueError("streaming needs exactly one prompt and one process")
    # This rank's share, padded with repeats so that every rank calls generate equally often:
    # under ZeRO-3 each forward is a collective (synced_gpus), and an uneven count would hang.
    share = list(range(rank, len(prompts_messages), world))
    padded = share + [share[0] if share else 0] * (math.ceil(len(prompts_messages) / world) - len(share))

    encoded = [prompt_ids(tokenizer, prompts_messages[i]) for i in padded]
    order = sorted(range(len(padded)), key=lambda j: -len(encoded[j]))  # longest first: OOM shows early

    stop_ids = stop_token_ids(tokenizer)
    if stream is not None:
        gen_kwargs["streamer"] = ReplyStreamer(tokenizer, stop_ids, stream)
    gen_kwargs.setdefault("synced_gpus", _zero3_enabled() and world > 1)
    device = next(model.parameters()).device
    padding_side, was_training = tokenizer.padding_side, model.training
    use_cache = getattr(model.config, "use_cache", None)
    tokenizer.padding_side = "left"
    model.config.use_cache = True  # training turns the KV cache off; generation needs it
    model.eval()
    replies = [""] * len(padded)
    try:
        from tqdm.auto import tqdm

        with tqdm(total=len(padded), desc="Generating", unit="sample", leave=False,
                  disable=not show_progress or rank != 0) as bar, torch.no_grad():
            for start in range(0, len(order), batch_size):
                rows = order[start:start + batch_size]
                batch = tokenizer.pad({"input_ids": [encoded[j] for j in rows]}, return_tensors="pt").to(device)
                output = model.generate(**batch, max_new_tokens=max_new_tokens, eos_token_id=stop_ids,
                                        pad_token_id=tokenizer.pad_token_id, **gen_kwargs)
                for j, new_tokens in zip(rows, output[:, batch["input_ids"].shape[1]:].tolist()):
                    replies[j] = decode_reply(tokenizer, new_tokens, stop_ids)
                bar.update(len(rows))
    finally:
        tokenizer.padding_side = padding_side
        if use_cache is not None:
            model.config.use_cache = use_cache
        model.train(was_training)

    mine = list(zip(share, replies[:len(share)]))  # drop the padding repeats
    if world > 1:
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, mine)  # once per evaluation, not per batch
        mine = [pair for part in gathered for pair in part]
    result = dict(mine)
    return [result[i] for i in range(len(prompts_messages))]


def evaluate_generation(model, tokenizer, samples: list[tuple[list[dict], str]], max_new_tokens: int = 128,
                        batch_size: int = 8, show_progress: bool = True, metrics=DEFAULT_METRICS, **gen_kwargs):
    """Generate a reply for each (prompt, reference) sample; return (predictions, metrics). A reply is scored
    without its reasoning (``answer_of``).

    metrics: those named in ``metrics`` (``compute_metrics``, x100: ROUGE-1/2/L and BLEU-4 by default,
    or accuracy) plus ``num_samples``.
    """
    predictions = generate_replies(model, tokenizer, [prompt for prompt, _ in samples], max_new_tokens,
                                   batch_size, show_progress, **gen_kwargs)
    metrics = compute_metrics([answer_of(p) for p in predictions], [reference for _, reference in samples], metrics)
    metrics["num_samples"] = len(samples)
    return predictions, metrics


def generation_kwargs(num_beams: int = 1, do_sample: bool = False, temperature: float = 1.0,
                      top_p: float = 1.0) -> dict:
    """generate() options from the command-line flags; sampling knobs only when sampling (else transformers warns)."""
    kwargs = {"num_beams": num_beams, "do_sample": do_sample}
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p)
    return kwargs
