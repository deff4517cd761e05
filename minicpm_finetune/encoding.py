"""Conversations -> input_ids and labels: render with the chat template, tokenize in batches, mask.

One encoder (``ChatEncoder``) serves training and inference (``prompts.prompt_ids``), so the ids
before each reply are exactly the ids inference feeds the model for the same messages.

Rendering. The general path renders the conversation and every prefix through Jinja (with
``add_generation_prompt=True`` before each assistant turn) to find where each reply starts and ends.
The fast path, taken where the template allows it, builds the text from per-role pieces found once by
rendering probe conversations (``TemplateBlocks``): no Jinja per sample. It is used only when it gives
the general path's text and spans on every probe (checked when the encoder is built; the tests prove it
on every bundled template); conversations with tools always take the general path.

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
from dataclasses import dataclass
from itertools import chain

import numpy as np

from .cli import ArgumentError, FinetuneError

IGNORE_INDEX = -100
ENCODER_VERSION = "3"  # part of the tokenized cache key: bump when the ids or labels change
_SENTINEL = re.compile("\ue000(\\d+)\ue001")


class TemplateError(FinetuneError):
    """The chat template cannot render what the data needs (e.g. tool calls)."""


@dataclass
class Rendered:
    text: str
    replies: list  # (begin, end) character spans that are learned
    contents: list  # (begin, end) character spans of message content (tokenized as text)


@dataclass
class TemplateBlocks:
    """A template that renders a conversation as start + content + glue + content + ... + end."""

    start: dict  # first role -> text before its content
    glue: dict  # (role, next role) -> text between their contents
    end: dict  # last role -> text after its content (no generation prompt)
    generation_prompt: str


def _probe_messages(roles, contents):
    return [{"role": r, "content": c} for r, c in zip(roles, contents)]


class ChatEncoder:
    def __init__(self, tokenizer):
        from .templates import end_of_turn_token

        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise ArgumentError("the data path needs a fast tokenizer (tokenizer.json or a convertible "
                             "SentencePiece model)")
        self.tokenizer = tokenizer
        self.template = tokenizer.chat_template
        self.end_of_turn = end_of_turn_token(tokenizer)
        self._backend = backend
        # Only special tokens (control tokens) are the template's markers; other added tokens ("\n" in
        # MiniCPM-2B's vocabulary) are split out of any text anyway.
        self._special_ids = {t.content: i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        tokens = sorted(self._special_ids, key=len, reverse=True)
        self._special = re.compile("|".join(map(re.escape, tokens))) if tokens else None
        self._rest_pre_tokenizer = self._no_first_prepend(backend)
        self.blocks = self._probe_blocks()
        self.renders_tools = self._probe_tools()
        self._can_protect = None  # checked on the first conversation that needs it

    # ----------------------------------------------------------------------- rendering

    def _jinja(self, messages, tools=None, generation_prompt=False) -> str:
        return self.tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                                  add_generation_prompt=generation_prompt)

    def render(self, messages: list[dict], tools=None, generation_prompt: bool = False) -> Rendered:
        """The text, the learned spans (none for a prompt) and the content spans of a conversation."""
        # Normalised messages hold role and content, plus tool_calls/tool_call_id/name when they use tools.
        plain = not tools and all(len(m) == 2 and m["role"] != "tool" for m in messages)
        if plain and self.blocks is not None and messages:
            try:
                return self._render_blocks(messages, generation_prompt)
            except KeyError:  # a shape the probes did not cover (e.g. two user turns in a row)
                pass
        return self._render_general(messages, tools, generation_prompt)

    def _render_blocks(self, messages, generation_prompt) -> Rendered:
        blocks, parts, contents, pos = self.blocks, [], [], 0
        previous = None
        for message in messages:
            piece = blocks.start[message["role"]] if previous is None else blocks.glue[(previous, message["role"])]
            pos += len(piece)
            parts += [piece, message["content"]]
            contents.append((pos, pos + len(message["content"])))
            pos += len(message["content"])
            previous = message["role"]
        parts.append(blocks.end[previous])
        if generation_prompt:
            parts.append(blocks.generation_prompt)
        text = "".join(parts)
        replies = []
        if not generation_prompt:
            for message, (begin, end) in zip(messages, contents):
                if message["role"] == "assistant":
                    through = end + len(blocks.end["assistant"])
                    eot = text.rfind(self.end_of_turn, begin, through) if self.end_of_turn else -1
                    replies.append((begin, eot + len(self.end_of_turn) if eot >= 0 else through))
        return Rendered(text, replies, contents)

    def _render_general(self, messages, tools, generation_prompt) -> Rendered:
        text = self._jinja(messages, tools, generation_prompt)
        bounds, replies = [0], []
        for i, message in enumerate(messages):
            through = self._jinja(messages[: i + 1], tools)
            if message["role"] == "assistant" and not generation_prompt:
                prompt = self._jinja(messages[:i], tools, generation_prompt=True)
                if not (text.startswith(prompt) and text.startswith(through)):
                    raise TemplateError("the chat template does not render a conversation as the sum of its "
                                        "prefixes; replies cannot be located (use --chat_template minicpm or chatml)")
                eot = through.rfind(self.end_of_turn, len(prompt)) if self.end_of_turn else -1
                replies.append((len(prompt), eot + len(self.end_of_turn) if eot >= 0 else len(through)))
            bounds.append(len(through) if text.startswith(through) else bounds[-1])
        return Rendered(text, replies, self._content_spans(messages, tools, generation_prompt, text, bounds))

    def _content_spans(self, messages, tools, generation_prompt, text, bounds) -> list:
        """Where each message's content lies in ``text``: render once with numbered sentinels in place of the
        contents; if putting the contents back gives ``text``, the positions are exact."""
        marked = [dict(m, content=f"\ue000{i}\ue001") if m["content"] else m for i, m in enumerate(messages)]
        try:
            pieces = _SENTINEL.split(self._jinja(marked, tools, generation_prompt))
        except Exception:  # noqa: BLE001
            pieces = [text]
        spans, out, pos = [], [], 0
        for k, piece in enumerate(pieces):
            if k % 2 == 0:
                out.append(piece)
                pos += len(piece)
            else:
                content = messages[int(piece)]["content"]
                spans.append((pos, pos + len(content)))
                out.append(content)
                pos += len(content)
        if "".join(out) == text:
            return spans
        # The template changes content (e.g. strips it): look for each content within its message's part.
        spans = []
        for message, begin, end in zip(messages, bounds, bounds[1:]):
            at = text.rfind(message["content"], begin, end) if message["content"] else -1
            if at >= 0:
                spans.append((at, at + len(message["content"])))
        return spans

    def _probe_blocks(self) -> TemplateBlocks | None:
        """Per-role pieces of the template, or None when it is not a sum of per-message blocks."""
        sentinels = [f"\ue000{i}\ue001" for i in range(5)]
        roles = ["system", "user", "assistant", "user", "assistant"]

        def pieces(text, first, count):
            found = [int(m.group(1)) for m in _SENTINEL.finditer(text)]
            if found != list(range(first, first + count)):
                raise ValueError("content not rendered verbatim")
            return _SENTINEL.split(text)[::2]

        try:
            a = pieces(self._jinja(_probe_messages(roles, sentinels)), 0, 5)
            b = pieces(self._jinja(_probe_messages(roles[1:], sentinels[1:])), 1, 4)
            user_only = self._jinja(_probe_messages(["user"], sentinels[1:2]))
            u = pieces(user_only, 1, 1)
            with_prompt = self._jinja(_probe_messages(["user"], sentinels[1:2]), generation_prompt=True)
        except Exception:  # noqa: BLE001 - any template failure means: use the general path
            return None
        if not with_prompt.startswith(user_only):
            return None
        blocks = TemplateBlocks(start={"system": a[0], "user": b[0]},
                                glue={("system", "user"): a[1], ("user", "assistant"): a[2],
                                      ("assistant", "user"): a[3]},
                                end={"assistant": a[5], "user": u[1]},
                                generation_prompt=with_prompt[len(user_only):])
        consistent = (a[4] == a[2] and b[1:] == [a[2], a[3], a[2], a[5]] and u[0] == b[0]
                      and a[2] == u[1] + blocks.generation_prompt and a[3].startswith(a[5]))
        if not consistent:
            return None
        # The fast path must give the general path's text and spans on real-looking conversations.
        saved, self.blocks = getattr(self, "blocks", None), blocks
        try:
            for messages, prompt in _verification_conversations():
                if self._render_blocks(messages, prompt) != self._render_general(messages, None, prompt):
                    return None
        except Exception:  # noqa: BLE001
            return None
        finally:
            self.blocks = saved
        return blocks

    def _probe_tools(self) -> bool:
        """Whether the template renders a tool list, a tool call and a tool result."""
        tools = [{"type": "function", "function": {"name": "probe_function_x", "description": "d",
                                                   "parameters": {"type": "object", "properties": {}}}}]
        messages = [{"role": "user", "content": "q"},
                    {"role": "assistant", "content": "", "tool_calls": [
                        {"type": "function", "function": {"name": "probe_call_y", "arguments": {"probe_arg_z": 1}}}]},
                    {"role": "tool", "content": "probe_result_w"},
                    {"role": "assistant", "content": "a"}]
        try:
            text = self._jinja(messages, tools)
        except Exception:  # noqa: BLE001
            return False
        return all(s in text for s in ("probe_function_x", "probe_call_y", "probe_arg_z", "probe_result_w"))

    # ----------------------------------------------------------------------- tokenizing

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


def _verification_conversations():
    """Conversations on which the fast path must equal the general one: shapes and awkward content."""
    texts = ["你好", " leading and trailing space ", "line one\nline two", "a", "Two plus two is four.",
             "类型#裙*版型#显瘦", "\n", "x y  z"]
    shapes = [["user", "assistant"], ["system", "user", "assistant"], ["user", "assistant", "user", "assistant"],
              ["system", "user", "assistant", "user", "assistant", "user", "assistant"]]
    for k, roles in enumerate(shapes):
        contents = [texts[(k + i) % len(texts)] for i in range(len(roles))]
        messages = _probe_messages(roles, contents)
        yield messages, False
        yield messages[:-1], True


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
