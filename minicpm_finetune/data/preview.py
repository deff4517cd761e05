"""The data preview command: check a data file and show its tokens and loss mask before training.

    python -m minicpm_finetune.data --tokenizer PATH --data FILE [--model_max_length N] [--dump OUT.jsonl]
    python -m minicpm_finetune.data --tokenizer PATH --data FILE --audit   (ids and masks vs the chat template)

A preference file (DPO pairs; told by its first record) shows the prompt and both replies with their
scored spans instead.
"""

from __future__ import annotations

import json
import os
import sys

from ..cli import (ArgumentError, FinetuneError, OneLineParser, check_output_path, command, load_error, true_or_false,
                   write_atomic)
from .audit import audit_dataset
from .checks import FORMATS, load_conversations
from .encoding import IGNORE_INDEX
from .tokenized import tokenize_dataset
from .preference import check_preference_files, tokenize_pairs
from .sources import read_records
from .tokenizer import load_chat_tokenizer


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


@command
def main(argv=None) -> int:
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
    parser.add_argument("--enable_thinking", type=true_or_false, default=None,
                        help="true/false: passed to the chat template for samples that do not set their own")
    parser.add_argument("--audit", action="store_true", help="compare every sample's ids and masks with the chat "
                        "template's own rendering, reply by reply; exit 1 on a difference")
    args = parser.parse_args(argv)
    if args.dump:  # before the work: a dump that cannot be written would lose it
        check_output_path(args.dump, "--dump", folder=False)
    if os.path.isdir(args.tokenizer) and not any(os.path.isfile(os.path.join(args.tokenizer, name)) for name in
                                                 ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        raise ArgumentError(f"--tokenizer {args.tokenizer}: no tokenizer files in this folder (tokenizer.json, "
                            "tokenizer.model or tokenizer_config.json)")
    try:  # with the template training would use: the flag, the tokenizer's, else the model type's
        tokenizer = load_chat_tokenizer(args.tokenizer, args.chat_template)
    except FinetuneError:
        raise
    except Exception as e:  # noqa: BLE001 - any load failure is reported in one line
        raise load_error(f"tokenizer {args.tokenizer}", e) from None
    if is_preference_file(args.data):  # DPO pairs: prompt, chosen and rejected with their scored spans
        return preview_pairs(tokenizer, args.data, args.model_max_length, args.skip_bad_samples)
    conversations = load_conversations(args.data, args.data_format, args.skip_bad_samples)
    if args.audit:
        report = audit_dataset(conversations, tokenizer, args.data, args.enable_thinking)
        for line in report.differences:
            print(line)
        print(report.summary(args.data))
        return 1 if report.differences else 0
    dataset, stats = tokenize_dataset(conversations, tokenizer, args.model_max_length,
                                      args.preprocessing_num_workers, source=args.data,
                                      skip_bad_samples=args.skip_bad_samples, enable_thinking=args.enable_thinking)
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
