"""Load a MiniCPM-2B-shaped native model (random weights), run training steps and a generation; report time and memory.

    python bench/bench_model_step.py [--device cuda] [--shape 2b|tiny] [--attn sdpa|eager]

A check that the native implementation runs at full size on a GPU: a full-parameter AdamW step on a
batch of 8 x 512 tokens (chunked loss), then greedy generation of 64 tokens at batch 1 and 8.
"""

from __future__ import annotations

import argparse
import sys
import time

SHAPES = {
    "tiny": dict(vocab_size=32000, hidden_size=256, intermediate_size=640, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=4, dim_model_base=64),
    "2b": dict(vocab_size=122753, hidden_size=2304, intermediate_size=5760, num_hidden_layers=40,
               num_attention_heads=36, num_key_value_heads=36, dim_model_base=256),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    parser.add_argument("--shape", default="2b", choices=sorted(SHAPES))
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()

    import minicpm_finetune  # noqa: F401  first: its logging and warning filters apply before torch loads
    import torch
    from transformers import AutoModelForCausalLM

    from minicpm_finetune.tiny import tiny_config

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        from minicpm_finetune.cli import fail

        fail("--device cuda but no GPU is available")
    dtype = torch.bfloat16 if cuda else torch.float32

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def peak_gib():
        return torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")

    shape = dict(SHAPES[args.shape])
    config = tiny_config(shape.pop("vocab_size"), max_position_embeddings=4096, **shape)
    start = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=args.attn)
    sync()
    params = sum(p.numel() for p in model.parameters())
    print(f"torch {torch.__version__}, {args.device}, {args.shape}: {params / 1e9:.3f}B parameters, {dtype}, "
          f"attention {args.attn}; built in {time.perf_counter() - start:.1f} s, weights {peak_gib():.2f} GiB")

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids = torch.randint(3, config.vocab_size, (args.batch, args.seq), device=args.device)
    model.train()
    times = []
    for step in range(args.steps + 1):  # the first step warms up
        sync()
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - start)
        print(f"step {step}: loss {loss.item():.4f}, {times[-1]:.3f} s")
    step_time = sum(times[1:]) / max(1, len(times) - 1)
    print(f"training: {step_time:.3f} s/step, {args.batch * args.seq / step_time:,.0f} tokens/s, "
          f"peak {peak_gib():.2f} GiB (full fine-tuning, AdamW in {dtype})")

    del optimizer
    model.eval()
    for batch in (1, 8):
        prompt = torch.randint(3, config.vocab_size, (batch, 32), device=args.device)
        sync()
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(prompt, max_new_tokens=64, min_new_tokens=64, do_sample=False, pad_token_id=0)
        sync()
        seconds = time.perf_counter() - start
        print(f"generate batch {batch}: {out.shape[1] - 32} new tokens in {seconds:.2f} s, "
              f"{batch * 64 / seconds:,.0f} tokens/s, peak {peak_gib():.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
