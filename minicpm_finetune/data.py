"""Training data: read and check files, render conversations with the chat template, mask the loss.

Formats (JSON array or JSON Lines, UTF-8), detected per file or forced with ``data_format``:
- conversation: ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``
- input_output: ``{"input", "output"}`` with optional ``instruction`` and ``system``,
  or ``{"prompt", "response"}``; each becomes a one-turn conversation.

Masking: a conversation is rendered once with the chat template and tokenized as one text;
a token is learned when it lies inside an assistant reply or the end-of-turn token after it.
The reply spans are found by rendering the prefixes with ``add_generation_prompt=True``, so
the ids before each reply are the ids inference feeds the model for the same messages.

Preview before training:
    python -m minicpm_finetune.data --tokenizer PATH --data FILE [--model_max_length N] [--dump OUT.jsonl]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
FORMATS = ("auto", "conversation", "input_output")
MAX_LISTED_PROBLEMS = 20


class DataError(Exception):
    """Bad training data; the message names the file, the record and the problem."""


class _Unreadable(str):
    """A record that could not be parsed (the text says why)."""


def record_is_unreadable(obj) -> bool:
    """Whether read_records yielded a parse problem instead of a record."""
    return isinstance(obj, _Unreadable)


@dataclass
class FileCheck:
    """The outcome of checking one data file: its format, good records and every problem found."""

    path: str
    data_format: str = "conversation"
    records: list = field(default_factory=list)  # (record number, conversation messages)
    problems: list = field(default_factory=list)  # "path:record: problem"
    duplicates: int = 0

    def report(self) -> str:
        shown = self.problems[:MAX_LISTED_PROBLEMS]
        more = len(self.problems) - len(shown)
        lines = [f"{len(self.problems)} bad record(s) in {self.path}:", *shown]
        if more:
            lines.append(f"... and {more} more")
        return "\n".join(lines)


# --------------------------------------------------------------------------- reading and checking


def read_records(path: str):
    """Yield (record number, object or error text). JSON Lines count lines; JSON arrays count items."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise DataError(f"{path}: file is empty")
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: malformed JSON array ({e.msg}, column {e.colno})") from None
        for number, item in enumerate(items, start=1):
            yield number, item
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as e:
            yield number, _Unreadable(f"malformed JSON ({e.msg}, column {e.colno})")


def write_atomic(path: str, text: str) -> None:
    """Write to a temporary name in the same folder, then rename: readers never see half a file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def detect_format(record: dict) -> str | None:
    if "messages" in record:
        return "conversation"
    if ("output" in record) or ("response" in record):
        return "input_output"
    return None


def to_messages(record: dict, data_format: str) -> list[dict]:
    """Normalise one record to a list of messages; raise ValueError naming the problem."""
    if data_format == "input_output":
        if "response" in record and "output" not in record:
            prompt_key, reply_key = "prompt", "response"
        else:
            prompt_key, reply_key = "input", "output"
        for key in (prompt_key, reply_key, "instruction", "system"):
            if key in record and not isinstance(record[key], str):
                raise ValueError(f'"{key}" must be a string, got {type(record[key]).__name__}')
        if reply_key not in record:
            raise ValueError(f'missing "{reply_key}"')
        prompt = "\n".join(p for p in (record.get("instruction", ""), record.get(prompt_key, "")) if p)
        if prompt_key not in record and "instruction" not in record:
            raise ValueError(f'missing "{prompt_key}"')
        messages = [{"role": "system", "content": record["system"]}] if record.get("system") else []
        messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": record[reply_key]}]
    else:
        if "messages" not in record:
            raise ValueError('missing "messages" (this file is in the conversation format)')
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError('"messages" must be a non-empty list')
    check_messages(messages)
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def check_messages(messages: list) -> None:
    """Optional system first, then user/assistant alternating, ending with a non-empty assistant reply."""
    for i, message in enumerate(messages):
        where = f"message {i + 1}"
        if not isinstance(message, dict):
            raise ValueError(f"{where} is not an object")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ValueError(f"{where}: unknown role {role!r} (expected one of {', '.join(ROLES)})")
        if not isinstance(content, str):
            raise ValueError(f'{where}: "content" must be a string')
        if not content.strip():
            raise ValueError(f"{where}: empty {'reply' if role == 'assistant' else role + ' text'}")
    roles = [m["role"] for m in messages]
    turns = roles[1:] if roles[0] == "system" else roles
    for i, role in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            position = i + 1 + (len(roles) - len(turns))
            raise ValueError(f"message {position}: role {role!r} out of order (expected {expected!r})")
    if not turns or turns[-1] != "assistant":
        raise ValueError("conversation does not end with an assistant reply")


def check_file(path: str, data_format: str = "auto") -> FileCheck:
    """Read a data file and check every record in one pass, collecting all problems."""
    check = FileCheck(path)
    seen = Counter()
    chosen = None if data_format == "auto" else data_format
    for number, obj in read_records(path):
        if record_is_unreadable(obj):
            check.problems.append(f"{path}:{number}: {obj}")
            continue
        if not isinstance(obj, dict):
            check.problems.append(f"{path}:{number}: record is not a JSON object")
            continue
        if chosen is None:
            chosen = detect_format(obj)
            if chosen is None:
                hint = (" (raw AdvertiseGen: convert it with python -m minicpm_finetune.advertisegen)"
                        if "content" in obj and "summary" in obj else "")
                raise DataError(f'{path}:{number}: unknown record format, expected "messages", '
                                f'"input"/"output" or "prompt"/"response"{hint}')
        try:
            messages = to_messages(obj, chosen)
        except ValueError as e:
            check.problems.append(f"{path}:{number}: {e}")
            continue
        key = json.dumps(messages, ensure_ascii=False, sort_keys=True)
        seen[key] += 1
        check.records.append((number, messages))
    check.data_format = chosen or "conversation"
    check.duplicates = sum(n - 1 for n in seen.values())
    return check


def check_files(paths: dict, data_format: str = "auto", skip_bad_samples: bool = False, log=print) -> dict:
    """Check every data file before anything is loaded; one DataError lists all problems of all files.

    ``paths`` maps split names to files. Returns {split: FileCheck}. Unreadable files (not UTF-8,
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
    if fatal or (problems and not skip_bad_samples):
        shown = problems[:MAX_LISTED_PROBLEMS]
        more = f"\n... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
        hint = "" if fatal else "\n(fix them, or pass --skip_bad_samples to drop them)"
        raise DataError(f"{len(problems)} problem(s) in the data:\n" + "\n".join(shown) + more + hint)
    train, valid = checks.get("train"), checks.get("eval")
    if train and valid:
        train_keys = {json.dumps(m, ensure_ascii=False, sort_keys=True) for _, m in train.records}
        overlap = sum(json.dumps(m, ensure_ascii=False, sort_keys=True) in train_keys for _, m in valid.records)
        if os.path.realpath(train.path) == os.path.realpath(valid.path) or (overlap and overlap == len(valid.records)):
            log(f"warning: the validation data {valid.path} is the training data {train.path}; "
                "validation loss will not show overfitting")
        elif overlap:
            log(f"warning: {overlap} of {len(valid.records)} validation sample(s) in {valid.path} are also "
                f"in the training data {train.path}")
    return checks


def load_conversations(path: str, data_format: str = "auto", skip_bad_samples: bool = False, log=print,
                       check: FileCheck | None = None):
    """Check a file, then load its conversations with the ``datasets`` library (cached).

    Returns a ``datasets.Dataset`` with one column ``messages``. Bad records stop everything
    with a list of problems, unless ``skip_bad_samples`` (then they are dropped and counted).
    """
    import datasets

    check = check or check_file(path, data_format)
    if check.problems and not skip_bad_samples:
        raise DataError(check.report() + "\n(fix them, or pass --skip_bad_samples to drop them)")
    if check.problems:
        log(f"warning: skipping {len(check.problems)} bad record(s) in {path}; first: {check.problems[0]}")
    if not check.records:
        raise DataError(f"{path}: no usable record")
    if check.duplicates:
        log(f"note: {path} has {check.duplicates} duplicated sample(s)")
    # Load the checked, normalised records through a content-addressed JSONL so that datasets'
    # cache keys on the data itself and never sees a malformed line.
    lines = "".join(json.dumps({"messages": m}, ensure_ascii=False) + "\n" for _, m in check.records)
    digest = hashlib.sha256(lines.encode("utf-8")).hexdigest()[:16]
    normalised = os.path.join(datasets.config.HF_DATASETS_CACHE, "minicpm_finetune", f"{digest}.jsonl")
    if not os.path.exists(normalised):
        write_atomic(normalised, lines)
    datasets.disable_progress_bars()
    try:
        return datasets.load_dataset("json", data_files=normalised, split="train")
    finally:
        datasets.enable_progress_bars()


# --------------------------------------------------------------------------- rendering and masking


def reply_spans(tokenizer, messages: list[dict], end_of_turn: str) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of each assistant reply (with its end-of-turn)."""
    render = tokenizer.apply_chat_template
    text = render(messages, tokenize=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(messages[:i], tokenize=False, add_generation_prompt=True)
        through = render(messages[: i + 1], tokenize=False)
        if not (text.startswith(prompt) and text.startswith(through)):
            raise DataError("the chat template does not render a conversation as the sum of its prefixes; "
                            "replies cannot be located (use --chat_template minicpm or chatml)")
        eot = through.rfind(end_of_turn, len(prompt)) if end_of_turn else -1
        spans.append((len(prompt), eot + len(end_of_turn) if eot >= 0 else len(through)))
    return text, spans


def encode(tokenizer, messages: list[dict], end_of_turn: str, max_length: int | None) -> dict:
    """input_ids and labels for one conversation; labels are aligned with input_ids (the model shifts).

    Over ``max_length`` the sample is cut, and a reply that loses its end is masked out whole,
    so the model never learns a reply without its ending.
    """
    text, spans = reply_spans(tokenizer, messages, end_of_turn)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(encoded["input_ids"], dtype=np.int64)
    offsets = np.asarray(encoded["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    starts, ends = offsets[:, 0], offsets[:, 1]
    labels = np.full_like(ids, IGNORE_INDEX)
    cut_replies = 0
    for begin, end in spans:
        inside = np.flatnonzero((starts >= begin) & (ends <= end) & (ends > starts))
        if max_length is not None and len(inside) and inside[-1] >= max_length:
            cut_replies += 1
            continue
        labels[inside] = ids[inside]
    full_length = len(ids)
    truncated = max_length is not None and full_length > max_length
    if truncated:
        ids, labels = ids[:max_length], labels[:max_length]
    return {
        "input_ids": ids.tolist(),
        "labels": labels.tolist(),
        "length": len(ids),
        "full_length": full_length,
        "num_learned": int((labels != IGNORE_INDEX).sum()),
        "truncated": bool(truncated),
        "cut_replies": cut_replies,
    }


@dataclass
class EncodeStats:
    samples: int
    tokens: int
    learned_tokens: int
    truncated: int
    skipped: int
    lengths: list  # before truncation, to help choose model_max_length

    def summary(self, name: str) -> str:
        lengths = np.asarray(self.lengths) if self.lengths else np.zeros(1)
        return (f"{name}: {self.samples} samples, {self.tokens} tokens, {self.learned_tokens} learned; "
                f"{self.truncated} truncated, {self.skipped} skipped (nothing left to learn); "
                f"length before truncation min/median/p95/max = {int(lengths.min())}/{int(np.median(lengths))}/"
                f"{int(np.percentile(lengths, 95))}/{int(lengths.max())}")


def tokenize_dataset(conversations, tokenizer, max_length: int | None, num_proc: int | None = None):
    """Map conversations to input_ids/labels with the datasets library (cached), drop unlearnable samples.

    Returns (dataset with input_ids, labels, length) and EncodeStats.
    """
    from .templates import end_of_turn_token

    end_of_turn = end_of_turn_token(tokenizer)

    def encode_batch(batch):
        rows = [encode(tokenizer, m, end_of_turn, max_length) for m in batch["messages"]]
        return {key: [row[key] for row in rows] for key in rows[0]}

    encoded = conversations.map(encode_batch, batched=True, remove_columns=conversations.column_names,
                                num_proc=num_proc, desc="Tokenizing")
    lengths = encoded["length"]
    learned = encoded["num_learned"]
    full_lengths = encoded["full_length"]
    keep = [i for i, n in enumerate(learned) if n > 0]
    stats = EncodeStats(
        samples=len(keep),
        tokens=int(sum(lengths[i] for i in keep)),
        learned_tokens=int(sum(learned)),
        truncated=int(sum(encoded["truncated"])),
        skipped=len(learned) - len(keep),
        lengths=full_lengths,
    )
    if len(keep) < len(learned):
        encoded = encoded.select(keep)
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


def main(argv=None) -> int:
    from transformers import AutoConfig, AutoTokenizer

    from .templates import apply_template, resolve_chat_template

    parser = argparse.ArgumentParser(prog="python -m minicpm_finetune.data",
                                     description="Check a data file and preview its tokens and loss mask.")
    parser.add_argument("--tokenizer", required=True, help="tokenizer or model folder (or hub id)")
    parser.add_argument("--data", required=True, help="JSON or JSON Lines data file")
    parser.add_argument("--model_max_length", type=int, default=None)
    parser.add_argument("--data_format", choices=FORMATS, default="auto")
    parser.add_argument("--chat_template", default=None, help="minicpm, chatml or a Jinja file")
    parser.add_argument("--skip_bad_samples", action="store_true")
    parser.add_argument("--dump", default=None, help="write {input_ids, labels} per sample to this JSONL")
    args = parser.parse_args(argv)
    if os.path.isdir(args.tokenizer) and not any(os.path.isfile(os.path.join(args.tokenizer, name)) for name in
                                                 ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        print(f"error: --tokenizer {args.tokenizer}: no tokenizer files in this folder (tokenizer.json, "
              "tokenizer.model or tokenizer_config.json)", file=sys.stderr)
        return 2
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    except Exception as e:  # noqa: BLE001 - any load failure is reported in one line
        print(f"error: cannot load tokenizer {args.tokenizer}: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    try:  # the template training would use: the flag, the tokenizer's, else the model type's
        model_type = AutoConfig.from_pretrained(args.tokenizer).model_type
    except (OSError, ValueError):  # a tokenizer without a model config
        model_type = None
    try:
        apply_template(tokenizer, resolve_chat_template(tokenizer, model_type, args.chat_template))
        conversations = load_conversations(args.data, args.data_format, args.skip_bad_samples)
        dataset, stats = tokenize_dataset(conversations, tokenizer, args.model_max_length)
    except (DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # unreadable (permissions, a folder, an I/O error)
        print(f"error: {args.data}: cannot read ({e.strerror or e})", file=sys.stderr)
        return 2
    print(stats.summary(args.data))
    if len(dataset):
        first = dataset[0]
        print("\nFirst sample (learned tokens in [[...]], the rest is masked):")
        print(render_masked(tokenizer, first["input_ids"], first["labels"]))
    if args.dump:
        write_atomic(args.dump, "".join(json.dumps({"input_ids": row["input_ids"], "labels": row["labels"]}) + "\n"
                                        for row in dataset))
        print(f"\nwrote {len(dataset)} samples to {args.dump}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
