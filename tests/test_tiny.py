"""The tiny model builder: a native MiniCPM with non-trivial scalings, and one-line errors for bad data."""

import os

import pytest
from conftest import run
from transformers import AutoConfig

from minicpm_finetune.data.templates import MINICPM_TEMPLATE
from minicpm_finetune.data.tokenizer import load_tokenizer


def test_tiny_model_is_a_native_minicpm_with_real_scalings(tiny_model):
    config = AutoConfig.from_pretrained(tiny_model)
    assert config.model_type == "minicpm" and config.architectures == ["MiniCPMForCausalLM"]
    assert config.scale_emb != 1 and config.dim_model_base != config.hidden_size and config.scale_depth != 1
    tokenizer = load_tokenizer(tiny_model)
    assert tokenizer.chat_template == MINICPM_TEMPLATE and config.vocab_size == len(tokenizer)
    # Byte fallback: text the tokenizer never saw still round-trips.
    assert tokenizer.decode(tokenizer("龘 ☃", add_special_tokens=False)["input_ids"]) == "龘 ☃"


@pytest.mark.slow
def test_tiny_cli_reports_bad_data_in_one_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": \n', encoding="utf-8")
    for data, message in ((bad, f"{bad}:2: malformed JSON"), (tmp_path / "missing.jsonl", "file not found")):
        result = run(["python", "-m", "minicpm_finetune.tiny", "--output_dir", str(tmp_path / "out"),
                      "--data", str(data)])
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr
        assert not os.path.exists(tmp_path / "out")


def test_pretrained_tiny_model_knows_its_texts_and_has_a_wider_logit_range(tmp_path, data_dir, tiny_model):
    """--pretrain_steps: the texts' language-modelling loss falls well below the random model's."""
    import torch
    from transformers import AutoModelForCausalLM

    from minicpm_finetune.tiny import PRETRAIN_CONFIG, build_tiny

    pretrained = build_tiny(str(tmp_path / "pretrained"), [str(data_dir / "train.jsonl")], pretrain_steps=60)
    assert {k: getattr(AutoConfig.from_pretrained(pretrained), k) for k in PRETRAIN_CONFIG} == PRETRAIN_CONFIG
    tokenizer = load_tokenizer(pretrained)
    batch = tokenizer([text + tokenizer.eos_token for text in ("你好，有什么可以帮你的吗？", "Two plus two is four.")],
                      return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)

    def loss(path):
        with torch.no_grad():
            return AutoModelForCausalLM.from_pretrained(path)(**batch, labels=labels).loss.item()

    assert load_tokenizer(tiny_model).get_vocab() == tokenizer.get_vocab()  # same tokenizer
    assert loss(pretrained) < 0.5 * loss(tiny_model)


def test_the_minicpm_2b_shape_is_minicpm_2b():
    """The shape GPU runs use: MiniCPM-2B's size (2.72B parameters, tied embeddings, 122,753 words)."""
    import torch

    from minicpm_finetune.models.modeling_minicpm import MiniCPMForCausalLM
    from minicpm_finetune.tiny import SHAPES, tiny_config

    with torch.device("meta"):
        model = MiniCPMForCausalLM(tiny_config(**SHAPES["minicpm-2b"]))
    assert round(sum(p.numel() for p in model.parameters()) / 1e9, 2) == 2.72
    assert model.config.vocab_size == 122753 and model.config.hidden_size // model.config.dim_model_base == 9
