"""Reading training data in bounded memory: every source as a stream of (record number, record).

Sources: a JSON Lines file (records numbered by line), a JSON array file (by item), a Parquet file or a
folder written by ``datasets.save_to_disk`` (by row), or a hub dataset name (``owner/name``, optionally
``owner/name:split``; by row). A record that cannot be parsed (malformed JSON, not UTF-8, a key given twice)
is yielded as an unreadable marker saying why (``record_is_unreadable``), so one report can list them all.
"""

from __future__ import annotations

import json
import os
import re

from ..cli import FinetuneError, looks_local

_CHUNK = 1 << 20


class DataError(FinetuneError):
    """Bad training data; the message names the file, the record and the problem."""


TOO_DEEP = "nested too deeply to read (JSON objects and lists inside each other some thousand levels deep)"


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
# orjson reads an integer beyond 64 bits as a float (its value changed); json keeps it exact. Nineteen digits
# in a row, wherever they are (in a string too), send a text to json.
LONG_INTEGER = re.compile(r"\d{19}")
LONG_INTEGER_BYTES = re.compile(rb"\d{19}")


def orjson_can_read(text) -> bool:
    """Whether orjson reads every value of this JSON text as written."""
    return (LONG_INTEGER_BYTES if type(text) is bytes else LONG_INTEGER).search(text) is None


def _parse_fast(text):
    """One JSON value parsed by orjson (text: str, or UTF-8 bytes, which orjson checks), or _NOT_PARSED when
    _parse must look: orjson refuses it (json says what is wrong, or accepts e.g. lone surrogates), or a
    key may be given twice. When every key is written as "key": (no space before a colon) and the text holds no
    more '":' than the parsed value has keys, no key was given twice; otherwise ('":' in a string) look."""
    if _orjson is None or not orjson_can_read(text):
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
            except RecursionError:
                yield number, _Unreadable(TOO_DEEP)
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
            except (_DuplicateKey, RecursionError) as e:
                end = _skip_value(self.buffer, pos)
                if end is not None:
                    return _Unreadable(str(e) if isinstance(e, _DuplicateKey) else TOO_DEEP), end
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
    except RecursionError:  # too deep to parse: find its end by brackets, outside strings
        depth, in_string, escaped = 0, False, False
        for i in range(pos, len(text)):
            char = text[i]
            if in_string:
                escaped, in_string = (not escaped and char == "\\"), in_string and (escaped or char != '"')
            elif char == '"':
                in_string = True
            elif char in "[{":
                depth += 1
            elif char in "]}":
                depth -= 1
                if depth == 0:
                    return i + 1
        return None


def is_parquet(path: str) -> bool:
    """A Parquet file, by its first bytes ("PAR1"), whatever its name."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"PAR1"
    except OSError:
        return False


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
        if is_parquet(path):
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
                yield number, {k: _without_struct_nulls(batch[k][i]) for k in columns}
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


def _without_struct_nulls(value):
    """Arrow gives every row of a struct column all the struct's fields, null where a row has none (a tool call
    gets its schema's keys): a null field inside a nested object is absent, as in the data written."""
    if isinstance(value, dict):
        return {k: _without_struct_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_struct_nulls(v) for v in value]
    return value


def _location(path: str, number: int) -> str:
    """How a problem names its record: FILE:LINE (or item) for JSON, FILE: row N for Arrow sources."""
    if os.path.isfile(path) and not is_parquet(path):
        return f"{path}:{number}"
    return f"{path}: row {number}"
