"""Data formats: the one place where a record format is defined.

Each format is one ``DataFormat`` entry in ``FORMATS``: its name, the top-level keys it reads (every one
of them carries data, so none is dropped), how a file in it is recognised, and how a record becomes a
normalised example. The data preview, ``finetune.py --data_format``, ``inference.py`` file mode and the
README's Data section all take the formats from here.

A normalised supervised example is ``{"messages": [...], "tools": [...] or None}`` in the OpenAI style:
roles ``system`` (first only), ``user``, ``assistant`` (``content`` and/or ``tool_calls``, optional
``reasoning_content``) and ``tool`` (a tool's result); ``tools`` is a list of ``{"type": "function",
"function": {name, description, parameters}}``; plus ``enable_thinking`` (true/false) when the record sets it,
passed to the chat template with that conversation. ``convert`` raises ValueError with the problem (the caller
adds file and record).

Keys: a record may hold the keys its format reads plus metadata (``id``, ``source``, anything not in
``TEXT_KEYS``), which is ignored and reported. A key that carries conversation text in some format
(``TEXT_KEYS``) but not in this one would be lost, so the record is rejected, naming the key.

Adding a format is one entry plus its tests. A preference format (for DPO) is an entry with
``kind="preference"`` whose ``convert`` returns ``{"prompt": messages ending with a user turn, "chosen": str,
"rejected": str}``; detection only considers formats of the kind asked for (``preference.py`` asks for
pairs).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable

from .messages import check_messages, normalise_tool_calls, normalise_tools, split_reasoning



@dataclass(frozen=True)
class DataFormat:
    name: str
    keys: tuple  # top-level keys it reads; the first ones listed decide detection
    detect: Callable[[dict], bool]
    convert: Callable[[dict], dict]
    example: dict  # one record, for the README and the tests
    summary: str
    add_reply: Callable[[dict, str], dict] | None = None  # a prompt-only record completed with a placeholder reply
    kind: str = "sft"  # "sft": a conversation to learn; "preference": chosen/rejected pairs

    def __post_init__(self):
        object.__setattr__(self, "key_set", frozenset(self.keys))  # for the per-record key check


# --------------------------------------------------------------------------- shared checks


def _string(record: dict, key: str, required: bool = False) -> str:
    value = record.get(key)
    if value is None:
        if required:
            raise ValueError(f'missing "{key}"')
        return ""
    if not isinstance(value, str):
        raise ValueError(f'"{key}" must be a string, got {type(value).__name__}')
    return value


def _with_system(system: str, messages: list) -> list:
    if system and messages and isinstance(messages[0], dict) and messages[0].get("role") == "system":
        raise ValueError('a system text both in "system" and as the first message')
    return ([{"role": "system", "content": system}] if system else []) + messages


def _example(record: dict, messages: list, tools=None) -> dict:
    """The normalised example, with the record's ``enable_thinking`` when it sets one."""
    example = {"messages": messages, "tools": tools}
    thinking = record.get("enable_thinking")
    if thinking is not None:
        if not isinstance(thinking, bool):
            raise ValueError(f'"enable_thinking" must be true or false, got {thinking!r}')
        example["enable_thinking"] = thinking
    return example


def _final_reply(record: dict, key: str) -> dict:
    """The last assistant message of a one-reply format: its text and the record's reasoning, if any."""
    reply = {"role": "assistant", "content": _string(record, key, required=True)}
    split_reasoning(reply, record.get("reasoning_content"), f'"{key}"')
    return reply


# --------------------------------------------------------------------------- the formats


def _conversation(record: dict) -> dict:
    if "messages" not in record:
        raise ValueError('missing "messages" (this file is in the conversation format)')
    return _example(record, check_messages(record["messages"]), normalise_tools(record.get("tools")))


SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "function_call": "assistant", "observation": "tool", "tool": "tool"}


def _sharegpt(record: dict) -> dict:
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise ValueError('"conversations" must be a non-empty list')
    messages = []
    for i, turn in enumerate(turns, 1):
        if not isinstance(turn, dict):
            raise ValueError(f"turn {i} is not an object")
        role_key, text_key = ("from", "value") if "from" in turn or "value" in turn else ("role", "content")
        unused = [k for k, v in turn.items() if k not in (role_key, text_key, "reasoning_content") and v is not None]
        if unused:
            raise ValueError(f'turn {i}: key "{unused[0]}" is not used, its text would be lost')
        speaker, value = turn.get(role_key), turn.get(text_key)
        if speaker not in SHAREGPT_ROLES:
            raise ValueError(f"turn {i}: unknown \"{role_key}\" {speaker!r} "
                             f"(expected one of {', '.join(SHAREGPT_ROLES)})")
        if not isinstance(value, str):
            raise ValueError(f'turn {i}: "{text_key}" must be a string')
        if speaker == "function_call":
            messages.append({"role": "assistant", "content": "",
                             "tool_calls": normalise_tool_calls(value, f"turn {i}")})
        else:
            messages.append({"role": SHAREGPT_ROLES[speaker], "content": value})
        if turn.get("reasoning_content") is not None:  # checked with the message (assistant turns only)
            messages[-1]["reasoning_content"] = turn["reasoning_content"]
    messages = _with_system(_string(record, "system"), messages)
    return _example(record, check_messages(messages), normalise_tools(record.get("tools")))


def _alpaca(record: dict) -> dict:
    instruction, given = _string(record, "instruction"), _string(record, "input")
    reply = _final_reply(record, "output")
    if "instruction" not in record and "input" not in record:
        raise ValueError('missing "instruction" (or "input")')
    history = record.get("history") or []
    if not isinstance(history, list):
        raise ValueError('"history" must be a list of [user, assistant] pairs')
    messages = []
    for i, pair in enumerate(history, 1):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
            raise ValueError(f"history item {i} must be a [user, assistant] pair of strings")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    prompt = "\n".join(part for part in (instruction, given) if part)
    messages += [{"role": "user", "content": prompt}, reply]
    return _example(record, check_messages(_with_system(_string(record, "system"), messages)))


def _prompt_response(record: dict) -> dict:
    messages = [{"role": "user", "content": _string(record, "prompt", required=True)},
                _final_reply(record, "response")]
    return _example(record, check_messages(_with_system(_string(record, "system"), messages)))


_TOOLS_EXAMPLE = [{"type": "function", "function": {
    "name": "get_weather", "description": "今天的天气",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]

FORMATS: dict[str, DataFormat] = {f.name: f for f in (
    DataFormat(
        "conversation", ("messages", "tools", "enable_thinking"), lambda r: "messages" in r, _conversation,
        {"messages": [{"role": "system", "content": "你是一个广告文案助手。"},
                      {"role": "user", "content": "北京天气怎么样？"},
                      {"role": "assistant", "content": "",
                       "tool_calls": [{"type": "function",
                                       "function": {"name": "get_weather", "arguments": {"city": "北京"}}}]},
                      {"role": "tool", "content": "晴，25度"},
                      {"role": "assistant", "content": "北京今天晴，25度。"}],
         "tools": _TOOLS_EXAMPLE},
        "OpenAI-style messages (system, user, assistant with optional tool_calls, tool results); optional "
        "top-level tools; reasoning as reasoning_content or a leading <think> block; optional enable_thinking",
        lambda r, reply: dict(r, messages=list(r.get("messages") or []) + [{"role": "assistant", "content": reply}])),
    DataFormat(
        "sharegpt", ("conversations", "system", "tools", "enable_thinking"), lambda r: "conversations" in r, _sharegpt,
        {"conversations": [{"from": "human", "value": "你好"}, {"from": "gpt", "value": "你好！"},
                           {"from": "human", "value": "北京天气怎么样？"},
                           {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "北京"}}'},
                           {"from": "observation", "value": "晴，25度"},
                           {"from": "gpt", "value": "北京今天晴，25度。"}],
         "system": "optional", "tools": json.dumps(_TOOLS_EXAMPLE, ensure_ascii=False)},
        "conversations of from/value turns (human, gpt, system, function_call, observation) or role/content "
        "turns (reasoning_content on gpt turns); optional system, tools (a list or its JSON text) and enable_thinking",
        lambda r, reply: dict(r, conversations=list(r.get("conversations") or []) + [{"from": "gpt", "value": reply}])),
    DataFormat(
        "prompt_response", ("prompt", "response", "system", "reasoning_content", "enable_thinking"),
        lambda r: "prompt" in r or "response" in r, _prompt_response,
        {"prompt": "类型#裙*颜色#红色", "response": "这款红色连衣裙……"},
        "one exchange; optional system, reasoning_content and enable_thinking",
        lambda r, reply: dict(r, response=reply)),
    DataFormat(
        "alpaca", ("instruction", "input", "output", "system", "history", "reasoning_content", "enable_thinking"),
        lambda r: bool({"instruction", "input", "output"} & r.keys()), _alpaca,
        {"instruction": "写一段广告", "input": "类型#裙*颜色#红色", "output": "这款红色连衣裙……",
         "system": "optional", "history": [["先写标题", "红裙上新"]]},
        "instruction and input (joined by a newline) -> output; history [user, assistant] pairs come first, "
        "every reply is learned; optional system, reasoning_content (of the output) and enable_thinking",
        lambda r, reply: dict(r, output=reply)),
)}

# --------------------------------------------------------------------------- preference pairs (DPO)


def _reply_value(value, key: str) -> str:
    """A reply given as a string or as a one-message assistant list (TRL's conversational form)."""
    if isinstance(value, list):
        if len(value) != 1 or not isinstance(value[0], dict) or value[0].get("role") != "assistant":
            raise ValueError(f'"{key}" must be one assistant message (or a string)')
        value = value[0].get("content")
        if not isinstance(value, str):
            raise ValueError(f'"{key}": "content" must be a string')
        return value
    if not isinstance(value, str):
        raise ValueError(f'"{key}" must be a string, got {type(value).__name__}')
    return value


def _pair(prompt: list, chosen: str, rejected: str) -> dict:
    """The checked pair: a prompt of plain messages ending with a user turn, two different non-empty replies."""
    if not isinstance(prompt[-1], dict) or prompt[-1].get("role") != "user":
        raise ValueError("the prompt does not end with a user turn")
    if any(isinstance(m, dict) and (m.get("tool_calls") or m.get("role") == "tool") for m in prompt):
        raise ValueError("the prompt holds a tool call or result: preference pairs take plain turns only")
    for name, reply in (("chosen", chosen), ("rejected", rejected)):
        if not reply.strip():
            raise ValueError(f'empty "{name}" reply')
        check_messages(prompt + [{"role": "assistant", "content": reply}])  # roles, order, empty turns
    if chosen == rejected:
        raise ValueError('"chosen" and "rejected" are the same reply (nothing to prefer)')
    return {"prompt": [{"role": m["role"], "content": m["content"]} for m in prompt], "chosen": chosen,
            "rejected": rejected}


def _minicpm_pair(record: dict) -> dict:
    system, instruction = _string(record, "system"), _string(record, "instruction")
    text = "\n".join(part for part in (instruction, _string(record, "input")) if part)
    history = record.get("history") or []
    if not isinstance(history, list) or not all(
            isinstance(turn, list) and len(turn) == 2 and all(isinstance(t, str) for t in turn) for turn in history):
        raise ValueError('"history" must be a list of [user, assistant] string pairs')
    messages = [{"role": "system", "content": system}] if system else []
    for user, assistant in history:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return _pair(messages + [{"role": "user", "content": text}], _string(record, "chosen", required=True),
                 _string(record, "rejected", required=True))


def _messages_pair(record: dict) -> dict:
    prompt = record.get("messages")
    if not isinstance(prompt, list) or not prompt:
        raise ValueError('"messages" must be a non-empty list')
    return _pair(list(prompt), _string(record, "chosen", required=True), _string(record, "rejected", required=True))


def _trl_pair(record: dict) -> dict:
    if "prompt" not in record:  # implicit prompt: two whole conversations
        chosen, rejected = record["chosen"], record["rejected"]
        if not (isinstance(chosen, list) and isinstance(rejected, list) and chosen and rejected):
            raise ValueError('without "prompt", "chosen" and "rejected" must be message lists')
        if chosen[:-1] != rejected[:-1]:
            raise ValueError('"chosen" and "rejected" differ before their last message (no shared prompt)')
        return _pair(list(chosen[:-1]), _reply_value(chosen[-1:], "chosen"),
                     _reply_value(rejected[-1:], "rejected"))
    prompt = record["prompt"]
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    elif not isinstance(prompt, list) or not prompt:
        raise ValueError('"prompt" must be a string or a non-empty message list')
    replies = [_reply_value(record[key], key) if key in record else _string(record, key, required=True)
               for key in ("chosen", "rejected")]
    return _pair(list(prompt), *replies)


def _is_pair(record: dict) -> bool:
    return "chosen" in record and "rejected" in record


PREFERENCE_FORMATS = (
    DataFormat(
        "messages", ("messages", "chosen", "rejected"), lambda r: _is_pair(r) and "messages" in r, _messages_pair,
        {"messages": [{"role": "user", "content": "写一句广告"}], "chosen": "红裙上新，优雅大方。",
         "rejected": "裙子。"},
        "a prompt of messages ending with a user turn, and two reply strings", kind="preference"),
    DataFormat(
        "trl", ("prompt", "chosen", "rejected"),
        lambda r: _is_pair(r) and ("prompt" in r or isinstance(r["chosen"], list)), _trl_pair,
        {"prompt": "写一句广告", "chosen": "红裙上新，优雅大方。", "rejected": "裙子。"},
        "TRL's: prompt and replies as strings or message lists; without prompt, two whole conversations that "
        "share all but their last reply", kind="preference"),
    DataFormat(
        "minicpm", ("instruction", "input", "chosen", "rejected", "system", "history"),
        lambda r: _is_pair(r) and ("instruction" in r or "input" in r), _minicpm_pair,
        {"instruction": "写一句广告", "input": "类型#裙", "chosen": "红裙上新，优雅大方。", "rejected": "裙子。"},
        "MiniCPM's DPO data: instruction and input (joined by a newline), optional system and history",
        kind="preference"),
)
FORMATS.update((f.name, f) for f in PREFERENCE_FORMATS)


# Keys that carry conversation text in some format (or in other toolkits' formats): a record holding one
# its own format does not read is rejected, since that text would be lost. Any other key is metadata.
TEXT_KEYS = frozenset(k for f in FORMATS.values() for k in f.keys) | {
    "query", "question", "answer", "completion", "text", "chosen", "rejected", "context", "reply", "target"}


def format_names(kind: str = "sft") -> list[str]:
    return [name for name, f in FORMATS.items() if f.kind == kind]


def detect(record: dict, kind: str = "sft") -> str | None:
    """The first format (in registry order) that recognises the record."""
    return next((f.name for f in FORMATS.values() if f.kind == kind and f.detect(record)), None)


def unknown_format_text(record: dict, kind: str = "sft") -> str:
    expected = "; ".join(f'{f.name} ({", ".join(f.keys[:3])})' for f in FORMATS.values() if f.kind == kind)
    hint = (" (raw AdvertiseGen: convert it with python -m minicpm_finetune.advertisegen)"
            if "content" in record and "summary" in record else "")
    return f"unknown record format with keys {sorted(record)[:8]}; expected one of: {expected}{hint}"


def convert(record: dict, data_format: str) -> tuple[dict, list[str]]:
    """(normalised example, ignored metadata keys) for one record, or ValueError naming the problem."""
    fmt = FORMATS[data_format]
    present = record
    for value in record.values():
        if value is None:  # Arrow fills absent fields with null
            present = {k: v for k, v in record.items() if v is not None}
            break
    example = fmt.convert(present)  # first: a record in another format is told what it misses
    if present.keys() <= fmt.key_set:
        return example, []
    lost = sorted(k for k in present if k in TEXT_KEYS and k not in fmt.keys)
    if lost:
        raise ValueError(f'key "{lost[0]}" is not read by the {fmt.name} format, its text would be lost '
                         f"(remove it, or use the format that reads it)")
    return example, sorted(k for k in present if k not in fmt.keys)
