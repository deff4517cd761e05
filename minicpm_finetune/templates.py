"""Chat templates: one Jinja template renders both the training data and the inference prompts.

Two styles are built in:
- ``minicpm``: MiniCPM-1/2's ``<用户>{user}<AI>{assistant}``, system text raw before the first turn,
  and the eos token after every reply so the model learns to stop. (The template shipped with
  MiniCPM-2B drops system turns and ends replies with nothing; we keep its format and fix both.)
- ``chatml``: ``<|im_start|>role\\n...<|im_end|>\\n`` as used by MiniCPM3 and MiniCPM4, with MiniCPM3's
  function-calling format for tools and tool calls (see CHATML_TEMPLATE).

The template is saved with every output, so inference renders prompts exactly as training did.
"""

from __future__ import annotations

import os

from .cli import ArgumentError

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

TEMPLATES = {"minicpm": MINICPM_TEMPLATE, "chatml": CHATML_TEMPLATE}

# Model types whose tokenizers ship without a usable template.
DEFAULT_TEMPLATE_FOR_MODEL_TYPE = {"minicpm": "minicpm", "minicpm3": "chatml", "llama": "minicpm"}


def resolve_chat_template(tokenizer, model_type: str | None = None, override: str | None = None) -> str:
    """The template to train and infer with: the flag, else the tokenizer's, else by model type.

    ``override`` is a built-in name (``minicpm``, ``chatml``) or a path to a Jinja file.
    A tokenizer template in MiniCPM-2B's ``<用户>`` style is replaced by ours (same format,
    plus system turns and an end-of-turn eos).
    """
    if override:
        if override in TEMPLATES:
            return TEMPLATES[override]
        if os.path.isfile(override):
            with open(override, encoding="utf-8") as f:
                return f.read()
        raise ArgumentError(f"--chat_template {override!r} is neither one of {sorted(TEMPLATES)} nor a file")
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, str) and own:
        return MINICPM_TEMPLATE if "<用户>" in own else own
    return TEMPLATES[DEFAULT_TEMPLATE_FOR_MODEL_TYPE.get(model_type or "", "minicpm")]


def end_of_turn_token(tokenizer) -> str:
    """The token that closes an assistant reply under the tokenizer's template (learned, and where generation stops)."""
    template = tokenizer.chat_template or ""
    return "<|im_end|>" if "<|im_end|>" in template else tokenizer.eos_token


def apply_template(tokenizer, template: str) -> None:
    """Install ``template`` on the tokenizer and make sure it can pad (MiniCPM's tokenizer has no pad token)."""
    tokenizer.chat_template = template
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
