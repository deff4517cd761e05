"""Generate replies for conversations and score them: shared by evaluation during training and inference.py.

- ``eval_samples`` turns conversations into (prompt messages, reference reply) pairs.
- ``generate_replies`` renders each prompt with the chat template (``add_generation_prompt=True``, the
  same ids training saw before each reply), generates in left-padded batches and stops at the
  end-of-turn token or eos. Under torch.distributed it splits the prompts across ranks and gathers
  the replies once, so every rank returns the full list.
"""

from __future__ import annotations

import json
import math

import torch

from .data import write_atomic
from .metrics import compute_metrics
from .templates import end_of_turn_token


def eval_samples(conversations, every_turn: bool = False) -> list[tuple[list[dict], str]]:
    """(prompt messages, reference) pairs: the conversation up to its last assistant turn and that reply,
    or, with ``every_turn``, one pair per assistant turn.

    ``conversations`` holds message lists or ``{"messages": [...]}`` records (a ``datasets.Dataset`` works).
    """
    samples = []
    for conversation in conversations:
        messages = conversation["messages"] if isinstance(conversation, dict) else conversation
        replies = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        for i in replies if every_turn else replies[-1:]:
            samples.append((list(messages[:i]), messages[i]["content"]))
    return samples


def stop_token_ids(tokenizer) -> list[int]:
    """Ids that end a reply: the template's end-of-turn token and eos (the same under the minicpm template)."""
    ids = [tokenizer.convert_tokens_to_ids(end_of_turn_token(tokenizer)), tokenizer.eos_token_id]
    # A token missing from the vocabulary converts to unk, which must not stop anything.
    return list(dict.fromkeys(i for i in ids if i is not None and i != tokenizer.unk_token_id))


def _rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _zero3_enabled() -> bool:
    from transformers.integrations import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled()


def generate_replies(model, tokenizer, prompts_messages: list[list[dict]], max_new_tokens: int = 128,
                     batch_size: int = 8, show_progress: bool = True, **gen_kwargs) -> list[str]:
    """The model's reply to each prompt (decoded new tokens, special tokens skipped, stripped), in order.

    Batches are left-padded so every row ends where generation starts. Prompts are sorted by length
    so a batch carries little padding. Under torch.distributed every rank must call this with the same
    prompts: each generates its share and all ranks return every reply. ``gen_kwargs`` go to
    ``model.generate`` (num_beams, do_sample, temperature, top_p, ...).
    """
    if not prompts_messages:
        return []
    rank, world = _rank_and_world()
    # This rank's share, padded with repeats so that every rank calls generate equally often:
    # under ZeRO-3 each forward is a collective (synced_gpus), and an uneven count would hang.
    share = list(range(rank, len(prompts_messages), world))
    padded = share + [share[0] if share else 0] * (math.ceil(len(prompts_messages) / world) - len(share))

    texts = [tokenizer.apply_chat_template(prompts_messages[i], tokenize=False, add_generation_prompt=True)
             for i in padded]
    # The rendered text carries bos itself; tokenize it as training does (data.encode).
    encoded = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    order = sorted(range(len(padded)), key=lambda j: -len(encoded[j]))  # longest first: OOM shows early

    stop_ids = stop_token_ids(tokenizer)
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
                    # Cut at the first stop token: what follows is padding of a finished row.
                    ends = [k for k, token in enumerate(new_tokens) if token in stop_ids]
                    new_tokens = new_tokens[:ends[0]] if ends else new_tokens
                    replies[j] = tokenizer.decode(new_tokens, skip_special_tokens=True).strip()
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
                        batch_size: int = 8, show_progress: bool = True, **gen_kwargs):
    """Generate a reply for each (prompt, reference) sample; return (predictions, metrics).

    metrics: ROUGE-1/2/L and BLEU-4 (``compute_metrics``, x100) plus ``num_samples``.
    """
    predictions = generate_replies(model, tokenizer, [prompt for prompt, _ in samples], max_new_tokens,
                                   batch_size, show_progress, **gen_kwargs)
    metrics = compute_metrics(predictions, [reference for _, reference in samples])
    metrics["num_samples"] = len(samples)
    return predictions, metrics


def generation_kwargs(num_beams: int = 1, do_sample: bool = False, temperature: float = 1.0,
                      top_p: float = 1.0) -> dict:
    """generate() options from the command-line flags; sampling knobs only when sampling (else transformers warns)."""
    kwargs = {"num_beams": num_beams, "do_sample": do_sample}
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p)
    return kwargs


# --------------------------------------------------------------------------- output files


def save_predictions(path: str, samples: list[tuple[list[dict], str | None]], predictions: list[str]) -> None:
    """One JSON line per sample: {"input": prompt messages, "reference": str or null, "prediction": str}."""
    lines = [json.dumps({"input": prompt, "reference": reference, "prediction": prediction}, ensure_ascii=False)
             for (prompt, reference), prediction in zip(samples, predictions)]
    write_atomic(path, "".join(line + "\n" for line in lines))


def save_metrics(path: str, metrics: dict) -> None:
    write_atomic(path, json.dumps(metrics, indent=2, ensure_ascii=False) + "\n")
