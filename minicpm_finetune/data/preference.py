"""Preference data for DPO (``--stage dpo``): read and check (prompt, chosen, rejected) records, encode both
replies with the SFT chat template and masks, batch them.

Formats (JSON array or JSON Lines, UTF-8; entries of kind "preference" in formats.py), detected per file from
its first record:
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

from . import formats as registry
from .checks import MAX_LISTED_PROBLEMS, FileCheck
from .encoding import IGNORE_INDEX, encode
from .sources import DataError, read_records, record_is_unreadable

PREFERENCE_FORMATS = tuple(registry.format_names("preference"))


def to_pair(record: dict, data_format: str) -> dict:
    """One record as ``{"prompt": messages ending with a user turn, "chosen": str, "rejected": str}``
    (formats.py, with the registry's key checks: a text key the format does not read is refused, not dropped);
    ValueError naming the problem."""
    return registry.convert(record, data_format)[0]


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
            data_format = check.data_format = registry.detect(obj, "preference")
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
