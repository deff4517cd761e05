"""What every output folder carries, whoever writes it (the Trainer's saves and checkpoints through
``PortableSaves``, merge, Llama export).

- The tokenizer it was trained with: the base's own tokenizer files, copied byte for byte, plus the chat
  template we trained with (``chat_template.jinja``, and in ``tokenizer_config.json`` for older stacks).
  Where loading had to fix the tokenizer to give its SentencePiece model's ids (MiniCPM-1/2 on
  transformers 5: tokenizer.py), also the fixed ``tokenizer.json``, with ``PreTrainedTokenizerFast`` as
  the class so that transformers 4.40 and 5 both load that file as it is. Re-saving a loaded tokenizer
  with ``save_pretrained`` is not the same thing: it drops ``tokenizer.model``, which llama.cpp reads
  MiniCPM vocabularies from, and writes ``add_prefix_space``, which sends transformers 4.40 back to it.
- For a full or merged model of a family implemented here (families.py; MiniCPM-1/2/4, ``model_type:
  minicpm``): its own code, ``configuration_minicpm.py`` and ``modeling_minicpm.py`` (with ``loss.py``,
  which it imports), and an ``auto_map`` in ``config.json``, the layout of the official checkpoints, so
  ``AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)`` works where this package is not
  installed. Where it is imported, its registered native class is used.
"""

from __future__ import annotations

import json
import os
import shutil

from .. import models
from ..cli import write_atomic
from ..data.tokenizer import is_tokenizer_file, portable_settings, portable_tokenizer_json, tokenizer_folder
from ..models.families import family_of

CHAT_TEMPLATE_FILE = "chat_template.jinja"


def save_tokenizer(tokenizer, output_dir: str) -> None:
    """Write the tokenizer of an output: the files it was loaded from (``tokenizer.name_or_path``) as they
    are, plus ``tokenizer.chat_template`` and its pad token. A tokenizer with no files behind it (built in
    memory) is saved with ``save_pretrained``."""
    source = tokenizer_folder(getattr(tokenizer, "name_or_path", ""))
    if source is None:
        tokenizer.save_pretrained(output_dir)
        return
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    copy_tokenizer(source, output_dir, template, tokenizer.pad_token)
    if getattr(tokenizer, "sentencepiece_aligned", False):
        # The pipeline that gives the SentencePiece model's ids, in a file both transformers 4.40 and 5 load as is.
        write_atomic(os.path.join(output_dir, "tokenizer.json"), portable_tokenizer_json(tokenizer))
        _update_tokenizer_config(os.path.join(output_dir, "tokenizer_config.json"), None, None,
                                 portable_settings(tokenizer))


def copy_tokenizer(source: str, output_dir: str, chat_template: str | None = None, pad_token: str | None = None):
    """Copy the tokenizer files of folder ``source`` into output_dir, replacing any there (e.g. what
    ``save_pretrained`` wrote); ``chat_template`` replaces the source's template, ``pad_token`` is recorded
    when the source has none."""
    files = {}  # read first: source may be output_dir itself (a few MB at most)
    for name in os.listdir(source):
        if is_tokenizer_file(name) and os.path.isfile(os.path.join(source, name)):
            if chat_template is None or name not in (CHAT_TEMPLATE_FILE, "chat_template.json"):
                with open(os.path.join(source, name), "rb") as f:
                    files[name] = f.read()
    os.makedirs(output_dir, exist_ok=True)
    for name in os.listdir(output_dir):
        if is_tokenizer_file(name) and os.path.isfile(os.path.join(output_dir, name)):
            os.remove(os.path.join(output_dir, name))
    for name, content in files.items():
        with open(os.path.join(output_dir, name), "wb") as f:
            f.write(content)
    if chat_template is None and pad_token is None:
        return
    _update_tokenizer_config(os.path.join(output_dir, "tokenizer_config.json"), chat_template, pad_token)
    if chat_template is not None:
        with open(os.path.join(output_dir, CHAT_TEMPLATE_FILE), "w", encoding="utf-8") as f:
            f.write(chat_template)


def _update_tokenizer_config(path: str, chat_template: str | None, pad_token: str | None,
                             settings: dict | None = None) -> None:
    """The base's settings stay as they are, except: its template gives way to ours (here as well as in its own
    file: transformers 4.40 reads it only here), the pad token we trained with is recorded (MiniCPM's tokenizer
    has none), and ``settings`` replace theirs."""
    if not os.path.isfile(path):  # a tokenizer.json-only base: nothing to record it in
        return
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    if chat_template is not None:
        config["chat_template"] = chat_template
    if pad_token is not None and not config.get("pad_token"):
        config["pad_token"] = str(pad_token)
    config.update(settings or {})
    write_atomic(path, json.dumps(config, ensure_ascii=False, indent=2) + "\n")


def ship_model_code(output_dir: str) -> None:
    """Make a saved model of a family implemented here (families.py: ``native``) loadable without this
    package: copy its code in and point ``auto_map`` at it (replacing any auto_map of the base, whose remote
    code does not run on transformers 5). Other folders (adapters, Llama layout) are left alone."""
    config_path = os.path.join(output_dir, "config.json")
    if not os.path.isfile(config_path):
        return
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    family = family_of(config.get("model_type"))
    if not family.native:
        return
    package = os.path.dirname(os.path.abspath(models.__file__))  # the code files live beside the family table
    for name in family.code_files:
        shutil.copyfile(os.path.join(package, name), os.path.join(output_dir, name))
    config["auto_map"] = dict(family.native)
    write_atomic(config_path, json.dumps(config, ensure_ascii=False, indent=2, sort_keys=True) + "\n")


def finish_output(output_dir: str, tokenizer=None) -> None:
    """Everything an output folder carries besides its weights: the tokenizer (when given) and, for a full
    MiniCPM model, its code."""
    if tokenizer is not None:
        save_tokenizer(tokenizer, output_dir)
    ship_model_code(output_dir)


class PortableSaves:
    """Mixin for a transformers ``Trainer`` (put it first among the bases): every save, the final model and
    each checkpoint, writes what ``finish_output`` adds (the base's tokenizer files with the chat template,
    and a full MiniCPM's code), on the processes that save."""

    def _save(self, output_dir=None, state_dict=None):
        super()._save(output_dir, state_dict)
        if self.args.should_save:
            finish_output(output_dir if output_dir is not None else self.args.output_dir, self.processing_class)
