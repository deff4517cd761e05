"""Throughput of generation-based evaluation (samples/s): one-by-one vs left-padded batches.

    python bench/bench_generation_eval.py                               # tiny random MiniCPM on CPU
    python bench/bench_generation_eval.py --device cuda --shape 2b      # MiniCPM-2B shape, random weights, bf16
    python bench/bench_generation_eval.py --model PATH --device cuda    # a real model folder

Prompts are the AdvertiseGen-format sample in data/advertisegen/dev.jsonl. Random weights rarely emit the
end-of-turn token, so most replies run to --max_new_tokens: this measures the worst case, equal for all rows.
A script, not a test.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# MiniCPM-2B's shape (hidden 2304, 40 layers, 36 heads, intermediate 5760, dim_model_base 256); the vocabulary
# stays the small test tokenizer's.
SHAPES = {
    "tiny": {},
    "2b": dict(hidden_size=2304, intermediate_size=5760, num_hidden_layers=40, num_attention_heads=36,
               num_key_value_heads=36, dim_model_base=256, scale_depth=1.4),
}


def load(args, workdir):
    import torch
    from transformers import AutoModelForCausalLM

    from minicpm_finetune.data.templates import apply_template, resolve_chat_template
    from minicpm_finetune.tiny import build_tokenizer, tiny_config
    from minicpm_finetune.data.tokenizer import load_tokenizer

    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    if args.model:
        tokenizer = load_tokenizer(args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
        apply_template(tokenizer, resolve_chat_template(tokenizer, model.config.model_type))
    else:
        tokenizer = build_tokenizer(workdir, [])
        torch.manual_seed(0)
        config = tiny_config(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, **SHAPES[args.shape])
        with torch.device(args.device):  # initialise on the GPU: 2.7B random weights are slow on a CPU
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.to(args.device).eval(), tokenizer


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--model", default=None, help="model folder (default: random weights of --shape)")
    parser.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    parser.add_argument("--num_samples", type=int, default=32)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--batch_sizes", default="1,8,32", help="comma-separated; 1 is one-by-one")
    args = parser.parse_args()
    import minicpm_finetune  # noqa: F401  first: its logging and warning filters apply before torch loads
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        from minicpm_finetune.cli import fail

        fail("--device cuda but no GPU is available")

    from minicpm_finetune.advertisegen import convert_record
    from minicpm_finetune.data import read_records
    from minicpm_finetune.evaluation.generation import generate_replies
    from minicpm_finetune.evaluation.prompts import eval_samples

    records = [r for _, r in read_records(os.path.join(ROOT, "data", "advertisegen", "dev.jsonl"))]
    samples = eval_samples([convert_record(r) for r in records])
    prompts = [prompt for prompt, _ in (samples * (args.num_samples // len(samples) + 1))[:args.num_samples]]
    with tempfile.TemporaryDirectory() as workdir:
        model, tokenizer = load(args, workdir)
        # Warm up (kernels, allocator), then time each batch size on the same prompts.
        generate_replies(model, tokenizer, prompts[:2], max_new_tokens=4, batch_size=2, show_progress=False)
        params = sum(p.numel() for p in model.parameters())
        print(f"model: {args.model or args.shape} ({params / 1e6:.1f}M parameters), device {args.device}, "
              f"{len(prompts)} prompts, max_new_tokens {args.max_new_tokens}, torch {torch.__version__}")
        print(f"{'batch size':>10} | {'seconds':>8} | {'samples/s':>9} | speed-up")
        baseline = None
        for batch_size in (int(b) for b in args.batch_sizes.split(",")):
            if args.device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            generate_replies(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens,
                             batch_size=batch_size, show_progress=False)
            if args.device == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            rate = len(prompts) / seconds
            baseline = baseline or rate
            print(f"{batch_size:>10} | {seconds:>8.2f} | {rate:>9.2f} | {rate / baseline:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
