"""Normalised messages: the checks every conversation passes, whatever format it came in.

A normalised conversation is a list of messages in the OpenAI style: roles ``system`` (first only),
``user``, ``assistant`` (``content`` and/or ``tool_calls``, optional ``reasoning_content``) and ``tool`` (a
tool's result), in an order a chat can have (``check_messages``); tool lists and calls are normalised to
``{"type": "function", "function": {...}}``. Each problem is a ValueError naming it (the caller adds file and
record).

Reasoning: an assistant's ``reasoning_content`` (the field OpenAI-style and Qwen3-style data use), or a
``<think>...</think>`` block at the start of its content, which is moved there (the newlines around the
reasoning and before the reply are the template's to write, as hybrid-reasoning templates render them). An
empty block says "no reasoning" and is dropped.
"""

from __future__ import annotations

import json
import math

ROLES = ("system", "user", "assistant", "tool")
MESSAGE_KEYS = ("role", "content", "tool_calls", "tool_call_id", "name", "reasoning_content")
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
_PLAIN_ROLES = ("system", "user", "assistant")


def _json_value(value, what: str):
    """Tool lists and call arguments may come as JSON text (ShareGPT stores them so)."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"{what} is a string but not JSON ({e.msg})") from None
    return value


# The keys each level of a tool definition or call is read by; another key's value would be lost.
TOOL_KEYS = ("type", "function")
SCHEMA_KEYS = ("name", "description", "parameters", "strict")
CALL_KEYS = ("type", "function", "id")
CALL_FUNCTION_KEYS = ("name", "arguments")


def _only_keys(obj: dict, keys: tuple, where: str) -> None:
    unused = [k for k, v in obj.items() if k not in keys and v is not None]
    if unused:
        raise ValueError(f'{where}: key "{unused[0]}" is not read (expected {", ".join(keys)}), its value would be '
                         "lost")


def _finite(value, where: str) -> None:
    """Values reach the template as written: NaN and Infinity (accepted by Python's json, not JSON) are refused."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where} holds {value}: not a JSON number")
    if isinstance(value, dict):
        for item in value.values():
            _finite(item, where)
    elif isinstance(value, list):
        for item in value:
            _finite(item, where)


def _check_parameters(parameters, where: str) -> None:
    """A function's parameters as templates read them: a JSON schema object whose "properties" map names to
    objects and whose "required" lists names."""
    if parameters is None:
        return
    if not isinstance(parameters, dict):
        raise ValueError(f'{where}: "parameters" must be a JSON schema object, got {type(parameters).__name__}')
    properties = parameters.get("properties")
    if properties is not None and not (isinstance(properties, dict)
                                       and all(isinstance(spec, dict) for spec in properties.values())):
        raise ValueError(f'{where}: "parameters"."properties" must map each name to a schema object')
    required = parameters.get("required")
    if required is not None and not (isinstance(required, list) and all(isinstance(n, str) for n in required)):
        raise ValueError(f'{where}: "parameters"."required" must be a list of names')


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
        if function is not tool:
            _only_keys(tool, TOOL_KEYS, f"tool {i}")
        _only_keys(function, SCHEMA_KEYS + (("type",) if function is tool else ()), f"tool {i}")  # flat form
        _check_parameters(function.get("parameters"), f"tool {i}")
        _finite(function, f"tool {i}")
        out.append({"type": "function", "function": {k: v for k, v in function.items() if v is not None}})
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
        if function is not call:
            _only_keys(call, CALL_KEYS, f"{where}: tool call")
        _only_keys(function, CALL_FUNCTION_KEYS + (("type", "id") if function is call else ()), f"{where}: tool call")
        arguments = _json_value(function.get("arguments", {}), f"{where}: tool call arguments")
        if arguments is None:
            arguments = {}
        if not isinstance(arguments, dict):
            raise ValueError(f"{where}: tool call arguments must be an object")
        _finite(arguments, f"{where}: tool call arguments")
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
    """A message with only a role that takes plain text and a non-empty text (a reply without a <think> block)."""
    return (type(message) is dict and len(message) == 2 and message.get("role") in _PLAIN_ROLES
            and type(message.get("content")) is str and bool(message["content"].strip())
            and (message["role"] != "assistant" or THINK_OPEN not in message["content"]))


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
    _reasoning(normal, message.get("reasoning_content"), bool(calls), where)
    for key in ("tool_call_id", "name"):
        if message.get(key) is not None:
            if not isinstance(message[key], str):
                raise ValueError(f'{where}: "{key}" must be a string')
            normal[key] = message[key]
    return normal


def _reasoning(normal: dict, reasoning, calls: bool, where: str) -> None:
    if normal["role"] != "assistant":
        if reasoning is not None:
            raise ValueError(f'{where}: only assistant messages carry "reasoning_content"')
        return
    split_reasoning(normal, reasoning, where)
    if not normal["content"].strip() and not calls:
        raise ValueError(f"{where}: empty reply (only reasoning)")


def split_reasoning(message: dict, reasoning, where: str) -> None:
    """Set the message's ``reasoning_content`` from the field or from a leading ``<think>...</think>`` block of
    its content (removed from the content); nothing when there is no reasoning."""
    content = message["content"]
    stripped = content.lstrip()
    if stripped.startswith(THINK_OPEN):
        end = stripped.find(THINK_CLOSE)
        if end < 0:
            raise ValueError(f"{where}: {THINK_OPEN} without {THINK_CLOSE}")
        if reasoning is not None:
            raise ValueError(f'{where}: reasoning both in "reasoning_content" and in a {THINK_OPEN} block')
        reasoning = stripped[len(THINK_OPEN):end]
        message["content"] = content = stripped[end + len(THINK_CLOSE):].lstrip("\n")
    if reasoning is None:
        return
    if not isinstance(reasoning, str):
        raise ValueError(f'{where}: "reasoning_content" must be a string')
    if THINK_OPEN in content or THINK_CLOSE in content:
        raise ValueError(f"{where}: a {THINK_OPEN} block after the reply's start (reasoning comes first)")
    reasoning = reasoning.strip("\n")
    if reasoning.strip():
        message["reasoning_content"] = reasoning


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
