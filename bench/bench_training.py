"""Training speed and memory of the seed recipe against ours, on synthetic AdvertiseGen-like data.

    python bench/bench_training.py --device cpu --model tiny --steps 3 --rows 4 [--json OUT]
    python bench/bench_training.py --device cuda --model minicpm-2b --steps 10 [--json OUT]
    python bench/bench_training.py --data_prep [--samples 100000]

Training: one process, the real model classes (native MiniCPM, random weights) and a plain loop with
torch.optim.AdamW (no Trainer, so that the time is the model's); every recipe gets a fresh model and
the same samples (prompt 30-60 tokens, reply 60-120, random ids from a fixed seed). The seed recipe pads
every sample to 512 and passes an attention mask; ours packs samples into rows of 512 with
minicpm_finetune.data.packing (no mask, no padding) and uses the model's chunked loss (fused: gradients made in
forward; chunked: checkpointed chunks, lm_head recomputed in backward), or full logits + cross-entropy for
"full logits"; "compiled layers" torch.compiles each decoder layer (--compile_layers in finetune.py). The
optimizer is fused AdamW, as transformers' Trainer uses by default. Warm-up steps (and compilation) are
not timed.

Columns: real tokens/s counts sample tokens only (padding is not work); peak memory is
torch.cuda.max_memory_allocated over the timed steps (weights, optimizer, activations) on CUDA, and on
CPU the peak resident set size during the recipe minus the RSS before its model was built (psutil,
sampled every 5 ms); MFU = k * N * tokens/s / peak, N = model parameters (tied embeddings counted once,
which equals the matmul weights: the lm_head matmul uses them), k = 6 for full fine-tuning (forward 2N,
backward 4N) and 4 for LoRA (no weight gradients for frozen weights); recomputation under checkpointing
and attention-score FLOPs (<1% at these lengths) are not counted. Peak: --peak_tflops (790 on CUDA, the
H200 bf16 matmul rate measured there), on CPU a measured fp32 matmul rate.

--data_prep times data preparation instead: AdvertiseGen records from data/advertisegen/train.jsonl,
repeated and shuffled to --samples conversations, converted, tokenized with data.tokenize_dataset
(masks included; num_proc 1 and 2) with the tiny SentencePiece tokenizer, then packed.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import threading
import time
from typing import NamedTuple

# The package first: its logging and warning filters must be in place before torch and transformers load.
import minicpm_finetune  # noqa: F401  # isort: skip
import numpy as np
import torch

from minicpm_finetune.data import IGNORE_INDEX
from minicpm_finetune.models.families import family_of
from minicpm_finetune.data.packing import PackingCollator, pack_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MODELS = {
    # A small MiniCPM for CPU runs: the vocabulary is large enough that the logits matter.
    "tiny": dict(vocab_size=32000, hidden_size=256, intermediate_size=640, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=4, dim_model_base=64),
    # MiniCPM-2B's shape (random weights).
    "minicpm-2b": dict(vocab_size=122753, hidden_size=2304, intermediate_size=5760, num_hidden_layers=40,
                       num_attention_heads=36, num_key_value_heads=36, dim_model_base=256),
}

class Recipe(NamedTuple):
    name: str
    lora: bool
    rows: int | str  # rows per batch: 1 or 8 for the seed, "rows" for --rows
    packed: bool = True
    # "logits": full-vocabulary logits + cross-entropy (stock); "chunked": the model's loss with checkpointed
    # chunks (lm_head recomputed in backward); "fused": the model's loss with gradients made in forward (default).
    loss: str = "fused"
    checkpointing: bool = False
    compiled: bool = False  # torch.compile each decoder layer (finetune.py --compile_layers)
    master: bool = False  # full fine-tuning with fp32 master weights, as DeepSpeed's bf16 optimizer keeps them
    four_bit: bool = False  # QLoRA: base weights in 4-bit NF4 (bitsandbytes), as finetune.py --qlora


def packed_recipes(who: str, lora: bool) -> list[Recipe]:
    """The loss and memory variants measured alike for LoRA and full fine-tuning, on packed rows."""
    return [
        Recipe(f"{who}, {{B}}x512 packed, full logits", lora, "rows", loss="logits"),
        Recipe(f"{who}, {{B}}x512 packed, chunked loss", lora, "rows", loss="chunked"),
        Recipe(f"{who}, {{B}}x512 packed, fused loss", lora, "rows"),
        Recipe(f"{who}, {{B}}x512 packed, fused loss, checkpointing", lora, "rows", checkpointing=True),
        Recipe(f"{who}, {{B}}x512 packed, fused loss, compiled layers", lora, "rows", compiled=True),
    ]


# --recipes takes indices into this list: keep its order.
RECIPES = [
    Recipe("seed: LoRA r8 q,v, batch 1, padded to 512", True, 1, packed=False, loss="logits"),
    Recipe("seed: LoRA r8 q,v, batch 8, padded to 512", True, 8, packed=False, loss="logits"),
    *packed_recipes("LoRA q,v", lora=True),
    Recipe("LoRA q,v, {B}x512 packed, fused loss, checkpointing, compiled layers", True, "rows", checkpointing=True,
           compiled=True),
    *packed_recipes("full, AdamW", lora=False),
    Recipe("full, fp32 master AdamW, {B}x512 packed, fused loss, checkpointing", False, "rows", checkpointing=True,
           master=True),
    Recipe("full, fp32 master AdamW, {B}x512 packed, fused loss, checkpointing, compiled layers", False, "rows",
           checkpointing=True, compiled=True, master=True),
    Recipe("QLoRA (4-bit) q,v, {B}x512 packed, fused loss", True, "rows", four_bit=True),
    Recipe("QLoRA (4-bit) q,v, {B}x512 packed, fused loss, checkpointing", True, "rows", checkpointing=True,
           four_bit=True),
]


# --------------------------------------------------------------------------- data


def synthetic_samples(count: int, vocab_size: int, seed: int = 0):
    """BOS + prompt (30-60, not learned) + reply (60-120, learned) + EOS (learned), random token ids."""
    import datasets

    rng = np.random.default_rng(seed)
    ids, labels = [], []
    for _ in range(count):
        prompt = rng.integers(3, vocab_size, rng.integers(30, 61)).tolist()
        reply = rng.integers(3, vocab_size, rng.integers(60, 121)).tolist() + [2]
        ids.append([1] + prompt + reply)
        labels.append([IGNORE_INDEX] * (1 + len(prompt)) + reply)
    return datasets.Dataset.from_dict({"input_ids": ids, "labels": labels, "length": [len(x) for x in ids]})


def padded_batches(samples, batch_size: int, length: int = 512):
    """The seed recipe: every sample padded to `length`, with an attention mask."""
    for start in range(0, len(samples) - batch_size + 1, batch_size):
        rows = samples[start:start + batch_size]
        ids = torch.zeros(batch_size, length, dtype=torch.long)
        labels = torch.full((batch_size, length), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros(batch_size, length, dtype=torch.long)
        for i, (x, y) in enumerate(zip(rows["input_ids"], rows["labels"])):
            ids[i, :len(x)], labels[i, :len(y)], mask[i, :len(x)] = torch.tensor(x), torch.tensor(y), 1
        yield {"input_ids": ids, "labels": labels, "attention_mask": mask}, int(mask.sum())


def packed_batches(samples, rows_per_batch: int, length: int = 512, flatten: bool = False, multiple=None):
    rows = pack_dataset(samples, length)
    collate = PackingCollator(pad_token_id=0, flatten=flatten, pad_to_multiple_of=multiple)
    for start in range(0, len(rows) - rows_per_batch + 1, rows_per_batch):
        features = [rows[i] for i in range(start, start + rows_per_batch)]
        yield collate(features), sum(f["length"] for f in features)


# --------------------------------------------------------------------------- model and step


def build_model(name: str, device: str, dtype: torch.dtype, attn: str):
    from transformers import AutoModelForCausalLM

    from minicpm_finetune.tiny import tiny_config

    settings = dict(MODELS[name])
    config = tiny_config(settings.pop("vocab_size"), max_position_embeddings=4096, initializer_range=0.02, **settings)
    config.use_cache = False
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    return model


def save_random_model(name: str, dtype: torch.dtype, folder: str) -> int:
    """The recipe's random model saved to `folder` (built on the CPU), for a 4-bit load; its parameter count."""
    model = build_model(name, "cpu", dtype, "sdpa")
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder)
    return n_params


def load_four_bit(folder: str, device: str, dtype: torch.dtype, attn: str):
    """As finetune.py --qlora loads a model: NF4 weights, double quantization, matmuls in `dtype`."""
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    from minicpm_finetune.models.loading import qlora_kwargs

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation=attn,
                                                 **qlora_kwargs(dtype, device))
    model.config.use_cache = False
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def full_logits_loss(model, batch):
    """Stock path: full-vocabulary logits, then cross-entropy in fp32 over the shifted labels."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits
    labels = torch.nn.functional.pad(batch["labels"], (0, 1), value=IGNORE_INDEX)[:, 1:]
    return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                             ignore_index=IGNORE_INDEX)


class PeakRSS:
    """Peak resident set size of this process over a block, sampled by a thread (CPU memory)."""

    def __init__(self, interval=0.005):
        import psutil

        self.process, self.interval, self.peak, self._stop = psutil.Process(), interval, 0, threading.Event()

    def __enter__(self):
        self.peak = self.process.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def release_memory(device):
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    else:
        try:  # hand freed heap back to the OS so the next recipe's RSS baseline is honest
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass


class MasterWeightsAdamW:
    """AdamW on fp32 copies of the (bf16) weights, as DeepSpeed's bf16 optimizer and ZeRO keep them:
    gradients are copied up to fp32, the step runs in fp32, the weights are copied back down."""

    def __init__(self, params, lr):
        self.params = list(params)
        self.master = [p.detach().to(torch.float32, copy=True) for p in self.params]
        self.optimizer = torch.optim.AdamW(self.master, lr=lr, fused=True)

    @torch.no_grad()
    def step(self):
        for master, param in zip(self.master, self.params):
            master.grad, param.grad = param.grad.float(), None
        self.optimizer.step()
        torch._foreach_copy_(self.params, self.master)

    def zero_grad(self, set_to_none=True):
        self.optimizer.zero_grad(set_to_none=set_to_none)


class MemoryMeter:
    """A recipe's peak memory: on CUDA the most allocated over the timed steps; on the CPU the peak resident set
    from before the model is built to the end of the timed steps, minus the resident set before."""

    def __init__(self, device: str):
        import psutil

        self.device = device
        self.rss_before = psutil.Process().memory_info().rss
        self.sampler = PeakRSS().__enter__() if device == "cpu" else None

    def timing_starts(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def stop(self):
        if self.sampler:
            self.sampler.__exit__(None, None, None)

    def peak_mib(self) -> float:
        if self.device == "cuda":
            return torch.cuda.max_memory_allocated() / 2**20
        self.stop()
        return (self.sampler.peak - self.rss_before) / 2**20


class Timing(NamedTuple):
    real_tokens: int
    seconds: float
    peak_mib: float
    last_loss: float


def run_recipe(recipe: Recipe, args, samples, dtype):
    label = recipe.name.format(B=args.rows)
    four_bit_folder = tempfile.TemporaryDirectory() if recipe.four_bit else None
    if four_bit_folder:  # saved before memory is measured: only the 4-bit model counts
        n_params = save_random_model(args.model, dtype, four_bit_folder.name)
    release_memory(args.device)
    memory = MemoryMeter(args.device)
    if four_bit_folder:
        model = load_four_bit(four_bit_folder.name, args.device, dtype, args.attn)
        four_bit_folder.cleanup()
    else:
        model = build_model(args.model, args.device, dtype, args.attn)
        n_params = sum(p.numel() for p in model.parameters())
    if recipe.loss != "logits" and not family_of(model.config).chunked_loss:
        memory.stop()
        return {"recipe": label, "skipped": "the model has no chunked loss"}
    model = prepare_for_training(model, recipe)
    rows = args.rows if recipe.rows == "rows" else recipe.rows
    timing = time_steps(model, recipe, rows, args, samples, memory)
    del model
    release_memory(args.device)
    tokens_per_s = timing.real_tokens / timing.seconds
    flops_per_token = (4 if recipe.lora else 6) * n_params
    return {"recipe": label, "lora": recipe.lora, "rows": rows, "packed": recipe.packed, "loss": recipe.loss,
            "checkpointing": recipe.checkpointing, "compiled_layers": recipe.compiled,
            "master_weights": recipe.master, "four_bit": recipe.four_bit, "steps": args.steps,
            "real_tokens": timing.real_tokens, "seconds": timing.seconds,
            "tokens_per_s": tokens_per_s, "peak_mib": timing.peak_mib, "n_params": n_params,
            "flops_per_token": flops_per_token,
            "mfu": flops_per_token * tokens_per_s / (args.peak_tflops * 1e12) if args.peak_tflops else None,
            "last_loss": timing.last_loss}


def prepare_for_training(model, recipe: Recipe):
    """The recipe's loss, checkpointing, LoRA and compilation, set up as finetune.py's load_model does."""
    if recipe.loss != "logits":
        model.loss_fused = recipe.loss == "fused"
    if recipe.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if recipe.lora and (recipe.checkpointing or recipe.compiled):  # one compiled graph serves layer 0 too
        model.enable_input_require_grads()
    if recipe.lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=32, lora_dropout=0.1,
                                                 target_modules=["q_proj", "v_proj"]))
    if recipe.compiled:
        from minicpm_finetune.models.loading import compile_decoder_layers

        compile_decoder_layers(model)
    model.train()
    return model


def time_steps(model, recipe: Recipe, rows: int, args, samples, memory: MemoryMeter) -> Timing:
    """args.warmup untimed optimizer steps, then args.steps timed ones (and args.profile profiled ones)."""
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = MasterWeightsAdamW(trained, 1e-5) if recipe.master else torch.optim.AdamW(trained, lr=1e-5, fused=True)
    if recipe.packed:
        batches = packed_batches(samples, rows, flatten=args.attn.startswith("flash_attention"),
                                 multiple=args.pad_to_multiple_of)
    else:
        batches = padded_batches(samples, rows)

    def step(batch):
        batch = {k: v.to(args.device, non_blocking=True) for k, v in batch.items()}
        loss = full_logits_loss(model, batch) if recipe.loss == "logits" else model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    for _ in range(args.warmup):
        step(next(batches)[0])
    memory.timing_starts()
    tokens, losses = 0, []
    start = time.perf_counter()
    for _ in range(args.steps):
        batch, real = next(batches)
        losses.append(step(batch).detach())
        tokens += real
    if args.device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak_mib = memory.peak_mib()
    if args.profile:
        profile_steps(step, batches, args)
    return Timing(tokens, seconds, peak_mib, float(losses[-1]))


def profile_steps(step, batches, args):
    """Per-op times of a few more steps (torch.profiler), the biggest first: where the time goes."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(args.profile):
            step(next(batches)[0])
        if args.device == "cuda":
            torch.cuda.synchronize()
    sort_by = "self_cuda_time_total" if args.device == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort_by, row_limit=args.profile_rows, max_name_column_width=60))


def measured_matmul_tflops(device: str, dtype: torch.dtype) -> float:
    n = 2048 if device == "cpu" else 8192
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    repeats = 5 if device == "cpu" else 20
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e12


def environment(args) -> dict:
    import transformers

    info = {"date": time.strftime("%Y-%m-%d"), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "threads": torch.get_num_threads()}
    try:
        import peft

        info["peft"] = peft.__version__
    except ImportError:
        pass
    if args.device == "cuda":
        info["device"] = torch.cuda.get_device_name()
    else:
        cpu = platform.processor()
        try:
            with open("/proc/cpuinfo") as f:
                cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
        info["device"] = f"{cpu} ({os.cpu_count()} cores visible)"
    return info


def print_table(results, peak_note):
    base = next((r for r in results if r["recipe"].startswith("seed") and r.get("rows") == 1 and "skipped" not in r),
                None)
    print(f"\n| recipe | real tokens/s | peak MiB | MFU ({peak_note}) | x seed b1 |")
    print("|---|---:|---:|---:|---:|")
    for r in results:
        if "skipped" in r:
            print(f"| {r['recipe']} | n/a ({r['skipped']}) | | | |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.1f}x" if base else ""
        print(f"| {r['recipe']} | {r['tokens_per_s']:,.0f} | {r['peak_mib']:,.0f} | {mfu} | {ratio} |")


def bench_training(args):
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if args.device == "cuda" else "fp32")]
    if args.peak_tflops is None:
        args.peak_tflops = 790.0 if args.device == "cuda" else measured_matmul_tflops(args.device, dtype)
        kind = "H200 bf16" if args.device == "cuda" else "measured fp32 matmul"
        peak_note = f"{kind} {args.peak_tflops:.3g} TFLOP/s"
    else:
        peak_note = f"{args.peak_tflops:g} TFLOP/s"
    needed = (args.warmup + args.steps + args.profile) * max(8, args.rows * 4)
    samples = synthetic_samples(needed, MODELS[args.model]["vocab_size"], args.seed)
    wanted = [r for i, r in enumerate(RECIPES) if not args.recipes or i in args.recipes]
    results = []
    for recipe in wanted:
        result = run_recipe(recipe, args, samples, dtype)
        results.append(result)
        if "skipped" not in result:
            print(f"{result['recipe']}: {result['tokens_per_s']:,.0f} tokens/s, peak {result['peak_mib']:,.0f} MiB, "
                  f"loss {result['last_loss']:.3f}", flush=True)
    info = environment(args)
    print(f"\n{info}; model {args.model} ({results[0].get('n_params', 0) / 1e6:.1f}M params), {args.dtype or dtype}, "
          f"attention {args.attn}, {args.steps} timed steps after {args.warmup} warm-up; "
          f"peak memory = {'CUDA max_memory_allocated' if args.device == 'cuda' else 'peak RSS delta (psutil)'}")
    print_table(results, peak_note)
    return {"environment": info, "args": vars(args), "peak_note": peak_note, "results": results}


# --------------------------------------------------------------------------- data preparation


def bench_data_prep(args):
    import random

    import datasets

    from minicpm_finetune.advertisegen import convert_record
    from minicpm_finetune.data import tokenize_dataset
    from minicpm_finetune.tiny import build_tokenizer

    source = os.path.join(ROOT, "data", "advertisegen", "train.jsonl")
    with open(source, encoding="utf-8") as f:
        raw = [json.loads(line) for line in f if line.strip()]
    random.Random(args.seed).shuffle(raw)
    records = [raw[i % len(raw)] for i in range(args.samples)]
    random.Random(args.seed + 1).shuffle(records)
    with tempfile.TemporaryDirectory() as folder:
        tokenizer = build_tokenizer(folder, [t for r in raw[:500] for t in (r["content"], r["summary"])])
    start = time.perf_counter()
    conversations = datasets.Dataset.from_list([convert_record(r) for r in records])
    convert_s = time.perf_counter() - start
    results = {"samples": args.samples, "convert_s": convert_s}
    datasets.disable_caching()  # time the work, not the cache
    for num_proc in args.num_proc:
        start = time.perf_counter()
        dataset, stats = tokenize_dataset(conversations, tokenizer, 512, num_proc=num_proc if num_proc > 1 else None)
        seconds = time.perf_counter() - start
        results[f"tokenize_num_proc_{num_proc}_s"] = seconds
        print(f"tokenize + mask, num_proc={num_proc}: {seconds:.1f} s = {args.samples / seconds:,.0f} samples/s "
              f"({stats.tokens / stats.samples:.0f} tokens/sample)", flush=True)
    start = time.perf_counter()
    packed = pack_dataset(dataset, 512)
    seconds = time.perf_counter() - start
    results["pack_s"] = seconds
    print(f"pack into rows of 512: {seconds:.1f} s = {args.samples / seconds:,.0f} samples/s "
          f"({len(packed)} rows, {sum(packed['length']) / (512 * len(packed)):.1%} full)")
    print(f"convert records: {convert_s:.1f} s; {environment(args)}")
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", choices=list(MODELS), default="tiny")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per recipe")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--rows", type=int, default=8, help="packed rows of 512 per batch (B)")
    parser.add_argument("--recipes", type=int, nargs="*", help="indices into the recipe list (default: all)")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default=None,
                        help="weights (default bf16 on cuda, fp32 on cpu)")
    parser.add_argument("--attn", default="sdpa", help="sdpa, eager or flash_attention_2 (packed rows flattened)")
    parser.add_argument("--peak_tflops", type=float, default=None,
                        help="chip peak for MFU (default 790 on cuda, a measured fp32 matmul rate on cpu)")
    parser.add_argument("--pad_to_multiple_of", type=int, default=64, help="packed batches: round the width up "
                        "(1: off)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", type=int, default=0, help="after timing, profile this many steps per recipe "
                        "(torch.profiler) and print the ops that take the most time")
    parser.add_argument("--profile_rows", type=int, default=20, help="--profile: ops to print")
    parser.add_argument("--json", default=None, help="write the results to this file")
    parser.add_argument("--plot", default=None, help="bar charts of tokens/s and peak memory to this PNG")
    parser.add_argument("--data_prep", action="store_true", help="time data preparation instead of training")
    parser.add_argument("--samples", type=int, default=100_000, help="--data_prep: number of conversations")
    parser.add_argument("--num_proc", type=int, nargs="*", default=[1, 2], help="--data_prep: tokenizer processes")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")
    results = bench_data_prep(args) if args.data_prep else bench_training(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    if args.plot and not args.data_prep:
        from plot_bench import plot_bench

        print(f"wrote {plot_bench(results, args.plot)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
