"""Conversations -> input_ids and labels: render (``rendering.py``), tokenize in batches, mask; the tokenized
data set, cached.

One encoder (``ChatEncoder``) serves training and inference (``prompts.prompt_ids``), so the ids
before each reply are exactly the ids inference feeds the model for the same messages.

Masking: a token is learned when it lies inside an assistant turn (from the end of the generation
prompt) up to and including the end-of-turn token after it. Over ``max_length`` the sample is cut,
and a reply that loses its end is masked out whole.

Special-looking text. Message content that holds a special token's text (``</s>``, ``<|im_end|>``,
HTML's ``<s>299元</s>``) is tokenized as text: the rendered text is cut only at the template's own
special tokens and the pieces between are tokenized with special-token matching off. A conversation
without such text tokenizes exactly as the whole rendered text does (the encoder checks this on probes).
"""

from __future__ import annotations

import errno
import gc
import hashlib
import json
import re
from dataclasses import dataclass
from itertools import chain

import numpy as np

from ..cli import ArgumentError
from .checks import example_of
from .rendering import ChatRenderer, Rendered, TemplateError, _verification_conversations
from .sources import DataError, _location, _orjson, orjson_can_read

IGNORE_INDEX = -100
ENCODER_VERSION = "3"  # part of the tokenized cache key: bump when the ids or labels change


class ChatEncoder(ChatRenderer):
    """Renders (``ChatRenderer``) and tokenizes conversations; masks what is not learned."""

    def __init__(self, tokenizer):
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise ArgumentError("the data path needs a fast tokenizer (tokenizer.json or a convertible "
                                "SentencePiece model)")
        super().__init__(tokenizer)
        self._backend = backend
        # Only special tokens (control tokens) are the template's markers; other added tokens ("\n" in
        # MiniCPM-2B's vocabulary) are split out of any text anyway.
        self._special_ids = {t.content: i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        tokens = sorted(self._special_ids, key=len, reverse=True)
        self._special = re.compile("|".join(map(re.escape, tokens))) if tokens else None
        self._rest_pre_tokenizer = self._no_first_prepend(backend)
        self._can_protect = None  # checked on the first conversation that needs it

    @staticmethod
    def _no_first_prepend(backend):
        """For a piece after a special token: SentencePiece's "first" prepend scheme adds "▁" only at offset 0
        of the whole text, so a piece tokenized on its own must not get it. None: no change needed."""
        if backend.pre_tokenizer is None:
            return None
        spec = json.loads(backend.pre_tokenizer.__getstate__())
        changed = [False]

        def rewrite(node):
            if isinstance(node, dict):
                if node.get("type") == "Metaspace" and node.get("prepend_scheme") == "first":
                    node["prepend_scheme"] = "never"
                    changed[0] = True
                for value in node.values():
                    rewrite(value)
            elif isinstance(node, list):
                for value in node:
                    rewrite(value)

        rewrite(spec)
        return _pre_tokenizer_from_spec(spec) if changed[0] else None

    def _encode_as_text(self, text: str, first: bool):
        """Special-token text read as text (the backend's encode_special_tokens), one piece."""
        backend = self._backend
        saved_pre = backend.pre_tokenizer
        backend.encode_special_tokens = True
        if not first and self._rest_pre_tokenizer is not None:
            backend.pre_tokenizer = self._rest_pre_tokenizer
        try:
            return backend.encode(text, add_special_tokens=False)
        finally:
            backend.encode_special_tokens = False
            backend.pre_tokenizer = saved_pre

    def needs_protection(self, rendered: Rendered) -> bool:
        """Whether some content holds a special token's text."""
        if self._special is None:
            return False
        text = rendered.text
        return any(self._special.search(text, begin, end) for begin, end in rendered.contents)

    def encode_protected(self, rendered: Rendered) -> tuple[list[int], list[tuple[int, int]]]:
        """ids and offsets with special tokens matched only outside the content spans."""
        text, contents = rendered.text, rendered.contents
        markers = [m for m in self._special.finditer(text)
                   if not any(b < m.end() and m.start() < e for b, e in contents)] if self._special else []
        ids, offsets, pos = [], [], 0
        for marker in markers + [None]:
            stop = marker.start() if marker else len(text)
            if stop > pos:
                encoding = self._encode_as_text(text[pos:stop], first=pos == 0)
                ids += encoding.ids
                offsets += [(s + pos, e + pos) for s, e in encoding.offsets]
            if marker:
                ids.append(self._special_ids[marker.group()])
                offsets.append(marker.span())
                pos = marker.end()
        return ids, offsets

    @property
    def can_protect(self) -> bool:
        """Whether protected encoding gives the plain ids on text without special-looking content."""
        if self._can_protect is None:
            self._can_protect = True
            try:
                for messages, prompt in _verification_conversations():
                    rendered = self.render(messages, generation_prompt=prompt)
                    if self.encode_protected(rendered)[0] != self._encode([rendered.text])[0].ids:
                        self._can_protect = False
            except Exception:  # noqa: BLE001
                self._can_protect = False
        return self._can_protect

    def _encode(self, texts: list[str]):
        backend = self._backend
        if backend.truncation is not None or backend.padding is not None:  # left by another call
            backend.no_truncation()
            backend.no_padding()
        return backend.encode_batch(texts, add_special_tokens=False)

    def token_ids(self, rendered: Rendered) -> list[int]:
        """The ids of a rendered text (inference's prompt ids)."""
        if self.needs_protection(rendered) and self.can_protect:
            return self.encode_protected(rendered)[0]
        return self._encode([rendered.text])[0].ids

    def prompt_ids(self, messages: list[dict], tools=None) -> list[int]:
        return self.token_ids(self.render(messages, tools, generation_prompt=True))

    def encode_batch(self, examples: list[dict], max_length: int | None):
        """An Arrow table (encoded_schema()) with columns input_ids, labels, length, full_length, num_learned,
        truncated, cut_replies. Per sample only the reply spans are found in Python; the id and label
        columns are built in numpy (a nested list -> Arrow conversion costs more than the masking)."""
        import pyarrow as pa

        rendered = [self.render(e["messages"], e.get("tools")) for e in examples]
        encodings = self._encode([r.text for r in rendered])
        # One search over all contents of the batch: most batches have no special-looking text at all.
        special = self._special is not None and self._special.search(
            "\n".join([r.text[b:e] for r in rendered for b, e in r.contents])) is not None
        ids_of, full_length, num_learned, cut_replies, learned_spans = [], [], [], [], []
        for i, (r, encoding) in enumerate(zip(rendered, encodings)):
            if special and self.needs_protection(r) and self.can_protect:
                ids, offsets = self.encode_protected(r)
                ranges = [_range_from_offsets(offsets, b, e) for b, e in r.replies]
            else:
                ids = encoding.ids
                ranges = [_range_from_encoding(encoding, len(ids), b, e) for b, e in r.replies]
            cut = learned = 0
            for span in ranges:
                if span is None:
                    continue
                first, stop = span
                if max_length is not None and stop > max_length:
                    cut += 1
                    continue
                learned_spans.append((i, first, stop))
                learned += stop - first
            full_length.append(len(ids))
            ids_of.append(ids if max_length is None or len(ids) <= max_length else ids[:max_length])
            num_learned.append(learned)
            cut_replies.append(cut)
        full_length = np.array(full_length, np.int32)
        length = np.minimum(full_length, max_length) if max_length is not None else full_length
        offsets = np.zeros(len(length) + 1, np.int32)
        np.cumsum(length, out=offsets[1:])
        ids = np.fromiter(chain.from_iterable(ids_of), np.int32, int(offsets[-1]))
        # Learned tokens: +1 where a span starts, -1 where it ends; the running sum is > 0 inside spans.
        learned = np.zeros(len(ids) + 1, np.int32)
        if learned_spans:
            sample, first, stop = np.array(learned_spans, np.int64).T
            np.add.at(learned, offsets[sample] + first, 1)
            np.add.at(learned, offsets[sample] + stop, -1)
        labels = np.where(np.cumsum(learned[:-1]) > 0, ids, np.int32(IGNORE_INDEX))
        arrow_offsets = pa.array(offsets)
        return pa.table([pa.ListArray.from_arrays(arrow_offsets, pa.array(ids)),
                         pa.ListArray.from_arrays(arrow_offsets, pa.array(labels)),
                         pa.array(length), pa.array(full_length), pa.array(np.array(num_learned, np.int32)),
                         pa.array(full_length > length), pa.array(np.array(cut_replies, np.int32))],
                        schema=encoded_schema())


def encoded_schema():
    """The columns encode_batch gives (and the tokenized data set holds)."""
    import pyarrow as pa

    return pa.schema([("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32())),
                      ("length", pa.int32()), ("full_length", pa.int32()), ("num_learned", pa.int32()),
                      ("truncated", pa.bool_()), ("cut_replies", pa.int32())])


def _pre_tokenizer_from_spec(spec: dict):
    """A tokenizers PreTokenizer built from its JSON description."""
    from tokenizers import Tokenizer, models

    holder = json.loads(Tokenizer(models.BPE()).to_str())
    holder["pre_tokenizer"] = spec
    return Tokenizer.from_str(json.dumps(holder)).pre_tokenizer


def _range_from_encoding(encoding, n: int, begin: int, end: int):
    """[first, stop) of the tokens lying wholly inside the characters [begin, end)."""
    first = None
    for c in range(begin, end):
        first = encoding.char_to_token(c)
        if first is not None:
            break
    if first is None:
        return None
    if encoding.token_to_chars(first)[0] < begin:
        first += 1
    last = None
    for c in range(end - 1, begin - 1, -1):
        last = encoding.char_to_token(c)
        if last is not None:
            break
    if encoding.token_to_chars(last)[1] > end:
        last -= 1
    while last + 1 < n and encoding.token_to_chars(last + 1)[1] <= end:  # byte pieces of one character
        last += 1
    return (first, last + 1) if last >= first else None


def _range_from_offsets(offsets, begin: int, end: int):
    inside = [i for i, (s, e) in enumerate(offsets) if s >= begin and e <= end and e > s]
    return (inside[0], inside[-1] + 1) if inside else None


_ENCODERS: dict = {}


def get_encoder(tokenizer) -> ChatEncoder:
    """The encoder for this tokenizer and its current chat template (built once: probing renders templates)."""
    key = id(tokenizer)
    cached = _ENCODERS.get(key)
    if cached is None or cached[0] is not tokenizer or cached[1] != tokenizer.chat_template:
        cached = (tokenizer, tokenizer.chat_template, ChatEncoder(tokenizer))
        if len(_ENCODERS) > 8:
            _ENCODERS.clear()
        _ENCODERS[key] = cached
    return cached[2]


def tokenizer_fingerprint(tokenizer) -> str:
    """What the tokenized cache depends on: vocabulary, merges, special tokens and the chat template."""
    digest = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode("utf-8"))
    digest.update(json.dumps([tokenizer.chat_template, str(tokenizer.special_tokens_map)],
                             ensure_ascii=False).encode("utf-8"))
    return digest.hexdigest()[:32]


# --------------------------------------------------------------------------- the tokenized data set



def encode(tokenizer, messages: list[dict], end_of_turn: str | None = None, max_length: int | None = None,
           tools=None) -> dict:
    """input_ids and labels (aligned; the model shifts) and counts for one conversation."""
    return get_encoder(tokenizer).encode_batch([{"messages": messages, "tools": tools}], max_length).to_pylist()[0]


@dataclass
class EncodeStats:
    samples: int
    tokens: int
    learned_tokens: int
    truncated: int
    skipped: int
    lengths: object  # numpy array, before truncation, to help choose model_max_length
    refused: int = 0  # conversations the chat template raised on, dropped with skip_bad_samples

    def summary(self, name: str) -> str:
        lengths = np.asarray(self.lengths) if len(self.lengths) else np.zeros(1)
        refused = f", {self.refused} refused by the chat template" if self.refused else ""
        return (f"{name}: {self.samples} samples, {self.tokens} tokens, {self.learned_tokens} learned; "
                f"{self.truncated} truncated, {self.skipped} skipped (nothing left to learn){refused}; "
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


def _encode_rows(batch, encoder, max_length, source, skip_bad_samples=False):
    """One batch as an Arrow table (built by the encoder in numpy), which datasets then writes as is. A chat
    template that raises on a conversation (a user template's raise_exception) is one line naming the record;
    with ``skip_bad_samples`` the conversation is dropped (said, and counted by tokenize_dataset)."""
    import jinja2

    # A batch allocates tens of thousands of small objects and no reference cycles: the cyclic collector
    # would only scan them again and again.
    collecting = gc.isenabled()
    gc.disable()
    try:  # every exit, a refused record's too, turns the collector back on
        examples = [_load_example(text) for text in batch["example"]]
        positions = batch["position"] if "position" in batch else [None] * len(examples)
        if not encoder.renders_names:  # a name the template does not write would be lost without a word
            for example, position in zip(examples, positions):
                named = next((i for i, m in enumerate(example["messages"], 1) if "name" in m), None)
                if named is not None:
                    raise TemplateError(f'{_where(source, position)}: message {named} has a "name", but the chat '
                                        "template does not render names (its text would be lost); drop it, or "
                                        "use a template that renders it")
        try:
            return encoder.encode_batch(examples, max_length)
        except jinja2.TemplateError:
            kept = []
            for example, position in zip(examples, positions):
                try:
                    encoder.render(example["messages"], example.get("tools"))
                except jinja2.TemplateError as e:
                    problem = f"{_where(source, position)}: the chat template raised on this conversation: {e}"
                    if not skip_bad_samples:
                        raise TemplateError(problem) from None
                    print(f"warning: skipping {problem}")
                    continue
                kept.append(example)
            return encoder.encode_batch(kept, max_length)
    finally:
        if collecting:
            gc.enable()


def tokenize_dataset(conversations, tokenizer, max_length: int | None, num_proc: int | None = None,
                     source: str | None = None, skip_bad_samples: bool = False):
    """Map loaded conversations to input_ids/labels in batches (cached), drop unlearnable samples.

    The cache key is the data's fingerprint, the tokenizer (vocabulary, special tokens, chat template)
    and ``max_length``. Returns (dataset with input_ids, labels, length) and EncodeStats.
    """
    import datasets
    import pyarrow.compute as pc

    encoder = get_encoder(tokenizer)
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
                      skip_bad_samples])
    try:
        encoded = conversations.map(_encode_rows, batched=True, remove_columns=conversations.column_names,
                                    fn_kwargs={"encoder": encoder, "max_length": max_length, "source": source,
                                               "skip_bad_samples": skip_bad_samples},
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
    keep = learned > 0
    stats = EncodeStats(
        samples=int(keep.sum()),
        tokens=int(table.column("length").to_numpy()[keep].sum()),
        learned_tokens=int(learned.sum()),
        truncated=int(pc.sum(table.column("truncated")).as_py() or 0),
        skipped=int((~keep).sum()),
        lengths=table.column("full_length").to_numpy(),
        refused=len(conversations) - table.num_rows,
    )
    if not keep.all():
        encoded = encoded.select(np.flatnonzero(keep))
    return encoded.select_columns(["input_ids", "labels", "length"]), stats
