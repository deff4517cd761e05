"""Exact ids and loss masks for conversations and input-output records, on both chat template styles."""

import json

import pytest
from conftest import run, write_jsonl
from transformers import AutoTokenizer

from minicpm_finetune.data import (IGNORE_INDEX, DataError, check_file, encode, load_conversations,
                                   to_messages, tokenize_dataset)
from minicpm_finetune.templates import CHATML_TEMPLATE, MINICPM_TEMPLATE, end_of_turn_token

MULTI_TURN = [
    {"role": "system", "content": "你是一个乐于助人的助手。"},
    {"role": "user", "content": "你好"},
    {"role": "assistant", "content": "你好，有什么可以帮你的吗？"},
    {"role": "user", "content": "今天天气怎么样"},
    {"role": "assistant", "content": "今天天气很好，适合散步。"},
]


@pytest.fixture(scope="module", params=["minicpm", "chatml"])
def tokenizer(request, tiny_model, tiny_chatml_model):
    return AutoTokenizer.from_pretrained(tiny_model if request.param == "minicpm" else tiny_chatml_model)


def prompt_ids(tokenizer, messages):
    """What inference feeds the model for these messages."""
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                              return_dict=True)["input_ids"])


def expected_labels(tokenizer, messages, ids):
    """Independent expectation: after each assistant prompt (as inference renders it), learn up to and
    including the first end-of-turn token; everything else is masked."""
    eot_id = tokenizer.convert_tokens_to_ids(end_of_turn_token(tokenizer))
    labels = [IGNORE_INDEX] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = prompt_ids(tokenizer, messages[:i])
        assert ids[: len(prompt)] == prompt, "training ids must start with what inference feeds the model"
        end = ids.index(eot_id, len(prompt))
        labels[len(prompt): end + 1] = ids[len(prompt): end + 1]
    return labels


@pytest.mark.parametrize("messages", [MULTI_TURN, MULTI_TURN[1:], MULTI_TURN[:3]], ids=["system", "no-system", "one-turn"])
def test_conversation_masks_are_exact(tokenizer, messages):
    row = encode(tokenizer, messages, end_of_turn_token(tokenizer), max_length=None)
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert row["input_ids"] == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert row["labels"] == expected_labels(tokenizer, messages, row["input_ids"])
    # The learned text is exactly every reply followed by its end-of-turn token.
    eot = end_of_turn_token(tokenizer)
    learned = [t for t, l in zip(row["input_ids"], row["labels"]) if l != IGNORE_INDEX]
    replies = [m["content"] + eot for m in messages if m["role"] == "assistant"]
    assert tokenizer.decode(learned) == "".join(replies)
    assert row["labels"][0] == IGNORE_INDEX  # BOS / role marker


def test_templates_render_as_documented(tokenizer):
    text = tokenizer.apply_chat_template(MULTI_TURN[:3], tokenize=False)
    if tokenizer.chat_template == MINICPM_TEMPLATE:
        assert text == "<s>你是一个乐于助人的助手。<用户>你好<AI>你好，有什么可以帮你的吗？</s>"
    else:
        assert tokenizer.chat_template == CHATML_TEMPLATE
        assert text == ("<|im_start|>system\n你是一个乐于助人的助手。<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n"
                        "<|im_start|>assistant\n你好，有什么可以帮你的吗？<|im_end|>\n")


def test_every_prefix_agrees_with_inference(tokenizer):
    """For each assistant turn, the ids before it equal apply_chat_template(prefix, add_generation_prompt=True)."""
    row = encode(tokenizer, MULTI_TURN, end_of_turn_token(tokenizer), None)
    starts = [i for i in range(1, len(row["labels"]))
              if row["labels"][i] != IGNORE_INDEX and row["labels"][i - 1] == IGNORE_INDEX]
    prompts = [prompt_ids(tokenizer, MULTI_TURN[:k]) for k in (2, 4)]
    assert starts == [len(p) for p in prompts]
    for p in prompts:
        assert row["input_ids"][: len(p)] == p


def test_input_output_records_become_one_turn_conversations():
    assert to_messages({"instruction": "写广告", "input": "类型#裙", "output": "好看", "system": "你是文案"},
                       "input_output") == [
        {"role": "system", "content": "你是文案"},
        {"role": "user", "content": "写广告\n类型#裙"},
        {"role": "assistant", "content": "好看"},
    ]
    assert to_messages({"prompt": "hi", "response": "hello"}, "input_output") == [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


def test_input_output_file_is_masked_like_a_conversation(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "io.jsonl", [{"input": "你好", "output": "你好，有什么可以帮你的吗？"}])
    dataset, stats = tokenize_dataset(load_conversations(path), tokenizer, max_length=None)
    row = encode(tokenizer, MULTI_TURN[1:3], end_of_turn_token(tokenizer), None)
    assert dataset[0]["input_ids"] == row["input_ids"] and dataset[0]["labels"] == row["labels"]
    assert stats.samples == 1 and stats.learned_tokens == sum(l != IGNORE_INDEX for l in row["labels"])


def test_truncation_masks_a_cut_reply_and_skips_samples_with_nothing_left(tmp_path, tokenizer):
    eot = end_of_turn_token(tokenizer)
    full = encode(tokenizer, MULTI_TURN, eot, None)
    labels = full["labels"]
    learned = [i for i, l in enumerate(labels) if l != IGNORE_INDEX]
    first_reply_end = next(i for i, j in zip(learned, learned[1:]) if j != i + 1)  # last token of reply 1
    # Cut inside the second reply: the first reply stays learned, the cut one is masked whole.
    cut = len(labels) - 3
    row = encode(tokenizer, MULTI_TURN, eot, max_length=cut)
    assert row["input_ids"] == full["input_ids"][:cut] and row["truncated"] and row["cut_replies"] == 1
    assert row["labels"][: first_reply_end + 1] == labels[: first_reply_end + 1]
    assert all(l == IGNORE_INDEX for l in row["labels"][first_reply_end + 1:])
    # Cut inside the first reply: nothing left to learn, so tokenize_dataset skips the sample.
    first_learned = learned[0]
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": MULTI_TURN}, {"messages": MULTI_TURN[1:3]}])
    dataset, stats = tokenize_dataset(load_conversations(path), tokenizer, max_length=first_learned + 2)
    assert stats.skipped >= 1 and stats.truncated >= 1
    assert all(any(l != IGNORE_INDEX for l in r["labels"]) for r in dataset)


@pytest.mark.parametrize("line, problem", [
    ('{"messages": [{"role": "user", "content": "hi"}', "malformed JSON"),
    ('{"messages": [{"role": "bot", "content": "hi"}]}', "unknown role 'bot'"),
    ('{"messages": [{"role": "assistant", "content": "hi"}]}', "out of order"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "does not end with an assistant reply"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}', "empty reply"),
    ('{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}]}', "must be a string"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "s"}, '
     '{"role": "assistant", "content": "a"}]}', "out of order"),
    ('{"text": "hi"}', 'missing "messages"'),
])
def test_bad_records_are_named_by_file_and_line(tmp_path, line, problem):
    good = json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
    path = tmp_path / "bad.jsonl"
    path.write_text(good + "\n" + line + "\n" + good + "\n", encoding="utf-8")
    check = check_file(str(path))
    assert len(check.problems) == 1 and len(check.records) == 2
    assert check.problems[0].startswith(f"{path}:2: ") and problem in check.problems[0]
    with pytest.raises(DataError, match="1 bad record"):
        load_conversations(str(path))
    assert len(load_conversations(str(path), skip_bad_samples=True, log=lambda *_: None)) == 2


def test_file_level_problems(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        check_file(str(tmp_path / "missing.jsonl"))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="empty"):
        check_file(str(tmp_path / "empty.jsonl"))
    (tmp_path / "latin.jsonl").write_bytes('{"prompt": "caf\u00e9", "response": "x"}'.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin.jsonl:1: not UTF-8"):
        check_file(str(tmp_path / "latin.jsonl"))
    (tmp_path / "raw.jsonl").write_text('{"content": "类型#裙", "summary": "好看"}\n', encoding="utf-8")
    with pytest.raises(DataError, match="minicpm_finetune.advertisegen"):
        check_file(str(tmp_path / "raw.jsonl"))
    array = tmp_path / "array.json"
    array.write_text(json.dumps([{"prompt": "a", "response": "b"}, {"prompt": "a", "response": "b"}]))
    check = check_file(str(array))
    assert check.data_format == "input_output" and len(check.records) == 2 and check.duplicates == 1


def test_preview_command_prints_counts_masks_and_dumps(tmp_path, tiny_model):
    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": MULTI_TURN}])
    dump = tmp_path / "dump.jsonl"
    result = run(["python", "-m", "minicpm_finetune.data", "--tokenizer", tiny_model, "--data", data,
                  "--dump", str(dump)])
    assert result.returncode == 0, result.stderr
    assert "1 samples" in result.stdout and "0 truncated" in result.stdout
    assert "<用户>你好<AI>[[你好，有什么可以帮你的吗？</s>]]<用户>" in result.stdout
    rows = [json.loads(l) for l in dump.read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    expected = encode(tokenizer, MULTI_TURN, end_of_turn_token(tokenizer), None)
    assert rows == [{"input_ids": expected["input_ids"], "labels": expected["labels"]}]


def test_preview_command_reports_bad_data_in_one_line(tmp_path, tiny_model):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n', encoding="utf-8")
    result = run(["python", "-m", "minicpm_finetune.data", "--tokenizer", tiny_model, "--data", str(bad)])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{bad}:1: conversation does not end with an assistant reply" in result.stderr
