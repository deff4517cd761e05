"""Token ids against SentencePiece itself: plain transformers, the toolkit's loader, and a saved output reloaded.

    python bench/bench_tokenizer.py [--tokenizer PATH] [--data FILE ...] [--json OUT.json]

For every text of the data files (every string of every record; default: the bundled AdvertiseGen sample's
train, dev and test sets) and the tests' mixed corpus, the ids of
- plain: ``AutoTokenizer.from_pretrained(PATH)`` (what transformers 5 alone gives),
- toolkit: ``minicpm_finetune.data.tokenizer.load_tokenizer(PATH)`` (what the toolkit trains, previews and infers with),
- output: that tokenizer saved as every output saves it, reloaded with plain ``AutoTokenizer``,
are compared with ``sentencepiece.SentencePieceProcessor(PATH/tokenizer.model).encode``; also the tokens
per text (plain against SentencePiece) and the load time of each (the toolkit's includes its probe check).

--tokenizer defaults to a tiny MiniCPM-2B-style tokenizer trained on the sample; give a folder with
MiniCPM-2B's ``tokenizer.model`` and ``tokenizer_config.json`` for real numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
# The package first: its logging and warning filters must be in place before transformers loads.
import minicpm_finetune  # noqa: E402,F401

DEFAULT_DATA = [os.path.join(ROOT, "data", "advertisegen_chat", f"{split}.jsonl") for split in ("train", "dev", "test")]


def timed(load):
    start = time.perf_counter()
    return load(), time.perf_counter() - start


def main(argv=None) -> int:
    import sentencepiece as spm
    from conftest import mixed_text_corpus
    from transformers import AutoTokenizer

    from minicpm_finetune.export.portable import save_tokenizer
    from minicpm_finetune.tiny import build_tokenizer, texts_of_file
    from minicpm_finetune.data.tokenizer import load_tokenizer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", default=None)
    parser.add_argument("--data", nargs="*", default=DEFAULT_DATA)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    texts = [text for path in args.data for text in texts_of_file(path)] + mixed_text_corpus()
    with tempfile.TemporaryDirectory() as work:
        folder = args.tokenizer
        if folder is None:
            folder = os.path.join(work, "tiny")
            build_tokenizer(folder, texts[::2], vocab_size=2000)
        processor = spm.SentencePieceProcessor(model_file=os.path.join(folder, "tokenizer.model"))
        plain, plain_s = timed(lambda: AutoTokenizer.from_pretrained(folder))
        toolkit, toolkit_s = timed(lambda: load_tokenizer(folder))
        save_tokenizer(toolkit, os.path.join(work, "output"))
        output, output_s = timed(lambda: AutoTokenizer.from_pretrained(os.path.join(work, "output")))
        truth = [processor.encode(text) for text in texts]
        results = {"tokenizer": args.tokenizer or "tiny (trained on the texts)", "texts": len(texts),
                   "sentencepiece_tokens": sum(map(len, truth))}
        for name, tokenizer, seconds in (("plain", plain, plain_s), ("toolkit", toolkit, toolkit_s),
                                         ("output", output, output_s)):
            ids = [tokenizer(text, add_special_tokens=False).input_ids for text in texts]
            results[name] = {"equal": sum(a == b for a, b in zip(ids, truth)), "tokens": sum(map(len, ids)),
                             "load_s": round(seconds, 3)}
    print(f"{results['texts']} texts, {results['sentencepiece_tokens']} SentencePiece tokens ({results['tokenizer']})")
    print("| tokenizer | ids equal to SentencePiece's | tokens vs SentencePiece | load s |")
    print("|---|---|---|---|")
    for name in ("plain", "toolkit", "output"):
        r = results[name]
        print(f"| {name} | {r['equal']}/{results['texts']} ({100 * r['equal'] / results['texts']:.1f}%) | "
              f"{r['tokens'] / results['sentencepiece_tokens']:.3f}x | {r['load_s']} |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
