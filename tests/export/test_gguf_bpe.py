"""`export gguf` of byte-level BPE vocabularies (tokenizer.json only, as MiniCPM5 ships): a tiny BPE trained here
with the `tokenizers` library under each pre-tokenizer llama.cpp knows by name, on a tiny random Llama (MiniCPM5 is
one). What the file holds is compared with the `tokenizers` library's own vocabulary and merges; where
llama-cpp-python is installed, llama.cpp's tokenizer on the file with the fast tokenizer's ids."""

import json
import os
import re

import gguf
import pytest
import torch
from conftest import ROOT, mixed_text_corpus
from test_gguf import error_lines, field
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from minicpm_finetune.data.templates import TEMPLATES
from minicpm_finetune.export import main

SPECIAL = ["<s>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
ADDED = ["<think>", "</think>"]  # not special: user-defined in llama.cpp, matched in any text by both tokenizers
CONTRACTIONS = "(?i:'s|'t|'re|'ve|'m|'ll|'d)"
WORDS = r"[^\r\n\p{L}\p{N}]?\p{L}+|%s| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
# The pre-tokenizers as the models' tokenizer.json files hold them (GPT-2, Llama 3, Qwen2; MiniCPM5 as llama.cpp's
# src/llama-vocab.cpp quotes its regexes): (split regexes, ByteLevel use_regex, ignore_merges) -> llama.cpp's name.
PRE = {"gpt-2": ((), True, False),
       "llama-bpe": ((CONTRACTIONS + "|" + WORDS % r"\p{N}{1,3}",), False, True),
       "qwen2": ((CONTRACTIONS + "|" + WORDS % r"\p{N}",), False, False),
       "minicpm5": ((r"\p{N}{1,3}", CONTRACTIONS + "|" + WORDS % r"\p{N}+"), False, True)}


def training_texts():
    """The bundled AdvertiseGen sample's training texts (the mixed corpus tested on holds its dev and test sets)."""
    with open(os.path.join(ROOT, "data", "advertisegen_chat", "train.jsonl"), encoding="utf-8") as f:
        return [m["content"] for line in f for m in json.loads(line)["messages"]] + ["Hello world, fine-tune 2026"]


def bpe_tokenizer(regexes=(), use_regex=True, ignore_merges=False, vocab_size=1200):
    tokenizer = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated", invert=False) for r in regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=use_regex)])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(training_texts(), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tokenizer.add_tokens([AddedToken(text, special=False, normalized=False) for text in ADDED])
    return tokenizer


def bpe_model(folder, tokenizer, seed=0):
    """A tiny random LlamaForCausalLM (rows beyond the tokenizer: padding) with the tokenizer and MiniCPM5's
    template saved beside it."""
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")
    fast.chat_template = TEMPLATES["minicpm5"].text
    fast.save_pretrained(folder)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=tokenizer.get_vocab_size() + 6, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         max_position_embeddings=512, initializer_range=0.2, tie_word_embeddings=False,
                         bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
                         pad_token_id=fast.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def minicpm5_like(tmp_path_factory):
    tokenizer = bpe_tokenizer(*PRE["minicpm5"])
    return bpe_model(tmp_path_factory.mktemp("bpe") / "model", tokenizer), tokenizer


def test_gguf_holds_the_bpe_vocabulary_as_tokenizers_has_it(minicpm5_like, tmp_path):
    folder, tokenizer = minicpm5_like
    assert main(["gguf", "--model", folder, "--output_dir", str(tmp_path / "out"), "--outtype", "f32",
                 "--no_check"]) == 0
    reader = gguf.GGUFReader(tmp_path / "out" / "model-f32.gguf")
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    size = len(vocab)
    assert sorted(vocab.values()) == list(range(size))
    by_id = {i: text for text, i in vocab.items()}
    added = tokenizer.get_added_tokens_decoder()
    padding = [f"[PAD{i}]" for i in range(size, size + 6)]

    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    assert field(reader, "tokenizer.ggml.pre") == "minicpm5"
    assert field(reader, "tokenizer.ggml.tokens") == [by_id[i] for i in range(size)] + padding
    T = gguf.TokenType
    expected_types = [T.NORMAL if i not in added else T.CONTROL if added[i].special else T.USER_DEFINED
                      for i in range(size)] + [T.UNUSED] * 6
    assert field(reader, "tokenizer.ggml.token_type") == expected_types
    assert expected_types.count(T.USER_DEFINED) == len(ADDED) and expected_types.count(T.CONTROL) == len(SPECIAL)
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    assert len(merges) > 500
    assert field(reader, "tokenizer.ggml.merges") == [" ".join(pair) for pair in merges]
    assert "tokenizer.ggml.scores" not in reader.fields and "tokenizer.ggml.add_space_prefix" not in reader.fields
    ids = {key: field(reader, f"tokenizer.ggml.{key}_token_id") for key in ("bos", "eos", "eot", "padding")}
    assert ids == {"bos": vocab["<s>"], "eos": vocab["<|im_end|>"], "eot": vocab["<|im_end|>"],
                   "padding": vocab["<|endoftext|>"]}
    assert field(reader, "tokenizer.ggml.add_bos_token") is False  # this tokenizer adds none; the template writes <s>
    assert field(reader, "tokenizer.chat_template") == TEMPLATES["minicpm5"].text


@pytest.mark.parametrize("name", ["llama-bpe", "qwen2", "gpt-2"])
def test_each_known_pre_tokenizer_gets_llama_cpps_name(name, tmp_path):
    folder = bpe_model(tmp_path / "model", bpe_tokenizer(*PRE[name], vocab_size=400))
    assert main(["gguf", "--model", folder, "--output_dir", str(tmp_path / "out"), "--no_check"]) == 0
    assert field(gguf.GGUFReader(tmp_path / "out" / "model-f16.gguf"), "tokenizer.ggml.pre") == name


@pytest.mark.parametrize("regexes, use_regex, ignore_merges, what", [
    ((r"\s+",), False, False, "matches none llama.cpp knows"),  # a split regex llama.cpp has no name for
    (PRE["qwen2"][0], False, True, "matches none llama.cpp knows"),  # Qwen2's regex, Llama 3's ignore_merges
])
def test_gguf_refuses_a_pre_tokenizer_llama_cpp_cannot_match(regexes, use_regex, ignore_merges, what, tmp_path,
                                                             capsys):
    folder = bpe_model(tmp_path / "model", bpe_tokenizer(regexes, use_regex, ignore_merges, vocab_size=400))
    with pytest.raises(SystemExit, match="^2$"):
        main(["gguf", "--model", folder, "--output_dir", str(tmp_path / "out")])
    err = error_lines(capsys)
    assert len(err) == 1 and err[0].startswith(f"error: {folder}: the byte-level BPE pre-tokenizer") and what in err[0]
    assert not (tmp_path / "out").exists()


def test_gguf_refuses_a_sentencepiece_style_tokenizer_json(tiny_chatml_model, tmp_path, capsys):
    """The toolkit's tiny chatml/minicpm5 tokenizers: SentencePiece-style BPE in tokenizer.json alone."""
    assert not os.path.exists(os.path.join(tiny_chatml_model, "tokenizer.model"))
    with pytest.raises(SystemExit, match="^2$"):
        main(["gguf", "--model", tiny_chatml_model, "--output_dir", str(tmp_path / "out")])
    err = error_lines(capsys)
    assert len(err) == 1 and err[0].startswith(f"error: {tiny_chatml_model}: a SentencePiece-style BPE "
                                               "tokenizer.json"), err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ llama.cpp itself (optional extra)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PRE))
def test_llama_cpp_tokenizes_the_bpe_file_as_the_fast_tokenizer(name, minicpm5_like, tmp_path):
    """llama.cpp's tokenizer on the file gives the fast tokenizer's ids on the 1,200 mixed lines."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from transformers import AutoTokenizer

    folder = minicpm5_like[0] if name == "minicpm5" else bpe_model(tmp_path / "model", bpe_tokenizer(*PRE[name]))
    assert main(["gguf", "--model", folder, "--output_dir", str(tmp_path / "out"), "--no_check"]) == 0
    fast = AutoTokenizer.from_pretrained(folder)
    llm = llama_cpp.Llama(model_path=str(tmp_path / "out" / "model-f16.gguf"), vocab_only=True, verbose=False)
    corpus = mixed_text_corpus()
    differ = [text for text in corpus if llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
              != fast(text, add_special_tokens=False).input_ids]
    llm.close()
    assert len(corpus) == 1200 and differ == []


@pytest.mark.slow
def test_parity_gate_runs_the_bpe_file_and_catches_a_wrong_pre_tokenizer(minicpm5_like, tmp_path, capsys,
                                                                         monkeypatch):
    pytest.importorskip("llama_cpp")
    folder = minicpm5_like[0]
    assert main(["gguf", "--model", folder, "--output_dir", str(tmp_path / "ok"), "--outtype", "f32"]) == 0
    printed = capsys.readouterr().out
    found = re.search(r"^parity \(f32 GGUF via llama.cpp vs source, 4 prompts from built-in prompts\): "
                                    r"max \|logit diff\| (\S+) .*token ids 4/4 equal", printed, re.M)
    assert found, printed
    assert float(found[1]) <= 1e-4

    # GPT-2's regex instead of MiniCPM5's: llama.cpp splits "299" and "，简约" otherwise; the gate sees other ids.
    monkeypatch.setattr(gguf.GGUFWriter, "add_tokenizer_pre", lambda self, value: self.add_string(
        gguf.Keys.Tokenizer.PRE, "gpt-2"))
    with pytest.raises(SystemExit, match="^2$"):
        main(["gguf", "--model", folder, "--output_dir", str(tmp_path / "bad"), "--outtype", "f32"])
    err = error_lines(capsys)
    assert len(err) == 1 and err[0].startswith(f"error: {tmp_path / 'bad'}: its tokenizer gives other ids than "
                                               "training's"), err
    assert not (tmp_path / "bad").exists()
