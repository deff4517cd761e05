"""The tokenized data set: checked conversations -> input_ids, labels and length in batches (``encoding.py``),
cached by datasets, with what the chat template cannot write refused per record before anything is lost.

A conversation whose template renders earlier turns differently once later turns follow (a hybrid-reasoning
template dropping their reasoning) becomes several samples (``rendering.ChatRenderer.render_samples``); the
summary counts them.
"""

from __future__ import annotations

import errno
import gc
import hashlib
import json
from dataclasses import dataclass

import numpy as np

from .checks import example_of
from .encoding import encoded_schema, get_encoder, tokenizer_fingerprint
from .rendering import TemplateError
from .sources import DataError, _location, _orjson, orjson_can_read

ENCODER_VERSION = "4"  # part of the tokenized cache key: bump when the ids or labels change


@dataclass
class EncodeStats:
    samples: int
    tokens: int
    learned_tokens: int
    truncated: int
    skipped: int
    lengths: object  # numpy array, before truncation, to help choose model_max_length
    refused: int = 0  # conversations the chat template raised on, dropped with skip_bad_samples
    split: int = 0  # conversations taught in several samples (their template renders earlier turns differently)
    added: int = 0  # the samples those splits added

    def summary(self, name: str) -> str:
        lengths = np.asarray(self.lengths) if len(self.lengths) else np.zeros(1)
        refused = f", {self.refused} refused by the chat template" if self.refused else ""
        split = (f"; {self.split} conversation(s) split into {self.split + self.added} samples (the chat template "
                 "renders their earlier turns differently once later turns follow, e.g. without their reasoning: "
                 "each reply is learned in the context inference gives it)") if self.split else ""
        return (f"{name}: {self.samples} samples, {self.tokens} tokens, {self.learned_tokens} learned; "
                f"{self.truncated} truncated, {self.skipped} skipped (nothing left to learn){refused}{split}; "
                f"length before truncation min/median/p95/max = {int(lengths.min())}/{int(np.median(lengths))}/"
                f"{int(np.percentile(lengths, 95))}/{int(lengths.max())}")


def _load_example(text: str) -> dict:
    """A checked example back from its JSON text; json where orjson would change a value (an integer beyond
    64 bits), so values reach the template as written."""
    if _orjson is not None and orjson_can_read(text):
        return _orjson.loads(text)
    return json.loads(text)


def _where(source: str | None, position) -> str:
    return _location(source, position) if source and position is not None else source or "the data"


def unwritable(example: dict, encoder) -> str | None:
    """What of this conversation the chat template would not write (lost without a word), or None."""
    messages = example["messages"]
    if not encoder.renders_names:
        named = next((i for i, m in enumerate(messages, 1) if "name" in m), None)
        if named is not None:
            return (f'message {named} has a "name", but the chat template does not render names (its text would be '
                    "lost); drop it, or use a template that renders it")
    if not encoder.renders_reasoning:
        reasoned = next((i for i, m in enumerate(messages, 1) if "reasoning_content" in m), None)
        if reasoned is not None:
            return (f"message {reasoned} has reasoning, but the chat template does not render reasoning (its text "
                    "would be lost); use the model's own template or --chat_template minicpm5")
    if "enable_thinking" in example and not encoder.reads_enable_thinking:
        return '"enable_thinking" is set, but the chat template does not read it (it would change nothing)'
    return None


def _encode_rows(batch, encoder, max_length, source, skip_bad_samples=False, enable_thinking=None):
    """One batch as an Arrow table (built by the encoder in numpy), which datasets then writes as is. What the
    template would not write is one line naming the record; a conversation the template raises on (a user
    template's raise_exception, a reply it cannot place) too, or with ``skip_bad_samples`` it is dropped (said,
    and counted by tokenize_dataset)."""
    import jinja2

    # A batch allocates tens of thousands of small objects and no reference cycles: the cyclic collector
    # would only scan them again and again.
    collecting = gc.isenabled()
    gc.disable()
    try:  # every exit, a refused record's too, turns the collector back on
        examples = [_load_example(text) for text in batch["example"]]
        positions = batch["position"] if "position" in batch else [None] * len(examples)
        for example, position in zip(examples, positions):
            problem = unwritable(example, encoder)
            if problem:
                raise TemplateError(f"{_where(source, position)}: {problem}")
        try:
            return encoder.encode_batch(examples, max_length, enable_thinking)
        except (jinja2.TemplateError, TemplateError):
            kept = []
            for example, position in zip(examples, positions):
                try:
                    encoder.render_samples(example["messages"], example.get("tools"),
                                           example.get("enable_thinking", enable_thinking))
                except (jinja2.TemplateError, TemplateError) as e:
                    problem = f"{_where(source, position)}: the chat template raised on this conversation: {e}"
                    if not skip_bad_samples:
                        raise TemplateError(problem) from None
                    print(f"warning: skipping {problem}")
                    continue
                kept.append(example)
            return encoder.encode_batch(kept, max_length, enable_thinking)
    finally:
        if collecting:
            gc.enable()


def tokenize_dataset(conversations, tokenizer, max_length: int | None, num_proc: int | None = None,
                     source: str | None = None, skip_bad_samples: bool = False, enable_thinking: bool | None = None):
    """Map loaded conversations to input_ids/labels in batches (cached), drop unlearnable samples.

    ``enable_thinking``: passed to the chat template for the conversations that do not set their own (None: the
    template's default). The cache key is the data's fingerprint, the tokenizer (vocabulary, special tokens, chat
    template), ``max_length`` and ``enable_thinking``. Returns (dataset with input_ids, labels, length) and
    EncodeStats.
    """
    import datasets
    import pyarrow.compute as pc

    encoder = get_encoder(tokenizer)
    if enable_thinking is not None and not encoder.reads_enable_thinking:
        raise TemplateError(f"--enable_thinking {str(enable_thinking).lower()}: the chat template does not read "
                            "enable_thinking (it would change nothing); leave it unset, or use a hybrid-reasoning "
                            "template (the model's own, or --chat_template minicpm5)")
    if "tools" in conversations.column_names and not encoder.renders_tools:
        with_tools = int(pc.sum(conversations.data.column("tools")).as_py() or 0)
        if with_tools:
            raise TemplateError(f"{source or 'the data'}: {with_tools} conversation(s) have tools or tool calls, "
                                "but the chat template cannot render them; use --chat_template chatml "
                                "(MiniCPM3's function-calling format) or a template that takes tools")
    if "example" not in conversations.column_names:  # message lists (e.g. built in code)
        conversations = conversations.map(lambda row: {"example": json.dumps(example_of(row), ensure_ascii=False)},
                                          remove_columns=conversations.column_names)
    key = json.dumps([conversations._fingerprint, tokenizer_fingerprint(tokenizer), max_length, ENCODER_VERSION,
                      skip_bad_samples, enable_thinking])
    try:
        encoded = conversations.map(_encode_rows, batched=True, remove_columns=conversations.column_names,
                                    fn_kwargs={"encoder": encoder, "max_length": max_length, "source": source,
                                               "skip_bad_samples": skip_bad_samples,
                                               "enable_thinking": enable_thinking},
                                    features=datasets.Features.from_arrow_schema(encoded_schema()),
                                    num_proc=num_proc if num_proc and num_proc > 1 else None, desc="Tokenizing",
                                    new_fingerprint=hashlib.sha256(key.encode()).hexdigest()[:32])
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS):
            raise
        raise DataError(f"{source or 'the data'}: cannot write the tokenized data into the datasets cache "
                        f"{datasets.config.HF_DATASETS_CACHE} ({e.strerror}); free some space there, or set "
                        "HF_DATASETS_CACHE to another disk") from None
    table = encoded.data
    learned = table.column("num_learned").to_numpy()
    parts = table.column("part").to_numpy()
    keep = learned > 0
    stats = EncodeStats(
        samples=int(keep.sum()),
        tokens=int(table.column("length").to_numpy()[keep].sum()),
        learned_tokens=int(learned.sum()),
        truncated=int(pc.sum(table.column("truncated")).as_py() or 0),
        skipped=int((~keep).sum()),
        lengths=table.column("full_length").to_numpy(),
        refused=len(conversations) - int((parts == 0).sum()),
        split=int((parts == 1).sum()),
        added=int((parts > 0).sum()),
    )
    if not keep.all():
        encoded = encoded.select(np.flatnonzero(keep))
    return encoded.select_columns(["input_ids", "labels", "length"]), stats
