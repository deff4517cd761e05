"""Exact ids and loss masks for every data format on both chat template styles; sources, checks, cache."""

import json
import os

import pytest
from conftest import QA, conversation, run, write_jsonl

from minicpm_finetune.data import (IGNORE_INDEX, DataError, check_file, encode, example_of,
                                   load_conversations, read_records, to_messages, tokenize_dataset)
from minicpm_finetune.data.encoding import ChatEncoder, _verification_conversations
from minicpm_finetune.data.rendering import TemplateError
from minicpm_finetune.data.formats import FORMATS as REGISTRY
from minicpm_finetune.data.formats import format_names
from minicpm_finetune.evaluation.prompts import prompt_ids as inference_prompt_ids
from minicpm_finetune.data.templates import (CHATML_TEMPLATE, MINICPM_TEMPLATE, TEMPLATES, apply_template,
                                             end_of_turn_token)
from minicpm_finetune.data.tokenizer import load_tokenizer

FORMATS = {name: REGISTRY[name] for name in format_names()}  # the SFT formats (the registry holds DPO pairs too)
MULTI_TURN = [
    {"role": "system", "content": "你是一个乐于助人的助手。"},
    {"role": "user", "content": "你好"},
    {"role": "assistant", "content": "你好，有什么可以帮你的吗？"},
    {"role": "user", "content": "今天天气怎么样"},
    {"role": "assistant", "content": "今天天气很好，适合散步。"},
]


@pytest.fixture(scope="module", params=["minicpm", "chatml"])
def tokenizer(request, tiny_model, tiny_chatml_model):
    return load_tokenizer(tiny_model if request.param == "minicpm" else tiny_chatml_model)


def prompt_ids(tokenizer, messages, tools=None):
    """What the template gives for these messages as a prompt (the rendered text, tokenized whole)."""
    text = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def expected_labels(tokenizer, messages, ids, tools=None):
    """Independent expectation: after each assistant prompt (as inference renders it), learn up to and
    including the first end-of-turn token; everything else is masked."""
    eot_id = tokenizer.convert_tokens_to_ids(end_of_turn_token(tokenizer))
    labels = [IGNORE_INDEX] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = prompt_ids(tokenizer, messages[:i], tools)
        assert ids[: len(prompt)] == prompt, "training ids must start with what inference feeds the model"
        end = ids.index(eot_id, len(prompt))
        labels[len(prompt): end + 1] = ids[len(prompt): end + 1]
    return labels


@pytest.mark.parametrize("messages", [MULTI_TURN, MULTI_TURN[1:], MULTI_TURN[:3]],
                         ids=["system", "no-system", "one-turn"])
def test_conversation_masks_are_exact(tokenizer, messages):
    row = encode(tokenizer, messages, end_of_turn_token(tokenizer), max_length=None)
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert row["input_ids"] == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert row["labels"] == expected_labels(tokenizer, messages, row["input_ids"])
    # The learned text is exactly every reply followed by its end-of-turn token.
    eot = end_of_turn_token(tokenizer)
    learned = [t for t, label in zip(row["input_ids"], row["labels"]) if label != IGNORE_INDEX]
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


    # Inference's own encoder gives the same prompt ids.
    assert [inference_prompt_ids(tokenizer, MULTI_TURN[:k]) for k in (2, 4)] == prompts


# --------------------------------------------------------------------------- formats

WEATHER_TOOLS = FORMATS["conversation"].example["tools"]
TOOL_CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "北京"}}}
# What each registered SFT format's example (docs/data.md) becomes.
EXPECTED_MESSAGES = {
    "conversation": [{"role": "system", "content": "你是一个广告文案助手。"},
                     {"role": "user", "content": "北京天气怎么样？"},
                     {"role": "assistant", "content": "", "tool_calls": [TOOL_CALL]},
                     {"role": "tool", "content": "晴，25度"},
                     {"role": "assistant", "content": "北京今天晴，25度。"}],
    "sharegpt": [{"role": "system", "content": "optional"}, {"role": "user", "content": "你好"},
                 {"role": "assistant", "content": "你好！"}, {"role": "user", "content": "北京天气怎么样？"},
                 {"role": "assistant", "content": "", "tool_calls": [TOOL_CALL]},
                 {"role": "tool", "content": "晴，25度"}, {"role": "assistant", "content": "北京今天晴，25度。"}],
    "prompt_response": [{"role": "user", "content": "类型#裙*颜色#红色"},
                        {"role": "assistant", "content": "这款红色连衣裙……"}],
    "alpaca": [{"role": "system", "content": "optional"}, {"role": "user", "content": "先写标题"},
               {"role": "assistant", "content": "红裙上新"},
               {"role": "user", "content": "写一段广告\n类型#裙*颜色#红色"},
               {"role": "assistant", "content": "这款红色连衣裙……"}],
}


def test_every_registered_format_has_its_expected_messages():
    assert set(EXPECTED_MESSAGES) == set(FORMATS)
    for name, fmt in FORMATS.items():
        assert to_messages(fmt.example, name) == EXPECTED_MESSAGES[name], name


@pytest.mark.parametrize("name", list(FORMATS))
def test_every_format_trains_on_the_template_rendering(tmp_path, tokenizer, name):
    """Detected from the file, metadata ignored and reported, ids = the template's rendering, every reply
    (tool calls too) learned, user text, tool results and the tool list masked."""
    record = dict(FORMATS[name].example, id=7, source="unit test")
    path = write_jsonl(tmp_path / f"{name}.jsonl", [record])
    said = []
    conversations = load_conversations(path, log=said.append)
    assert check_file(path).data_format == name
    assert said == [f"note: {path}: ignored metadata key(s) id, source (not part of the {name} format)"]
    example = example_of(conversations[0])
    messages, tools = example["messages"], example["tools"]
    assert messages == EXPECTED_MESSAGES[name]
    if tools and tokenizer.chat_template == MINICPM_TEMPLATE:
        with pytest.raises(TemplateError, match="cannot render them; use --chat_template chatml"):
            tokenize_dataset(conversations, tokenizer, max_length=None, source=path)
        return
    dataset, stats = tokenize_dataset(conversations, tokenizer, max_length=None, source=path)
    ids, labels = dataset[0]["input_ids"], dataset[0]["labels"]
    rendered = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False)
    assert ids == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert labels == expected_labels(tokenizer, messages, ids, tools)
    # Each learned run is one assistant turn, ending with the end-of-turn token; the rest is masked.
    runs, run_ids = [], []
    for t, label in zip(ids + [None], labels + [IGNORE_INDEX]):
        if label != IGNORE_INDEX:
            run_ids.append(t)
        elif run_ids:
            runs.append(tokenizer.decode(run_ids))
            run_ids = []
    replies = [m for m in messages if m["role"] == "assistant"]
    assert len(runs) == len(replies)
    for run_text, reply in zip(runs, replies):
        assert run_text.endswith(end_of_turn_token(tokenizer)) and reply["content"] in run_text
    if tools:
        assert 'get_weather(city="北京")' in runs[len(replies) - 2]  # the tool call is learned ...
        assert not any("def get_weather" in r or "晴，25度<" in r for r in runs)  # ... the tool list and result not
    assert stats.samples == 1 and stats.learned_tokens == sum(label != IGNORE_INDEX for label in labels)


def test_alpaca_history_comes_first_and_every_reply_is_learned(tokenizer):
    record = {"instruction": "再短一点", "output": "红裙，显瘦。",
              "history": [["写广告", "这款红裙很显瘦。"], ["加上价格", "299元。"]]}
    messages = to_messages(record, "alpaca")
    assert [m["content"] for m in messages] == ["写广告", "这款红裙很显瘦。", "加上价格", "299元。", "再短一点",
                                                "红裙，显瘦。"]
    row = encode(tokenizer, messages)
    eot = end_of_turn_token(tokenizer)
    assert tokenizer.decode([t for t, label in zip(row["input_ids"], row["labels"]) if label != IGNORE_INDEX]) == \
        "".join(m["content"] + eot for m in messages if m["role"] == "assistant")


def test_sharegpt_role_content_variant_and_tools_as_json_text():
    record = {"conversations": [{"role": "user", "content": "北京天气？"},
                                {"from": "function_call",
                                 "value": json.dumps({"name": "get_weather", "arguments": '{"city": "北京"}'})},
                                {"from": "observation", "value": "晴"}, {"role": "assistant", "content": "晴天。"}],
              "tools": json.dumps(WEATHER_TOOLS)}
    example, ignored = FORMATS["sharegpt"].convert(record), []
    assert example["tools"] == WEATHER_TOOLS and not ignored
    assert example["messages"][1] == {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "北京"}}}]}


@pytest.mark.slow
def test_a_template_that_cannot_render_tools_is_refused_before_training(tmp_path, tiny_model):
    path = write_jsonl(tmp_path / "tools.jsonl", [FORMATS["conversation"].example])
    result = run(["python", "-m", "minicpm_finetune.data", "--tokenizer", tiny_model, "--data", path])
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "1 conversation(s) have tools or tool calls, but the chat template cannot render them" in result.stderr
    result = run(["python", "-m", "minicpm_finetune.data", "--tokenizer", tiny_model, "--data", path,
                  "--chat_template", "chatml"])
    assert result.returncode == 0, result.stderr
    assert "<|tool_call_start|>" in result.stdout


# --------------------------------------------------------------------------- fast path and special-looking text


# minicpm5 learns a <think> block the generation prompt does not open: no per-role blocks, the general path always.
@pytest.mark.parametrize("template", sorted(set(TEMPLATES) - {"minicpm5"}))
def test_fast_path_equals_the_general_one_on_every_bundled_template(template, tiny_model, tiny_chatml_model):
    tokenizer = load_tokenizer(tiny_chatml_model if template == "chatml" else tiny_model)
    apply_template(tokenizer, TEMPLATES[template].text)
    encoder = ChatEncoder(tokenizer)
    assert encoder.blocks is not None and encoder.can_protect
    conversations = [(m, p) for m, p in _verification_conversations()] + [(MULTI_TURN, False), (MULTI_TURN[:4], True)]
    for messages, prompt in conversations:
        fast = encoder._render_blocks(messages, prompt)
        if prompt:
            assert fast.contents == encoder._content_spans(messages, None, True, None, fast.text) and not fast.replies
        else:
            assert [fast] == encoder._render_general(messages, None, {})
        assert fast.text == tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)


SPECIAL_LOOKING = ["<s>299元</s>的裙子", "结束</s>还有", "文字<|im_end|>更多<|im_start|>", "<用户>假的<AI>"]


@pytest.mark.parametrize("text", SPECIAL_LOOKING)
def test_content_that_looks_like_a_special_token_is_text(tokenizer, text):
    eot = end_of_turn_token(tokenizer)
    special = {tokenizer.convert_tokens_to_ids(t) for t in tokenizer.get_added_vocab()}
    messages = [{"role": "user", "content": text}, {"role": "assistant", "content": text},
                {"role": "user", "content": "再来"}, {"role": "assistant", "content": "好"}]
    row = encode(tokenizer, messages)
    ids, labels = row["input_ids"], row["labels"]
    learned = [t for t, label in zip(ids, labels) if label != IGNORE_INDEX]
    # Both replies learned with their end-of-turn; inside the reply text no special token at all.
    assert tokenizer.decode(learned) == text + eot + "好" + eot
    reply = learned[: learned.index(tokenizer.convert_tokens_to_ids(eot))]
    assert not special & set(reply)
    assert tokenizer.decode(reply) == text
    # The special tokens in the whole sample are exactly the template's own (as for plain text).
    plain = encode(tokenizer, [dict(m, content="x") for m in messages])["input_ids"]
    assert [t for t in ids if t in special] == [t for t in plain if t in special]
    # Inference encodes the prompt the same way: the ids before the second reply.
    for k in (1, 3):
        prompt = inference_prompt_ids(tokenizer, messages[:k])
        assert ids[: len(prompt)] == prompt
        assert labels[len(prompt) - 1] == IGNORE_INDEX and labels[len(prompt)] != IGNORE_INDEX


# --------------------------------------------------------------------------- checks: one report, per format


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
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "history": [["x", "y"]]}',
     'key "history" is not read by the conversation format, its text would be lost'),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "reasoning": "r"}]}',
     'message 2: key "reasoning" is not used, its text would be lost'),
    ('{"messages": [{"role": "user", "content": "a", "content": "b"}, {"role": "assistant", "content": "b"}]}',
     'duplicate key "content"'),
    ('{"messages": [{"role": "user", "content" : "a", "content": "b"}, {"role": "assistant", "content": "b"}]}',
     'duplicate key "content"'),
    ('{"messages": [{"role": "user", "content": "\\ud800"}, {"role": "assistant", "content": "b"}]}',
     "lone surrogate (\\ud800)"),
    ('[{"messages": []}]', "record is not a JSON object but a list"),
    ('{"messages": [{"role": "user", "content": "a"}, '
     '{"role": "assistant", "content": "", "tool_calls": [{"function": {}}]}]}',
     'message 2: a tool call needs a "name"'),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "tool_calls": "{"}]}',
     "tool call is a string but not JSON"),
], ids=["malformed_json", "unknown_role", "out_of_order", "ends_with_user", "empty_reply", "non_string_content",
        "system_not_first", "wrong_format", "text_key_not_read", "message_key_not_used", "duplicate_key",
        "duplicate_key_spaced", "lone_surrogate", "line_is_an_array", "tool_call_without_name", "tool_calls_not_json"])
def test_bad_records_are_named_by_file_and_line(tmp_path, line, problem):
    good = json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
    path = tmp_path / "bad.jsonl"
    path.write_text(good + "\n" + line + "\n" + good + "\n", encoding="utf-8")
    check = check_file(str(path))
    assert check.problem_count == 1 and check.good_count == 2
    assert check.problems[0].startswith(f"{path}:2: ") and problem in check.problems[0], check.problems
    with pytest.raises(DataError, match="1 bad record"):
        load_conversations(str(path))
    assert len(load_conversations(str(path), skip_bad_samples=True, log=lambda *_: None)) == 2


@pytest.mark.parametrize("name, bad, problem", [
    ("sharegpt", {"conversations": [{"from": "robot", "value": "a"}, {"from": "gpt", "value": "b"}]},
     "turn 1: unknown \"from\" 'robot'"),
    ("sharegpt", {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b", "weight": 0}]},
     'turn 2: key "weight" is not used'),
    ("sharegpt", {"conversations": [{"from": "human", "value": "a"}, {"from": "observation", "value": "b"}]},
     "role 'tool' out of order"),
    ("alpaca", {"instruction": "a", "output": "b", "history": [["only one"]]},
     "history item 1 must be a [user, assistant] pair"),
    ("alpaca", {"instruction": "a"}, 'missing "output"'),
    ("alpaca", {"instruction": "a", "output": "b", "response": "c"}, 'key "response" is not read by the alpaca format'),
    ("prompt_response", {"prompt": "a"}, 'missing "response"'),
    ("prompt_response", {"prompt": "a", "response": "b", "system": 1}, '"system" must be a string'),
    # Inside tool calls and schemas: keys no template reads, values that are not JSON.
    ("conversation", {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "f", "parameters": {"city": "北京"}}}]},
        {"role": "tool", "content": "r"}, {"role": "assistant", "content": "a"}]},
     'message 2: tool call: key "parameters" is not read (expected name, arguments), its value would be lost'),
    ("conversation", {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": {"x": float("nan")}}}]},
        {"role": "tool", "content": "r"}, {"role": "assistant", "content": "a"}]},
     "message 2: tool call arguments holds nan: not a JSON number"),
    ("conversation", {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
      "tools": [{"type": "function", "function": {"name": "f", "parameters": {"properties": ["city"]}}}]},
     'tool 1: "parameters"."properties" must map each name to a schema object'),
    ("conversation", {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
      "tools": [{"type": "function", "function": {"name": "f", "params": {}}}]},
     'tool 1: key "params" is not read (expected name, description, parameters, strict), its value would be lost'),
])
def test_bad_records_of_every_format(tmp_path, name, bad, problem):
    good = FORMATS[name].example
    path = write_jsonl(tmp_path / "bad.jsonl", [good, bad, good])
    check = check_file(path)
    assert check.data_format == name and check.good_count == 2
    assert check.problems == [f"{path}:2: " + check.problems[0].split(": ", 1)[1]] and problem in check.problems[0]


def test_tool_schemas_in_the_flat_form_keep_being_read():
    """{"type": "function", "name": ...} without the "function" wrapper: its "type" is read, not lost."""
    from minicpm_finetune.data.messages import normalise_tools

    flat = {"type": "function", "name": "f", "description": "d", "parameters": {"type": "object"}}
    (tool,) = normalise_tools([flat])  # accepted (refusing "type" would refuse a common form)
    assert tool["type"] == "function" and tool["function"]["name"] == "f"
    assert tool["function"]["parameters"] == {"type": "object"}


def test_tool_call_values_reach_the_template_as_written_from_json_and_parquet(tmp_path):
    """An integer beyond 64 bits stays exact (orjson cannot hold it), and Parquet's struct columns add no null
    fields that were never in the data: the rendered text is the same from JSON Lines and from Parquet."""
    import datasets

    from minicpm_finetune.data.templates import CHATML_TEMPLATE
    from minicpm_finetune.tiny import build_tokenizer

    tokenizer = build_tokenizer(str(tmp_path / "tok"), ["q", "ok"], chat_template="chatml")
    assert tokenizer.chat_template == CHATML_TEMPLATE
    big = 123456789012345678901234567890
    record = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": {"n": big}}}]},
        {"role": "tool", "content": "r"}, {"role": "assistant", "content": "ok"}],
        "tools": [{"type": "function", "function": {"name": "f", "description": "d", "parameters": {
            "type": "object", "properties": {"n": {"type": "integer"}}}}}]}
    jsonl = write_jsonl(tmp_path / "t.jsonl", [record])
    rendered = tokenizer.decode(tokenize_dataset(load_conversations(jsonl), tokenizer, None)[0][0]["input_ids"])
    assert f"f(n={big})" in rendered.replace(" ", "")
    other = dict(record, messages=record["messages"][:1] + [dict(record["messages"][1], tool_calls=[
        {"type": "function", "function": {"name": "g", "arguments": {"m": 1}}}])] + record["messages"][2:])
    parquet = str(tmp_path / "t.parquet")  # two rows whose calls differ: one struct type holds both n and m
    datasets.Dataset.from_list([dict(record, messages=[dict(m, tool_calls=[
        {"type": "function", "function": {"name": "f", "arguments": {"n": 7}}}]) if "tool_calls" in m else m
        for m in record["messages"]]), other]).to_parquet(parquet)
    from_parquet = [example_of(row) for row in load_conversations(parquet)]
    assert [m["tool_calls"][0]["function"]["arguments"] for m in (e["messages"][1] for e in from_parquet)] == [
        {"n": 7}, {"m": 1}]  # no "m": None beside "n", no "n": None beside "m"


@pytest.mark.parametrize("layout", ["jsonl", "json"])
def test_a_record_nested_too_deeply_is_named_and_the_others_read(tmp_path, layout):
    """JSON inside JSON thousands of levels deep (Python's parser would raise RecursionError)."""
    good = json.dumps({"prompt": "a", "response": "b"})
    deep = '{"prompt": "a", "response": "b", "id": ' + "[" * 5000 + "]" * 5000 + "}"
    path = tmp_path / f"deep.{layout}"
    path.write_text("\n".join([good, deep, good]) + "\n" if layout == "jsonl" else f"[{good},\n{deep},\n{good}]",
                    encoding="utf-8")
    check = check_file(str(path))
    assert check.good_count == 2 and len(check.problems) == 1
    assert check.problems[0].startswith(f"{path}:2: nested too deeply to read"), check.problems


def test_a_template_that_raises_on_a_record_is_one_line_naming_it(tmp_path, tiny_model, capsys):
    """A user's Jinja template may refuse a conversation (raise_exception): its message and the record, one line."""
    from minicpm_finetune.data.rendering import TemplateError

    tokenizer = load_tokenizer(tiny_model)
    apply_template(tokenizer, "{% if messages|length > 2 %}{{ raise_exception('one exchange only') }}{% endif %}"
                              + MINICPM_TEMPLATE)
    path = write_jsonl(tmp_path / "t.jsonl", [conversation(*QA[0]), {"messages": MULTI_TURN[1:]}])
    with pytest.raises(TemplateError) as error:
        tokenize_dataset(load_conversations(path), tokenizer, None, source=path)
    assert str(error.value) == f"{path}:2: the chat template raised on this conversation: one exchange only"
    # --skip_bad_samples: that conversation is dropped, said and counted; the others train.
    dataset, stats = tokenize_dataset(load_conversations(path), tokenizer, None, source=path, skip_bad_samples=True)
    assert len(dataset) == 1 and stats.refused == 1 and "1 refused by the chat template" in stats.summary("t")
    assert f"warning: skipping {path}:2: the chat template raised on this conversation" in capsys.readouterr().out


def test_a_name_the_template_does_not_render_is_one_line_naming_the_record(tmp_path, tokenizer):
    """OpenAI's "name" (who speaks, or which tool answered) is kept only by templates that write it."""
    from minicpm_finetune.data.encoding import get_encoder
    from minicpm_finetune.data.rendering import TemplateError

    assert not get_encoder(tokenizer).renders_names  # neither bundled template writes names
    named = {"messages": [{"role": "user", "content": "你好", "name": "小明"}, {"role": "assistant", "content": "好"}]}
    path = write_jsonl(tmp_path / "n.jsonl", [conversation(*QA[0]), named])
    with pytest.raises(TemplateError, match=r'n.jsonl:2: message 1 has a "name", but the chat template does not '
                                            r"render names \(its text would be lost\)"):
        tokenize_dataset(load_conversations(path), tokenizer, None, source=path)
    import gc

    assert gc.isenabled()  # the encoder turns the collector off for a batch, and back on when it refuses one
    with_names = tokenizer.chat_template.replace("message['content']", "(message['name'] ~ ': ' if message['name'] "
                                                 "is defined else '') ~ message['content']")
    try:  # a template that writes names trains on them
        apply_template(tokenizer, with_names)
        assert get_encoder(tokenizer).renders_names
        dataset, _ = tokenize_dataset(load_conversations(path), tokenizer, None, source=path)
        assert "小明: 你好" in tokenizer.decode(dataset[1]["input_ids"]).replace(" ", "").replace(":", ": ")
    finally:
        apply_template(tokenizer, CHATML_TEMPLATE if "im_start" in tokenizer.chat_template else MINICPM_TEMPLATE)


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
    assert check.data_format == "prompt_response" and check.good_count == 2 and check.duplicates == 1
    # What the file is and what to do, in one line.
    pretty = tmp_path / "pretty.json"
    pretty.write_text(json.dumps(FORMATS["alpaca"].example, ensure_ascii=False, indent=2), encoding="utf-8")
    with pytest.raises(DataError, match=r"pretty.json holds records spread over several lines \(pretty-printed JSON\)"):
        check_file(str(pretty))
    lines_of_arrays = tmp_path / "arrays.jsonl"
    lines_of_arrays.write_text((json.dumps([FORMATS["alpaca"].example]) + "\n") * 2)
    with pytest.raises(DataError,
                       match="arrays.jsonl is JSON Lines whose lines are arrays: write one JSON object per line"):
        check_file(str(lines_of_arrays))


def test_unicode_line_separators_inside_strings_are_text(tmp_path):
    text = "第一段\u2028第二段\u2029第三段\x85\x0c end"
    path = write_jsonl(tmp_path / "sep.jsonl", [{"prompt": text, "response": "好"}, {"prompt": "b", "response": "c"},
                                                {"prompt": "d", "response": 5}])
    check = check_file(path)
    assert check.good_count == 2 and check.problems == [f'{path}:3: "response" must be a string, got int']
    assert to_messages(next(read_records(path))[1], "prompt_response")[0]["content"] == text


def test_json_array_is_read_in_bounded_pieces(tmp_path, monkeypatch):
    import minicpm_finetune.data.sources as data

    monkeypatch.setattr(data, "_CHUNK", 7)  # every item spans several reads
    items = [{"prompt": f"问题{i} " * (i % 4 + 1), "response": 10 ** i if i == 5 else f"回答{i}"} for i in range(12)]
    path = tmp_path / "a.json"
    path.write_text(json.dumps(items, ensure_ascii=False, indent=2), encoding="utf-8")
    assert [r for _, r in read_records(str(path))] == items
    check = check_file(str(path))
    assert check.good_count == 11 and check.problems == [f'{path}:6: "response" must be a string, got int']
    path.write_text('[\n{"prompt": "a", "response": "b"},\n{"prompt": "a" "response": "b"}\n]')
    with pytest.raises(DataError, match=r"a.json:3: malformed JSON array"):
        list(read_records(str(path)))


def test_parquet_and_saved_dataset_sources(tmp_path, tokenizer):
    import datasets

    records = [FORMATS["alpaca"].example, dict(FORMATS["alpaca"].example, output=7), FORMATS["alpaca"].example]
    rows = datasets.Dataset.from_list([dict(r, output=str(r["output"])) for r in records])
    parquet = str(tmp_path / "d.parquet")
    rows.to_parquet(parquet)
    saved = str(tmp_path / "saved")
    rows.save_to_disk(saved)
    jsonl = write_jsonl(tmp_path / "d.jsonl", [dict(r, output=str(r["output"])) for r in records])
    expected, _ = tokenize_dataset(load_conversations(jsonl), tokenizer, None)
    unnamed = str(tmp_path / "d.data")  # a Parquet file whatever its name (told by its first bytes)
    rows.to_parquet(unnamed)
    for source in (parquet, unnamed, saved):
        dataset, _ = tokenize_dataset(load_conversations(source), tokenizer, None)
        assert dataset["input_ids"] == expected["input_ids"] and dataset["labels"] == expected["labels"]
    bad = datasets.Dataset.from_list([{"prompt": "a", "response": "b"}, {"prompt": "a", "response": None}])
    bad.save_to_disk(str(tmp_path / "bad"))
    check = check_file(str(tmp_path / "bad"))
    assert check.problems == [f'{tmp_path / "bad"}: row 2: missing "response"']
    datasets.DatasetDict({"train": rows, "test": rows}).save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(DataError, match=r"holds several splits \(train, test\); give one of them"):
        check_file(str(tmp_path / "dict"))


def test_the_preview_checks_its_dump_path_before_the_work(tmp_path, capsys):
    from minicpm_finetune.data import main as preview_main

    (tmp_path / "a_file").write_text("not a folder")
    dump = tmp_path / "a_file" / "dump.jsonl"
    with pytest.raises(SystemExit) as exit_info:  # the tokenizer does not even exist: the dump path comes first
        preview_main(["--tokenizer", str(tmp_path / "no_model"), "--data", str(tmp_path / "x.jsonl"),
                      "--dump", str(dump)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"error: --dump {dump}: {tmp_path / 'a_file'} is a file, not a folder\n"


def test_a_file_corrected_in_place_is_checked_again_even_with_its_old_size_and_time(tmp_path):
    """The checked-data cache is keyed by the file's content, not its size and modification time."""
    path = write_jsonl(tmp_path / "d.jsonl", [conversation("你好", "好的")])
    stat = os.stat(path)
    assert check_file(path).good_count == 1
    with open(path, "r+b") as f:  # the same size: one character of the record changed
        text = f.read().replace("好的".encode(), "好吗".encode())
        f.seek(0)
        f.write(text)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert os.stat(path).st_size == stat.st_size and os.stat(path).st_mtime_ns == stat.st_mtime_ns
    assert example_of(check_file(path).checked[0])["messages"][-1]["content"] == "好吗"


def test_tokenized_cache_key_is_data_tokenizer_template_and_length(tmp_path, tiny_model, monkeypatch):
    calls = []
    original = ChatEncoder.encode_batch
    monkeypatch.setattr(ChatEncoder, "encode_batch", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    path = tmp_path / "c.jsonl"
    write_jsonl(path, [{"messages": MULTI_TURN}])

    def tokenize(max_length=64, template=None):
        tokenizer = load_tokenizer(tiny_model)
        if template:
            apply_template(tokenizer, template)
        calls.clear()
        dataset, _ = tokenize_dataset(load_conversations(str(path), log=lambda *_: None), tokenizer, max_length)
        return len(calls), dataset["input_ids"]

    assert tokenize()[0] == 1
    assert tokenize()[0] == 0  # same data, tokenizer, template and length: served from the cache
    assert tokenize(max_length=8)[0] == 1  # length changed
    assert tokenize(template=CHATML_TEMPLATE)[0] == 1  # template changed
    write_jsonl(path, [{"messages": MULTI_TURN[:3]}])
    assert tokenize()[0] == 1  # data changed


# --------------------------------------------------------------------------- preview command


@pytest.mark.slow
def test_preview_command_prints_counts_masks_and_dumps(tmp_path, tiny_model):
    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": MULTI_TURN}])
    dump = tmp_path / "dump.jsonl"
    result = run(["python", "-m", "minicpm_finetune.data", "--tokenizer", tiny_model, "--data", data,
                  "--dump", str(dump)])
    assert result.returncode == 0, result.stderr
    assert "1 samples" in result.stdout and "0 truncated" in result.stdout
    assert "<用户>你好<AI>[[你好，有什么可以帮你的吗？</s>]]<用户>" in result.stdout
    rows = [json.loads(line) for line in dump.read_text().splitlines()]
    tokenizer = load_tokenizer(tiny_model)
    expected = encode(tokenizer, MULTI_TURN, end_of_turn_token(tokenizer), None)
    assert rows == [{"input_ids": expected["input_ids"], "labels": expected["labels"]}]


@pytest.mark.slow
def test_preview_command_reports_bad_data_in_one_line(tmp_path, tiny_model):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n', encoding="utf-8")
    result = run(["python", "-m", "minicpm_finetune.data", "--tokenizer", tiny_model, "--data", str(bad)])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{bad}:1: conversation does not end with an assistant reply" in result.stderr


def test_the_docs_show_every_registered_format_and_the_flag_takes_them():
    import os

    from conftest import ROOT
    from minicpm_finetune.data import FORMATS as CHOICES
    from minicpm_finetune.training.arguments import DataArguments

    pages = {}
    for page in ("data", "preference"):
        with open(os.path.join(ROOT, "docs", f"{page}.md"), encoding="utf-8") as f:
            pages[page] = f.read()
    for name, fmt in REGISTRY.items():  # SFT formats in docs/data.md, preference pairs in docs/preference.md
        assert json.dumps(fmt.example, ensure_ascii=False) in pages["data" if fmt.kind == "sft" else "preference"], name
    assert f"--data_format {'|'.join(FORMATS)}" in pages["data"]
    assert list(CHOICES) == ["auto", *FORMATS] == DataArguments.__dataclass_fields__["data_format"].metadata["choices"]


def test_preprocessing_num_workers_gives_the_same_samples(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "w.jsonl", [{"messages": MULTI_TURN}, {"messages": MULTI_TURN[1:3]}] * 3)
    one, _ = tokenize_dataset(load_conversations(path, log=lambda *_: None), tokenizer, 64)
    two, _ = tokenize_dataset(load_conversations(path, log=lambda *_: None), tokenizer, 64, num_proc=2)
    assert two["input_ids"] == one["input_ids"] and two["labels"] == one["labels"]


def test_a_hub_name_is_loaded_through_datasets_and_fails_in_one_line_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match=r"^nobody-here/no-such-dataset: not a local file, and loading it from the "
                                        r"hub failed: .+") as info:
        check_file("nobody-here/no-such-dataset")
    assert "\n" not in str(info.value)
    from minicpm_finetune.cli import ArgumentError
    from minicpm_finetune.training.arguments import parse_args

    with pytest.raises(ArgumentError, match="--preprocessing_num_workers must be positive, got 0"):
        parse_args(["--model_name_or_path", "x/y", "--train_data_path", "owner/train-set",
                    "--eval_data_path", "owner/dev-set", "--output_dir", "/tmp/unused", "--use_cpu",
                    "--preprocessing_num_workers", "0"])


def test_the_datasets_cache_is_checked_before_the_data_and_a_full_disk_is_one_line(tmp_path, monkeypatch, tiny_model):
    import errno

    import datasets

    from minicpm_finetune.cli import OutputDirError
    from minicpm_finetune.data import checks

    path = write_jsonl(tmp_path / "d.jsonl", [conversation("你好", "好的")])
    (tmp_path / "a_file").write_text("not a folder")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "a_file" / "cache"))
    with pytest.raises(OutputDirError, match=r"^the datasets cache \(HF_DATASETS_CACHE\) .*a_file is a file"):
        check_file(path)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checks, "_write_checked", full)  # as writing on a full disk fails
    with pytest.raises(DataError, match=r"d.jsonl: cannot write the checked data into the datasets cache .*cache/"
                                        r"minicpm_finetune \(No space left on device\); free some space there"):
        check_file(path)
    monkeypatch.undo()
    conversations = load_conversations(path)
    monkeypatch.setattr(datasets.Dataset, "map", full)  # then the tokenized set
    with pytest.raises(DataError, match=r"d.jsonl: cannot write the tokenized data into the datasets cache .*"
                                        r"\(No space left on device\); free some space there"):
        tokenize_dataset(conversations, load_tokenizer(tiny_model), None, source=path)
