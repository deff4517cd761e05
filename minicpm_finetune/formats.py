"""Data formats: the one place where a record format is defined.

Each format is one ``DataFormat`` entry in ``FORMATS``: its name, the top-level keys it reads (every one
of them carries data, so none is dropped), how a file in it is recognised, and how a record becomes a
normalised example. The data preview, ``finetune.py --data_format``, ``inference.py`` file mode and the
README's Data section all take the formats from here.

A normalised supervised example is ``{"messages": [...], "tools": [...] or None}`` in the OpenAI style:
roles ``system`` (first only), ``user``, ``assistant`` (``content`` and/or ``tool_calls``) and ``tool``
(a tool's result); ``tools`` is a list of ``{"type": "function", "function": {name, description,
parameters}}``. ``convert`` raises ValueError with the problem (the caller adds file and record).

Keys: a record may hold the keys its format reads plus metadata (``id``, ``source``, anything not in
``TEXT_KEYS``), which is ignored and reported. A key that carries conversation text in some format
(``TEXT_KEYS``) but not in this one would be lost, so the record is rejected, naming the key.

Adding a format is one entry plus its tests. A preference format (for DPO: ``{"prompt", "chosen",
"rejected"}``) is an entry with ``kind="preference"`` whose ``convert`` returns ``{"prompt": messages,
"chosen": messages, "rejected": messages, "tools": ...}``; loaders ask for the kind they train on
(``data.check_file(..., kind="preference")``) and detection only considers formats of that kind.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable

ROLES = ("system", "user", "assistant", "tool")
MESSAGE_KEYS = ("role", "content", "tool_calls", "tool_call_id", "name")
_PLAIN_ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class DataFormat:
    name: str
    keys: tuple  # top-level keys it reads; the first ones listed decide detection
    detect: Callable[[dict], bool]
    convert: Callable[[dict], dict]
    example: dict  # one record, for the README and the tests
    summary: str
    add_reply: Callable[[dict, str], dict]  # a prompt-only record completed with a placeholder reply
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


def _json_value(value, what: str):
    """Tool lists and call arguments may come as JSON text (ShareGPT stores them so)."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"{what} is a string but not JSON ({e.msg})") from None
    return value


def normalise_tools(tools) -> list | None:
    tools = _json_value(tools, '"tools"')
    if tools in (None, [], ""):
        return None
    if not isinstance(tools, list):
        raise ValueError(f'"tools" must be a list of function schemas, got {type(tools).__name__}')
    out = []
    for i, tool in enumerate(tools, 1):
        function = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise ValueError(f'tool {i}: expected {{"type": "function", "function": {{"name": ..., ...}}}}')
        out.append({"type": "function", "function": function})
    return out


def normalise_tool_calls(calls, where: str) -> list:
    calls = _json_value(calls, f"{where}: tool call")
    if isinstance(calls, dict):
        calls = [calls]
    if not isinstance(calls, list) or not calls:
        raise ValueError(f'{where}: "tool_calls" must be a non-empty list')
    out = []
    for call in calls:
        function = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise ValueError(f'{where}: a tool call needs a "name" (and "arguments")')
        arguments = _json_value(function.get("arguments", {}), f"{where}: tool call arguments")
        if arguments is None:
            arguments = {}
        if not isinstance(arguments, dict):
            raise ValueError(f"{where}: tool call arguments must be an object")
        out.append({"type": "function", "function": {"name": function["name"], "arguments": arguments}})
    return out


def check_messages(messages: list) -> list[dict]:
    """Normalised messages, or ValueError. Optional system first; a user turn, then assistant replies,
    where an assistant tool call is followed by one or more tool results and then an assistant turn;
    the conversation ends with an assistant turn."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("the conversation must be a non-empty list of messages")
    out, previous = [], None
    for i, message in enumerate(messages):
        expected = _allowed_after(previous)
        # The common case first (a role and a non-empty text): only the order is left to check.
        if _is_plain_text(message) and message["role"] in expected:
            previous = {"role": message["role"], "content": message["content"]}
            out.append(previous)
            continue
        where = f"message {i + 1}"
        normal = _checked_message(message, where)
        if normal["role"] not in expected:
            raise ValueError(f"{where}: role {normal['role']!r} out of order "
                             f"(expected {' or '.join(map(repr, expected))})")
        previous = normal
        out.append(normal)
    if out[-1]["role"] != "assistant":
        raise ValueError("conversation does not end with an assistant reply")
    return out


def _is_plain_text(message) -> bool:
    """A message with only a role that takes plain text and a non-empty text."""
    return (type(message) is dict and len(message) == 2 and message.get("role") in _PLAIN_ROLES
            and type(message.get("content")) is str and bool(message["content"].strip()))


def _checked_message(message, where: str) -> dict:
    """One message normalised (its place in the conversation is checked by the caller), or ValueError."""
    if not isinstance(message, dict):
        raise ValueError(f"{where} is not an object")
    unused = [k for k, v in message.items() if k not in MESSAGE_KEYS and v is not None]
    if unused:
        raise ValueError(f'{where}: key "{unused[0]}" is not used, its text would be lost')
    role, content = message.get("role"), message.get("content")
    if role not in ROLES:
        raise ValueError(f"{where}: unknown role {role!r} (expected one of {', '.join(ROLES)})")
    normal = {"role": role}
    calls = message.get("tool_calls")
    if calls is not None and role != "assistant":
        raise ValueError(f'{where}: only assistant messages make "tool_calls"')
    if calls:
        normal["tool_calls"] = normalise_tool_calls(calls, where)
        content = "" if content is None else content
    if not isinstance(content, str):
        raise ValueError(f'{where}: "content" must be a string')
    if not content.strip() and not calls and role != "tool":
        raise ValueError(f"{where}: empty {'reply' if role == 'assistant' else role + ' text'}")
    normal["content"] = content
    for key in ("tool_call_id", "name"):
        if message.get(key) is not None:
            if not isinstance(message[key], str):
                raise ValueError(f'{where}: "{key}" must be a string')
            normal[key] = message[key]
    return normal


def _allowed_after(previous: dict | None) -> tuple:
    if previous is None:
        return ("system", "user")
    role = previous["role"]
    if role == "system":
        return ("user",)
    if role == "user":
        return ("assistant",)
    if role == "assistant":
        return ("tool",) if previous.get("tool_calls") else ("user",)
    return ("tool", "assistant")  # after a tool result: more results or the assistant's turn


def _with_system(system: str, messages: list) -> list:
    if system and messages and isinstance(messages[0], dict) and messages[0].get("role") == "system":
        raise ValueError('a system text both in "system" and as the first message')
    return ([{"role": "system", "content": system}] if system else []) + messages


# --------------------------------------------------------------------------- the formats


def _conversation(record: dict) -> dict:
    if "messages" not in record:
        raise ValueError('missing "messages" (this file is in the conversation format)')
    return {"messages": check_messages(record["messages"]), "tools": normalise_tools(record.get("tools"))}


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
        unused = [k for k, v in turn.items() if k not in (role_key, text_key) and v is not None]
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
    messages = _with_system(_string(record, "system"), messages)
    return {"messages": check_messages(messages), "tools": normalise_tools(record.get("tools"))}


def _alpaca(record: dict) -> dict:
    instruction, given = _string(record, "instruction"), _string(record, "input")
    output = _string(record, "output", required=True)
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
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    return {"messages": check_messages(_with_system(_string(record, "system"), messages)), "tools": None}


def _prompt_response(record: dict) -> dict:
    messages = [{"role": "user", "content": _string(record, "prompt", required=True)},
                {"role": "assistant", "content": _string(record, "response", required=True)}]
    return {"messages": check_messages(_with_system(_string(record, "system"), messages)), "tools": None}


_TOOLS_EXAMPLE = [{"type": "function", "function": {
    "name": "get_weather", "description": "今天的天气",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]

FORMATS: dict[str, DataFormat] = {f.name: f for f in (
    DataFormat(
        "conversation", ("messages", "tools"), lambda r: "messages" in r, _conversation,
        {"messages": [{"role": "system", "content": "你是一个广告文案助手。"},
                      {"role": "user", "content": "北京天气怎么样？"},
                      {"role": "assistant", "content": "",
                       "tool_calls": [{"type": "function",
                                       "function": {"name": "get_weather", "arguments": {"city": "北京"}}}]},
                      {"role": "tool", "content": "晴，25度"},
                      {"role": "assistant", "content": "北京今天晴，25度。"}],
         "tools": _TOOLS_EXAMPLE},
        "OpenAI-style messages (system, user, assistant with optional tool_calls, tool results); optional "
        "top-level tools",
        lambda r, reply: dict(r, messages=list(r.get("messages") or []) + [{"role": "assistant", "content": reply}])),
    DataFormat(
        "sharegpt", ("conversations", "system", "tools"), lambda r: "conversations" in r, _sharegpt,
        {"conversations": [{"from": "human", "value": "你好"}, {"from": "gpt", "value": "你好！"},
                           {"from": "human", "value": "北京天气怎么样？"},
                           {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "北京"}}'},
                           {"from": "observation", "value": "晴，25度"},
                           {"from": "gpt", "value": "北京今天晴，25度。"}],
         "system": "optional", "tools": json.dumps(_TOOLS_EXAMPLE, ensure_ascii=False)},
        "conversations of from/value turns (human, gpt, system, function_call, observation) or role/content "
        "turns; optional system and tools (a list or its JSON text)",
        lambda r, reply: dict(r, conversations=list(r.get("conversations") or []) + [{"from": "gpt", "value": reply}])),
    DataFormat(
        "prompt_response", ("prompt", "response", "system"), lambda r: "prompt" in r or "response" in r,
        _prompt_response, {"prompt": "类型#裙*颜色#红色", "response": "这款红色连衣裙……"},
        "one exchange; optional system", lambda r, reply: dict(r, response=reply)),
    DataFormat(
        "alpaca", ("instruction", "input", "output", "system", "history"),
        lambda r: bool({"instruction", "input", "output"} & r.keys()), _alpaca,
        {"instruction": "写一段广告", "input": "类型#裙*颜色#红色", "output": "这款红色连衣裙……",
         "system": "optional", "history": [["先写标题", "红裙上新"]]},
        "instruction and input (joined by a newline) -> output; history [user, assistant] pairs come first, "
        "every reply is learned; optional system", lambda r, reply: dict(r, output=reply)),
)}

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
