"""Preference data for DPO (``--stage dpo``): read and check (prompt, chosen, rejected) records, encode both
replies with the SFT chat template and masks, batch them, preview them.

Formats (JSON array or JSON Lines, UTF-8), detected per file from its first record:
- ``minicpm``: MiniCPM's ``{"instruction", "input", "chosen", "rejected"}`` with optional ``"system"`` and
  ``"history": [[user, assistant], ...]`` (earlier turns); the prompt is instruction and input joined by a newline.
- ``messages``: ``{"messages": [..., {"role": "user", ...}], "chosen": str, "rejected": str}``.
- ``trl``: TRL's ``{"prompt", "chosen", "rejected"}``, conversational (``prompt`` a message list ending with a user
  turn, ``chosen``/``rejected`` one-message assistant lists) or standard (three strings, the prompt one user turn);
  without ``prompt``, ``chosen`` and ``rejected`` are whole conversations that share all but their last reply.

Encoding: each reply is appended to the prompt and encoded by ``data.encode``, exactly as an SFT sample, so
the ids before the reply are the ids inference feeds; only the final reply and its end-of-turn token are
scored (earlier assistant turns in the prompt are context). A pair that does not fit in ``max_length`` is
dropped and counted, never cut: a cut reply would be scored without its end.

Preview before training (the data command tells a preference file by its first record):
    python -m minicpm_finetune.data --tokenizer PATH --data FILE [--model_max_length N]
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from .data import (IGNORE_INDEX, MAX_LISTED_PROBLEMS, DataError, FileCheck, check_messages, encode, read_records,
                   record_is_unreadable, render_masked)

PREFERENCE_FORMATS = ("minicpm", "messages", "trl")


# --------------------------------------------------------------------------- reading and checking


def detect_preference_format(record: dict) -> str | None:
    if "chosen" not in record or "rejected" not in record:
        return None
    if "messages" in record:
        return "messages"
    if "prompt" in record or isinstance(record["chosen"], list):
        return "trl"
    if "instruction" in record or "input" in record:
        return "minicpm"
    return None


def _string(record: dict, key: str, required: bool = True) -> str:
    if key not in record:
        if required:
            raise ValueError(f'missing "{key}"')
        return ""
    if not isinstance(record[key], str):
        raise ValueError(f'"{key}" must be a string, got {type(record[key]).__name__}')
    return record[key]


def _reply(record: dict, key: str) -> str:
    """A reply given as a string or as a one-message assistant list (TRL's conversational form)."""
    return _reply_value(record[key], key) if key in record else _string(record, key)


def _reply_value(value, key: str) -> str:
    if isinstance(value, list):
        if len(value) != 1 or not isinstance(value[0], dict) or value[0].get("role") != "assistant":
            raise ValueError(f'"{key}" must be one assistant message (or a string)')
        value = value[0].get("content")
        if not isinstance(value, str):
            raise ValueError(f'"{key}": "content" must be a string')
        return value
    if not isinstance(value, str):
        raise ValueError(f'"{key}" must be a string, got {type(value).__name__}')
    return value


def _minicpm_prompt(record: dict) -> list[dict]:
    system, instruction = _string(record, "system", False), _string(record, "instruction", False)
    text = "\n".join(part for part in (instruction, _string(record, "input", False)) if part)
    history = record.get("history") or []
    if not isinstance(history, list) or not all(
            isinstance(turn, list) and len(turn) == 2 and all(isinstance(t, str) for t in turn) for turn in history):
        raise ValueError('"history" must be a list of [user, assistant] string pairs')
    messages = [{"role": "system", "content": system}] if system else []
    for user, assistant in history:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return messages + [{"role": "user", "content": text}]


def _trl_pair(record: dict) -> tuple[list[dict], str, str]:
    if "prompt" not in record:  # implicit prompt: two whole conversations
        chosen, rejected = record["chosen"], record["rejected"]
        if not (isinstance(chosen, list) and isinstance(rejected, list) and chosen and rejected):
            raise ValueError('without "prompt", "chosen" and "rejected" must be message lists')
        if chosen[:-1] != rejected[:-1]:
            raise ValueError('"chosen" and "rejected" differ before their last message (no shared prompt)')
        return list(chosen[:-1]), _reply_value(chosen[-1:], "chosen"), _reply_value(rejected[-1:], "rejected")
    prompt = record["prompt"]
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    elif not isinstance(prompt, list) or not prompt:
        raise ValueError('"prompt" must be a string or a non-empty message list')
    return list(prompt), _reply(record, "chosen"), _reply(record, "rejected")


def to_pair(record: dict, data_format: str) -> dict:
    """One record as ``{"prompt": messages ending with a user turn, "chosen": str, "rejected": str}``;
    ValueError naming the problem."""
    if data_format == "minicpm":
        prompt, chosen, rejected = _minicpm_prompt(record), _string(record, "chosen"), _string(record, "rejected")
    elif data_format == "messages":
        prompt = record.get("messages")
        if not isinstance(prompt, list) or not prompt:
            raise ValueError('"messages" must be a non-empty list')
        prompt, chosen, rejected = list(prompt), _string(record, "chosen"), _string(record, "rejected")
    else:
        prompt, chosen, rejected = _trl_pair(record)
    if not isinstance(prompt[-1], dict) or prompt[-1].get("role") != "user":
        raise ValueError("the prompt does not end with a user turn")
    for name, reply in (("chosen", chosen), ("rejected", rejected)):
        if not reply.strip():
            raise ValueError(f'empty "{name}" reply')
        check_messages(prompt + [{"role": "assistant", "content": reply}])  # roles, order, empty turns
    if chosen == rejected:
        raise ValueError('"chosen" and "rejected" are the same reply (nothing to prefer)')
    prompt = [{"role": m["role"], "content": m["content"]} for m in prompt]
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def check_preference_file(path: str) -> FileCheck:
    """Read a preference file and check every record in one pass; records are (number, pair)."""
    check, seen, data_format = FileCheck(path), set(), None
    for number, obj in read_records(path):
        if record_is_unreadable(obj):
            check.problems.append(f"{path}:{number}: {obj}")
            continue
        if not isinstance(obj, dict):
            check.problems.append(f"{path}:{number}: record is not a JSON object")
            continue
        if data_format is None:
            data_format = check.data_format = detect_preference_format(obj)
            if data_format is None:
                raise DataError(f'{path}:{number}: not a preference record: expected "chosen" and "rejected" '
                                f'with "instruction"/"input", "messages" or "prompt" '
                                f'(formats: {", ".join(PREFERENCE_FORMATS)})')
        try:
            pair = to_pair(obj, data_format)
        except ValueError as e:
            check.problems.append(f"{path}:{number}: {e}")
            continue
        key = json.dumps(pair, ensure_ascii=False, sort_keys=True)
        check.duplicates += key in seen
        seen.add(key)
        check.records.append((number, pair))
    return check


def check_preference_files(paths: dict, skip_bad_samples: bool = False, log=print) -> dict:
    """Check every preference file before anything is loaded; one DataError lists all problems of all files
    (unreadable files always stop; bad records unless ``skip_bad_samples``). Returns {split: FileCheck}."""
    checks, fatal = {}, []
    for name, path in paths.items():
        try:
            checks[name] = check_preference_file(path)
        except DataError as e:
            fatal.append(str(e))
    problems = fatal + [problem for check in checks.values() for problem in check.problems]
    if fatal or (problems and not skip_bad_samples):
        shown = problems[:MAX_LISTED_PROBLEMS]
        more = f"\n... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
        hint = "" if fatal else "\n(fix them, or pass --skip_bad_samples to drop them)"
        raise DataError(f"{len(problems)} problem(s) in the preference data:\n" + "\n".join(shown) + more + hint)
    for check in checks.values():
        if check.problems:
            log(f"warning: skipping {len(check.problems)} bad record(s) in {check.path}; first: {check.problems[0]}")
        if check.duplicates:
            log(f"note: {check.path} has {check.duplicates} duplicated pair(s)")
        if not check.records:
            raise DataError(f"{check.path}: no usable preference record")
    return checks


# --------------------------------------------------------------------------- encoding


def last_reply_labels(labels: list[int]) -> list[int]:
    """``labels`` with only the last run of scored tokens kept: the final reply and its end-of-turn
    (``data.encode`` scores every assistant turn; in a preference pair earlier turns are context)."""
    labels = list(labels)
    end = max((i for i, label in enumerate(labels) if label != IGNORE_INDEX), default=-1)
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return [label if start <= i <= end else IGNORE_INDEX for i, label in enumerate(labels)]


def encode_pair(tokenizer, pair: dict, end_of_turn: str, max_length: int | None) -> dict:
    """``{chosen,rejected}_{input_ids,labels}`` (labels aligned with the ids, only the final reply scored),
    ``length`` (the longer of the two) and ``fits`` (both within ``max_length``)."""
    row = {}
    for side in ("chosen", "rejected"):
        encoded = encode(tokenizer, pair["prompt"] + [{"role": "assistant", "content": pair[side]}], end_of_turn, None)
        row[f"{side}_input_ids"] = encoded["input_ids"]
        row[f"{side}_labels"] = last_reply_labels(encoded["labels"])
    row["length"] = max(len(row["chosen_input_ids"]), len(row["rejected_input_ids"]))
    row["fits"] = max_length is None or row["length"] <= max_length
    return row


@dataclass
class PairStats:
    pairs: int
    dropped: int  # longer than max_length
    lengths: list  # the longer side of every pair

    def summary(self, name: str, max_length: int | None) -> str:
        lengths = np.asarray(self.lengths) if self.lengths else np.zeros(1)
        dropped = (f"; {self.dropped} dropped (longer than --model_max_length {max_length}: a cut reply would "
                   "be scored without its end)") if max_length else ""
        return (f"{name}: {self.pairs} preference pairs{dropped}; tokens per pair's longer side "
                f"min/median/max = {int(lengths.min())}/{int(np.median(lengths))}/{int(lengths.max())}")


def tokenize_pairs(check: FileCheck, tokenizer, max_length: int | None):
    """(``datasets.Dataset`` of encoded pairs that fit, PairStats)."""
    import datasets

    from .templates import end_of_turn_token

    end_of_turn = end_of_turn_token(tokenizer)
    rows = [encode_pair(tokenizer, pair, end_of_turn, max_length) for _, pair in check.records]
    kept = [{k: v for k, v in row.items() if k != "fits"} for row in rows if row["fits"]]
    stats = PairStats(pairs=len(kept), dropped=len(rows) - len(kept), lengths=[row["length"] for row in rows])
    columns = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels", "length")
    return datasets.Dataset.from_dict({c: [row[c] for row in kept] for c in columns}), stats


def prepare_preference_data(data_args, training_args, tokenizer) -> dict:
    """Check and encode every split (train, eval, test when given); print what was dropped. {split: Dataset}."""
    splits = {"train": data_args.train_data_path, "eval": data_args.eval_data_path, "test": data_args.test_data_path}
    splits = {name: path for name, path in splits.items() if path}
    log = print if training_args.process_index == 0 else (lambda *_: None)
    checks = check_preference_files(splits, data_args.skip_bad_samples, log)
    datasets = {}
    for name, check in checks.items():
        datasets[name], stats = tokenize_pairs(check, tokenizer, training_args.model_max_length)
        log(stats.summary(f"{name} ({check.path}, {check.data_format} format)", training_args.model_max_length))
        if not len(datasets[name]):
            raise DataError(f"{check.path}: no preference pair fits in --model_max_length "
                            f"{training_args.model_max_length}")
    return datasets


class PreferenceCollator:
    """Batches pairs as TRL's DPO trainer reads them: the chosen sequences, then the rejected ones, right-padded
    to one width; ``completion_mask`` marks the scored tokens (the labels that are not -100)."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict]) -> dict:
        import torch

        ids = [row["chosen_input_ids"] for row in rows] + [row["rejected_input_ids"] for row in rows]
        labels = [row["chosen_labels"] for row in rows] + [row["rejected_labels"] for row in rows]
        width = max(len(seq) for seq in ids)
        batch = {
            "input_ids": torch.tensor([seq + [self.pad_token_id] * (width - len(seq)) for seq in ids]),
            "attention_mask": torch.tensor([[1] * len(seq) + [0] * (width - len(seq)) for seq in ids]),
            "completion_mask": torch.tensor([[int(label != IGNORE_INDEX) for label in seq] + [0] * (width - len(seq))
                                             for seq in labels]),
        }
        for key in ("ref_chosen_logps", "ref_rejected_logps"):  # TRL's precomputed reference log-probs
            if key in rows[0]:
                batch[key] = torch.tensor([row[key] for row in rows])
        return batch


# --------------------------------------------------------------------------- preview command


def preview_pairs(tokenizer, path: str, max_length: int | None, skip_bad_samples: bool = False) -> int:
    """The data command's preview of a preference file (``python -m minicpm_finetune.data``): counts, then the
    first pair's chosen and rejected replies with their scored spans in [[...]]; the tokenizer carries the
    template training uses."""
    check = check_preference_files({"data": path}, skip_bad_samples)["data"]
    dataset, stats = tokenize_pairs(check, tokenizer, max_length)
    print(stats.summary(f"{path} ({check.data_format} format)", max_length))
    if len(dataset):
        first = dataset[0]
        print("\nFirst pair (scored tokens in [[...]], the prompt before them is context):")
        for side in ("chosen", "rejected"):
            print(f"{side}: {render_masked(tokenizer, first[f'{side}_input_ids'], first[f'{side}_labels'])}")
    return 0
