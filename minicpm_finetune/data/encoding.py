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

import hashlib
import json
import re
from itertools import chain

import numpy as np

from ..cli import ArgumentError
from .rendering import ChatRenderer, Rendered, _verification_conversations

IGNORE_INDEX = -100


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

    def prompt_ids(self, messages: list[dict], tools=None, enable_thinking=None) -> list[int]:
        return self.token_ids(self.render(messages, tools, generation_prompt=True, enable_thinking=enable_thinking))

    def encode_batch(self, examples: list[dict], max_length: int | None, enable_thinking=None):
        """An Arrow table (encoded_schema()) with columns input_ids, labels, length, full_length, num_learned,
        truncated, cut_replies and part (0 for a conversation's first sample, 1, 2, ... for the samples a split
        adds, see ``rendering.ChatRenderer.render_samples``). ``enable_thinking``: for the examples that do not set
        their own. Per sample only the reply spans are found in Python; the id and label columns are built in
        numpy (a nested list -> Arrow conversion costs more than the masking)."""
        import pyarrow as pa

        rendered, parts = [], []
        for e in examples:
            samples = self.render_samples(e["messages"], e.get("tools"), e.get("enable_thinking", enable_thinking))
            rendered += samples
            parts += range(len(samples))
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
                         pa.array(full_length > length), pa.array(np.array(cut_replies, np.int32)),
                         pa.array(np.array(parts, np.int32))],
                        schema=encoded_schema())


def encoded_schema():
    """The columns encode_batch gives (and the tokenized data set holds)."""
    import pyarrow as pa

    return pa.schema([("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32())),
                      ("length", pa.int32()), ("full_length", pa.int32()), ("num_learned", pa.int32()),
                      ("truncated", pa.bool_()), ("cut_replies", pa.int32()), ("part", pa.int32())])


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


def encode(tokenizer, messages: list[dict], end_of_turn: str | None = None, max_length: int | None = None,
           tools=None, enable_thinking=None) -> dict:
    """input_ids and labels (aligned; the model shifts) and counts of the sample that teaches a conversation's
    last reply (a conversation the template renders differently turn by turn gives several: ``encode_batch``)."""
    example = {"messages": messages, "tools": tools}
    return get_encoder(tokenizer).encode_batch([example], max_length, enable_thinking).to_pylist()[-1]
