"""Chat templates: one Jinja template renders both the training data and the inference prompts.

Two styles are built in:
- ``minicpm``: MiniCPM-1/2's ``<用户>{user}<AI>{assistant}``, system text raw before the first turn,
  and the eos token after every reply so the model learns to stop. (The template shipped with
  MiniCPM-2B drops system turns and ends replies with nothing; we keep its format and fix both.)
- ``chatml``: ``<|im_start|>role\\n...<|im_end|>\\n`` as used by MiniCPM3 and MiniCPM4.

The template is saved with every output, so inference renders prompts exactly as training did.
"""

from __future__ import annotations

import os

MINICPM_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}{{ '<用户>' + message['content'] + '<AI>' }}"
    "{% else %}{{ message['content'] + eos_token }}"
    "{% endif %}"
    "{% endfor %}"
)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
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
        raise ValueError(f"--chat_template {override!r} is neither one of {sorted(TEMPLATES)} nor a file")
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
