"""Rendering a conversation with the chat template, and finding in the text what is learned.

The general path renders the conversation and every prefix through Jinja (with
``add_generation_prompt=True`` before each assistant turn) to find where each reply starts and ends.
The fast path, taken where the template allows it, builds the text from per-role pieces found once by
rendering probe conversations (``TemplateBlocks``): no Jinja per sample. It is used only when it gives
the general path's text and spans on every probe (checked when the renderer is built; the tests prove it
on every bundled template); conversations with tools always take the general path.

A reply is learned from the end of the generation prompt up to and including the end-of-turn token after
it (``templates.end_of_turn_token``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..cli import FinetuneError
from .templates import end_of_turn_token

_SENTINEL = re.compile("\ue000(\\d+)\ue001")


class TemplateError(FinetuneError):
    """The chat template cannot render what the data needs (e.g. tool calls)."""


@dataclass
class Rendered:
    text: str
    replies: list  # (begin, end) character spans that are learned
    contents: list  # (begin, end) character spans of message content and reasoning (tokenized as text)
    turns: list = field(default_factory=list)  # the message index of each reply


@dataclass
class TemplateBlocks:
    """A template that renders a conversation as start + content + glue + content + ... + end."""

    start: dict  # first role -> text before its content
    glue: dict  # (role, next role) -> text between their contents
    end: dict  # last role -> text after its content (no generation prompt)
    generation_prompt: str


def _probe_messages(roles, contents):
    return [{"role": r, "content": c} for r, c in zip(roles, contents)]


def template_options(enable_thinking) -> dict:
    """The keyword arguments a conversation passes to the chat template (``enable_thinking`` when set)."""
    return {} if enable_thinking is None else {"enable_thinking": enable_thinking}


class ChatRenderer:
    """Renders conversations with a tokenizer's chat template (probed once, when built)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.template = tokenizer.chat_template
        self.end_of_turn = end_of_turn_token(tokenizer)
        self.blocks = self._probe_blocks()
        self.renders_tools = self._probe_tools()
        self.renders_names = self._probe_names()
        self.renders_reasoning = self._probe_reasoning()
        self.reads_enable_thinking = self._probe_enable_thinking()

    def _jinja(self, messages, tools=None, generation_prompt=False, options=None) -> str:
        return self.tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                                  add_generation_prompt=generation_prompt, **(options or {}))

    def _fast(self, messages, tools, options) -> bool:
        # Normalised messages hold role and content, plus tool_calls/tool_call_id/name/reasoning_content.
        return (self.blocks is not None and bool(messages) and not tools and not options
                and all(len(m) == 2 and m["role"] != "tool" for m in messages))

    def render(self, messages: list[dict], tools=None, generation_prompt: bool = False,
               enable_thinking=None) -> Rendered:
        """One rendering of the conversation: a prompt (``generation_prompt``: no learned spans), or the whole
        conversation with the replies it can teach in place (``render_samples`` gives them all)."""
        if not generation_prompt:
            return self.render_samples(messages, tools, enable_thinking)[-1]
        options = template_options(enable_thinking)
        if self._fast(messages, tools, options):
            try:
                return self._render_blocks(messages, True)
            except KeyError:
                pass
        text = self._jinja(messages, tools, True, options)
        return Rendered(text, [], self._content_spans(messages, tools, True, options, text))

    def render_samples(self, messages: list[dict], tools=None, enable_thinking=None) -> list[Rendered]:
        """The samples that teach every reply of a conversation in its inference-time context: one where the
        template renders each earlier turn as it rendered it as the last one (the common case), more where it
        does not (a hybrid-reasoning template drops the reasoning of earlier turns)."""
        options = template_options(enable_thinking)
        if self._fast(messages, tools, options):
            try:
                return [self._render_blocks(messages, False)]
            except KeyError:  # a shape the probes did not cover (e.g. two user turns in a row)
                pass
        return self._render_general(messages, tools, options)

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
        replies, turns = [], []
        if not generation_prompt:
            for i, (message, (begin, end)) in enumerate(zip(messages, contents)):
                if message["role"] == "assistant":
                    through = end + len(blocks.end["assistant"])
                    eot = text.rfind(self.end_of_turn, begin, through) if self.end_of_turn else -1
                    replies.append((begin, eot + len(self.end_of_turn) if eot >= 0 else through))
                    turns.append(i)
        return Rendered(text, replies, contents, turns)

    def _render_general(self, messages, tools, options) -> list[Rendered]:
        """Each reply k is learned after exactly the generation prompt of messages[:k] and as the template writes
        it as the last turn; a sample is the rendering up to its last reply, and teaches every earlier reply
        whose prompt + reply it starts with (a prefix of a prefix is one: picking samples from the last reply
        down is the fewest)."""
        throughs = [self._jinja(messages[: i + 1], tools, False, options) for i in range(len(messages))]
        taught = {}  # reply index -> (length of its prompt, prompt + reply through the end-of-turn token)
        for k, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt, through = self._jinja(messages[:k], tools, True, options), throughs[k]
            if not through.startswith(prompt):
                raise _unplaced(message, k, options)
            eot = through.rfind(self.end_of_turn, len(prompt)) if self.end_of_turn else -1
            taught[k] = (len(prompt), through[: eot + len(self.end_of_turn)] if eot >= 0 else through)
        samples, pending = [], sorted(taught, reverse=True)
        while pending:
            text = throughs[pending[0]]
            turns = [k for k in reversed(pending) if text.startswith(taught[k][1])]
            pending = [k for k in pending if k not in turns]
            last = turns[-1]
            bounds = [0]
            for through in throughs[: last + 1]:
                bounds.append(len(through) if text.startswith(through) else bounds[-1])
            contents = self._content_spans(messages[: last + 1], tools, False, options, text, bounds)
            samples.append(Rendered(text, [(taught[k][0], len(taught[k][1])) for k in turns], contents, turns))
        return samples[::-1]

    def _content_spans(self, messages, tools, generation_prompt, options, text, bounds=None) -> list:
        """Where each message's content (and reasoning) lies in ``text``: render once with numbered sentinels in
        place of the texts; if putting the texts back gives ``text``, the positions are exact."""
        n = len(messages)
        texts = [m["content"] for m in messages] + [m.get("reasoning_content") for m in messages]
        marked = [dict(m, **({"content": f"\ue000{i}\ue001"} if m["content"] else {}),
                       **({"reasoning_content": f"\ue000{n + i}\ue001"} if m.get("reasoning_content") else {}))
                  for i, m in enumerate(messages)]
        try:
            pieces = _SENTINEL.split(self._jinja(marked, tools, generation_prompt, options))
        except Exception:  # noqa: BLE001
            pieces = [text]
        spans, out, pos = [], [], 0
        for k, piece in enumerate(pieces):
            piece = piece if k % 2 == 0 else texts[int(piece)]
            if k % 2:
                spans.append((pos, pos + len(piece)))
            out.append(piece)
            pos += len(piece)
        if "".join(out) == text:
            return spans
        # The template changes content (e.g. strips it): look for each content within its message's part.
        if bounds is None:
            bounds = [0] + [len(self._jinja(messages[: i + 1], tools, False, options)) for i in range(n)]
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
                if prompt:
                    text = self._jinja(messages, None, True)
                    general = [Rendered(text, [], self._content_spans(messages, None, True, None, text))]
                else:
                    general = self._render_general(messages, None, {})
                if general != [self._render_blocks(messages, prompt)]:
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


    def _probe_names(self) -> bool:
        """Whether the template renders a message's ``name`` (OpenAI's field for who speaks, or which tool)."""
        messages = [{"role": "user", "content": "q", "name": "probe_name_v"}, {"role": "assistant", "content": "a"}]
        try:
            return "probe_name_v" in self._jinja(messages)
        except Exception:  # noqa: BLE001
            return False

    def _probe_reasoning(self) -> bool:
        """Whether the template renders an assistant's ``reasoning_content`` (for the last reply at least)."""
        messages = [{"role": "user", "content": "q"},
                    {"role": "assistant", "content": "a", "reasoning_content": "probe_reasoning_u"}]
        try:
            return "probe_reasoning_u" in self._jinja(messages)
        except Exception:  # noqa: BLE001
            return False

    def _probe_enable_thinking(self) -> bool:
        """Whether the template reads ``enable_thinking`` (its prompt differs between true and false)."""
        messages = [{"role": "user", "content": "q"}]
        try:
            return (self._jinja(messages, None, True, {"enable_thinking": True})
                    != self._jinja(messages, None, True, {"enable_thinking": False}))
        except Exception:  # noqa: BLE001
            return False


def _unplaced(message: dict, k: int, options: dict) -> TemplateError:
    """The error for a reply the template does not write after its own generation prompt (``turn``: which)."""
    if message.get("reasoning_content") and options.get("enable_thinking") is False:
        why = ("it has reasoning, but enable_thinking is false (the template's prompt closes the reasoning block "
               "before the reply): drop the reasoning or set enable_thinking true")
    else:
        why = ("the chat template does not write it after its generation prompt, so it cannot be located (use "
               "--chat_template minicpm, chatml or minicpm5)")
    error = TemplateError(f"reply at message {k + 1}: {why}")
    error.turn = k + 1
    return error


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
