"""Reasoning data and hybrid-reasoning templates: reasoning_content and <think> blocks in every format,
enable_thinking per sample and per run, every reply learned in exactly its inference-time context (a template that
drops earlier reasoning splits the conversation), the template parity audit, and MiniCPM5's built-in template.

The reference throughout is the chat template itself, rendered by Jinja: for reply k, the ids before it must be
``apply_chat_template(messages[:k], add_generation_prompt=True)`` tokenized, and the learned ids the tokens
``apply_chat_template(messages[:k + 1])`` adds after them through the end-of-turn token."""

import json

import pytest
from conftest import STRIPPING, run, write_jsonl

from minicpm_finetune.data import load_conversations, tokenize_dataset
from minicpm_finetune.data.audit import audit_conversation, audit_dataset
from minicpm_finetune.data.encoding import IGNORE_INDEX, get_encoder
from minicpm_finetune.data.formats import convert
from minicpm_finetune.data.messages import check_messages
from minicpm_finetune.data.rendering import TemplateError
from minicpm_finetune.data.templates import TEMPLATES, apply_template
from minicpm_finetune.data.tokenizer import load_tokenizer

# A broken one: the generation prompt ends with a space that the reply's first word takes into its token.
TRAILING_SPACE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
                  "{% if m['role'] == 'assistant' %}<|im_end|>{% endif %}\n{% endfor %}"
                  "{% if add_generation_prompt %}assistant: {% endif %}")

REASONED = [{"role": "system", "content": "你是助手。"},
            {"role": "user", "content": "一加一？"},
            {"role": "assistant", "content": "二。", "reasoning_content": "一加一得二"},
            {"role": "user", "content": "再加一？"},
            {"role": "assistant", "content": "三。", "reasoning_content": "二加一得三"},
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "world", "reasoning_content": "greet"}]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory, data_dir):
    """The tiny tokenizer laid out as MiniCPM5 ships its own: ChatML markers and <think>, </think> as special
    tokens, the minicpm5 template."""
    from minicpm_finetune.tiny import build_tokenizer

    folder = tmp_path_factory.mktemp("tiny_minicpm5") / "tokenizer"
    build_tokenizer(str(folder), [json.dumps(REASONED, ensure_ascii=False)], chat_template="minicpm5")
    return load_tokenizer(str(folder))


def with_template(tokenizer, template):
    apply_template(tokenizer, template)
    return tokenizer


def template_ids(tokenizer, messages, prompt, **options):
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt, **options)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def learned_runs(labels):
    runs, start = [], None
    for i, label in enumerate(list(labels) + [IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = i
        elif label == IGNORE_INDEX and start is not None:
            runs.append((start, i))
            start = None
    return runs


def assert_inference_contexts(tokenizer, messages, rows, **options):
    """Every learned run is one reply, after exactly the template's prompt for it and exactly the template's reply
    tokens; each reply is learned exactly once."""
    eot = tokenizer.convert_tokens_to_ids("<|im_end|>")
    replies = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
    taught = []
    for row in rows:
        for first, stop in learned_runs(row["labels"]):
            k = next(k for k in replies if template_ids(tokenizer, messages[:k], True, **options)
                     == row["input_ids"][:first])  # StopIteration: a context inference never produces
            prompt, full = (template_ids(tokenizer, messages[:k], True, **options),
                            template_ids(tokenizer, messages[: k + 1], False, **options))
            reply = full[len(prompt):]
            assert row["input_ids"][first:stop] == reply[: reply.index(eot) + 1]
            taught.append(k)
    assert sorted(taught) == replies


# --------------------------------------------------------------------------- reasoning in the records


def test_reasoning_content_and_think_blocks_are_normalised_in_every_format():
    reply = {"role": "assistant", "content": "答案", "reasoning_content": "想一想"}
    records = {
        "conversation": {"messages": [{"role": "user", "content": "问"},
                                      {"role": "assistant", "content": "<think>\n想一想\n</think>\n\n答案"}]},
        "sharegpt": {"conversations": [{"from": "human", "value": "问"},
                                       {"from": "gpt", "value": "答案", "reasoning_content": "想一想"}]},
        "alpaca": {"instruction": "问", "output": "答案", "reasoning_content": "想一想"},
        "prompt_response": {"prompt": "问", "response": "<think>想一想</think>答案"},
    }
    for name, record in records.items():
        example, _ = convert(dict(record, enable_thinking=True), name)
        assert example["messages"] == [{"role": "user", "content": "问"}, reply], name
        assert example["enable_thinking"] is True
    # An empty block says "no reasoning"; the field and the block are read the same way.
    assert check_messages([{"role": "user", "content": "q"},
                           {"role": "assistant", "content": "<think>\n\n</think>\n\nA"}])[1] == {
        "role": "assistant", "content": "A"}


@pytest.mark.parametrize("messages, problem", [
    ([{"role": "user", "content": "q", "reasoning_content": "r"}, {"role": "assistant", "content": "a"}],
     'only assistant messages carry "reasoning_content"'),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>r"}], "<think> without </think>"),
    ([{"role": "user", "content": "q"},
      {"role": "assistant", "content": "<think>r</think>a", "reasoning_content": "r"}],
     'reasoning both in "reasoning_content" and in a <think> block'),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>r</think>"}],
     r"empty reply \(only reasoning\)"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "reasoning_content": 3}],
     '"reasoning_content" must be a string'),
])
def test_bad_reasoning_is_one_problem(messages, problem):
    with pytest.raises(ValueError, match=problem):
        check_messages(messages)


def test_enable_thinking_must_be_a_boolean():
    with pytest.raises(ValueError, match='"enable_thinking" must be true or false'):
        convert({"prompt": "q", "response": "a", "enable_thinking": "yes"}, "prompt_response")


# --------------------------------------------------------------------------- every reply in its inference-time context


def test_a_template_that_drops_earlier_reasoning_splits_the_conversation(tokenizer):
    tok = with_template(tokenizer, STRIPPING)
    rows = get_encoder(tok).encode_batch([{"messages": REASONED, "tools": None}], None).to_pylist()
    assert [row["part"] for row in rows] == [0, 1, 2]  # each earlier reply loses its reasoning later on
    assert_inference_contexts(tok, REASONED, rows)
    # Every reply is learned with its reasoning.
    for row, (reasoning, answer) in zip(rows, [("一加一得二", "二。"), ("二加一得三", "三。"), ("greet", "world")]):
        learned = [t for t, label in zip(row["input_ids"], row["labels"]) if label != IGNORE_INDEX]
        assert tok.decode(learned) == f"<think>\n{reasoning}\n</think>\n\n{answer}<|im_end|>"
    assert audit_conversation(tok, {"messages": REASONED, "tools": None}) == (3, 0, None)


def test_a_template_that_keeps_reasoning_teaches_the_conversation_in_one_sample(tokenizer):
    tok = with_template(tokenizer, TEMPLATES["minicpm5"].text)
    rows = get_encoder(tok).encode_batch([{"messages": REASONED, "tools": None}], None).to_pylist()
    assert len(rows) == 1 and len(learned_runs(rows[0]["labels"])) == 3
    assert_inference_contexts(tok, REASONED, rows)


def test_the_fewest_samples_turns_that_agree_stay_together(tokenizer):
    """A reply without reasoning before the last user message renders the same when later turns follow under a
    template that keeps reasoning, so only the replies that change are split off."""
    tok = with_template(tokenizer, STRIPPING)
    messages = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
                {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2", "reasoning_content": "r2"}]
    # a1 as the last turn gets an empty <think> block that later renderings drop: two samples.
    rows = get_encoder(tok).encode_batch([{"messages": messages, "tools": None}], None).to_pylist()
    assert len(rows) == 2
    assert_inference_contexts(tok, messages, rows)
    # The chatml template renders every turn the same: one sample, as before.
    tok = with_template(tokenizer, TEMPLATES["chatml"].text)
    plain = [{"role": m["role"], "content": m["content"]} for m in messages]
    rows = get_encoder(tok).encode_batch([{"messages": plain, "tools": None}], None).to_pylist()
    assert len(rows) == 1 and len(learned_runs(rows[0]["labels"])) == 2


@pytest.mark.parametrize("thinking", [True, False, None])
def test_enable_thinking_reaches_the_template_per_sample_and_per_run(tokenizer, thinking):
    tok = with_template(tokenizer, TEMPLATES["minicpm5"].text)
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]
    options = {} if thinking is None else {"enable_thinking": thinking}
    for example, run_default in (({"messages": messages, "tools": None, **options}, None),
                                 ({"messages": messages, "tools": None}, thinking)):
        rows = get_encoder(tok).encode_batch([example], None, run_default).to_pylist()
        assert_inference_contexts(tok, messages, rows, **options)
        learned = tok.decode([t for t, label in zip(rows[0]["input_ids"], rows[0]["labels"]) if label != IGNORE_INDEX])
        # false: the prompt closed the block, the answer alone is learned; true: the prompt opened it.
        assert learned == {False: "world<|im_end|>", True: "\n</think>\n\nworld<|im_end|>",
                           None: "<think>\n\n</think>\n\nworld<|im_end|>"}[thinking]


def test_reasoning_with_thinking_off_names_the_record(tmp_path, tokenizer):
    tok = with_template(tokenizer, TEMPLATES["minicpm5"].text)
    path = write_jsonl(tmp_path / "r.jsonl", [{"messages": REASONED[1:3], "enable_thinking": False}])
    with pytest.raises(TemplateError, match=r"r.jsonl:1: the chat template raised on this conversation: reply at "
                                            r"message 2: it has reasoning, but enable_thinking is false"):
        tokenize_dataset(load_conversations(path), tok, None, source=path)


@pytest.mark.parametrize("record, problem", [
    ({"messages": REASONED[1:3]}, "message 2 has reasoning, but the chat template does not render reasoning"),
    ({"messages": REASONED[1:2] + [{"role": "assistant", "content": "a"}], "enable_thinking": True},
     '"enable_thinking" is set, but the chat template does not read it'),
])
def test_what_the_template_would_not_write_is_refused_by_record(tmp_path, tokenizer, record, problem):
    tok = with_template(tokenizer, TEMPLATES["chatml"].text)
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": REASONED[1:2] + [{"role": "assistant", "content": "a"}]},
                                              record])
    with pytest.raises(TemplateError, match=f"d.jsonl:2: {problem}"):
        tokenize_dataset(load_conversations(path), tok, None, source=path)
    with pytest.raises(TemplateError, match="--enable_thinking true: the chat template does not read enable_thinking"):
        tokenize_dataset(load_conversations(path), tok, None, source=path, enable_thinking=True)


def test_the_summary_counts_split_conversations(tmp_path, tokenizer):
    tok = with_template(tokenizer, STRIPPING)
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": REASONED}, {"messages": REASONED[:3]}])
    dataset, stats = tokenize_dataset(load_conversations(path), tok, None, source=path)
    assert (len(dataset), stats.samples, stats.split, stats.added) == (4, 4, 1, 2)
    assert "1 conversation(s) split into 3 samples (the chat template renders their earlier turns differently" in \
        stats.summary(path)


# --------------------------------------------------------------------------- MiniCPM5's template


def test_the_minicpm5_template_renders_what_minicpm5_renders(tokenizer):
    """Renders of MiniCPM5-2B's own template (facts from its published renders), written out."""
    tok = with_template(tokenizer, TEMPLATES["minicpm5"].text)
    user = [{"role": "user", "content": "Hi"}]
    for thinking, tail in ((None, ""), (True, "<think>\n"), (False, "<think>\n\n</think>\n\n")):
        options = {} if thinking is None else {"enable_thinking": thinking}
        assert tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True, **options) == \
            "<s><|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n" + tail
    tools = [{"type": "function", "function": {"name": "run", "parameters": {"type": "object"}}}]
    messages = [{"role": "user", "content": "Run it."},
                {"role": "assistant", "content": "Running.", "tool_calls": [{"type": "function", "function": {
                    "name": "run", "arguments": {"code": "1 < 2\nx", "timeout": 5, "quiet": True}}}]},
                {"role": "tool", "content": "True"}, {"role": "tool", "content": "x"},
                {"role": "assistant", "content": "Done.", "reasoning_content": "both ran"}]
    text = tok.apply_chat_template(messages, tools=tools, tokenize=False)
    assert text.startswith('<s><|im_start|>system\n# Tools\n\nYou are provided with function signatures within '
                           '<tools></tools> XML tags:\n<tools>\n{"type": "function", "function": {"name": "run", '
                           '"parameters": {"type": "object"}}}\n</tools>\n\nTool usage guidelines:\n')
    assert text.endswith(
        "<|im_end|>\n<|im_start|>user\nRun it.<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nRunning.\n"
        '<function name="run"><param name="code"><![CDATA[1 < 2\nx]]></param><param name="timeout">5</param>'
        '<param name="quiet">True</param></function><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\nTrue\n</tool_response>\n<tool_response>\nx\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n<think>\nboth ran\n</think>\n\nDone.<|im_end|>\n")
    rows = get_encoder(tok).encode_batch([{"messages": messages, "tools": tools}], None).to_pylist()
    assert audit_conversation(tok, {"messages": messages, "tools": tools}) == (2, 0, None)
    assert len(rows) == 1


# --------------------------------------------------------------------------- the audit


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_the_audit_finds_no_difference_on_any_bundled_template(tmp_path, tokenizer, tiny_model, name):
    tok = with_template(load_tokenizer(tiny_model) if name == "minicpm" else tokenizer, TEMPLATES[name].text)
    plain = [{"role": m["role"], "content": m["content"]} for m in REASONED]
    records = [{"messages": plain}, {"messages": [{"role": "user", "content": "  spaced  "},
                                                  {"role": "assistant", "content": "\n行\n"}]}]
    if name != "minicpm":  # the templates that take tools
        tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
            "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
        records.append({"tools": tools, "messages": [
            {"role": "user", "content": "北京？"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "北京"}}}]},
            {"role": "tool", "content": "晴"}, {"role": "assistant", "content": "晴。"}]})
    if name == "minicpm5":  # reasoning, and thinking on and off in one file
        records += [{"messages": REASONED}, {"messages": REASONED, "enable_thinking": True},
                    {"messages": plain, "enable_thinking": False}]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    report = audit_dataset(load_conversations(path, log=lambda *_: None), tok, path)
    assert report.differences == [] and report.conversations == len(records)
    replies = [m for r in records for m in r["messages"] if m["role"] == "assistant"]
    assert report.replies == len(replies)


def test_the_audit_reports_the_first_difference_of_a_wrong_template(tmp_path, tokenizer):
    tok = with_template(tokenizer, TRAILING_SPACE)
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": REASONED[1:3]}, {"messages": [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "hello"}]}])
    report = audit_dataset(load_conversations(path, log=lambda *_: None), tok, path)
    assert len(report.differences) >= 1
    line = report.differences[-1]
    assert line.startswith(f"{path}:2: turn 2: context: toolkit ") and " / template " in line, line
    # The toolkit's context holds the reply's first word (it took the prompt's space), the template's does not.
    ours, theirs = line.split(": context: toolkit ")[1].split(" / template ")
    assert ours.startswith("'") and "assistant: h" in ours and theirs.rstrip("'").endswith("assistant: ")


@pytest.mark.slow
def test_the_audit_command_prints_differences_and_fails(tmp_path, tokenizer):
    folder = tmp_path / "tok"
    tokenizer.save_pretrained(folder)
    plain = [{"role": m["role"], "content": m["content"]} for m in REASONED]
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": plain}, {"messages": [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "hello"}]}])
    good = run(["python", "-m", "minicpm_finetune.data", "--tokenizer", str(folder), "--data", path, "--audit",
                "--chat_template", "minicpm5"])
    assert good.returncode == 0, good.stderr
    assert good.stdout.strip() == (f"template audit of {path}: 2 conversation(s), 4 reply(ies): every reply is "
                                   "learned after exactly the template's prompt and as exactly its reply")
    (tmp_path / "wrong.jinja").write_text(TRAILING_SPACE)
    bad = run(["python", "-m", "minicpm_finetune.data", "--tokenizer", str(folder), "--data", path, "--audit",
               "--chat_template", str(tmp_path / "wrong.jinja")])
    assert bad.returncode == 1
    first, summary = bad.stdout.strip().splitlines()
    assert first.startswith(f"{path}:2: turn 2: context: toolkit ") and " / template " in first
    assert "1 conversation(s) differ from the template" in summary
