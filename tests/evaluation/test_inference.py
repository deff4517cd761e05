"""inference.py: the same greedy text from a LoRA adapter, its merged model and a full fine-tune output;
stdin chat; predictions and metrics over a file; one-line errors; prompts kept within --max_length
(oldest exchanges dropped, a prompt too long alone refused); streamed replies equal to unstreamed ones."""

import json
import subprocess
import sys

import pytest
from conftest import QA, ROOT, run, write_jsonl
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from minicpm_finetune.evaluation.generation import generate_replies
from minicpm_finetune.evaluation.prompts import PromptTooLong, context_limit, fit_prompt, prompt_length
from minicpm_finetune.export.portable import save_tokenizer
from minicpm_finetune.data.tokenizer import load_tokenizer

MAX_NEW = "10"


def finetune(model_path, data_dir, output_dir, *extra):
    result = run([sys.executable, "finetune.py", "--model_name_or_path", model_path,
                  "--train_data_path", str(data_dir / "train.jsonl"), "--eval_data_path", str(data_dir / "dev.jsonl"),
                  "--output_dir", str(output_dir), "--use_cpu", "--report_to", "none", "--save_strategy", "no",
                  "--eval_strategy", "no", "--eval_generation", "false", "--max_steps", "6",
                  "--per_device_train_batch_size", "4", *extra])
    assert result.returncode == 0, result.stderr[-3000:]
    return str(output_dir)


def infer(*args, stdin=None):
    """Run inference.py (greedy, short replies); ``stdin`` is piped in for the chat mode."""
    return subprocess.run([sys.executable, "inference.py", "--max_new_tokens", MAX_NEW, *args], cwd=ROOT,
                          input=stdin, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def base_model(tiny_model, tmp_path_factory):
    """The tiny model with larger random weights: its greedy text varies with the prompt and with any
    change of weights (the fixture's says the same thing to everything), so a lost adapter would show."""
    config = AutoConfig.from_pretrained(tiny_model)
    config.initializer_range = 0.5
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("base") / "model"
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    save_tokenizer(load_tokenizer(tiny_model), folder)
    return str(folder)


@pytest.fixture(scope="module")
def lora_adapter(base_model, data_dir, tmp_path_factory):
    return finetune(base_model, data_dir, tmp_path_factory.mktemp("lora") / "out", "--use_lora",
                    "--lora_target_modules", "q_proj,v_proj", "--learning_rate", "1e-2")


def in_process(model_dir, prompts, adapter=None):
    """Greedy replies generated here, from the folder's own tokenizer (it carries the chat template)."""
    tokenizer = load_tokenizer(adapter or model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    return generate_replies(model, tokenizer, prompts, max_new_tokens=int(MAX_NEW), show_progress=False)


@pytest.mark.slow
def test_lora_adapter_and_merged_model_give_the_same_text(base_model, lora_adapter, tmp_path):
    from peft import PeftModel

    # Merge here (python -m minicpm_finetune.export merge is being written elsewhere).
    merged = tmp_path / "merged"
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_model), lora_adapter)
    model.merge_and_unload().save_pretrained(merged)
    save_tokenizer(load_tokenizer(lora_adapter), merged)

    prompt = QA[1][0]
    replies = []
    for args in (["--model_name_or_path", lora_adapter],  # base read from adapter_config.json
                 ["--model_name_or_path", base_model, "--adapter", lora_adapter],
                 ["--model_name_or_path", str(merged), "--no_stream"]):  # the others stream
        result = infer(*args, "--prompt", prompt)
        assert result.returncode == 0, result.stderr[-3000:]
        replies.append(result.stdout.rstrip("\n"))
    expected = in_process(base_model, [[{"role": "user", "content": prompt}]], adapter=lora_adapter)[0]
    assert replies == [expected] * 3
    # The adapter really is applied: the base model alone says something else.
    assert in_process(base_model, [[{"role": "user", "content": prompt}]])[0] != expected


@pytest.mark.slow
def test_full_finetune_output_batch_file_predictions_and_metrics(base_model, data_dir, tmp_path):
    full = finetune(base_model, data_dir, tmp_path / "full", "--learning_rate", "1e-3")
    predictions, metrics_file = tmp_path / "pred.jsonl", tmp_path / "scores.json"
    result = infer("--model_name_or_path", full, "--input_file", str(data_dir / "test.jsonl"),
                   "--output_file", str(predictions), "--metrics_file", str(metrics_file), "--batch_size", "3")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in predictions.read_text(encoding="utf-8").splitlines()]
    prompts = [[{"role": "user", "content": q}] for q, _ in QA]
    assert [row["input"] for row in rows] == prompts
    assert [row["reference"] for row in rows] == [a for _, a in QA]
    expected = in_process(full, prompts)
    assert [row["prediction"] for row in rows] == expected
    assert expected != in_process(base_model, prompts)  # it is the trained model that answered
    metrics = json.loads(metrics_file.read_text())
    assert set(metrics) == {"rouge-1", "rouge-2", "rouge-l", "bleu-4", "num_samples"} and metrics["num_samples"] == 4
    assert '"rouge-1"' in result.stdout  # printed too


@pytest.mark.slow
def test_prompt_only_file_gives_predictions_without_metrics(tiny_model, tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"input": "你好"}\n{"messages": [{"role": "user", "content": "推荐一条裙子"}]}\n',
                    encoding="utf-8")
    result = infer("--model_name_or_path", tiny_model, "--input_file", str(data), "--output_file",
                   str(tmp_path / "out.jsonl"))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [row["reference"] for row in rows] == [None, None] and rows[1]["input"][0]["content"] == "推荐一条裙子"
    assert not (tmp_path / "out.metrics.json").exists()


@pytest.mark.slow
def test_interactive_chat_keeps_history_until_clear(base_model, lora_adapter):
    first, second = QA[0][0], QA[2][0]
    result = infer("--model_name_or_path", lora_adapter,
                   stdin=f"{first}\n{second}\nclear\n{second}\nexit\nnever read\n")
    assert result.returncode == 0, result.stderr[-3000:]
    replies = [line.removeprefix("Assistant: ") for line in result.stdout.splitlines()
               if line.startswith("Assistant: ")]
    assert len(replies) == 3 and "(history cleared)" in result.stdout
    user = [{"role": "user", "content": first}]
    turn_two = user + [{"role": "assistant", "content": replies[0]}, {"role": "user", "content": second}]
    expected = in_process(base_model, [user, turn_two, [{"role": "user", "content": second}]], adapter=lora_adapter)
    assert replies == expected  # the second turn saw the first; after clear it did not


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["--model_name_or_path", "/no/such/model"], "--model_name_or_path /no/such/model: folder not found"),
    (["--model_name_or_path", "TINY", "--adapter", "/no/such/adapter"], "--adapter /no/such/adapter: folder not found"),
    (["--model_name_or_path", "TINY", "--adapter", "TINY"], "not a LoRA adapter"),
    (["--model_name_or_path", "TINY", "--input_file", "/no/such.jsonl", "--output_file", "x.jsonl"],
     "--input_file /no/such.jsonl: file not found"),
    (["--model_name_or_path", "TINY", "--max_new_tokens", "lots"], "invalid int value"),
    (["--model_name_or_path", "TINY", "--max_length", "0"], "--max_length must be positive, got 0"),
    (["--model_name_or_path", "TINY", "--max_length", "64", "--max_new_tokens", "64"],
     "--max_new_tokens 64 leaves no room for a prompt within --max_length 64"),
    (["--model_name_or_path", "TINY", "--max_new_tokens", "4096"],  # the tiny model's 2048 positions
     "--max_new_tokens 4096 leaves no room for a prompt within --max_length 2048"),
])
def test_bad_arguments_exit_2_with_one_line(tiny_model, args, message):
    result = run([sys.executable, "inference.py", *[tiny_model if a == "TINY" else a for a in args]])
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


# --------------------------------------------------------------------------- context limit and streaming

SYSTEM = {"role": "system", "content": "你是助手"}
# A user message far longer than the limits used below (ASCII: many tokens under the tiny vocabulary).
LONG = " ".join(["the quick brown fox jumps over the lazy dog"] * 4)


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


@pytest.mark.parametrize("template", ["minicpm", "chatml"])
def test_fit_prompt_drops_oldest_exchanges_and_keeps_the_system_turn(template, tiny_model, tiny_chatml_model):
    tokenizer = load_tokenizer(tiny_model if template == "minicpm" else tiny_chatml_model)
    exchanges = [[user(q), assistant(a)] for q, a in QA[:3]]
    current = user(QA[3][0])
    conversation = [SYSTEM] + [m for pair in exchanges for m in pair] + [current]
    # What is left after dropping the k oldest exchanges; the last one is the prompt alone.
    kept = [[SYSTEM] + [m for pair in exchanges[k:] for m in pair] + [current] for k in range(4)]
    lengths = [prompt_length(tokenizer, messages) for messages in kept]
    assert lengths == sorted(lengths, reverse=True) and len(set(lengths)) == 4
    new = 5
    for k, length in enumerate(lengths):
        # The largest conversation that fits is chosen, the system turn always kept...
        assert fit_prompt(tokenizer, conversation, length + new, new) == (kept[k], k)
        # ... and one token less drops one exchange more.
        if k < 3:
            assert fit_prompt(tokenizer, conversation, length + new - 1, new) == (kept[k + 1], k + 1)
    fitted, _ = fit_prompt(tokenizer, conversation, lengths[2] + new + 1, new)
    ids = tokenizer(tokenizer.apply_chat_template(fitted, tokenize=False, add_generation_prompt=True),
                    add_special_tokens=False)["input_ids"]
    assert len(ids) + new <= lengths[2] + new + 1
    assert fit_prompt(tokenizer, conversation, None, new) == (conversation, 0)  # no limit known
    with pytest.raises(PromptTooLong) as error:
        fit_prompt(tokenizer, conversation, lengths[3] + new - 1, new)
    assert (error.value.length, error.value.max_length, error.value.max_new_tokens) == (lengths[3], lengths[3] + 4, 5)


def test_context_limit_is_the_model_positions_else_the_tokenizer_length(tiny_model):
    tokenizer = load_tokenizer(tiny_model)
    config = AutoConfig.from_pretrained(tiny_model)
    assert tokenizer.model_max_length > 10**20  # transformers' "unset"
    assert context_limit(config, tokenizer) == config.max_position_embeddings == 2048
    tokenizer.model_max_length = 512  # often copied from another model: the config wins
    assert context_limit(config, tokenizer) == 2048
    from transformers import PretrainedConfig

    assert context_limit(PretrainedConfig(), tokenizer) == 512  # a config without positions
    tokenizer.model_max_length = int(1e30)
    assert context_limit(PretrainedConfig(), tokenizer) is None


@pytest.mark.parametrize("template", ["minicpm", "chatml"])
def test_streamed_pieces_join_to_the_returned_reply(template, tiny_model, tiny_chatml_model):
    """Random weights emit byte tokens (<0xE4>), half characters and special tokens mid-reply: the pieces
    written while generating still join to exactly the returned, stripped reply."""
    folder = tiny_model if template == "minicpm" else tiny_chatml_model
    tokenizer = load_tokenizer(folder)
    config = AutoConfig.from_pretrained(folder)
    config.initializer_range = 0.5
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    replies = []
    for prompt in ["你好", "?u么ua", "What is two plus four?🙂", "é 𠀀"]:
        pieces = []
        replies += generate_replies(model, tokenizer, [[user(prompt)]], max_new_tokens=60, show_progress=False,
                                    stream=pieces.append)
        assert "".join(pieces) == replies[-1] and len(pieces) > 5  # it really arrived piece by piece
    assert any("\ufffd" in reply for reply in replies)  # invalid byte runs were generated: the hard case
    with pytest.raises(ValueError, match="one prompt"):
        generate_replies(model, tokenizer, [[user("a")], [user("b")]], stream=print, show_progress=False)


def replies_in(stdout):
    return [line.removeprefix("Assistant: ") for line in stdout.splitlines() if line.startswith("Assistant: ")]


@pytest.mark.slow
def test_chat_drops_oldest_exchanges_refuses_a_message_too_long_and_streams_the_same_text(base_model):
    tokenizer = load_tokenizer(base_model)
    model = AutoModelForCausalLM.from_pretrained(base_model).eval()
    new = int(MAX_NEW)

    def reply(messages):
        return generate_replies(model, tokenizer, [messages], max_new_tokens=new, show_progress=False)[0]

    u1, u2, u3, u5 = (user(QA[0][0]), user(QA[1][0]), user("What is two plus two? " + QA[2][0]), user(QA[3][0]))
    a1 = assistant(reply([SYSTEM, u1]))
    a2 = assistant(reply([SYSTEM, u1, a1, u2]))
    # A limit where the third turn fits only without the first exchange.
    third = [SYSTEM, u2, a2, u3]
    max_length = prompt_length(tokenizer, third) + new
    assert prompt_length(tokenizer, [SYSTEM, u1, a1, u2]) + new <= max_length
    assert prompt_length(tokenizer, [SYSTEM, u1, a1, u2, a2, u3]) + new > max_length
    assert prompt_length(tokenizer, [SYSTEM, user(LONG)]) + new > max_length
    a3 = assistant(reply(third))
    fifth, _ = fit_prompt(tokenizer, third + [a3, u5], max_length, new)  # LONG never joined the history
    expected = [a1["content"], a2["content"], a3["content"], reply(fifth)]

    stdin = "\n".join(m["content"] for m in (u1, u2, u3, user(LONG), u5)) + "\n"
    common = ["--model_name_or_path", base_model, "--system", SYSTEM["content"], "--max_length", str(max_length)]
    streamed, whole = infer(*common, stdin=stdin), infer(*common, "--no_stream", stdin=stdin)
    for result in (streamed, whole):
        assert result.returncode == 2, result.stderr[-3000:]  # a message was not sent
        assert replies_in(result.stdout) == expected
        lines = result.stdout.splitlines()
        note = f"(dropped the oldest exchange to fit --max_length {max_length})"
        assert lines.count(note) == 1 and lines.index(note) == 2  # once, before the third reply
        errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert errors == [f"error: this message is {prompt_length(tokenizer, [SYSTEM, user(LONG)])} tokens with the "
                          f"chat template; with --max_new_tokens {new} it exceeds --max_length {max_length}; not sent"]
    assert streamed.stdout == whole.stdout


@pytest.mark.slow
def test_file_prompts_drop_oldest_exchanges_and_a_prompt_too_long_names_its_record(base_model, tmp_path):
    tokenizer = load_tokenizer(base_model)
    new = int(MAX_NEW)
    (q1, r1), (q2, r2), (q3, r3) = QA[:3]
    long_chat = [SYSTEM, user(q1), assistant(r1), user(q2), assistant(r2), user(q3), assistant(r3)]
    short = [user(q2), assistant(r2)]
    trimmed = [SYSTEM, user(q2), assistant(r2), user(q3)]  # the first exchange dropped
    max_length = prompt_length(tokenizer, trimmed) + new
    assert prompt_length(tokenizer, long_chat[:-1]) + new > max_length
    data, out = tmp_path / "chats.jsonl", tmp_path / "pred.jsonl"
    write = lambda chats: data.write_text("".join(json.dumps({"messages": c}, ensure_ascii=False) + "\n"  # noqa: E731
                                                  for c in chats), encoding="utf-8")
    args = ["--model_name_or_path", base_model, "--input_file", str(data), "--output_file", str(out),
            "--max_length", str(max_length)]

    write([short, long_chat])
    result = infer(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"note: dropped the oldest exchanges of 1 sample(s) to fit --max_length {max_length} (record 2)" \
        in result.stdout
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [row["input"] for row in rows] == [short[:-1], long_chat[:-1]]  # the file keeps the full input
    assert [row["prediction"] for row in rows] == in_process(base_model, [short[:-1], trimmed])

    out.unlink()
    write([short, short, [user(LONG), assistant(r1)]])
    result = infer(*args)
    assert result.returncode == 2 and not out.exists()  # refused before generating anything
    length = prompt_length(tokenizer, [user(LONG)])
    assert result.stderr == (f"error: {data}:3: the prompt is {length} tokens with the chat template; "
                             f"with --max_new_tokens {new} it exceeds --max_length {max_length}\n")


@pytest.mark.slow
def test_prompt_too_long_alone_is_refused_with_one_line(tiny_model):
    result = infer("--model_name_or_path", tiny_model, "--max_length", "30", "--prompt", LONG)
    length = prompt_length(load_tokenizer(tiny_model), [user(LONG)])
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == (f"error: --prompt is {length} tokens with the chat template; with --max_new_tokens "
                             f"{MAX_NEW} it exceeds --max_length 30\n")


def test_file_mode_reads_every_registered_format_with_tools_carried_to_the_prompt(tmp_path):
    """Samples come from the format registry: history kept in the prompt, the reference is the last reply,
    a conversation's tool list travels with its prompt (generation renders it), an unknown format is named."""
    sys.path.insert(0, ROOT)
    from inference import read_samples

    from minicpm_finetune.data import DataError
    from minicpm_finetune.data.formats import FORMATS, format_names

    for name in format_names():
        fmt = FORMATS[name]
        path = tmp_path / f"{name}.jsonl"
        path.write_text(json.dumps(fmt.example, ensure_ascii=False) + "\n", encoding="utf-8")
        samples, numbers = read_samples(str(path), "auto", every_turn=False)
        (prompt, reference), = samples
        assert numbers == [1] and reference == FORMATS[name].convert(fmt.example)["messages"][-1]["content"]
        assert getattr(prompt, "tools", None) == FORMATS[name].convert(fmt.example)["tools"]
        assert prompt[-1]["role"] in ("user", "tool")
    alpaca = read_samples(str(tmp_path / "alpaca.jsonl"), "alpaca", every_turn=True)[0]
    assert [reference for _, reference in alpaca] == ["红裙上新", "这款红色连衣裙……"]  # history replies too
    with pytest.raises(DataError, match="unknown data format 'input_output'"):
        read_samples(str(tmp_path / "alpaca.jsonl"), "input_output", every_turn=False)


def test_a_file_mixing_records_with_and_without_replies_is_one_line_and_a_saved_dataset_is_read(tmp_path,
                                                                                                  tiny_model):
    """Records with a reply are scored, records without only predicted: a file of both is said, not turned
    silently into prompts only (which would drop every reference); any data path of training works here too."""
    import datasets

    sys.path.insert(0, ROOT)
    from inference import parse_args, read_samples

    from minicpm_finetune.data import DataError

    mixed = write_jsonl(tmp_path / "mixed.jsonl", [{"instruction": "写一段广告", "output": "红裙上新"},
                                                   {"instruction": "写一段广告"}])
    with pytest.raises(DataError, match=r"mixed.jsonl: 1 record\(s\) have no reply and 1 have one \(first without: "
                                        r".*mixed.jsonl:2: .*\); give every record its reply to score them"):
        read_samples(mixed, "auto", every_turn=False)
    saved = str(tmp_path / "saved")
    datasets.Dataset.from_list([{"instruction": "写一段广告", "output": "红裙上新"}]).save_to_disk(saved)
    parse_args(["--model_name_or_path", tiny_model, "--input_file", saved, "--output_file",
                str(tmp_path / "out.jsonl")])  # its checks take a folder as a data path, as training does
    (prompt, reference), = read_samples(saved, "auto", every_turn=False)[0]
    assert reference == "红裙上新" and prompt[-1] == {"role": "user", "content": "写一段广告"}
