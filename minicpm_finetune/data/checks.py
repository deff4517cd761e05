"""Checking training data: every record of every source in one pass, into a cached Arrow table.

Checking streams a source (``sources.py``) once, record by record, into an Arrow table (``datasets``,
memory-mapped, cached by the source's path and content) holding per record its position,
its problem (if any) and its normalised example as JSON text (record formats: ``formats.py``, detected per
file from its first record, or forced with ``data_format``). Nothing holds the data set as Python objects,
so memory does not grow with the data. One report lists the first 20 problems of all files, counted; with
``skip_bad_samples`` bad records are dropped and counted instead.
"""

from __future__ import annotations

import errno
import gc
import hashlib
import json
import os
from dataclasses import dataclass, field

import numpy as np

from ..cli import atomic_path, check_output_path
from . import formats as registry
from .sources import _SERIALISER, DataError, _arrow_source, _location, _orjson, read_records, record_is_unreadable

FORMATS = ("auto", *registry.format_names())
MAX_LISTED_PROBLEMS = 20
CHECK_VERSION = "3"  # part of the checked-data cache key: bump when checking or normalising changes
PLACEHOLDER_REPLY = "-"


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
    """What the checked table of a source is cached under: a file's content (a file corrected in place, even
    with its old size and time, is checked again), a saved folder's or hub data set's fingerprint."""
    if os.path.isfile(path):
        digest = hashlib.blake2b(digest_size=16)
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        return f"file:{os.path.realpath(path)}:{digest.hexdigest()}"
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

    if data_format != "auto" and data_format not in registry.format_names(kind):
        raise DataError(f"unknown data format {data_format!r} (expected one of {', '.join(FORMATS)})")
    fingerprint = hashlib.sha256(json.dumps([CHECK_VERSION, _SERIALISER, _source_identity(path), data_format, kind,
                                             prompts])
                                 .encode("utf-8")).hexdigest()[:32]
    folder = os.path.join(datasets.config.HF_DATASETS_CACHE, "minicpm_finetune")
    cache = os.path.join(folder, f"checked-{fingerprint}.arrow")
    if not os.path.exists(cache):
        check_output_path(folder, "the datasets cache (HF_DATASETS_CACHE)")  # before reading a large file
        collecting = gc.isenabled()
        gc.disable()  # many small objects, no cycles (see _encode_rows)
        try:
            _write_checked(cache, _checked_rows(path, data_format, kind, prompts))
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS):
                raise
            raise DataError(f"{path}: cannot write the checked data into the datasets cache {folder} ({e.strerror}); "
                            "free some space there, or set HF_DATASETS_CACHE to another disk") from None
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
