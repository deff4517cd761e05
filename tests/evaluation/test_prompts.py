"""prompts.py without a model: samples from conversations, the stop ids, reading and streaming a reply from ids."""

import pytest
import torch

from minicpm_finetune.evaluation.prompts import (Prompt, ReplyStreamer, decode_reply, eval_samples, fit_prompt,
                                                 prompt_ids, stop_token_ids)
from minicpm_finetune.data.templates import CHATML_TEMPLATE
from minicpm_finetune.data.tokenizer import load_tokenizer

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
U, A = {"role": "user", "content": "今天天气怎么样"}, {"role": "assistant", "content": "今天天气很好"}


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return load_tokenizer(tiny_model)


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_samples_of_a_conversation_with_tools_carry_them():
    samples = eval_samples([{"messages": [U, A, U, A], "tools": TOOLS}], every_turn=True)
    assert samples == [([U], A["content"]), ([U, A, U], A["content"])]
    assert all(isinstance(prompt, Prompt) and prompt.tools == TOOLS for prompt, _ in samples)
    assert not isinstance(eval_samples([[U, A]])[0][0], Prompt)  # no tools: a plain list


def test_without_a_limit_the_prompt_comes_back_whole_with_its_tools(tiny_chatml_model):
    chatml = load_tokenizer(tiny_chatml_model)
    prompt = Prompt([U, A, U], TOOLS)
    fitted, dropped = fit_prompt(chatml, prompt, None, 8)
    assert (fitted, dropped, fitted.tools) == ([U, A, U], 0, TOOLS) and fitted is not prompt
    # The tools are rendered into the prompt (chatml lists them in the system turn).
    with_tools, without = prompt_ids(chatml, fitted), prompt_ids(chatml, [U, A, U])
    assert "get_weather" in chatml.decode(with_tools) and "get_weather" not in chatml.decode(without)


def test_stop_ids_are_the_end_of_turn_token_and_eos(tokenizer, tiny_chatml_model):
    assert stop_token_ids(tokenizer) == [tokenizer.eos_token_id]  # minicpm: the end of turn is eos
    chatml = load_tokenizer(tiny_chatml_model)
    im_end = chatml.convert_tokens_to_ids("<|im_end|>")
    assert stop_token_ids(chatml) == [im_end, chatml.eos_token_id] and im_end != chatml.unk_token_id
    # A template whose end-of-turn token the vocabulary lacks: unk must not stop generation.
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == tokenizer.unk_token_id
    tokenizer.chat_template = CHATML_TEMPLATE
    try:
        assert stop_token_ids(tokenizer) == [tokenizer.eos_token_id]
    finally:
        tokenizer.chat_template = load_tokenizer(tokenizer.name_or_path).chat_template


def test_a_reply_is_cut_at_the_first_stop_token_without_special_tokens_and_stripped(tokenizer):
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    reply = ids(tokenizer, "你好 𠀀好")
    assert decode_reply(tokenizer, [bos] + reply + [eos] + ids(tokenizer, "多余的话") + [eos], [eos]) == "你好 𠀀好"
    assert decode_reply(tokenizer, reply + ids(tokenizer, "多余的话"), [eos]) == "你好 𠀀好多余的话"  # no stop: all
    assert decode_reply(tokenizer, ids(tokenizer, " 你好！ "), [eos]) == "你好！"


def test_streamer_writes_only_text_that_cannot_change_and_ends_with_the_reply(tokenizer):
    stop = stop_token_ids(tokenizer)
    generated = ids(tokenizer, "你好 𠀀好") + [tokenizer.eos_token_id] + ids(tokenizer, "多余")
    # 你好, a space (held: the reply is stripped), the four byte tokens of 𠀀 (held until a character
    # follows: a run decodes together), 好, eos and what follows it (cut).
    assert tokenizer.convert_ids_to_tokens(generated[2:6]) == ["<0xF0>", "<0xA0>", "<0x80>", "<0x80>"]
    pieces, written = [], []
    streamer = ReplyStreamer(tokenizer, stop, pieces.append)
    streamer.put(torch.tensor([ids(tokenizer, "推荐一条裙子")]))  # generate() passes the prompt first: not written
    for token in generated:
        streamer.put(torch.tensor([token]))
        written.append("".join(pieces))
    streamer.end()
    assert pieces == ["你好", " 𠀀好"]
    assert written[1:6] == ["你好"] * 5  # nothing of the space and the byte run before 好 arrives
    assert "".join(pieces) == decode_reply(tokenizer, generated, stop)


def test_a_tool_call_reply_is_scored_against_the_call_the_template_writes(tiny_chatml_model):
    """Its content is empty: scored against that, an empty reply would be right and the right call wrong."""
    from minicpm_finetune.data.formats import FORMATS
    from minicpm_finetune.evaluation.metrics import compute_metrics

    example = FORMATS["conversation"].convert(FORMATS["conversation"].example)
    call_turn = next(i for i, m in enumerate(example["messages"]) if m.get("tool_calls"))
    conversation = {"messages": example["messages"][:call_turn + 1], "tools": example["tools"]}
    tokenizer = load_tokenizer(tiny_chatml_model)
    (prompt, plain), = eval_samples([conversation])
    (_, reference), = eval_samples([conversation], tokenizer=tokenizer)
    assert plain == "" and prompt.tools == example["tools"]
    assert 'get_weather(city="北京")' in reference.replace(" ", "")  # the call, as the template writes it
    assert compute_metrics([reference], [reference], ("accuracy",))["accuracy"] == 100.0
    assert compute_metrics([""], [reference], ("accuracy",))["accuracy"] == 0.0
