"""Data preparation against a bare batched tokenizer call over the same rendered texts, side by side in one run.

    python bench/bench_data.py [--samples 100000] [--tokenizer PATH] [--num_proc 1] [--preview_samples 100000 300000]
                               [--json OUT.json]

AdvertiseGen-like conversations (the records of data/advertisegen/train.jsonl, repeated and shuffled to
--samples, converted to the conversation format) are written as a JSON Lines file, then in one process:
- prepare: what finetune.py does with the file: read, check, load into Arrow, render, tokenize, mask and
  write the tokenized set (data.load_conversations + data.tokenize_dataset), from a fresh cache;
- cached (after the first prepare): the same preparation again, served from the cache;
- bare: every conversation rendered with the chat template (untimed), then only the tokenizer's batched
  call over those texts, 1000 at a time, as the timed part;
and again (--repeats pairs, interleaved, so that load from other jobs falls on both sides). The ratio is
mean prepare / mean bare, in wall time and in CPU time of the process (all threads; less sensitive to a
busy machine); the load average before and after is recorded too. --preview_samples runs the data preview
(python -m minicpm_finetune.data) on that many conversations each, in a fresh process and a fresh cache,
and reports each one's peak resident memory (ru_maxrss).

--tokenizer defaults to a tiny SentencePiece tokenizer trained on the sample (so CI can run this); give a
real one (e.g. a folder with MiniCPM-2B's tokenizer.model and tokenizer_config.json) for real numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# The package first: its logging and warning filters must be in place before datasets and transformers load.
import minicpm_finetune  # noqa: E402,F401


def write_conversations(path: str, samples: int, seed: int) -> None:
    from minicpm_finetune.advertisegen import convert_record

    with open(os.path.join(ROOT, "data", "advertisegen", "train.jsonl"), encoding="utf-8") as f:
        raw = [json.loads(line) for line in f if line.strip()]
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(samples):
            f.write(json.dumps(convert_record(raw[rng.randrange(len(raw))]), ensure_ascii=False) + "\n")


def tiny_tokenizer(folder: str) -> str:
    from minicpm_finetune.tiny import build_tokenizer

    with open(os.path.join(ROOT, "data", "advertisegen", "train.jsonl"), encoding="utf-8") as f:
        raw = [json.loads(line) for line in f if line.strip()][:500]
    build_tokenizer(folder, [t for r in raw for t in (r["content"], r["summary"])])
    return folder


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bare(tokenizer, texts, batch: int = 1000) -> float:
    start = time.perf_counter()
    for i in range(0, len(texts), batch):
        tokenizer(texts[i:i + batch], add_special_tokens=False)
    return time.perf_counter() - start


def preview_peak(tokenizer_path: str, samples: int, seed: int) -> dict:
    """Peak RSS of the data preview on a fresh cache, in its own process."""
    with tempfile.TemporaryDirectory() as folder:
        data = os.path.join(folder, "train.jsonl")
        write_conversations(data, samples, seed)
        env = dict(os.environ, HF_DATASETS_CACHE=os.path.join(folder, "cache"))
        code = ("import resource, sys, time; from minicpm_finetune.data import main; t = time.perf_counter(); "
                "rc = main(sys.argv[1:]); print('BENCH', rc, time.perf_counter() - t, "
                "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
        result = subprocess.run([sys.executable, "-c", code, "--tokenizer", tokenizer_path, "--data", data,
                                 "--model_max_length", "512"], cwd=ROOT, env=env, capture_output=True, text=True)
        line = next((out for out in result.stdout.splitlines() if out.startswith("BENCH")), None)
        if result.returncode or line is None:
            raise SystemExit(f"preview failed: {result.stderr[-2000:]}")
        _, rc, seconds, rss = line.split()
        return {"samples": samples, "seconds": float(seconds), "peak_rss_mib": float(rss)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=100_000)
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: a tiny one built here)")
    parser.add_argument("--chat_template", default=None, help="minicpm, chatml or a Jinja file (default: resolved "
                        "as training does)")
    parser.add_argument("--num_proc", type=int, default=1, help="--preprocessing_num_workers for the preparation")
    parser.add_argument("--model_max_length", type=int, default=512)
    parser.add_argument("--preview_samples", type=int, nargs="*", default=[],
                        help="also measure the preview's peak memory at these sizes (fresh processes)")
    parser.add_argument("--repeats", type=int, default=2, help="prepare/bare pairs, interleaved")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the results to this file")
    args = parser.parse_args(argv)

    work = tempfile.mkdtemp(prefix="bench_data_")
    os.environ["HF_DATASETS_CACHE"] = os.path.join(work, "cache")  # fresh: time the work, not an old cache
    import datasets

    from minicpm_finetune.data import example_of, load_conversations, tokenize_dataset
    from minicpm_finetune.data.encoding import get_encoder
    from minicpm_finetune.data.templates import apply_template, resolve_chat_template
    from minicpm_finetune.data.tokenizer import load_tokenizer

    tokenizer_path = args.tokenizer or tiny_tokenizer(os.path.join(work, "tokenizer"))
    tokenizer = load_tokenizer(tokenizer_path)
    apply_template(tokenizer, resolve_chat_template(tokenizer, "minicpm", args.chat_template))
    data = os.path.join(work, "train.jsonl")
    write_conversations(data, args.samples, args.seed)
    datasets.disable_progress_bars()
    rss_start = peak_rss_mib()
    load_before = os.getloadavg()  # the machine may be shared: other jobs' load is part of the record
    encoder = get_encoder(tokenizer)
    texts = None

    def prepare(run: int):
        """The whole preparation from a fresh cache folder: (wall s, CPU s of all threads, stats, dataset)."""
        datasets.config.HF_DATASETS_CACHE = os.path.join(work, f"cache{run}")
        start, cpu = time.perf_counter(), time.process_time()
        conversations = load_conversations(data, log=lambda *_: None)
        dataset, stats = tokenize_dataset(conversations, tokenizer, args.model_max_length, args.num_proc)
        return time.perf_counter() - start, time.process_time() - cpu, stats, conversations

    # Interleaved (prepare, bare, prepare, bare, ...) so that load from other jobs falls on both sides.
    prepare_s, prepare_cpu, bare_s, bare_cpu = [], [], [], []
    for run in range(args.repeats):
        wall, cpu, stats, conversations = prepare(run)
        prepare_s.append(wall)
        prepare_cpu.append(cpu)
        if run == 0:
            rss_prepare = peak_rss_mib()
            start = time.perf_counter()
            cached, _ = tokenize_dataset(load_conversations(data, log=lambda *_: None), tokenizer,
                                         args.model_max_length)
            cached_s = time.perf_counter() - start
            texts = [encoder.render(example_of(row)["messages"]).text for row in conversations]
        cpu = time.process_time()
        bare_s.append(bare(tokenizer, texts))
        bare_cpu.append(time.process_time() - cpu)
    bare_mean = sum(bare_s) / len(bare_s)
    prepare_mean = sum(prepare_s) / len(prepare_s)
    results = {
        "samples": args.samples, "tokenizer": tokenizer_path if args.tokenizer else "tiny (built from the sample)",
        "vocab_size": len(tokenizer), "tokens_per_sample": stats.tokens / max(stats.samples, 1),
        "num_proc": args.num_proc, "fast_path": encoder.blocks is not None,
        "bare_tokenizer_s": bare_s, "prepare_s": prepare_s, "ratio": prepare_mean / bare_mean,
        "bare_tokenizer_cpu_s": bare_cpu, "prepare_cpu_s": prepare_cpu, "cpu_ratio": sum(prepare_cpu) / sum(bare_cpu),
        "cached_s": cached_s,
        "peak_rss_mib_before": rss_start, "peak_rss_mib_after_prepare": rss_prepare,
        "cpu_count": os.cpu_count(), "load_average_before": load_before, "load_average_after": os.getloadavg(),
    }
    print(f"{args.samples} conversations, {results['tokens_per_sample']:.0f} tokens each, vocabulary {len(tokenizer)}, "
          f"{os.cpu_count()} CPUs")
    print(f"bare batched tokenizer call over the rendered texts: {', '.join(f'{x:.1f}' for x in bare_s)} s "
          f"(CPU {', '.join(f'{x:.1f}' for x in bare_cpu)} s)")
    print(f"whole preparation (read, check, render, tokenize, mask, write): "
          f"{', '.join(f'{x:.1f}' for x in prepare_s)} s "
          f"(CPU {', '.join(f'{x:.1f}' for x in prepare_cpu)} s) = {results['ratio']:.2f}x the bare call "
          f"({results['cpu_ratio']:.2f}x in CPU time); peak RSS {rss_prepare:.0f} MiB")
    print(f"second run, same data/tokenizer/template/length: {cached_s:.1f} s (cache)")
    print(f"load average (1, 5, 15 min) before {', '.join(f'{x:.1f}' for x in load_before)}, after "
          f"{', '.join(f'{x:.1f}' for x in results['load_average_after'])} on {os.cpu_count()} CPUs")
    for samples in args.preview_samples:
        peak = preview_peak(tokenizer_path, samples, args.seed)
        results.setdefault("preview", []).append(peak)
        print(f"preview of {samples} conversations (fresh process and cache): {peak['seconds']:.1f} s, "
              f"peak RSS {peak['peak_rss_mib']:.0f} MiB")
    if len(results.get("preview", [])) >= 2:
        first, last = results["preview"][0], results["preview"][-1]
        results["preview_peak_ratio"] = last["peak_rss_mib"] / first["peak_rss_mib"]
        print(f"preview peak memory {last['samples']} vs {first['samples']}: {results['preview_peak_ratio']:.3f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
