"""The data stage: from a data file to token ids and loss masks.

- ``sources``: reading any source (JSON, JSON Lines, Parquet, ``save_to_disk`` folders, hub names) in bounded
  memory, a record at a time.
- ``formats``: the data-format registry (conversation, ShareGPT, Alpaca, prompt/response; preference pairs).
- ``checks``: checking every record into a cached Arrow table; one report of all problems.
- ``templates``, ``tokenizer``, ``rendering``, ``encoding``: chat templates, tokenizers with SentencePiece's
  ids, rendering a conversation, tokenizing and masking in batches (the tokenized set, cached).
- ``packing``: packed batches; ``preference``: DPO pairs; ``preview``: the ``python -m minicpm_finetune.data``
  command.

Imports: ``minicpm_finetune.cli`` and ``minicpm_finetune.models``; never training, evaluation or export.
The names below are the ones this module had before it became a package.
"""

from .checks import FORMATS, MAX_LISTED_PROBLEMS, FileCheck, check_file, check_files, example_of, load_conversations
from .checks import to_messages
from .encoding import IGNORE_INDEX, encode
from .tokenized import EncodeStats, tokenize_dataset
from .formats import check_messages
from .preview import main, render_masked
from .sources import DataError, read_records, record_is_unreadable

__all__ = ["FORMATS", "MAX_LISTED_PROBLEMS", "FileCheck", "check_file", "check_files", "example_of",
           "load_conversations", "to_messages", "IGNORE_INDEX", "EncodeStats", "encode", "tokenize_dataset",
           "check_messages", "main", "render_masked", "DataError", "read_records", "record_is_unreadable"]
