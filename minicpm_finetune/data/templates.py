"""Chat templates: one Jinja template renders both the training data and the inference prompts.

Three styles are built in:
- ``minicpm``: MiniCPM-1/2's ``<用户>{user}<AI>{assistant}``, system text raw before the first turn,
  and the eos token after every reply so the model learns to stop. (The template shipped with
  MiniCPM-2B drops system turns and ends replies with nothing; we keep its format and fix both.)
- ``chatml``: ``<|im_start|>role\\n...<|im_end|>\\n`` as used by MiniCPM3 and MiniCPM4, with MiniCPM3's
  function-calling format for tools and tool calls (see CHATML_TEMPLATE).
- ``minicpm5``: MiniCPM5's ChatML after ``<s>``: every reply in a ``<think>`` block (empty when it has no
  reasoning), ``enable_thinking`` opening (true) or closing (false) that block in the generation prompt, tools
  listed as JSON in the system turn, calls as ``<function name=..><param name=..>value</param></function>``,
  tool results as ``<tool_response>`` blocks in a user turn (see MINICPM5_TEMPLATE). Used when a MiniCPM5
  tokenizer ships no template; the 2B's own template renders the same text.

The template is saved with every output, so inference renders prompts exactly as training did.

The end-of-turn token (learned after every reply, and where generation stops) comes from the template in
use: a built-in template knows its own (``minicpm``: the eos token; ``chatml``: ``<|im_end|>``). Any other
template (the tokenizer's own, or a Jinja file) is rendered on a one-exchange probe, and the special token
it writes right after the reply's text (whitespace aside) ends a turn; a template that writes none there,
or that cannot render the probe, ends turns with the eos token.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..cli import ArgumentError
from ..models.families import family_of

MINICPM_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}{{ '<用户>' + message['content'] + '<AI>' }}"
    "{% else %}{{ message['content'] + eos_token }}"
    "{% endif %}"
    "{% endfor %}"
)

# ChatML, plus MiniCPM3's function-calling format when there are tools: the functions are listed as
# Python stubs under "# Functions" in the system turn; an assistant call is
# <|tool_call_start|>\n```python\nname(arg=<JSON value>, ...)\n```\n<|tool_call_end|>\n before its text;
# a tool result is a "tool" turn. Without tools and tool calls it is plain ChatML.
CHATML_TEMPLATE = (
    "{%- macro py_type(spec) -%}"
    "{%- set names = {'string': 'str', 'number': 'float', 'integer': 'int', 'boolean': 'bool', "
    "'array': 'list', 'object': 'dict'} -%}"
    "{{- names.get(spec.get('type'), 'Any') if spec is mapping else 'Any' -}}"
    "{%- endmacro -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system_text = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set system_text = '' -%}{%- set turns = messages -%}{%- endif -%}"
    "{%- if system_text or tools -%}"
    "{{- '<|im_start|>system\n' + system_text -}}"
    "{%- if tools -%}"
    "{{- '\n# Functions\nHere is a list of functions that you can invoke:\n```python\n' -}}"
    "{%- for tool in tools -%}"
    "{%- set f = tool['function'] if tool['function'] is defined else tool -%}"
    "{%- set params = f.get('parameters') or {} -%}{%- set required = params.get('required') or [] -%}"
    "{{- '\ndef ' + f['name'] + '(' -}}"
    "{%- for name, spec in (params.get('properties') or {}).items() -%}"
    "{{- (', ' if not loop.first else '') + name + ': ' + py_type(spec) + ('' if name in required else ' = None') -}}"
    "{%- endfor -%}"
    "{{- '):\n    \"\"\"' + (f.get('description') or '') + '\n' -}}"
    "{%- if params.get('properties') -%}{{- '\n    Args:\n' -}}{%- endif -%}"
    "{%- for name, spec in (params.get('properties') or {}).items() -%}"
    "{{- '        ' + name + ': ' + ((spec.get('description') or '') if spec is mapping else '') + '\n' -}}"
    "{%- endfor -%}"
    "{{- '    \"\"\"\n' -}}"
    "{%- endfor -%}"
    "{{- '```\n\n# Output format for a function call\n<|tool_call_start|>\n```python\n"
    "function_name(argument=value, ...)\n```\n<|tool_call_end|>\n' -}}"
    "{%- endif -%}"
    "{{- '<|im_end|>\n' -}}"
    "{%- endif -%}"
    "{%- for message in turns -%}"
    "{{- '<|im_start|>' + message['role'] + '\n' -}}"
    "{%- if message['role'] == 'assistant' and message['tool_calls'] is defined and message['tool_calls'] -%}"
    "{{- '<|tool_call_start|>\n```python\n' -}}"
    "{%- for call in message['tool_calls'] -%}"
    "{%- set f = call['function'] if call['function'] is defined else call -%}"
    "{{- f['name'] + '(' -}}"
    "{%- for name, value in (f.get('arguments') or {}).items() -%}"
    "{{- (',' if not loop.first else '') + name + '=' + value | tojson -}}"
    "{%- endfor -%}"
    "{{- ')\n' -}}"
    "{%- endfor -%}"
    "{{- '```\n<|tool_call_end|>\n' -}}"
    "{%- endif -%}"
    "{{- (message['content'] or '') + '<|im_end|>\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)


_MINICPM5_TOOLS_GUIDE = (
    "\n</tools>\n\nTool usage guidelines:\n- You may call zero or more functions. If no function calls are needed, "
    "just answer normally and do not include any <function ... </function>.\n- When calling a function, return an "
    "XML object within <function ... </function> using:\n<function name=\"function-name\"><param name=\"param-name\">"
    "param-value</param></function>\n- param-value may be multi-line. If it contains <, & or newline characters, "
    "wrap it in a CDATA block: <param name=\"param-name\"><![CDATA[...multi-line value...]]></param>")

# MiniCPM5 (facts from the renders of openbmb/MiniCPM5-2B's template): string arguments are written raw, or in
# CDATA when they hold <, & or a newline; other values as Python prints them; text after <tool_sep> in a reply
# with calls is not written; a reply's reasoning comes from reasoning_content or a </think> in its content.
MINICPM5_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- if tools -%}"
    "{%- set ns = namespace(block='# Tools\n\nYou are provided with function signatures within <tools></tools> XML "
    "tags:\n<tools>') -%}"
    "{%- for tool in tools -%}{%- set ns.block = ns.block + '\n' + (tool | tojson) -%}{%- endfor -%}"
    "{%- set tool_block = ns.block + '" + _MINICPM5_TOOLS_GUIDE.replace("\n", "\\n").replace("'", "\\'") + "' -%}"
    "{%- endif -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system_text = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
    "{%- if tools -%}"
    "{%- set system_text = system_text.replace('<tool_def_sep>', tool_block) if '<tool_def_sep>' in system_text "
    "else system_text + '\n\n' + tool_block -%}"
    "{%- endif -%}"
    "{{- '<|im_start|>system\n' + system_text + '<|im_end|>\n' -}}"
    "{%- else -%}"
    "{%- set turns = messages -%}"
    "{%- if tools -%}{{- '<|im_start|>system\n' + tool_block + '<|im_end|>\n' -}}{%- endif -%}"
    "{%- endif -%}"
    "{%- for message in turns -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- set content = message['content'] or '' -%}"
    "{%- if message['reasoning_content'] is defined and message['reasoning_content'] is not none -%}"
    "{%- set reasoning = message['reasoning_content'] -%}"
    "{%- elif '</think>' in content -%}"
    "{%- set reasoning = content.split('</think>')[0].split('<think>')[-1] -%}"
    "{%- set content = content.split('</think>')[-1].lstrip('\n') -%}"
    "{%- else -%}{%- set reasoning = '' -%}{%- endif -%}"
    "{%- set calls = message['tool_calls'] if message['tool_calls'] is defined and message['tool_calls'] else [] -%}"
    "{%- if calls -%}{%- set content = content.split('<tool_sep>')[0] -%}{%- endif -%}"
    "{{- '<|im_start|>assistant\n<think>\n' + reasoning.strip('\n') + '\n</think>\n\n' + content -}}"
    "{%- for call in calls -%}"
    "{%- set f = call['function'] if call['function'] is defined else call -%}"
    "{%- if content or not loop.first -%}{{- '\n' -}}{%- endif -%}"
    "{{- '<function name=\"' + f['name'] + '\">' -}}"
    "{%- for name, value in (f['arguments'] or {}).items() -%}"
    "{{- '<param name=\"' + name + '\">' -}}"
    "{%- if value is string and ('<' in value or '&' in value or '\n' in value) -%}"
    "{{- '<![CDATA[' + value + ']]>' -}}"
    "{%- else -%}{{- value -}}{%- endif -%}"
    "{{- '</param>' -}}"
    "{%- endfor -%}"
    "{{- '</function>' -}}"
    "{%- endfor -%}"
    "{{- '<|im_end|>\n' -}}"
    "{%- elif message['role'] == 'tool' -%}"
    "{%- if loop.first or loop.previtem['role'] != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}"
    "{{- '\n<tool_response>\n' + message['content'] + '\n</tool_response>' -}}"
    "{%- if loop.last or loop.nextitem['role'] != 'tool' -%}{{- '<|im_end|>\n' -}}{%- endif -%}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking -%}{{- '<think>\n' -}}"
    "{%- elif enable_thinking is defined -%}{{- '<think>\n\n</think>\n\n' -}}{%- endif -%}"
    "{%- endif -%}"
)


@dataclass(frozen=True)
class ChatTemplate:
    text: str
    end_of_turn: str | None  # the token after every reply; None: the tokenizer's eos token
    special_tokens: tuple[str, ...] = ()  # markers a tokenizer must hold as single special tokens


TEMPLATES = {
    "minicpm": ChatTemplate(MINICPM_TEMPLATE, end_of_turn=None),
    "chatml": ChatTemplate(CHATML_TEMPLATE, end_of_turn="<|im_end|>", special_tokens=("<|im_start|>", "<|im_end|>")),
    "minicpm5": ChatTemplate(MINICPM5_TEMPLATE, end_of_turn="<|im_end|>",
                             special_tokens=("<|im_start|>", "<|im_end|>", "<think>", "</think>")),
}


def resolve_chat_template(tokenizer, model_type: str | None = None, override: str | None = None) -> str:
    """The template to train and infer with: the flag, else the tokenizer's, else the model family's
    (families.py: its preferred one when the tokenizer holds that template's markers).

    ``override`` is a built-in name (``minicpm``, ``chatml``) or a path to a Jinja file.
    A tokenizer template in MiniCPM-2B's ``<用户>`` style is replaced by ours (same format,
    plus system turns and an end-of-turn eos).
    """
    if override:
        if override in TEMPLATES:
            return TEMPLATES[override].text
        if os.path.isfile(override):
            with open(override, encoding="utf-8") as f:
                return f.read()
        raise ArgumentError(f"--chat_template {override!r} is neither one of {sorted(TEMPLATES)} nor a file")
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, str) and own:
        return MINICPM_TEMPLATE if "<用户>" in own else own
    family = family_of(model_type)
    preferred = TEMPLATES.get(family.preferred_template or "")
    if preferred and all(holds_token(tokenizer, token) for token in preferred.special_tokens):
        return preferred.text
    return TEMPLATES[family.chat_template].text


def holds_token(tokenizer, token: str) -> bool:
    """Whether ``token`` is one token of the tokenizer's vocabulary."""
    token_id = tokenizer.convert_tokens_to_ids(token)
    return token_id is not None and token_id != tokenizer.unk_token_id


# A reply no template alters, to see what a template writes after one.
_PROBE_REPLY = "end-of-turn probe"


def end_of_turn_token(tokenizer) -> str:
    """The token that closes an assistant reply under the tokenizer's template (learned, and where generation
    stops): a built-in template's own, else the special token the template writes right after a reply's text
    (whitespace aside), else the eos token."""
    template = tokenizer.chat_template
    for builtin in TEMPLATES.values():
        if template == builtin.text:
            return builtin.end_of_turn or tokenizer.eos_token
    if not isinstance(template, str) or not template:
        return tokenizer.eos_token
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "?"},
                                              {"role": "assistant", "content": _PROBE_REPLY}], tokenize=False)
    except Exception:  # noqa: BLE001 - a template that cannot render a plain exchange ends turns with eos
        return tokenizer.eos_token
    after = text[text.rfind(_PROBE_REPLY) + len(_PROBE_REPLY):].lstrip() if _PROBE_REPLY in text else ""
    special = sorted((t.content for t in tokenizer.added_tokens_decoder.values() if t.special), key=len, reverse=True)
    return next((token for token in special if after.startswith(token)), tokenizer.eos_token)


def stop_token_ids(tokenizer) -> list[int]:
    """Ids that end a reply: the template's end-of-turn token and eos (the same under the minicpm template)."""
    ids = [tokenizer.convert_tokens_to_ids(end_of_turn_token(tokenizer)), tokenizer.eos_token_id]
    # A token missing from the vocabulary converts to unk, which must not stop anything.
    return list(dict.fromkeys(i for i in ids if i is not None and i != tokenizer.unk_token_id))


def apply_template(tokenizer, template: str) -> None:
    """Install ``template`` on the tokenizer and make sure it can pad (MiniCPM's tokenizer has no pad token)."""
    tokenizer.chat_template = template
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
