"""Chat with a (fine-tuned) MiniCPM, answer one prompt, or predict over a data file and score it.

    python inference.py --model_name_or_path MODEL --prompt "你好"               # one answer
    python inference.py --model_name_or_path MODEL                              # chat: 'clear' resets, 'exit' quits
    python inference.py --model_name_or_path MODEL --input_file test.jsonl --output_file predictions.jsonl

MODEL is a base model, a full fine-tune output, a merged model or a LoRA adapter folder (its base is
read from adapter_config.json); or give the base as MODEL and the adapter with --adapter DIR.
Prompts are rendered with the chat template saved with the model or adapter, as in training. A prompt
plus --max_new_tokens must fit --max_length (default: the model's context): chat drops its oldest
exchanges, and a prompt too long on its own is refused. Chat and --prompt replies stream as generated.
"""

from __future__ import annotations

import json
import os
import sys

from ..cli import (ArgumentError, OneLineParser, check_count, check_output_path, command, load_error, looks_local,
                   print_error, true_or_false)


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
    # Checked against the format registry (minicpm_finetune/formats.py) when the file is read: importing
    # the package here would delay every one-line usage error by seconds.
    parser.add_argument("--data_format", default="auto", help="record format of --input_file: a name from "
                        "python -m minicpm_finetune.data --help (default: detected)")
    parser.add_argument("--every_turn", action="store_true", help="with --input_file: answer every assistant turn")
    parser.add_argument("--eval_metrics", default="rouge,bleu",
                        help="with references: comma list of rouge, bleu, accuracy (exact match, for label tasks)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_new_tokens", type=int, default=512)
    parser.add_argument("--max_length", type=int, default=None,
                        help="context limit for prompt + reply in tokens (default: the model's "
                             "max_position_embeddings, else the tokenizer's model_max_length)")
    parser.add_argument("--no_stream", action="store_true",
                        help="print chat and --prompt replies when complete instead of as they are generated")
    parser.add_argument("--num_beams", type=int, default=1)
    parser.add_argument("--do_sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top_p", type=float, default=0.8)
    parser.add_argument("--enable_thinking", type=true_or_false, default=None,
                        help="true/false: passed to a hybrid-reasoning chat template (MiniCPM4.1/5) with every prompt "
                             "(a --input_file record's own enable_thinking comes first)")
    parser.add_argument("--chat_template", default=None,
                        help="minicpm, chatml or a Jinja file (default: the one saved with the tokenizer)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--trust_remote_code", action="store_true")
    args = parser.parse_args(argv)
    check_args(args)
    args.base, args.adapter = resolve_model(args.model_name_or_path, args.adapter)
    return args


def check_args(args) -> None:
    """ArgumentError for flags that cannot work together, before anything is loaded; --eval_metrics becomes a list."""
    from .metrics import parse_metric_names

    if args.prompt is not None and args.input_file:
        raise ArgumentError("give --prompt or --input_file, not both")
    for name in ("prompt", "system"):
        if getattr(args, name) is not None and not is_utf8(getattr(args, name)):
            raise ArgumentError(f"--{name} is not valid UTF-8 text (check the terminal's or the script's encoding)")
    if args.input_file and not os.path.exists(args.input_file) and looks_local(args.input_file.split(":")[0]):
        raise ArgumentError(f"--input_file {args.input_file}: file not found")  # else a hub dataset name
    if args.input_file and not args.output_file:
        raise ArgumentError("--input_file needs --output_file")
    for name in ("batch_size", "max_new_tokens", "num_beams", "max_length"):
        check_count(f"--{name}", getattr(args, name))
    if args.max_length is not None and args.max_new_tokens >= args.max_length:
        raise ArgumentError(no_room_text(args))
    try:
        args.eval_metrics = parse_metric_names(args.eval_metrics)
    except ValueError as e:
        raise ArgumentError(f"--eval_metrics: {e}") from None
    for flag in ("output_file", "metrics_file"):  # where the results go, before minutes of generating them
        if getattr(args, flag):
            check_output_path(getattr(args, flag), f"--{flag}", folder=False)


def is_utf8(text: str) -> bool:
    """False for text decoded with surrogateescape from bytes that are not UTF-8 (arguments, stdin)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def no_room_text(args) -> str:
    return f"--max_new_tokens {args.max_new_tokens} leaves no room for a prompt within --max_length {args.max_length}"


def resolve_model(model: str, adapter: str | None) -> tuple[str, str | None]:
    """(base model, adapter folder or None); a LoRA folder given as the model names its base itself."""
    if looks_local(model) and not os.path.isdir(model):
        raise ArgumentError(f"--model_name_or_path {model}: folder not found")
    is_adapter = os.path.isfile(os.path.join(model, "adapter_config.json"))
    if os.path.isdir(model) and not is_adapter and not os.path.isfile(os.path.join(model, "config.json")):
        raise ArgumentError(f"--model_name_or_path {model}: no config.json in this folder (not a model folder, "
                         "or its download is incomplete)")
    if adapter is not None:
        if not os.path.isdir(adapter):
            raise ArgumentError(f"--adapter {adapter}: folder not found")
        if not os.path.isfile(os.path.join(adapter, "adapter_config.json")):
            raise ArgumentError(f"--adapter {adapter}: not a LoRA adapter (no adapter_config.json)")
        if is_adapter:
            raise ArgumentError(f"--model_name_or_path {model} is an adapter too; give the base model with --adapter")
        return model, adapter
    if not is_adapter:
        return model, None
    with open(os.path.join(model, "adapter_config.json"), encoding="utf-8") as f:
        base = json.load(f).get("base_model_name_or_path")
    if not base or (looks_local(base) and not os.path.isdir(base)):
        raise ArgumentError(f"{model}/adapter_config.json: base model {base!r} not found; "
                         f"give it with --model_name_or_path BASE --adapter {model}")
    return base, model


def load_tokenizer_and_config(args):
    """The tokenizer with its chat template, and the model's config: enough to check prompts before
    the weights are loaded."""
    from transformers import AutoConfig

    from ..data.tokenizer import load_chat_tokenizer

    # An adapter folder from finetune.py carries the tokenizer and chat template it was trained with.
    has_own_tokenizer = args.adapter and os.path.isfile(os.path.join(args.adapter, "tokenizer_config.json"))
    config = AutoConfig.from_pretrained(args.base, trust_remote_code=args.trust_remote_code)
    tokenizer = load_chat_tokenizer(args.adapter if has_own_tokenizer else args.base, args.chat_template,
                                    config.model_type, args.trust_remote_code)
    return tokenizer, config


def load_model(args):
    """The model (with its adapter) in eval mode on the GPU when there is one."""
    import torch
    from transformers import AutoModelForCausalLM

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        dtype = torch.float32  # CPUs are slow and often inexact in half precision
    model = AutoModelForCausalLM.from_pretrained(args.base, dtype=dtype, trust_remote_code=args.trust_remote_code)
    if args.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter)
    return model.to(device).eval()


def read_samples(path: str, data_format: str, every_turn: bool, tokenizer=None, enable_thinking=None):
    """(prompt messages, reference) pairs from a data file, and the record number of each (for messages);
    a file of prompts only, i.e. records of a training format without their final reply, gives
    references None. With ``tokenizer``, a reply that makes tool calls is referenced as the template writes
    it (``prompts.eval_samples``)."""
    from ..data import DataError, check_file, example_of, load_conversations
    from .prompts import Prompt, eval_samples

    check, prompts_only = check_file(path, data_format), False
    if check.problem_count:  # prompts only? The same records completed with a placeholder reply must pass.
        as_prompts = check_file(path, data_format, prompts=True)
        if as_prompts.problem_count:
            raise DataError(check.report())
        if check.good_count:  # some records have their reply: scoring them silently would drop the others
            raise DataError(f"{path}: {check.problem_count} record(s) have no reply and {check.good_count} have "
                            f"one (first without: {check.problems[0]}); give every record its reply to score "
                            "them, or none to only predict")
        check, prompts_only = as_prompts, True
    samples, numbers = [], []
    for row in load_conversations(path, data_format, check=check):
        if prompts_only:
            example = example_of(row)
            tools = example.get("tools")
            thinking = example.get("enable_thinking", enable_thinking)
            pairs = [(Prompt(example["messages"], tools, thinking) if tools or thinking is not None
                      else example["messages"], None)]
        else:
            pairs = eval_samples([row], every_turn, tokenizer, enable_thinking)
        samples += pairs
        numbers += [row["position"]] * len(pairs)
    return samples, numbers


def too_long_text(what: str, error) -> str:
    return (f"{what} is {error.length} tokens with the chat template; with --max_new_tokens {error.max_new_tokens} "
            f"it exceeds --max_length {error.max_length}")


def fit_file_prompts(tokenizer, samples, numbers, args) -> list[list[dict]]:
    """Every sample's prompt within --max_length (oldest exchanges dropped, noted); a prompt too long on its
    own stops everything before any generation, naming its record."""
    from ..data import DataError
    from .prompts import PromptTooLong, fit_prompt

    prompts, trimmed, too_long = [], [], []
    for (prompt, _), number in zip(samples, numbers):
        try:
            fitted, dropped = fit_prompt(tokenizer, prompt, args.max_length, args.max_new_tokens)
        except PromptTooLong as e:
            too_long.append((number, e))
            continue
        prompts.append(fitted)
        if dropped:
            trimmed.append(number)
    if too_long:
        number, error = too_long[0]
        more = f" ({len(too_long) - 1} more sample(s) too long)" if len(too_long) > 1 else ""
        raise DataError(f"{args.input_file}:{number}: " + too_long_text("the prompt", error) + more)
    if trimmed:
        records = sorted(set(trimmed))
        shown = ", ".join(map(str, records[:5])) + (", ..." if len(records) > 5 else "")
        print(f"note: dropped the oldest exchanges of {len(trimmed)} sample(s) to fit --max_length "
              f"{args.max_length} (record {shown}); the predictions file keeps the full input")
    return prompts


def predict_file(model, tokenizer, args, gen_kwargs, samples, prompts) -> None:
    """Predictions for ``samples`` (written with their full input) from their fitted ``prompts``, and metrics."""
    from .generation import generate_replies
    from .metrics import compute_metrics
    from .prompts import answer_of
    from .results import save_metrics, save_predictions

    predictions = generate_replies(model, tokenizer, prompts, args.max_new_tokens, args.batch_size, **gen_kwargs)
    save_predictions(args.output_file, samples, predictions)
    print(f"wrote {len(predictions)} predictions to {args.output_file}")
    references = [reference for _, reference in samples]
    if None not in references:
        answers = [answer_of(p) for p in predictions]  # scored without their reasoning
        metrics = dict(compute_metrics(answers, references, args.eval_metrics), num_samples=len(samples))
        metrics_file = args.metrics_file or os.path.splitext(args.output_file)[0] + ".metrics.json"
        save_metrics(metrics_file, metrics)
        print(json.dumps(metrics, ensure_ascii=False))
        print(f"wrote metrics to {metrics_file}")


def reply_to(model, tokenizer, messages, args, gen_kwargs, prefix: str = "") -> str:
    """Generate one reply and print it after ``prefix``: as it is generated unless --no_stream."""
    from .generation import generate_replies
    from .prompts import write_to_stdout

    # transformers cannot stream beam search; its reply is printed whole.
    stream = not args.no_stream and args.num_beams == 1
    if stream:
        print(prefix, end="", flush=True)
    reply = generate_replies(model, tokenizer, [messages], args.max_new_tokens, 1, show_progress=False,
                             stream=write_to_stdout if stream else None, **gen_kwargs)[0]
    print("" if stream else prefix + reply, flush=True)
    return reply


def chat(model, tokenizer, args, gen_kwargs) -> int:
    """Multi-turn chat on stdin; also works with stdin a pipe (no prompts are shown then).
    Returns the exit status: 2 if a message was too long to send, else 0."""
    from .prompts import PromptTooLong, answer_of, fit_prompt

    start = [{"role": "system", "content": args.system}] if args.system else []
    history = list(start)
    status = 0
    interactive = sys.stdin.isatty()
    if interactive:
        print("Chat: 'clear' starts over, 'exit' quits.")
    while True:
        try:
            text = input("User: " if interactive else "").strip()
        except EOFError:
            break
        except UnicodeDecodeError:  # stdin strict UTF-8 (a UTF-8 locale)
            text = None
        if text is None or not is_utf8(text):
            print_error("this message is not valid UTF-8 text; not sent")
            status = 2
            continue
        if text == "exit":
            break
        if text == "clear":
            history = list(start)
            print("(history cleared)", flush=True)
            continue
        if not text:
            continue
        try:
            fitted, dropped = fit_prompt(tokenizer, with_thinking(history + [{"role": "user", "content": text}], args),
                                         args.max_length, args.max_new_tokens)
        except PromptTooLong as e:  # the conversation goes on without this message
            print_error(too_long_text("this message", e) + "; not sent")
            status = 2
            continue
        if dropped:  # gone for good, so the note shows once per drop, not at every later turn
            what = "the oldest exchange" if dropped == 1 else f"the {dropped} oldest exchanges"
            print(f"(dropped {what} to fit --max_length {args.max_length})", flush=True)
        history = fitted
        reply = reply_to(model, tokenizer, history, args, gen_kwargs, prefix="Assistant: ")
        history.append({"role": "assistant", "content": answer_of(reply)})  # earlier reasoning is not sent again
    return status


def with_thinking(messages: list[dict], args) -> list[dict]:
    """The messages as a prompt rendered with --enable_thinking, when given."""
    from .prompts import Prompt

    return messages if args.enable_thinking is None else Prompt(messages, None, args.enable_thinking)


def fit_max_length(args, config, tokenizer) -> None:
    """--max_length: the model's context unless given; a reply of --max_new_tokens must leave room for a prompt."""
    from .prompts import context_limit

    model_limit = context_limit(config, tokenizer)
    if args.max_length is None:
        args.max_length = model_limit  # None when neither config nor tokenizer says: no limit
    elif model_limit is not None and args.max_length > model_limit:
        print(f"warning: --max_length {args.max_length} is above the model's {model_limit} positions", file=sys.stderr)
    if args.max_length is not None and args.max_new_tokens >= args.max_length:  # the model's own limit
        raise ArgumentError(no_room_text(args))


def one_prompt(tokenizer, args) -> list[dict]:
    """--prompt (after --system) as messages, checked to fit --max_length."""
    from .prompts import PromptTooLong, fit_prompt

    messages = with_thinking(([{"role": "system", "content": args.system}] if args.system else []) +
                             [{"role": "user", "content": args.prompt}], args)
    try:
        fit_prompt(tokenizer, messages, args.max_length, args.max_new_tokens)
    except PromptTooLong as e:
        raise ArgumentError(too_long_text("--prompt with --system" if args.system else "--prompt", e)) from None
    return messages


def load_or_fail(load, args):
    """``load(args)``; a model transformers cannot load is one line naming it."""
    try:
        return load(args)
    except (OSError, ValueError) as e:  # e.g. a folder without weights, a hub id not in the cache
        raise load_error(args.base, e) from None


@command
def main(argv=None) -> int:
    from .generation import generation_kwargs

    args = parse_args(argv)
    tokenizer, config = load_or_fail(load_tokenizer_and_config, args)
    fit_max_length(args, config, tokenizer)
    # Prompts are checked before the weights load, so a bad one is reported at once.
    if args.input_file:
        samples, numbers = read_samples(args.input_file, args.data_format, args.every_turn, tokenizer,
                                        args.enable_thinking)
        prompts = fit_file_prompts(tokenizer, samples, numbers, args)
    elif args.prompt is not None:
        messages = one_prompt(tokenizer, args)
    model = load_or_fail(load_model, args)
    gen_kwargs = generation_kwargs(args.num_beams, args.do_sample, args.temperature, args.top_p)
    if args.input_file:
        predict_file(model, tokenizer, args, gen_kwargs, samples, prompts)
    elif args.prompt is not None:
        reply_to(model, tokenizer, messages, args, gen_kwargs)
    else:
        return chat(model, tokenizer, args, gen_kwargs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
