"""What every output folder carries, whoever writes it (the Trainer's saves and checkpoints through
``PortableSaves``, merge, Llama export).

- The tokenizer it was trained with: the base's own tokenizer files, copied byte for byte, plus the chat
  template we trained with (``chat_template.jinja``). Re-saving a loaded tokenizer is not the same thing:
  transformers 5 writes ``tokenizer.json`` without ``tokenizer.model`` and drops settings such as
  MiniCPM-2B's ``legacy: true``, so the reloaded tokenizer puts a "▁" after every added token (Chinese
  punctuation in MiniCPM's vocabulary) differently, and llama.cpp, which reads MiniCPM vocabularies from
  ``tokenizer.model`` only, cannot convert the folder.
- For a full or merged model of a family implemented here (families.py; MiniCPM-1/2/4, ``model_type:
  minicpm``): its own code, ``configuration_minicpm.py`` and ``modeling_minicpm.py`` (with ``loss.py``,
  which it imports), and an ``auto_map`` in ``config.json``, the layout of the official checkpoints, so
  ``AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)`` works where this package is not
  installed. Where it is imported, its registered native class is used.
"""

from __future__ import annotations

import fnmatch
import functools
import json
import os
import shutil

from .cli import write_atomic
from .families import family_of

# Files that make up a tokenizer. The first three mark a folder as holding one.
TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "tokenization_*.py",  # a tokenizer's own code, named by its config's auto_map
)
CHAT_TEMPLATE_FILE = "chat_template.jinja"

def is_tokenizer_file(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in TOKENIZER_FILES)


def has_tokenizer(folder: str) -> bool:
    return any(os.path.isfile(os.path.join(folder, name)) for name in TOKENIZER_FILES[:3])


def tokenizer_folder(name_or_path: str) -> str | None:
    """The local folder holding the tokenizer files of a folder or hub id (from the hub cache, or
    downloaded: only the tokenizer files); None when there is none."""
    if not name_or_path:
        return None
    if os.path.isdir(name_or_path):
        return name_or_path if has_tokenizer(name_or_path) else None
    return _hub_tokenizer_folder(name_or_path)


@functools.lru_cache(maxsize=None)  # asked at every checkpoint; one look-up per run
def _hub_tokenizer_folder(repo_id: str) -> str | None:
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(repo_id, allow_patterns=list(TOKENIZER_FILES))
    except Exception:  # not a hub id, offline without a cached copy, ...: the caller saves what was loaded
        return None
    return folder if has_tokenizer(folder) else None


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


def _update_tokenizer_config(path: str, chat_template: str | None, pad_token: str | None) -> None:
    """The base's settings stay as they are; only its template gives way to ours (kept in its own file, one
    source of truth) and the pad token we trained with is recorded (MiniCPM's tokenizer has none)."""
    if not os.path.isfile(path):  # a tokenizer.json-only base: nothing to record it in
        return
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    if chat_template is not None:
        config.pop("chat_template", None)
    if pad_token is not None and not config.get("pad_token"):
        config["pad_token"] = str(pad_token)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(config, f, ensure_ascii=False, indent=2)
        f.write("\n")


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
    package = os.path.dirname(os.path.abspath(__file__))
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
