"""Training data: read any source in bounded memory, check every record, tokenize and mask in batches.

Sources: a JSON Lines file (records numbered by line), a JSON array file (by item), a Parquet file or a
folder written by ``datasets.save_to_disk`` (by row), or a hub dataset name (``owner/name``, optionally
``owner/name:split``; by row). Record formats are defined in ``formats.py`` (detected per file from its
first record, or forced with ``data_format``).

Checking streams the source once, record by record, into an Arrow table (``datasets``, memory-mapped,
cached by the source's path, size and modification time) holding per record its position, its problem
(if any) and its normalised example as JSON text. Nothing holds the data set as Python objects, so
memory does not grow with the data. One report lists the first 20 problems of all files, counted; with
``skip_bad_samples`` bad records are dropped and counted instead.

Encoding (``encoding.py``): every conversation is rendered with the chat template and tokenized in
batches; the tokenized set is cached under a key made of the data, the tokenizer, the chat template and
``max_length``, so a second run with the same four is served from the cache and any change re-tokenizes.

Preview before training:
    python -m minicpm_finetune.data --tokenizer PATH --data FILE [--model_max_length N] [--dump OUT.jsonl]
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass, field

import numpy as np

from . import formats as registry
from .cli import (ArgumentError, FinetuneError, OneLineParser, atomic_path, command, load_error, looks_local,
                  write_atomic)
from .formats import check_messages  # noqa: F401 - part of this module's interface (preference.py uses it)
from .encoding import (ENCODER_VERSION, IGNORE_INDEX, TemplateError, encoded_schema, get_encoder,
                       tokenizer_fingerprint)

FORMATS = ("auto", *registry.format_names())
MAX_LISTED_PROBLEMS = 20
CHECK_VERSION = "2"  # part of the checked-data cache key: bump when checking or normalising changes
PLACEHOLDER_REPLY = "-"
_CHUNK = 1 << 20


class DataError(FinetuneError):
    """Bad training data; the message names the file, the record and the problem."""


class _Unreadable(str):
    """A record that could not be parsed (the text says why)."""


def record_is_unreadable(obj) -> bool:
    """Whether read_records yielded a parse problem instead of a record."""
    return isinstance(obj, _Unreadable)


class _DuplicateKey(ValueError):
    pass


def _object(pairs):
    """json object hook: a key given twice would silently keep only its last value."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(f'duplicate key "{key}" in one object (JSON keeps only the last value; '
                                    "keep one)")
            seen.add(key)
    return obj


_decoder = json.JSONDecoder(object_pairs_hook=_object)

try:  # optional: parses and serialises several times faster than json (same results, checked below)
    import orjson as _orjson
except ImportError:
    _orjson = None
_SERIALISER = "orjson" if _orjson else "json"  # part of the cache key: digests depend on it


def _count_keys(obj) -> int:
    """Keys in all objects of a parsed JSON value (exact types: json and orjson build plain dicts and lists)."""
    kind = type(obj)
    if kind is dict:
        count = len(obj)
        for value in obj.values():
            if type(value) is dict or type(value) is list:
                count += _count_keys(value)
        return count
    if kind is list:
        count = 0
        for value in obj:
            if type(value) is dict or type(value) is list:
                count += _count_keys(value)
        return count
    return 0


_NOT_PARSED = object()
_SPACED_COLON = re.compile(r'"\s+:')  # a key written "key" : is not counted by '":'
_SPACED_COLON_BYTES = re.compile(rb'"\s+:')


def _parse_fast(text):
    """One JSON value parsed by orjson (text: str, or UTF-8 bytes, which orjson checks), or _NOT_PARSED when
    _parse must look: orjson refuses it (json says what is wrong, or accepts e.g. lone surrogates), or a
    key may be given twice. When every key is written as "key": (no space before a colon) and the text holds no
    more '":' than the parsed value has keys, no key was given twice; otherwise ('":' in a string) look."""
    if _orjson is None:
        return _NOT_PARSED
    try:
        obj = _orjson.loads(text)
    except _orjson.JSONDecodeError:
        return _NOT_PARSED
    if type(text) is bytes:
        written, spaced = text.count(b'":'), _SPACED_COLON_BYTES.search(text)
    else:
        written, spaced = text.count('":'), _SPACED_COLON.search(text)
    return obj if written == _count_keys(obj) and not spaced else _NOT_PARSED


def _parse(text: str):
    """One JSON value; a key given twice in an object raises _DuplicateKey (json would keep the last)."""
    obj = _parse_fast(text)
    if obj is not _NOT_PARSED:
        return obj
    obj, end = _decoder.raw_decode(text, len(text) - len(text.lstrip()))
    if text[end:].strip():
        raise json.JSONDecodeError("Extra data", text, end)
    return obj


# --------------------------------------------------------------------------- reading


def _is_hub_name(path: str) -> bool:
    return not looks_local(path.split(":")[0])


def _not_utf8(path: str, offset: int, reason: str) -> DataError:
    line = 1
    with open(path, "rb") as f:
        remaining = offset
        while remaining > 0:
            block = f.read(min(_CHUNK, remaining))
            if not block:
                break
            line += block.count(b"\n")
            remaining -= len(block)
    return DataError(f"{path}:{line}: not UTF-8 ({reason} at byte {offset})")


def _jsonl_records(path: str):
    """JSON Lines, split on "\\n" only: U+2028/U+2029 and other separators inside strings are text."""
    offset = 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            start, offset = offset, offset + len(raw)
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw, start = raw[3:], start + 3
            obj = _parse_fast(raw)  # the common case, without decoding the line first
            if obj is not _NOT_PARSED:
                yield number, obj
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _not_utf8(path, start + e.start, e.reason) from None
            if not line.strip():
                continue
            try:
                yield number, _parse(line)
            except _DuplicateKey as e:
                yield number, _Unreadable(str(e))
            except json.JSONDecodeError as e:
                if number == 1 and line.strip() == "{":
                    raise DataError(f"{path} holds records spread over several lines (pretty-printed JSON), not "
                                    "JSON Lines: write one record per line (json.dumps without indent), or make "
                                    "the file one JSON array of records") from None
                yield number, _Unreadable(f"malformed JSON ({e.msg}, column {e.colno})")


class _JsonArrayReader:
    """A sliding window of decoded text over a JSON array file, and the line number where it starts."""

    def __init__(self, path: str, f):
        self.path, self.f = path, f
        self.buffer, self.eof, self.line = "", False, 1
        self.pending, self.consumed = b"", 0  # pending: the start of a character cut by the block's end

    def more(self) -> bool:
        """Append the next block to the buffer; False at the end of the file."""
        if self.eof:
            return False
        block = self.f.read(_CHUNK)
        if not block:
            self.eof = True
            if self.pending:
                raise _not_utf8(self.path, self.consumed, "truncated character at the end")
            return False
        text = self._decode(self.pending + block)
        self.consumed += len(block)
        if not self.buffer and text.startswith("\ufeff"):
            text = text[1:]
        self.buffer += text
        return True

    def _decode(self, data: bytes) -> str:
        try:
            text, self.pending = data.decode("utf-8"), b""
        except UnicodeDecodeError as e:
            if e.end < len(data) - 3 or e.reason != "unexpected end of data":
                raise _not_utf8(self.path, self.consumed - len(self.pending) + e.start, e.reason) from None
            text, self.pending = data[: e.start].decode("utf-8", "strict"), data[e.start:]
        return text

    def skip_space(self, pos: int) -> int:
        """The position of the next non-space character (reading on as needed), counting the lines passed."""
        while True:
            stripped = len(self.buffer) - len(self.buffer[pos:].lstrip())
            self.line += self.buffer.count("\n", pos, stripped)
            if stripped < len(self.buffer) or not self.more():
                return stripped

    def value_at(self, pos: int):
        """The JSON value that starts at ``pos`` and where it ends, reading on while it is incomplete."""
        while True:
            try:
                obj, end = _decoder.raw_decode(self.buffer, pos)
                if end >= len(self.buffer) and not self.eof and self.more():  # a number may go on in the next block
                    continue
                return obj, end
            except _DuplicateKey as e:
                end = _skip_value(self.buffer, pos)
                if end is not None:
                    return _Unreadable(str(e)), end
                if not self.more():
                    raise DataError(f"{self.path}:{self.line}: malformed JSON array") from None
            except json.JSONDecodeError as e:
                if not self.more():
                    raise DataError(f"{self.path}:{self.line + self.buffer.count(chr(10), pos, e.pos)}: malformed "
                                    f"JSON array ({e.msg})") from None

    def check_nothing_after(self, pos: int, items: int) -> None:
        """After the closing ]: only space may follow (JSON Lines of arrays is named as such)."""
        rest = self.skip_space(pos)
        if rest < len(self.buffer):
            if self.buffer[rest] == "[" or items == 0:
                raise DataError(f"{self.path} is JSON Lines whose lines are arrays: write one JSON object per "
                                "line, or make the whole file one JSON array")
            raise DataError(f"{self.path}:{self.line}: malformed JSON array (text after the closing ])")

    def after_item(self, start: int, end: int, number: int) -> int:
        """The position after the separator that follows item ``number`` (``start``-``end`` in the buffer)."""
        self.line += self.buffer.count("\n", start, end)
        pos = self.skip_space(end)
        if pos < len(self.buffer) and self.buffer[pos] == ",":
            pos += 1
        elif pos < len(self.buffer) and self.buffer[pos] != "]":
            raise DataError(f"{self.path}:{self.line}: malformed JSON array (expected , or ] after item {number})")
        return pos


def _json_array_records(path: str):
    """The items of a JSON array file, parsed one at a time from a sliding buffer (bounded memory)."""
    with open(path, "rb") as f:
        reader = _JsonArrayReader(path, f)
        reader.more()
        pos = reader.skip_space(0) + 1  # after the "[" (checked by the caller)
        number = 0
        while True:
            pos = reader.skip_space(pos)
            if pos >= len(reader.buffer):
                raise DataError(f"{path}:{reader.line}: malformed JSON array (no closing ])")
            if reader.buffer[pos] == "]":
                reader.check_nothing_after(pos + 1, number)
                return
            obj, end = reader.value_at(pos)
            number += 1
            yield number, obj
            pos = reader.after_item(pos, end, number)
            # Drop what was parsed so the buffer stays about one block long.
            reader.buffer, pos = reader.buffer[pos:], 0


def _skip_value(text: str, pos: int):
    """The end of the JSON value at ``pos`` (parsed without the duplicate-key check), or None if incomplete."""
    try:
        return json.JSONDecoder().raw_decode(text, pos)[1]
    except json.JSONDecodeError:
        return None


def _arrow_source(path: str):
    """A datasets.Dataset for a save_to_disk folder, a Parquet file or a hub name; None for JSON files."""
    import datasets

    if os.path.isdir(path):
        try:
            loaded = datasets.load_from_disk(path)
        except Exception as e:  # noqa: BLE001 - any failure: not a saved dataset
            raise DataError(f"{path}: a folder, but not one written by datasets.save_to_disk "
                            f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        if isinstance(loaded, datasets.DatasetDict):
            raise DataError(f"{path} holds several splits ({', '.join(loaded)}); give one of them, "
                            f"e.g. {os.path.join(path, next(iter(loaded)))}")
        return loaded
    if os.path.isfile(path):
        if path.endswith(".parquet"):
            try:
                return datasets.load_dataset("parquet", data_files=path, split="train")
            except Exception as e:  # noqa: BLE001
                raise DataError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0]})") from None
        return None
    if _is_hub_name(path):
        name, _, split = path.partition(":")
        try:
            return datasets.load_dataset(name, split=split or "train")
        except Exception as e:  # noqa: BLE001 - offline, unknown name, no such split
            raise DataError(f"{path}: not a local file, and loading it from the hub failed: "
                            f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None
    raise DataError(f"{path}: file not found")


def read_records(path: str):
    """Yield (record number, object or parse problem) in file order, in bounded memory.

    JSON Lines count lines, JSON arrays items, Parquet files and saved data sets rows (from 1).
    File-level problems (missing, not UTF-8, empty, malformed array) raise DataError.
    """
    source = _arrow_source(path)
    if source is not None:
        number = 0
        for batch in source.iter(batch_size=1000):
            columns = list(batch)
            for i in range(len(batch[columns[0]]) if columns else 0):
                number += 1
                yield number, {k: batch[k][i] for k in columns}
        if number == 0:
            raise DataError(f"{path}: no records")
        return
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
            while head.strip() == b"" and head:
                head = f.read(4096)
        first = head.lstrip().lstrip(b"\xef\xbb\xbf").lstrip()[:1]
        if not first:
            raise DataError(f"{path}: file is empty")
        yield from (_json_array_records(path) if first == b"[" else _jsonl_records(path))
    except OSError as e:  # unreadable: permissions, a folder, an I/O error
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None


def _location(path: str, number: int) -> str:
    """How a problem names its record: FILE:LINE (or item) for JSON, FILE: row N for Arrow sources."""
    if os.path.isfile(path) and not path.endswith(".parquet"):
        return f"{path}:{number}"
    return f"{path}: row {number}"


# --------------------------------------------------------------------------- checking


def to_messages(record: dict, data_format: str) -> list[dict]:
    """One record's normalised messages (ValueError names the problem)."""
    return registry.convert(record, data_format)[0]["messages"]




def _serialise(example: dict) -> bytes:
    """UTF-8 JSON of a normalised example; UnicodeEncodeError for a lone surrogate."""
    if _orjson is not None:
        try:
            return _orjson.dumps(example)
        except TypeError:  # a lone surrogate: json names the character below
            pass
    return json.dumps(example, ensure_ascii=False).encode("utf-8")


def _checked_rows(path: str, data_format: str, kind: str, prompts: bool):
    """One row per record, a tuple in _CHECKED_COLUMNS' order: position, problem ("" when good), normalised
    example (JSON), its digest, the ignored keys, whether it uses tools, its format."""
    chosen = None if data_format == "auto" else data_format
    fmt = registry.FORMATS[chosen] if chosen else None
    for number, obj in read_records(path):
        problem = ""
        if record_is_unreadable(obj):
            problem = str(obj)
        elif not isinstance(obj, dict):
            problem = ("record is not a JSON object" + (" but a list (JSON Lines: one object per line)"
                                                        if isinstance(obj, list) else ""))
        else:
            if chosen is None or (prompts and data_format == "auto"):  # prompt files may mix formats
                chosen = registry.detect(obj, kind)
                if chosen is None:
                    raise DataError(f"{_location(path, number)}: {registry.unknown_format_text(obj, kind)}")
                fmt = registry.FORMATS[chosen]
            try:
                record = fmt.add_reply(obj, PLACEHOLDER_REPLY) if prompts else obj
                example, ignored = registry.convert(record, chosen)
                if prompts:
                    example["messages"] = example["messages"][:-1]
                encoded = _serialise(example)
            except UnicodeEncodeError as e:  # before ValueError, its base class
                problem = (f"text holds a lone surrogate ({e.object[e.start:e.end].encode('unicode_escape').decode()}) "
                           "that no tokenizer can encode: fix the text, or pass --skip_bad_samples")
            except ValueError as e:
                problem = str(e)
            else:
                tools = bool(example.get("tools") or any(m.get("tool_calls") or m["role"] == "tool"
                                                         for m in example["messages"]))
                digest = int.from_bytes(hashlib.blake2b(encoded, digest_size=8).digest(), "little", signed=True)
                yield number, "", encoded, digest, ",".join(ignored), tools, chosen
                continue
        yield number, problem, "", 0, "", False, chosen or ""


def _source_identity(path: str) -> str:
    if os.path.isfile(path):
        stat = os.stat(path)
        return f"file:{os.path.realpath(path)}:{stat.st_size}:{stat.st_mtime_ns}"
    source = _arrow_source(path)  # a saved folder or a hub data set: datasets' own fingerprint
    return f"arrow:{os.path.realpath(path) if os.path.isdir(path) else path}:{source._fingerprint}"


_CHECKED_COLUMNS = {"position": "int64", "problem": "string", "example": "string", "digest": "int64",
                    "ignored": "string", "tools": "bool", "data_format": "string"}


def _write_checked(path: str, rows, batch_rows: int = 10_000) -> None:
    """Checked rows (tuples) to an Arrow stream file in batches (bounded memory), renamed into place when complete."""
    import pyarrow as pa

    schema = pa.schema([(name, pa.type_for_alias(kind)) for name, kind in _CHECKED_COLUMNS.items()])
    with atomic_path(path) as tmp:
        with pa.OSFile(tmp, "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            batch = []

            def flush():
                columns = zip(*batch)  # rows -> columns, in C
                writer.write_batch(pa.record_batch([pa.array(values, f.type) for values, f in zip(columns, schema)],
                                                   schema=schema))
                batch.clear()

            for row in rows:
                batch.append(row)
                if len(batch) >= batch_rows:
                    flush()
            if batch:
                flush()


@dataclass
class FileCheck:
    """The outcome of checking one source: its format, its checked rows and the problems found."""

    path: str
    data_format: str = "conversation"
    checked: object = None  # datasets.Dataset of checked rows (Arrow, memory-mapped)
    problems: list = field(default_factory=list)  # the first MAX_LISTED_PROBLEMS, "FILE:N: problem"
    problem_count: int = 0
    good_count: int = 0
    duplicates: int = 0
    ignored_keys: list = field(default_factory=list)
    tool_records: int = 0
    records: list = field(default_factory=list)  # (number, record) for checks made in memory (preference.py)

    def report(self) -> str:
        count = max(self.problem_count, len(self.problems))
        more = count - len(self.problems)
        lines = [f"{count} bad record(s) in {self.path}:", *self.problems]
        if more:
            lines.append(f"... and {more} more")
        return "\n".join(lines)

    def _good_mask(self) -> np.ndarray:
        import pyarrow.compute as pc

        return pc.equal(self.checked.data.column("problem"), "").to_numpy(zero_copy_only=False)

    def digests(self) -> np.ndarray:
        return self.checked.data.column("digest").to_numpy()[self._good_mask()]

    def good(self):
        """The good records as a datasets.Dataset with columns example (JSON text) and tools."""
        good = self.checked
        if self.problem_count:
            good = good.select(np.flatnonzero(self._good_mask()))
        return good.select_columns(["position", "example", "tools"])


def check_file(path: str, data_format: str = "auto", kind: str = "sft", prompts: bool = False) -> FileCheck:
    """Check every record of a source in one streaming pass (cached) and summarise the problems.

    ``prompts``: the records are prompts only (no final reply), as inference.py reads them.
    """
    import datasets
    import pyarrow.compute as pc

    if data_format != "auto" and data_format not in registry.FORMATS:
        raise DataError(f"unknown data format {data_format!r} (expected one of {', '.join(FORMATS)})")
    fingerprint = hashlib.sha256(json.dumps([CHECK_VERSION, _SERIALISER, _source_identity(path), data_format, kind,
                                             prompts])
                                 .encode("utf-8")).hexdigest()[:32]
    cache = os.path.join(datasets.config.HF_DATASETS_CACHE, "minicpm_finetune", f"checked-{fingerprint}.arrow")
    if not os.path.exists(cache):
        collecting = gc.isenabled()
        gc.disable()  # many small objects, no cycles (see _encode_rows)
        try:
            _write_checked(cache, _checked_rows(path, data_format, kind, prompts))
        finally:
            if collecting:
                gc.enable()
    checked = datasets.Dataset.from_file(cache)
    checked._fingerprint = fingerprint
    check = FileCheck(path, checked=checked)
    if len(checked) == 0:
        raise DataError(f"{path}: file is empty")
    table = checked.data
    formats_seen = [f for f in pc.unique(table.column("data_format")).to_pylist() if f]
    check.data_format = formats_seen[0] if formats_seen else (data_format if data_format != "auto" else "conversation")
    good = check._good_mask()
    check.good_count = int(good.sum())
    check.problem_count = len(good) - check.good_count
    if check.problem_count:
        bad = checked.select(np.flatnonzero(~good)[:MAX_LISTED_PROBLEMS]).select_columns(["position", "problem"])
        check.problems = [f"{_location(path, p)}: {problem}" for p, problem in zip(bad["position"], bad["problem"])]
    digests = table.column("digest").to_numpy()[good]
    check.duplicates = int(len(digests) - len(np.unique(digests)))
    keys = set()
    for joined in pc.unique(table.column("ignored")).to_pylist():
        keys.update(k for k in (joined or "").split(",") if k)
    check.ignored_keys = sorted(keys)
    check.tool_records = int(pc.sum(table.column("tools")).as_py() or 0)
    return check


def check_files(paths: dict, data_format: str = "auto", skip_bad_samples: bool = False, log=print) -> dict:
    """Check every data file before anything is loaded; one DataError lists all problems of all files.

    ``paths`` maps split names to sources. Returns {split: FileCheck}. Unreadable files (not UTF-8,
    empty, malformed JSON array, unknown format) always stop; bad records stop unless
    ``skip_bad_samples``. Warns when the validation data is the training data.
    """
    checks, fatal = {}, []
    for name, path in paths.items():
        try:
            checks[name] = check_file(path, data_format)
        except DataError as e:
            fatal.append(str(e))
    problems = fatal + [problem for check in checks.values() for problem in check.problems]  # files first
    total = len(fatal) + sum(check.problem_count for check in checks.values())
    if fatal or (total and not skip_bad_samples):
        shown = problems[:MAX_LISTED_PROBLEMS]
        more = f"\n... and {total - len(shown)} more" if total > len(shown) else ""
        hint = "" if fatal else "\n(fix them, or pass --skip_bad_samples to drop them)"
        raise DataError(f"{total} problem(s) in the data:\n" + "\n".join(shown) + more + hint)
    train, valid = checks.get("train"), checks.get("eval")
    if train and valid:
        valid_digests = valid.digests()
        overlap = int(np.isin(valid_digests, train.digests()).sum())
        same_file = os.path.realpath(train.path) == os.path.realpath(valid.path)
        if same_file or (overlap and overlap == len(valid_digests)):
            log(f"warning: the validation data {valid.path} is the training data {train.path}; "
                "validation loss will not show overfitting")
        elif overlap:
            log(f"warning: {overlap} of {len(valid_digests)} validation sample(s) in {valid.path} are also "
                f"in the training data {train.path}")
    return checks


def load_conversations(path: str, data_format: str = "auto", skip_bad_samples: bool = False, log=print,
                       check: FileCheck | None = None):
    """Check a source (cached), then return its good records as a ``datasets.Dataset``.

    Columns: ``example`` (the normalised conversation as JSON text: ``example_of(row)`` reads it),
    ``position`` (line or row) and ``tools``. Bad records stop everything with a list of problems,
    unless ``skip_bad_samples`` (then they are dropped and counted).
    """
    check = check or check_file(path, data_format)
    if check.problem_count and not skip_bad_samples:
        raise DataError(check.report() + "\n(fix them, or pass --skip_bad_samples to drop them)")
    if check.problem_count:
        log(f"warning: skipping {check.problem_count} bad record(s) in {path}; first: {check.problems[0]}")
    if not check.good_count:
        raise DataError(f"{path}: no usable record")
    if check.duplicates:
        log(f"note: {path} has {check.duplicates} duplicated sample(s)")
    if check.ignored_keys:
        log(f"note: {path}: ignored metadata key(s) {', '.join(check.ignored_keys)} (not part of the "
            f"{check.data_format} format)")
    return check.good()


def example_of(row) -> dict:
    """The normalised example ({"messages", "tools"}) of a loaded row (or a message list as is)."""
    if hasattr(row, "keys"):  # a dict or a datasets row
        keys = row.keys()
        if "example" in keys:
            return json.loads(row["example"])
        return {"messages": list(row["messages"]), "tools": row["tools"] if "tools" in keys else None}
    return {"messages": list(row), "tools": None}


# --------------------------------------------------------------------------- tokenizing


def encode(tokenizer, messages: list[dict], end_of_turn: str | None = None, max_length: int | None = None,
           tools=None) -> dict:
    """input_ids and labels (aligned; the model shifts) and counts for one conversation."""
    return get_encoder(tokenizer).encode_batch([{"messages": messages, "tools": tools}], max_length).to_pylist()[0]


@dataclass
class EncodeStats:
    samples: int
    tokens: int
    learned_tokens: int
    truncated: int
    skipped: int
    lengths: object  # numpy array, before truncation, to help choose model_max_length

    def summary(self, name: str) -> str:
        lengths = np.asarray(self.lengths) if len(self.lengths) else np.zeros(1)
        return (f"{name}: {self.samples} samples, {self.tokens} tokens, {self.learned_tokens} learned; "
                f"{self.truncated} truncated, {self.skipped} skipped (nothing left to learn); "
                f"length before truncation min/median/p95/max = {int(lengths.min())}/{int(np.median(lengths))}/"
                f"{int(np.percentile(lengths, 95))}/{int(lengths.max())}")


_load_example = _orjson.loads if _orjson is not None else json.loads


def _encode_rows(batch, encoder, max_length):
    """One batch as an Arrow table (built by the encoder in numpy), which datasets then writes as is."""
    # A batch allocates tens of thousands of small objects and no reference cycles: the cyclic collector
    # would only scan them again and again.
    collecting = gc.isenabled()
    gc.disable()
    try:
        return encoder.encode_batch([_load_example(text) for text in batch["example"]], max_length)
    finally:
        if collecting:
            gc.enable()


def tokenize_dataset(conversations, tokenizer, max_length: int | None, num_proc: int | None = None,
                     source: str | None = None):
    """Map loaded conversations to input_ids/labels in batches (cached), drop unlearnable samples.

    The cache key is the data's fingerprint, the tokenizer (vocabulary, special tokens, chat template)
    and ``max_length``. Returns (dataset with input_ids, labels, length) and EncodeStats.
    """
    import datasets
    import pyarrow.compute as pc

    encoder = get_encoder(tokenizer)
    if "tools" in conversations.column_names and not encoder.renders_tools:
        with_tools = int(pc.sum(conversations.data.column("tools")).as_py() or 0)
        if with_tools:
            raise TemplateError(f"{source or 'the data'}: {with_tools} conversation(s) have tools or tool calls, "
                                "but the chat template cannot render them; use --chat_template chatml "
                                "(MiniCPM3's function-calling format) or a template that takes tools")
    if "example" not in conversations.column_names:  # message lists (e.g. built in code)
        conversations = conversations.map(lambda row: {"example": json.dumps(example_of(row), ensure_ascii=False)},
                                          remove_columns=conversations.column_names)
    key = json.dumps([conversations._fingerprint, tokenizer_fingerprint(tokenizer), max_length, ENCODER_VERSION])
    encoded = conversations.map(_encode_rows, batched=True, remove_columns=conversations.column_names,
                                fn_kwargs={"encoder": encoder, "max_length": max_length},
                                features=datasets.Features.from_arrow_schema(encoded_schema()),
                                num_proc=num_proc if num_proc and num_proc > 1 else None, desc="Tokenizing",
                                new_fingerprint=hashlib.sha256(key.encode()).hexdigest()[:32])
    table = encoded.data
    learned = table.column("num_learned").to_numpy()
    keep = learned > 0
    stats = EncodeStats(
        samples=int(keep.sum()),
        tokens=int(table.column("length").to_numpy()[keep].sum()),
        learned_tokens=int(learned.sum()),
        truncated=int(pc.sum(table.column("truncated")).as_py() or 0),
        skipped=int((~keep).sum()),
        lengths=table.column("full_length").to_numpy(),
    )
    if not keep.all():
        encoded = encoded.select(np.flatnonzero(keep))
    return encoded.select_columns(["input_ids", "labels", "length"]), stats


# --------------------------------------------------------------------------- preview command


def render_masked(tokenizer, input_ids: list[int], labels: list[int]) -> str:
    """The sample as text with learned spans in [[...]] and everything else (masked) as is."""
    out, run, learned = [], [], False
    for token, label in zip(input_ids, labels):
        is_learned = label != IGNORE_INDEX
        if is_learned != learned and run:
            text = tokenizer.decode(run, skip_special_tokens=False)
            out.append(f"[[{text}]]" if learned else text)
            run = []
        learned = is_learned
        run.append(token)
    if run:
        text = tokenizer.decode(run, skip_special_tokens=False)
        out.append(f"[[{text}]]" if learned else text)
    return "".join(out)


def is_preference_file(path: str) -> bool:
    """Whether the first record of a local file is a preference pair (has "chosen" and "rejected")."""
    if not os.path.exists(path):
        return False
    for _, obj in read_records(path):
        return isinstance(obj, dict) and "chosen" in obj and "rejected" in obj
    return False


@command
def main(argv=None) -> int:
    from transformers import AutoConfig

    from .templates import apply_template, resolve_chat_template
    from .tokenizer import load_tokenizer

    parser = OneLineParser(prog="python -m minicpm_finetune.data",
                           description="Check a data file (SFT or DPO preference pairs) and preview its tokens and "
                                       "loss mask.")
    parser.add_argument("--tokenizer", required=True, help="tokenizer or model folder (or hub id)")
    parser.add_argument("--data", required=True, help="JSON / JSON Lines / Parquet file, save_to_disk folder or "
                        "hub dataset name")
    parser.add_argument("--model_max_length", type=int, default=None)
    parser.add_argument("--data_format", choices=FORMATS, default="auto")
    parser.add_argument("--chat_template", default=None, help="minicpm, chatml or a Jinja file")
    parser.add_argument("--skip_bad_samples", action="store_true")
    parser.add_argument("--preprocessing_num_workers", type=int, default=None, help="processes that tokenize")
    parser.add_argument("--dump", default=None, help="write {input_ids, labels} per sample to this JSONL")
    args = parser.parse_args(argv)
    if os.path.isdir(args.tokenizer) and not any(os.path.isfile(os.path.join(args.tokenizer, name)) for name in
                                                 ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        raise ArgumentError(f"--tokenizer {args.tokenizer}: no tokenizer files in this folder (tokenizer.json, "
                            "tokenizer.model or tokenizer_config.json)")
    try:
        tokenizer = load_tokenizer(args.tokenizer)
    except FinetuneError:
        raise
    except Exception as e:  # noqa: BLE001 - any load failure is reported in one line
        raise load_error(f"tokenizer {args.tokenizer}", e) from None
    try:  # the template training would use: the flag, the tokenizer's, else the model type's
        model_type = AutoConfig.from_pretrained(args.tokenizer).model_type
    except (OSError, ValueError):  # a tokenizer without a model config
        model_type = None
    apply_template(tokenizer, resolve_chat_template(tokenizer, model_type, args.chat_template))
    if is_preference_file(args.data):  # DPO pairs: prompt, chosen and rejected with their scored spans
        from .preference import preview_pairs

        return preview_pairs(tokenizer, args.data, args.model_max_length, args.skip_bad_samples)
    conversations = load_conversations(args.data, args.data_format, args.skip_bad_samples)
    dataset, stats = tokenize_dataset(conversations, tokenizer, args.model_max_length,
                                      args.preprocessing_num_workers, source=args.data)
    print(stats.summary(args.data))
    if len(dataset):
        first = dataset[0]
        print("\nFirst sample (learned tokens in [[...]], the rest is masked):")
        print(render_masked(tokenizer, first["input_ids"], first["labels"]))
    if args.dump:
        write_atomic(args.dump, (json.dumps({"input_ids": row["input_ids"], "labels": row["labels"]}) + "\n"
                                 for row in dataset))
        print(f"\nwrote {len(dataset)} samples to {args.dump}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
