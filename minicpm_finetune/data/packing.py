"""Padding-free training: pack tokenized samples into rows of up to ``model_max_length`` tokens.

``pack_dataset`` groups the samples of a tokenized dataset (``input_ids``, ``labels``, ``length``
from ``data.tokenize_dataset``) into rows with first-fit decreasing: deterministic, and rows come
out nearly full (AdvertiseGen's ~150-token samples fill rows of 512 to about 95%). Each row holds
the samples' tokens back to back, with

- ``position_ids`` that restart at 0 for every sample, so attention stays inside each sample:
  with ``attention_mask=None`` transformers builds a block-diagonal causal mask from them
  (``masking_utils.find_packed_sequence_indices``, SDPA and eager), and flash attention runs
  varlen over the samples when the batch is flattened to one row (``PackingCollator(flatten=True)``);
- ``labels`` with the first token of every sample set to -100: the model predicts position t from
  position t-1, and the first token of a sample must not be learned from the previous sample's last
  token. (data.py already masks BOS and prompt tokens, so this changes nothing for its samples; it
  guarantees that no label ever crosses a sample boundary.)

The loss over a batch of packed rows is the mean over the same learned tokens as without packing,
so it equals the padded loss for the same samples (tests/data/test_packing.py checks loss and gradients).

Keep rows short under SDPA/eager: the block mask is dense per row (row_length^2), so a 16k-token row
was 3-4x slower than rows of 512 (measured on an H200, MiniCPM-2B shape). ``model_max_length`` 512-2048
is the sensible range.
"""

from __future__ import annotations

import numpy as np

from .encoding import IGNORE_INDEX


def first_fit_decreasing(lengths, capacity: int) -> list[list[int]]:
    """Bins of sample indices, each bin's lengths summing to at most ``capacity``.

    Longest first (ties by index), each into the first bin with room; a segment tree over the bins'
    free space finds that bin in O(log n), so 100k samples pack in about a second.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and lengths.max() > capacity:
        raise ValueError(f"a sample of {int(lengths.max())} tokens does not fit in rows of {capacity}")
    order = np.argsort(-lengths, kind="stable")
    size = 1
    while size < max(len(lengths), 1):
        size *= 2
    free = [0] * (2 * size)  # free[size + b] = free space of bin b; inner nodes hold the max of their children
    for leaf in range(size, 2 * size):
        free[leaf] = capacity
    for node in range(size - 1, 0, -1):
        free[node] = capacity
    bins: list[list[int]] = []
    for index in order.tolist():
        need = int(lengths[index])
        node = 1
        while node < size:  # descend to the leftmost bin with enough room
            node = 2 * node if free[2 * node] >= need else 2 * node + 1
        b = node - size
        if b == len(bins):
            bins.append([])
        bins[b].append(index)
        free[node] -= need
        node //= 2
        while node:
            free[node] = max(free[2 * node], free[2 * node + 1])
            node //= 2
    return bins


def pack_dataset(dataset, max_length: int):
    """A ``datasets.Dataset`` of packed rows (``input_ids``, ``labels``, ``position_ids``, ``length``).

    ``dataset`` is the output of ``data.tokenize_dataset`` (samples already cut to ``max_length``).
    Rows are built with Arrow and numpy, not per token in Python.
    """
    import datasets
    import pyarrow as pa

    table = dataset.with_format("arrow")[:]  # a pyarrow Table of the selected rows
    lengths = np.asarray(table.column("length").to_numpy(), dtype=np.int64)
    bins = first_fit_decreasing(lengths, max_length)
    order = np.fromiter((i for b in bins for i in b), dtype=np.int64, count=len(lengths))

    def flat_values(name):
        column = table.column(name).combine_chunks().take(pa.array(order))
        return column.flatten().to_numpy(zero_copy_only=False).astype(np.int64, copy=False)

    input_ids, labels = flat_values("input_ids"), flat_values("labels").copy()
    sample_lengths = lengths[order]
    sample_starts = np.concatenate([[0], np.cumsum(sample_lengths)[:-1]])
    labels[sample_starts] = IGNORE_INDEX  # no sample learns its first token from the previous sample
    position_ids = np.arange(len(input_ids), dtype=np.int64) - np.repeat(sample_starts, sample_lengths)

    row_lengths = np.fromiter((lengths[b].sum() for b in bins), dtype=np.int64, count=len(bins))
    offsets = pa.array(np.concatenate([[0], np.cumsum(row_lengths)]).astype(np.int32))

    def rows(values):
        return pa.ListArray.from_arrays(offsets, pa.array(values))

    packed = pa.table({"input_ids": rows(input_ids), "labels": rows(labels),
                       "position_ids": rows(position_ids), "length": pa.array(row_lengths)})
    return datasets.Dataset(packed)


def packing_summary(dataset, packed, max_length: int) -> str:
    """One line: how many samples went into how many rows, and how full the rows are."""
    tokens = int(np.sum(packed["length"])) if len(packed) else 0
    fill = tokens / max(1, len(packed) * max_length)
    return (f"packing: {len(dataset)} samples -> {len(packed)} rows of up to {max_length} tokens "
            f"({fill:.1%} full)")


class PackingCollator:
    """Collate packed rows into a batch without an attention mask; anything else is padded as usual.

    Packed rows (features with ``position_ids``) become ``input_ids``/``labels``/``position_ids`` of shape
    (rows, longest row). A shorter row is filled with pad tokens that form one more "sample" of their own
    (positions 0, 1, ...; labels -100), so no attention mask is needed and no real token sees them.
    With ``flatten=True`` the rows are concatenated into a single row instead (shape (1, tokens)), which
    is what flash attention's varlen path reads from ``position_ids``; use it with flash_attention_2/3
    only, since SDPA/eager would build one dense mask over the whole batch.

    ``pad_to_multiple_of`` (64) rounds the batch width up: with a width that changed every batch, the
    full-vocabulary logits of a stock loss went through the CUDA caching allocator at 4.4k tokens/s against
    14.2k with widths rounded to 64 (MiniCPM-2B, LoRA, 8 rows of 512, H200).

    Features without ``position_ids`` (an unpacked validation set) go to ``fallback``, by default
    ``DataCollatorForSeq2Seq(padding="longest")`` when a tokenizer is given.
    """

    def __init__(self, tokenizer=None, pad_token_id: int | None = None, flatten: bool = False, fallback=None,
                 pad_to_multiple_of: int | None = 64):
        if pad_token_id is None:
            if tokenizer is None:
                raise ValueError("PackingCollator needs a tokenizer or a pad_token_id")
            pad_token_id = tokenizer.pad_token_id
        self.pad_token_id = pad_token_id
        self.flatten = flatten
        self.pad_to_multiple_of = pad_to_multiple_of
        if fallback is None and tokenizer is not None:
            from transformers import DataCollatorForSeq2Seq

            fallback = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=IGNORE_INDEX)
        self.fallback = fallback

    def __call__(self, features):
        import torch

        if "position_ids" not in features[0]:
            if self.fallback is None:
                raise ValueError("PackingCollator got unpacked samples and has no fallback collator")
            return self.fallback(features)
        keys = ("input_ids", "labels", "position_ids")
        rows = [{k: np.asarray(f[k], dtype=np.int64) for k in keys} for f in features]
        if self.flatten:
            batch = {k: np.concatenate([r[k] for r in rows])[None] for k in keys}
        else:
            width = max(len(r["input_ids"]) for r in rows)
            if self.pad_to_multiple_of:
                width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
            batch = {"input_ids": np.full((len(rows), width), self.pad_token_id, dtype=np.int64),
                     "labels": np.full((len(rows), width), IGNORE_INDEX, dtype=np.int64),
                     "position_ids": np.tile(np.arange(width, dtype=np.int64), (len(rows), 1))}
            for i, r in enumerate(rows):
                n = len(r["input_ids"])
                for k in keys:
                    batch[k][i, :n] = r[k]
                batch["position_ids"][i, n:] -= n  # the padding restarts at 0: a separate block
        return {k: torch.from_numpy(v) for k, v in batch.items()}
