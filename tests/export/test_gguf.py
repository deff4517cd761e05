"""`python -m minicpm_finetune.export gguf`: the file read back with gguf.GGUFReader against the source's safetensors
(folded and laid out here, independently of the writer) and its SentencePiece model; the Modelfile; the parity
gate refusing a corrupted export and leaving nothing; and, where llama-cpp-python is installed, llama.cpp itself
on the file."""

import json
import os
import re

import gguf
import numpy as np
import pytest
import sentencepiece as spm
import torch
from conftest import mixed_text_corpus
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import minicpm_finetune.export.gguf as gguf_module
from minicpm_finetune.data.templates import MINICPM_TEMPLATE
from minicpm_finetune.data.tokenizer import load_chat_tokenizer
from minicpm_finetune.export import main
from minicpm_finetune.export.gguf import modelfile
from minicpm_finetune.tiny import USER_DEFINED_PIECES


def field(reader, key):
    """A metadata value of a GGUF file as Python: a number, a string or a list."""
    f = reader.fields[key]
    values = [f.parts[i] for i in f.data]
    if f.types[0] == gguf.GGUFValueType.STRING:
        return bytes(values[0]).decode("utf-8")
    if f.types[0] == gguf.GGUFValueType.ARRAY:
        if f.types[1] == gguf.GGUFValueType.STRING:
            return [bytes(v).decode("utf-8") for v in values]
        return [v.tolist()[0] for v in values]
    return values[0].tolist()[0]


def expected_tensors(model_dir):
    """The source's weights as llama.cpp's llama architecture holds them: muP scalings folded (embeddings
    x scale_emb, o_proj/down_proj x scale_depth/sqrt(layers), the tied head / (hidden/dim_model_base)), q/k rows
    of each head reordered from halves to adjacent pairs, llama.cpp's names."""
    with open(os.path.join(model_dir, "config.json")) as f:
        config = json.load(f)
    weights = load_file(os.path.join(model_dir, "model.safetensors"))
    layers, heads, kv_heads = config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"]

    def pairs(w, n):  # row j of a head's first half -> 2j, of its second half -> 2j+1
        half = w.shape[0] // n // 2
        order = [h * 2 * half + (j // 2 if j % 2 == 0 else half + j // 2) for h in range(n) for j in range(2 * half)]
        return w[order]

    embed = weights["model.embed_tokens.weight"]
    out = {"token_embd.weight": embed * config["scale_emb"], "output_norm.weight": weights["model.norm.weight"],
           "output.weight": embed / (config["hidden_size"] / config["dim_model_base"])}
    residual = config["scale_depth"] / layers**0.5
    for i in range(layers):
        w = {name.split(f"layers.{i}.")[1]: t for name, t in weights.items() if f"layers.{i}." in name}
        out.update({f"blk.{i}.attn_q.weight": pairs(w["self_attn.q_proj.weight"], heads),
                    f"blk.{i}.attn_k.weight": pairs(w["self_attn.k_proj.weight"], kv_heads),
                    f"blk.{i}.attn_v.weight": w["self_attn.v_proj.weight"],
                    f"blk.{i}.attn_output.weight": w["self_attn.o_proj.weight"] * residual,
                    f"blk.{i}.ffn_gate.weight": w["mlp.gate_proj.weight"],
                    f"blk.{i}.ffn_up.weight": w["mlp.up_proj.weight"],
                    f"blk.{i}.ffn_down.weight": w["mlp.down_proj.weight"] * residual,
                    f"blk.{i}.attn_norm.weight": w["input_layernorm.weight"],
                    f"blk.{i}.ffn_norm.weight": w["post_attention_layernorm.weight"]})
    return {name: t.float().numpy() for name, t in out.items()}


def error_lines(capsys):
    """The command's error lines on stderr (transformers' loading progress aside)."""
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]


def read_tensors(reader):
    return {t.name: (gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(
        [int(n) for n in reversed(t.shape)]), t.tensor_type) for t in reader.tensors}


def expected_types(processor, piece_id):
    piece = processor.id_to_piece(piece_id)
    if processor.is_unknown(piece_id):
        return gguf.TokenType.UNKNOWN
    if processor.is_control(piece_id):
        return gguf.TokenType.CONTROL
    if processor.is_byte(piece_id):
        return gguf.TokenType.BYTE
    return gguf.TokenType.USER_DEFINED if piece in USER_DEFINED_PIECES else gguf.TokenType.NORMAL


def test_gguf_holds_every_tensor_and_what_a_llama_cpp_loader_needs(tiny_model, tmp_path, capsys):
    out = tmp_path / "gguf"
    assert main(["gguf", "--model", tiny_model, "--output_dir", str(out), "--outtype", "f32", "--no_check"]) == 0
    assert sorted(os.listdir(out)) == ["Modelfile", "model-f32.gguf"]
    assert "parity" not in capsys.readouterr().out  # --no_check
    reader = gguf.GGUFReader(out / "model-f32.gguf")
    with open(os.path.join(tiny_model, "config.json")) as f:
        config = json.load(f)

    assert field(reader, "general.architecture") == "llama"
    expected = {"llama.context_length": config["max_position_embeddings"], "llama.block_count": 2,
                "llama.embedding_length": config["hidden_size"],
                "llama.feed_forward_length": config["intermediate_size"],
                "llama.attention.head_count": config["num_attention_heads"],
                "llama.attention.head_count_kv": config["num_key_value_heads"],
                "llama.rope.dimension_count": config["hidden_size"] // config["num_attention_heads"],
                "llama.vocab_size": config["vocab_size"]}
    assert {key: field(reader, key) for key in expected} == expected
    assert field(reader, "llama.rope.freq_base") == config["rope_theta"]
    assert field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(config["rms_norm_eps"])

    processor = spm.SentencePieceProcessor(model_file=os.path.join(tiny_model, "tokenizer.model"))
    size = processor.get_piece_size()
    assert field(reader, "tokenizer.ggml.model") == "llama"
    assert field(reader, "tokenizer.ggml.tokens") == [processor.id_to_piece(i) for i in range(size)]
    assert field(reader, "tokenizer.ggml.scores") == pytest.approx([processor.get_score(i) for i in range(size)])
    types = field(reader, "tokenizer.ggml.token_type")
    assert types == [expected_types(processor, i) for i in range(size)]
    assert types.count(gguf.TokenType.USER_DEFINED) == len(USER_DEFINED_PIECES)
    # MiniCPM-2B's SentencePiece model adds no "▁" at the start; llama.cpp, told nothing, would.
    assert field(reader, "tokenizer.ggml.add_space_prefix") is False
    assert field(reader, "tokenizer.ggml.add_bos_token") is True
    ids = {key: field(reader, f"tokenizer.ggml.{key}_token_id") for key in ("bos", "eos", "eot", "unknown")}
    assert ids == {"bos": processor.bos_id(), "eos": processor.eos_id(), "eot": processor.eos_id(),
                   "unknown": processor.unk_id()}
    assert field(reader, "tokenizer.chat_template") == MINICPM_TEMPLATE  # the one trained with

    stored = read_tensors(reader)
    source = expected_tensors(tiny_model)
    assert sorted(stored) == sorted(source)
    for name, array in source.items():
        values, kind = stored[name]
        assert kind == gguf.GGMLQuantizationType.F32, name
        np.testing.assert_allclose(values, array, rtol=1e-6, atol=1e-7, err_msg=name)


@pytest.mark.parametrize("outtype, qtype, rounding", [("f16", "F16", 1e-3), ("q8_0", "Q8_0", 8e-3)])
def test_gguf_tensors_equal_the_source_within_the_outtype(tiny_model, tmp_path, outtype, qtype, rounding):
    out = tmp_path / outtype
    assert main(["gguf", "--model", tiny_model, "--output_dir", str(out), "--outtype", outtype, "--no_check"]) == 0
    stored = read_tensors(gguf.GGUFReader(out / f"model-{outtype}.gguf"))
    for name, array in expected_tensors(tiny_model).items():
        values, kind = stored[name]
        # norms (1-D) stay f32; 2-D weights take the outtype
        assert kind == (gguf.GGMLQuantizationType.F32 if array.ndim == 1 else gguf.GGMLQuantizationType[qtype]), name
        assert np.abs(values - array).max() <= rounding * np.abs(array).max(), name


def test_modelfile_has_the_template_and_stop_tokens(tiny_model, tiny_chatml_model):
    text = modelfile(load_chat_tokenizer(tiny_model), "model-f16.gguf")
    assert "FROM ./model-f16.gguf" in text
    assert re.search(r'TEMPLATE """.*<用户>\{\{ \.Content \}\}<AI>.*\{\{ \.Content \}\}</s>', text)
    assert re.findall(r'PARAMETER stop "(.*)"', text) == ["</s>"]
    chatml = modelfile(load_chat_tokenizer(tiny_chatml_model), "model-f16.gguf")
    assert "<|im_start|>{{ .Role }}" in chatml
    assert re.findall(r'PARAMETER stop "(.*)"', chatml) == ["<|im_end|>", "</s>"]


def test_gguf_parity_line_and_the_gate_refusing_a_corrupted_file(tiny_model, tmp_path, capsys, monkeypatch):
    assert main(["gguf", "--model", tiny_model, "--output_dir", str(tmp_path / "ok"), "--outtype", "f32"]) == 0
    printed = capsys.readouterr().out
    assert "read back: every tensor present, largest weight error 0 of its range" in printed
    assert re.search(r"^parity(: skipped: llama-cpp-python not installed| \(f32 GGUF via llama.cpp)", printed, re.M)

    encoded = gguf_module._encoded

    def corrupt(array, outtype):  # one weight of one tensor written wrong
        data, qtype = encoded(array, outtype)
        if array.shape == (array.shape[0], 64) and data.flags.writeable and not corrupt.done:
            data = data.copy()
            data[0, 0] += 1.0
            corrupt.done = True
        return data, qtype

    corrupt.done = False
    monkeypatch.setattr(gguf_module, "_encoded", corrupt)
    with pytest.raises(SystemExit, match="^2$"):
        main(["gguf", "--model", tiny_model, "--output_dir", str(tmp_path / "bad"), "--outtype", "f32"])
    err = error_lines(capsys)
    assert len(err) == 1 and re.match(r"error: .*bad: the GGUF tensor token_embd.weight differs", err[0]), err
    assert "nothing was written" in err[0]
    assert sorted(os.listdir(tmp_path)) == ["ok"]  # no output, no temporary folder


def test_gguf_of_an_adapter_is_merged_on_the_fly_and_checked(tiny_model, tmp_path, capsys):
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    torch.manual_seed(0)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")  # no tokenizer: the base's is used
    assert main(["gguf", "--model", str(tmp_path / "adapter"), "--output_dir", str(tmp_path / "out"),
                 "--outtype", "f32"]) == 0
    assert "read back: every tensor present" in capsys.readouterr().out
    merged = peft_model.merge_and_unload()
    stored = read_tensors(gguf.GGUFReader(tmp_path / "out" / "model-f32.gguf"))
    np.testing.assert_allclose(stored["blk.0.attn_v.weight"][0],
                               merged.model.layers[0].self_attn.v_proj.weight.detach().numpy(), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ llama.cpp itself (optional extra)


@pytest.mark.slow
def test_llama_cpp_runs_the_file_as_transformers_does(tiny_model, tmp_path, capsys, monkeypatch):
    """The one skip allowed here: llama-cpp-python is an optional extra ([gguf-check])."""
    llama_cpp = pytest.importorskip("llama_cpp")
    for outtype in ("f32", "f16"):
        assert main(["gguf", "--model", tiny_model, "--output_dir", str(tmp_path / outtype), "--outtype", outtype]) == 0
        printed = capsys.readouterr().out
        found = re.search(rf"^parity \({outtype} GGUF via llama.cpp vs source, 4 prompts from built-in prompts\): "
                          r"max \|logit diff\| (\S+) \(limit (\S+)\), token ids 4/4 equal", printed, re.M)
        assert found, printed
        assert float(found[1]) <= (1e-4 if outtype == "f32" else float(found[2]))  # f32: within 1e-4, absolute

    # llama.cpp's own tokenizer on the file gives SentencePiece's ids on 1,000+ mixed lines.
    processor = spm.SentencePieceProcessor(model_file=os.path.join(tiny_model, "tokenizer.model"))
    llm = llama_cpp.Llama(model_path=str(tmp_path / "f32" / "model-f32.gguf"), vocab_only=True, verbose=False)
    corpus = mixed_text_corpus()
    same = sum(llm.tokenize(text.encode("utf-8"), add_bos=False, special=False) == processor.encode(text)
               for text in corpus)
    llm.close()
    assert same == len(corpus)

    # A file whose tokenizer adds a "▁" at the start (what llama.cpp does when the key is missing): refused.
    monkeypatch.setattr(gguf.GGUFWriter, "add_add_space_prefix", lambda self, value: self.add_bool(
        gguf.Keys.Tokenizer.ADD_PREFIX, True))
    with pytest.raises(SystemExit, match="^2$"):
        main(["gguf", "--model", tiny_model, "--output_dir", str(tmp_path / "bad"), "--outtype", "f32"])
    err = error_lines(capsys)
    assert len(err) == 1 and err[0].startswith(f"error: {tmp_path / 'bad'}: its tokenizer gives other ids than "
                                               "training's"), err
    assert not (tmp_path / "bad").exists()
