"""Convert raw AdvertiseGen data ({"content", "summary"}) to the conversation format.

AdvertiseGen's ``content`` (e.g. ``类型#裙*版型#显瘦*风格#文艺``) becomes the user turn and its
``summary`` (the ad text) the assistant turn, with an optional system prompt first:

    python -m minicpm_finetune.advertisegen AdvertiseGen/ data/advertisegen_chat [--system TEXT]

converts train/dev/test ``.json`` or ``.jsonl`` files found in the source folder (or one file)
to ``OUT_DIR/{train,dev,test}.jsonl``. Input is JSON Lines (the real download is JSON Lines
named ``.json``) or a JSON array. A bad record stops the conversion before anything is written,
unless ``--skip_bad`` is given.
"""

import hashlib
import json
import logging
import os
import sys

from .cli import OneLineParser, command, write_atomic
from .data.sources import DataError

logger = logging.getLogger(__name__)

SPLITS = ("train", "dev", "test")
MAX_REPORTED = 20  # bad records listed in an error; the rest are only counted


class AdvertiseGenDataError(DataError, ValueError):
    """Bad input records. ``problems`` holds one ``FILE:LINE: problem`` line per bad record. A ValueError too,
    as convert_file has always promised its callers (like convert_record for one record)."""

    def __init__(self, path: str, problems: list[str]):
        self.path = path
        self.problems = problems
        shown = problems[:MAX_REPORTED]
        lines = [f"{len(problems)} bad record(s) in {path} (use skip_bad to skip them):"] + shown
        if len(problems) > len(shown):
            lines.append(f"... and {len(problems) - len(shown)} more")
        super().__init__("\n".join(lines))


def _record_problem(record) -> str | None:
    """What is wrong with a raw record, or None if it is usable."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    for key in ("content", "summary"):
        if key not in record:
            return f'missing "{key}"'
        value = record[key]
        if not isinstance(value, str):
            return f'"{key}" must be a string, got {type(value).__name__}'
        if not value.strip():
            return f'"{key}" is empty'
    return None


def convert_record(record: dict, system: str | None = None) -> dict:
    """One raw record -> ``{"messages": [system?, user=content, assistant=summary]}``.

    An empty or None ``system`` adds no system message. Raises ValueError for a bad record.
    """
    problem = _record_problem(record)
    if problem:
        raise ValueError(problem)
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": record["content"]})
    messages.append({"role": "assistant", "content": record["summary"]})
    return {"messages": messages}


def _read_raw(path: str) -> list[tuple[str, object, str | None]]:
    """Parse a JSON array or JSON Lines file into (where, value, parse problem) in file order.

    ``where`` is ``FILE:LINE`` for JSON Lines and ``FILE: record N`` for an array, because the
    json module does not tell where an array element starts.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None
    try:
        text = data.decode("utf-8-sig")  # tolerate a byte-order mark
    except UnicodeDecodeError as e:
        return [(path, None, f"not UTF-8 text (bad byte at offset {e.start})")]

    if text.lstrip().startswith("["):
        try:
            values = json.loads(text)
        except json.JSONDecodeError as e:
            return [(f"{path}:{e.lineno}", None, f"malformed JSON array: {e.msg}")]
        return [(f"{path}: record {i}", v, None) for i, v in enumerate(values, 1)]

    entries = []
    # Split on "\n" only: str.splitlines() also breaks at U+2028/U+2029 and other separators that are
    # valid raw inside JSON strings.
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue  # blank lines (e.g. a trailing one) carry no record
        try:
            entries.append((f"{path}:{lineno}", json.loads(line), None))
        except json.JSONDecodeError as e:
            problem = f"malformed JSON: {e.msg} (column {e.colno})"
            entries.append((f"{path}:{lineno}", None, problem))
    return entries


def _convert_records(path: str, system: str | None, skip_bad: bool) -> tuple[list[dict], int]:
    """Read and convert one file in memory; raise AdvertiseGenDataError unless skip_bad."""
    converted, problems = [], []
    for where, value, problem in _read_raw(path):
        problem = problem or _record_problem(value)
        if problem:
            problems.append(f"{where}: {problem}")
        else:
            converted.append(convert_record(value, system))
    if problems and not skip_bad:
        raise AdvertiseGenDataError(path, problems)
    for line in problems[:MAX_REPORTED]:
        logger.warning("skipped %s", line)
    if len(problems) > MAX_REPORTED:
        logger.warning("skipped %d more bad record(s) in %s", len(problems) - MAX_REPORTED, path)
    return converted, len(problems)


def _write_jsonl(records: list[dict], dst: str) -> None:
    """Conversation records as JSON Lines, written atomically."""
    write_atomic(dst, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))


def convert_file(src: str, dst: str, system: str | None = None, skip_bad: bool = False) -> dict:
    """Convert one raw AdvertiseGen file (JSON Lines or JSON array) to conversation JSON Lines.

    Returns ``{"converted": n, "bad": k}``. By default any bad record raises
    AdvertiseGenDataError (a DataError and a ValueError) listing the first 20 as ``FILE:LINE: problem`` lines,
    and ``dst`` is left untouched. With ``skip_bad=True`` bad records are skipped, counted and
    logged as warnings. ``dst`` is written atomically, never half-written.
    """
    converted, bad = _convert_records(src, system, skip_bad)
    _write_jsonl(converted, dst)
    return {"converted": len(converted), "bad": bad}


def sha256sum(path: str, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks so large archives need little memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_archive(path: str, expected_sha256: str) -> str:
    """Check a downloaded archive (e.g. AdvertiseGen.tar.gz) against a SHA-256 you trust.

    The project does not ship the real archive's checksum: it could not be downloaded here, and
    an invented value would be worse than none. Pass the value from a source you trust (or one
    you recorded on first download). Returns the digest; raises ValueError on a mismatch.
    """
    expected = expected_sha256.strip().lower()
    if len(expected) != 64 or any(ch not in "0123456789abcdef" for ch in expected):
        raise ValueError(f"expected_sha256 must be 64 hex digits, got {expected_sha256!r}")
    actual = sha256sum(path)
    if actual != expected:
        raise ValueError(f"{path}: SHA-256 mismatch: expected {expected}, got {actual}")
    return actual


def find_split_files(src: str) -> dict[str, str]:
    """Map split name -> input file: a folder's train/dev/test .json(l) files, or one file.

    A single file keeps its name's stem as the split name (``AdvertiseGen_train.json`` ->
    ``AdvertiseGen_train``). Raises DataError with a one-line message.
    """
    if os.path.isfile(src):
        stem = os.path.basename(src)
        for ext in (".jsonl", ".json"):
            if stem.endswith(ext):
                stem = stem[: -len(ext)]
                break
        return {stem: src}
    if not os.path.isdir(src):
        raise DataError(f"no such file or directory: {src}")
    found = {}
    for split in SPLITS:
        candidates = [os.path.join(src, split + ext) for ext in (".json", ".jsonl")]
        present = [p for p in candidates if os.path.isfile(p)]
        if len(present) > 1:
            raise DataError(f"both {present[0]} and {present[1]} exist; keep one")
        if present:
            found[split] = present[0]
    if not found:
        raise DataError(f"no train/dev/test .json or .jsonl files in {src}")
    return found


@command
def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(
        prog="python -m minicpm_finetune.advertisegen",
        description="Convert raw AdvertiseGen {content, summary} files to conversation JSON Lines.",
    )
    parser.add_argument("src", help="folder with train/dev/test .json(l) files, or one file")
    parser.add_argument("out_dir", help="output folder for {split}.jsonl")
    parser.add_argument("--system", default=None, help="system prompt added to every record")
    parser.add_argument("--skip_bad", action="store_true", help="skip bad records, count them")
    args = parser.parse_args(argv)
    logging.basicConfig(format="warning: %(message)s", level=logging.WARNING)

    inputs = find_split_files(args.src)
    outputs = {split: os.path.join(args.out_dir, split + ".jsonl") for split in inputs}
    for split, src in inputs.items():
        if os.path.abspath(outputs[split]) == os.path.abspath(src):
            raise DataError(f"output {outputs[split]} would overwrite its input")
    # Read and check every split before writing any, so a bad dev file leaves no new train file.
    converted = {split: _convert_records(src, args.system, args.skip_bad) for split, src in inputs.items()}
    for split, (records, bad) in converted.items():
        _write_jsonl(records, outputs[split])
        skipped = f", skipped {bad} bad" if bad else ""
        print(f"{split}: {len(records)} converted{skipped} -> {outputs[split]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
