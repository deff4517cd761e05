"""Make a small synthetic preference (DPO) set from conversation files, for the CPU demo: each prompt keeps
its own reply as "chosen" and gets another record's reply (a different ad) as "rejected". Not real
preferences: a learnable stand-in to try --stage dpo end to end.

    python scripts/make_preference_sample.py data/advertisegen_chat data/advertisegen_pref [--max_records 400]

Reads {train,dev,test}.jsonl (any SFT format) and writes the same names in the "messages" preference format:
{"messages": [prompt turns ending with the user's], "chosen": str, "rejected": str}.
"""

import json
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from minicpm_finetune.cli import OneLineParser, command, write_atomic  # noqa: E402
from minicpm_finetune.data import DataError, check_file, example_of  # noqa: E402


def make_pairs(conversations: list[list[dict]], rng: random.Random) -> list[dict]:
    """One pair per conversation whose last reply differs from some other conversation's."""
    replies = [messages[-1]["content"] for messages in conversations]
    pairs = []
    for i, messages in enumerate(conversations):
        others = [j for j in range(len(replies)) if replies[j] != replies[i]]
        if others:
            pairs.append({"messages": messages[:-1], "chosen": replies[i], "rejected": replies[rng.choice(others)]})
    return pairs


@command
def main(argv=None) -> int:
    parser = OneLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("input_dir", help="folder with train/dev/test .jsonl conversation files")
    parser.add_argument("output_dir")
    parser.add_argument("--max_records", type=int, default=400, help="first N records of each file")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    written = 0
    for split in ("train", "dev", "test"):
        path = os.path.join(args.input_dir, f"{split}.jsonl")
        if not os.path.isfile(path):
            continue
        check = check_file(path)
        if check.problems:
            raise DataError(check.report())
        good = check.good()
        first = good.select(range(min(args.max_records, len(good))))
        pairs = make_pairs([example_of(row)["messages"] for row in first], rng)
        write_atomic(os.path.join(args.output_dir, f"{split}.jsonl"),
                     "".join(json.dumps(pair, ensure_ascii=False) + "\n" for pair in pairs))
        print(f"{split}: {len(pairs)} pairs -> {os.path.join(args.output_dir, split + '.jsonl')}")
        written += 1
    if not written:
        raise DataError(f"{args.input_dir}: no train/dev/test.jsonl")
    return 0


if __name__ == "__main__":
    sys.exit(main())
