"""Chat with a (fine-tuned) MiniCPM, answer one prompt, or predict over a data file and score it.

    python inference.py --model_name_or_path MODEL --prompt "你好"               # one answer
    python inference.py --model_name_or_path MODEL                              # chat: 'clear' resets, 'exit' quits
    python inference.py --model_name_or_path MODEL --input_file test.jsonl --output_file predictions.jsonl

MODEL is a base model, a full fine-tune output, a merged model or a LoRA adapter folder (its base is
read from adapter_config.json); or give the base as MODEL and the adapter with --adapter DIR.
Prompts are rendered with the chat template saved with the model or adapter, as in training.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


class UsageError(Exception):
    """Bad arguments: reported as one line, exit status 2."""


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def parse_args(argv=None):
    parser = OneLineParser(prog="python inference.py", description=__doc__.splitlines()[0])
    parser.add_argument("--model_name_or_path", required=True,
                        help="base model, fine-tune output, merged model or LoRA adapter folder (or hub id)")
    parser.add_argument("--adapter", default=None, help="LoRA adapter folder to apply to --model_name_or_path")
    parser.add_argument("--prompt", default=None, help="answer this once and exit")
    parser.add_argument("--system", default=None, help="system text put before the conversation")
    parser.add_argument("--input_file", default=None, help="data file (JSON / JSON Lines, any supported format)")
    parser.add_argument("--output_file", default=None, help="predictions JSONL (with --input_file)")
    parser.add_argument("--metrics_file", default=None, help="metrics JSON (default: OUTPUT.metrics.json)")
    parser.add_argument("--data_format", default="auto", choices=["auto", "conversation", "input_output"])
    parser.add_argument("--every_turn", action="store_true", help="with --input_file: answer every assistant turn")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_new_tokens", type=int, default=512)
    parser.add_argument("--num_beams", type=int, default=1)
    parser.add_argument("--do_sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top_p", type=float, default=0.8)
    parser.add_argument("--chat_template", default=None,
                        help="minicpm, chatml or a Jinja file (default: the one saved with the tokenizer)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--trust_remote_code", action="store_true")
    args = parser.parse_args(argv)
    if args.prompt is not None and args.input_file:
        raise UsageError("give --prompt or --input_file, not both")
    if args.input_file:
        if not os.path.isfile(args.input_file):
            raise UsageError(f"--input_file {args.input_file}: file not found")
        if not args.output_file:
            raise UsageError("--input_file needs --output_file")
    for name in ("batch_size", "max_new_tokens", "num_beams"):
        if getattr(args, name) <= 0:
            raise UsageError(f"--{name} must be positive, got {getattr(args, name)}")
    args.base, args.adapter = resolve_model(args.model_name_or_path, args.adapter)
    return args


def looks_local(name: str) -> bool:
    """A path rather than a hub id ("owner/name"). Same rule as minicpm_finetune.arguments, whose import
    (transformers' TrainingArguments) would take seconds before a bad path could be reported."""
    return name.startswith((".", "/", "~")) or os.path.exists(name) or name.count("/") != 1


def resolve_model(model: str, adapter: str | None) -> tuple[str, str | None]:
    """(base model, adapter folder or None); a LoRA folder given as the model names its base itself."""
    if looks_local(model) and not os.path.isdir(model):
        raise UsageError(f"--model_name_or_path {model}: folder not found")
    is_adapter = os.path.isfile(os.path.join(model, "adapter_config.json"))
    if adapter is not None:
        if not os.path.isdir(adapter):
            raise UsageError(f"--adapter {adapter}: folder not found")
        if not os.path.isfile(os.path.join(adapter, "adapter_config.json")):
            raise UsageError(f"--adapter {adapter}: not a LoRA adapter (no adapter_config.json)")
        if is_adapter:
            raise UsageError(f"--model_name_or_path {model} is an adapter too; give the base model with --adapter")
        return model, adapter
    if not is_adapter:
        return model, None
    with open(os.path.join(model, "adapter_config.json"), encoding="utf-8") as f:
        base = json.load(f).get("base_model_name_or_path")
    if not base or (looks_local(base) and not os.path.isdir(base)):
        raise UsageError(f"{model}/adapter_config.json: base model {base!r} not found; "
                         f"give it with --model_name_or_path BASE --adapter {model}")
    return base, model


def load_model_and_tokenizer(args):
    """The model (with its adapter) in eval mode on the GPU when there is one, and the tokenizer with its template."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    import minicpm_finetune  # noqa: F401 - registers the native MiniCPM model
    from minicpm_finetune.templates import apply_template, resolve_chat_template

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        dtype = torch.float32  # CPUs are slow and often inexact in half precision
    # An adapter folder from finetune.py carries the tokenizer and chat template it was trained with.
    has_own_tokenizer = args.adapter and os.path.isfile(os.path.join(args.adapter, "tokenizer_config.json"))
    tokenizer = AutoTokenizer.from_pretrained(args.adapter if has_own_tokenizer else args.base,
                                              trust_remote_code=args.trust_remote_code)
    config = AutoConfig.from_pretrained(args.base, trust_remote_code=args.trust_remote_code)
    apply_template(tokenizer, resolve_chat_template(tokenizer, config.model_type, args.chat_template))
    model = AutoModelForCausalLM.from_pretrained(args.base, dtype=dtype, trust_remote_code=args.trust_remote_code)
    if args.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter)
    return model.to(device).eval(), tokenizer


def read_samples(path: str, data_format: str, every_turn: bool):
    """(prompt messages, reference) pairs from a data file; a file of prompts only, i.e. conversations
    ending with a user turn or input records without an output, gives references None."""
    from minicpm_finetune.data import DataError, read_records, load_conversations, to_messages
    from minicpm_finetune.generation import eval_samples

    try:
        return eval_samples(load_conversations(path, data_format), every_turn)
    except DataError as complete_error:
        # Prompts only? Add a placeholder reply, check the record as training data, drop the placeholder.
        samples = []
        for number, record in read_records(path):
            if not isinstance(record, dict):
                raise complete_error
            if "messages" in record and isinstance(record["messages"], list):
                record = {"messages": record["messages"] + [{"role": "assistant", "content": "-"}]}
            elif "prompt" in record and "response" not in record:
                record = dict(record, response="-")
            elif "output" not in record and ("input" in record or "instruction" in record):
                record = dict(record, output="-")
            else:
                raise complete_error
            try:
                samples.append((to_messages(record, "conversation" if "messages" in record else "input_output")[:-1],
                                None))
            except ValueError:
                raise complete_error from None
        return samples


def predict_file(model, tokenizer, args, gen_kwargs) -> None:
    from minicpm_finetune.generation import generate_replies, save_metrics, save_predictions
    from minicpm_finetune.metrics import compute_metrics

    samples = read_samples(args.input_file, args.data_format, args.every_turn)
    predictions = generate_replies(model, tokenizer, [prompt for prompt, _ in samples], args.max_new_tokens,
                                   args.batch_size, **gen_kwargs)
    save_predictions(args.output_file, samples, predictions)
    print(f"wrote {len(predictions)} predictions to {args.output_file}")
    references = [reference for _, reference in samples]
    if None not in references:
        metrics = dict(compute_metrics(predictions, references), num_samples=len(samples))
        metrics_file = args.metrics_file or os.path.splitext(args.output_file)[0] + ".metrics.json"
        save_metrics(metrics_file, metrics)
        print(json.dumps(metrics, ensure_ascii=False))
        print(f"wrote metrics to {metrics_file}")


def chat(model, tokenizer, args, gen_kwargs) -> None:
    """Multi-turn chat on stdin; also works with stdin a pipe (no prompts are shown then)."""
    from minicpm_finetune.generation import generate_replies

    start = [{"role": "system", "content": args.system}] if args.system else []
    history = list(start)
    interactive = sys.stdin.isatty()
    if interactive:
        print("Chat: 'clear' starts over, 'exit' quits.")
    while True:
        try:
            text = input("User: " if interactive else "").strip()
        except EOFError:
            break
        if text == "exit":
            break
        if text == "clear":
            history = list(start)
            print("(history cleared)", flush=True)
            continue
        if not text:
            continue
        history.append({"role": "user", "content": text})
        reply = generate_replies(model, tokenizer, [history], args.max_new_tokens, 1, show_progress=False,
                                 **gen_kwargs)[0]
        history.append({"role": "assistant", "content": reply})
        print(f"Assistant: {reply}", flush=True)


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from minicpm_finetune.data import DataError
    from minicpm_finetune.generation import generate_replies, generation_kwargs

    try:
        model, tokenizer = load_model_and_tokenizer(args)
    except (OSError, ValueError) as e:  # e.g. a folder without weights; the first line says what
        print(f"error: cannot load {args.base}: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    gen_kwargs = generation_kwargs(args.num_beams, args.do_sample, args.temperature, args.top_p)
    if args.input_file:
        try:
            predict_file(model, tokenizer, args, gen_kwargs)
        except DataError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    elif args.prompt is not None:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
                   [{"role": "user", "content": args.prompt}]
        print(generate_replies(model, tokenizer, [messages], args.max_new_tokens, 1, show_progress=False,
                               **gen_kwargs)[0])
    else:
        chat(model, tokenizer, args, gen_kwargs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
