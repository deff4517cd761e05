"""Conversations -> prompts -> token ids, and generated ids -> reply text: what inference and evaluation feed the
model and how they read its answer (batched generation itself is ``generation.py``).

- ``eval_samples`` turns conversations into (prompt messages, reference reply) pairs.
- ``prompt_ids`` renders a prompt with the chat template (``add_generation_prompt=True``) and tokenizes it with
  training's encoder: the ids training saw before each reply.
- ``context_limit`` and ``fit_prompt`` keep a prompt plus its new tokens within the model's context:
  the oldest whole user/assistant exchanges go first, the system turn stays, and a prompt that does not
  fit even alone raises ``PromptTooLong`` (cutting it would answer a question nobody asked).
- ``stop_token_ids`` (from data/templates.py: the end-of-turn token and eos) and ``decode_reply`` read a reply
  from generated ids; ``ReplyStreamer`` writes a reply as it is generated, ending with exactly the text
  ``decode_reply`` gives.
"""

from __future__ import annotations

import re
import sys
from typing import Callable

from ..data.messages import THINK_CLOSE
from ..data.templates import stop_token_ids


class Prompt(list):
    """A prompt's messages that carry the conversation's tool list (``tools``) and ``enable_thinking`` along."""

    def __init__(self, messages=(), tools=None, enable_thinking=None):
        super().__init__(messages)
        self.tools = tools
        self.enable_thinking = enable_thinking

    def like(self, messages) -> "Prompt":
        """Other messages with this prompt's tools and enable_thinking."""
        return Prompt(messages, self.tools, self.enable_thinking)


def eval_samples(conversations, every_turn: bool = False, tokenizer=None,
                 enable_thinking=None) -> list[tuple[list[dict], str]]:
    """(prompt messages, reference) pairs: the conversation up to its last assistant turn and that reply,
    or, with ``every_turn``, one pair per assistant turn. A conversation with tools or ``enable_thinking`` (its
    own, else the argument) gives ``Prompt``s that carry them; the reference is a reply's answer (its reasoning
    is not scored). A reply that makes tool calls is, with ``tokenizer``, the text the chat template gives
    that turn (calls included), read as a generated reply is (``reply_text``); else its content alone.

    ``conversations`` holds message lists, ``{"messages": [...]}`` records or rows of
    ``data.load_conversations`` (a ``datasets.Dataset`` works).
    """
    from ..data.checks import example_of

    samples = []
    for conversation in conversations:
        example = example_of(conversation)
        messages, tools = example["messages"], example.get("tools")
        thinking = example.get("enable_thinking", enable_thinking)
        replies = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        for i in replies if every_turn else replies[-1:]:
            prompt = Prompt(messages[:i], tools, thinking) if tools or thinking is not None else list(messages[:i])
            calls = tokenizer is not None and messages[i].get("tool_calls")
            samples.append((prompt, reply_text(tokenizer, prompt, messages[i]) if calls else messages[i]["content"]))
    return samples


def reply_text(tokenizer, prompt: list[dict], reply: dict) -> str:
    """An assistant turn as the model would write it: the tokens the chat template gives it after ``prompt``
    (what training learns), read back as ``decode_reply`` reads generated ones."""
    from ..data.encoding import IGNORE_INDEX, encode

    row = encode(tokenizer, list(prompt) + [reply], tools=getattr(prompt, "tools", None),
                 enable_thinking=getattr(prompt, "enable_thinking", None))
    learned = [token for token, label in zip(row["input_ids"], row["labels"]) if label != IGNORE_INDEX]
    return decode_reply(tokenizer, learned, stop_token_ids(tokenizer))


# --------------------------------------------------------------------------- prompts within the context


def context_limit(config, tokenizer) -> int | None:
    """The longest prompt + reply in tokens: the model's ``max_position_embeddings`` (the positions it was
    trained on), else the tokenizer's ``model_max_length`` when set; None when neither says.

    The tokenizer's value is only a fallback: it is often a sentinel (1e30) or copied from another model,
    while the config describes the weights themselves.
    """
    for limit in (getattr(config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)):
        if isinstance(limit, int) and 0 < limit < 10**9:  # transformers' "unset" is 1e30
            return limit
    return None


class PromptTooLong(ValueError):
    """The prompt alone (system turn + last user turn) does not leave room for the reply."""

    def __init__(self, length: int, max_length: int, max_new_tokens: int):
        self.length, self.max_length, self.max_new_tokens = length, max_length, max_new_tokens
        super().__init__(f"the prompt is {length} tokens; with {max_new_tokens} new tokens it exceeds "
                         f"the context limit of {max_length}")


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The ids ``generate_replies`` feeds for a prompt: rendered with the generation prompt and tokenized by
    the encoder training uses (``encoding.ChatEncoder``: content that looks like a special token stays
    text), so they equal the ids training saw before the reply."""
    from ..data.encoding import get_encoder

    return get_encoder(tokenizer).prompt_ids(list(messages), getattr(messages, "tools", None),
                                             getattr(messages, "enable_thinking", None))


def prompt_length(tokenizer, messages: list[dict]) -> int:
    return len(prompt_ids(tokenizer, messages))


def fit_prompt(tokenizer, messages: list[dict], max_length: int | None,
               max_new_tokens: int) -> tuple[list[dict], int]:
    """(messages, number of exchanges dropped) such that the rendered prompt + ``max_new_tokens`` <= ``max_length``.

    The oldest whole exchanges (a user turn and the replies after it) are dropped first; leading system
    turns and the last exchange, the one being answered, are always kept. If even that is too long,
    raise ``PromptTooLong``. ``max_length`` None: no limit, the messages come back unchanged.
    """
    if max_length is None:
        return (messages.like(messages) if isinstance(messages, Prompt) else list(messages)), 0
    if max_new_tokens >= max_length:
        raise ValueError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt within {max_length} tokens")
    budget = max_length - max_new_tokens
    first_turn = next((i for i, m in enumerate(messages) if m["role"] != "system"), len(messages))
    system, turns = list(messages[:first_turn]), list(messages[first_turn:])
    starts = [i for i, m in enumerate(turns) if m["role"] == "user"] or [0]
    # Each try renders the whole prompt again: templates need not be a sum of per-turn pieces.
    for dropped, start in enumerate(starts):
        candidate = system + turns[start if dropped else 0:]  # nothing dropped: all turns, as given
        if isinstance(messages, Prompt):
            candidate = messages.like(candidate)
        length = prompt_length(tokenizer, candidate)
        if length <= budget:
            return candidate, dropped
    raise PromptTooLong(length, max_length, max_new_tokens)


# --------------------------------------------------------------------------- replies


def decode_reply(tokenizer, new_tokens: list[int], stop_ids) -> str:
    """The reply text of generated ids: cut at the first stop token (what follows is padding of a
    finished row), special tokens skipped, stripped; a hybrid-reasoning model's ``</think>`` stays in the text
    (also where it is a special token) so that ``answer_of`` can tell the reasoning from the answer."""
    ends = [k for k, token in enumerate(new_tokens) if token in stop_ids]
    new_tokens = new_tokens[:ends[0]] if ends else new_tokens
    close = tokenizer.convert_tokens_to_ids(THINK_CLOSE)
    if close is not None and close != tokenizer.unk_token_id and close in new_tokens:
        at = len(new_tokens) - 1 - new_tokens[::-1].index(close)
        reasoning = tokenizer.decode(new_tokens[:at], skip_special_tokens=True).strip()
        answer = tokenizer.decode(new_tokens[at + 1:], skip_special_tokens=True).strip()
        return f"{reasoning}\n{THINK_CLOSE}\n\n{answer}".strip()
    return tokenizer.decode(new_tokens, skip_special_tokens=True).strip()


def answer_of(reply: str) -> str:
    """A reply without its reasoning (what is scored): the text after its last ``</think>``."""
    return reply.rsplit(THINK_CLOSE, 1)[-1].strip()


BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


class ReplyStreamer:
    """A ``generate(streamer=...)`` that writes a reply as it is generated and ends with exactly the text
    ``decode_reply`` gives: the prompt is skipped, and what may still change is held back until more
    text follows: leading/trailing whitespace (the reply is stripped), a trailing incomplete character,
    and a trailing run of SentencePiece byte tokens (<0xE4>...), which decode together: one invalid
    byte turns the whole run into U+FFFD, even a character already complete.
    """

    def __init__(self, tokenizer, stop_ids, write: Callable[[str], None]):
        self.tokenizer, self.stop_ids, self.write = tokenizer, list(stop_ids), write
        self.tokens: list[int] = []
        self.byte_run_start: int | None = None
        self.printed = ""
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:  # generate() passes the prompt first
            self.prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            if BYTE_TOKEN.fullmatch(self.tokenizer.convert_ids_to_tokens(token) or ""):
                if self.byte_run_start is None:
                    self.byte_run_start = len(self.tokens)
            elif self.tokenizer.decode([token], skip_special_tokens=True):
                self.byte_run_start = None
            # else a skipped (special) token: the bytes on either side of it still decode as one run
            self.tokens.append(token)
        stable = self.tokens if self.byte_run_start is None else self.tokens[:self.byte_run_start]
        # "\ufffd" at the end: a multi-byte character whose other bytes are still to come (byte-level BPE).
        self._write_up_to(decode_reply(self.tokenizer, stable, self.stop_ids).rstrip("\ufffd").rstrip())

    def end(self) -> None:
        final = decode_reply(self.tokenizer, self.tokens, self.stop_ids)
        if not self._write_up_to(final):
            # Decoding changed text already written (not seen in the tests): show the reply whole.
            self.write("\n" + final)
            self.printed = final

    def _write_up_to(self, text: str) -> bool:
        """Write what ``text`` adds to what was written; False if it does not extend it."""
        if not text.startswith(self.printed):
            return False
        if len(text) > len(self.printed):
            self.write(text[len(self.printed):])
            self.printed = text
        return True


def write_to_stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()
