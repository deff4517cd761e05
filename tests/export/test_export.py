"""`python -m minicpm_finetune.export`: Llama-layout export and LoRA merge, and their bad-argument errors."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from conftest import ROOT, VOCAB, random_ids, random_minicpm
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaForCausalLM, PreTrainedTokenizerFast

import minicpm_finetune  # noqa: F401  registers model_type "minicpm"
from minicpm_finetune.export import main, merge_adapter
from minicpm_finetune.models.modeling_minicpm import MiniCPMForCausalLM
from minicpm_finetune.data.tokenizer import load_tokenizer

REPO_ROOT = ROOT
CHAT_TEMPLATE = ("{% for m in messages %}{% if m.role == 'user' %}<用户>{{ m.content }}<AI>{% else %}{{ m.content }}"
                 "{% endif %}{% endfor %}")


def tiny_tokenizer(chat_template=CHAT_TEMPLATE) -> PreTrainedTokenizerFast:
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<unk>",
        chat_template=chat_template,
    )


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "minicpm_finetune.export", *map(str, args)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )


def only_children(folder):
    return sorted(os.listdir(folder))


@pytest.fixture
def adapter_dir(tmp_path):
    """A saved tiny base (with tokenizer) and a LoRA adapter on it with non-zero B weights."""
    random_minicpm().save_pretrained(tmp_path / "base")
    tiny_tokenizer(chat_template="{{ 'base template' }}").save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")  # records its path for the adapter config
    peft_model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    peft_model.save_pretrained(tmp_path / "adapter")
    tiny_tokenizer().save_pretrained(tmp_path / "adapter")
    with open(tmp_path / "adapter" / "adapter_config.json") as f:
        assert json.load(f)["base_model_name_or_path"] == str(tmp_path / "base")
    return tmp_path / "adapter"


# ---------------------------------------------------------------- llama export


@pytest.mark.parametrize("tied", [True, False])
def test_llama_export_cli_writes_equivalent_llama_folder(tmp_path, tied):
    model = random_minicpm(tied)
    config = model.config
    config.auto_map = {"AutoModelForCausalLM": "modeling_minicpm.MiniCPMForCausalLM"}  # as in official folders
    model.save_pretrained(tmp_path / "minicpm")
    tiny_tokenizer().save_pretrained(tmp_path / "minicpm")

    assert main(["llama", "--model", str(tmp_path / "minicpm"), "--output_dir", str(tmp_path / "llama")]) == 0

    with open(tmp_path / "llama" / "config.json") as f:
        exported_config = json.load(f)
    assert exported_config["model_type"] == "llama" and "auto_map" not in exported_config
    assert exported_config["tie_word_embeddings"] is False
    llama = AutoModelForCausalLM.from_pretrained(tmp_path / "llama").eval()
    assert type(llama) is LlamaForCausalLM
    with torch.no_grad():
        torch.testing.assert_close(llama(random_ids(2, 12)).logits, model(random_ids(2, 12)).logits, atol=1e-5, rtol=0)
    tokenizer = load_tokenizer(tmp_path / "llama")
    assert tokenizer.chat_template == CHAT_TEMPLATE
    assert only_children(tmp_path) == ["llama", "minicpm"]  # no temp folder left behind


# ---------------------------------------------------------------- merge


@pytest.mark.slow
def test_merge_cli_gives_base_plus_adapter_logits(adapter_dir, tmp_path):
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    expected = PeftModel.from_pretrained(base, adapter_dir).eval()(random_ids(2, 12)).logits
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()(random_ids(2, 12)).logits
    assert not torch.allclose(expected, plain, atol=1e-3)  # the adapter really changes the model

    result = run_cli("merge", "--adapter", adapter_dir, "--output_dir", tmp_path / "merged")
    assert result.returncode == 0, result.stderr

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert type(merged) is MiniCPMForCausalLM and merged.dtype == torch.float32
    assert not any("lora" in name for name, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(random_ids(2, 12)).logits, expected, atol=1e-5, rtol=0)
    assert os.path.exists(tmp_path / "merged" / "model.safetensors")
    # The tokenizer and chat template come from the adapter folder, which has one.
    assert load_tokenizer(tmp_path / "merged").chat_template == CHAT_TEMPLATE
    assert only_children(tmp_path) == ["adapter", "base", "merged"]


def test_merge_keeps_base_dtype_unless_told(adapter_dir, tmp_path):
    bf16_base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.bfloat16)
    bf16_base.save_pretrained(tmp_path / "base")  # the adapter's base is now stored in bf16
    for name in os.listdir(adapter_dir):
        if name.startswith(("tokenizer", "chat_template", "special_tokens")):
            os.remove(adapter_dir / name)  # no tokenizer in the adapter: the base's is used

    merge_adapter(str(adapter_dir), str(tmp_path / "merged_bf16"))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged_bf16", dtype="auto")
    assert merged.dtype == torch.bfloat16
    assert load_tokenizer(tmp_path / "merged_bf16").chat_template == "{{ 'base template' }}"

    merge_adapter(str(adapter_dir), str(tmp_path / "merged_fp32"), dtype="float32")
    merged_fp32 = AutoModelForCausalLM.from_pretrained(tmp_path / "merged_fp32", dtype="auto")
    assert merged_fp32.dtype == torch.float32
    # bf16 output is the fp32 merge rounded once.
    for (name, weight), (_, weight_fp32) in zip(merged.named_parameters(), merged_fp32.named_parameters()):
        assert torch.equal(weight, weight_fp32.to(torch.bfloat16)), name


# ---------------------------------------------------------------- bad arguments


def error_line(capsys, starting=""):
    """The one line on stderr (``starting``: the one line that starts so, transformers' progress aside)."""
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith(starting)]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_bad_arguments_give_one_line_and_status_2(adapter_dir, tmp_path, capsys):
    missing = tmp_path / "nowhere"
    with pytest.raises(SystemExit, match="^2$"):
        main(["merge", "--adapter", str(missing), "--output_dir", str(tmp_path / "out")])
    assert str(missing) in error_line(capsys)

    base = tmp_path / "base"  # a model folder, not an adapter
    with pytest.raises(SystemExit, match="^2$"):
        main(["merge", "--adapter", str(base), "--output_dir", str(tmp_path / "out")])
    assert "adapter_config.json" in error_line(capsys)

    with pytest.raises(SystemExit, match="^2$"):
        main(["merge", "--adapter", str(adapter_dir), "--output_dir", str(base)])
    assert str(base) in error_line(capsys)  # refuses to write into a non-empty folder

    with open(adapter_dir / "adapter_config.json") as f:
        adapter_config = json.load(f)
    adapter_config["base_model_name_or_path"] = str(missing)
    with open(adapter_dir / "adapter_config.json", "w") as f:
        json.dump(adapter_config, f)
    with pytest.raises(SystemExit, match="^2$"):
        main(["merge", "--adapter", str(adapter_dir), "--output_dir", str(tmp_path / "out")])
    assert str(missing) in error_line(capsys)

    with pytest.raises(SystemExit, match="^2$"):
        main(["llama", "--model", str(missing), "--output_dir", str(tmp_path / "out")])
    assert str(missing) in error_line(capsys)

    with pytest.raises(SystemExit) as exit_info:
        main(["merge", "--output_dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "--adapter" in error_line(capsys)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_cli_bad_argument_has_no_traceback(tmp_path):
    result = run_cli("merge", "--adapter", tmp_path / "nowhere", "--output_dir", tmp_path / "out")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: adapter folder not found: {tmp_path / 'nowhere'}"]


# ---------------------------------------------------------------- the parity gate


def test_llama_and_merge_print_parity_and_refuse_a_corrupted_result(adapter_dir, tmp_path, capsys, monkeypatch):
    import minicpm_finetune.export.commands as commands
    from minicpm_finetune.export.parity import PROMPTS_FILE

    # Prompts stored with the run, in words this word-level tokenizer knows (the built-in ones are all <unk> here).
    prompts = [[{"role": "user", "content": " ".join(f"w{(7 * i + j) % (VOCAB - 3) + 3}" for j in range(6))}]
               for i in range(3)]
    random_minicpm().save_pretrained(tmp_path / "minicpm")
    tiny_tokenizer().save_pretrained(tmp_path / "minicpm")  # a template that renders the prompt (the base's does not)
    for folder in (tmp_path / "minicpm", adapter_dir):
        (folder / PROMPTS_FILE).write_text(json.dumps(prompts))
    assert main(["llama", "--model", str(tmp_path / "minicpm"), "--output_dir", str(tmp_path / "llama")]) == 0
    assert main(["merge", "--adapter", str(adapter_dir), "--output_dir", str(tmp_path / "merged")]) == 0
    printed = capsys.readouterr().out
    assert printed.count(f"parity (float32 model vs source, 3 prompts from the run's {PROMPTS_FILE}): ") == 2
    assert printed.count("token ids 3/3 equal") == 2
    assert json.loads((tmp_path / "merged" / PROMPTS_FILE).read_text()) == prompts  # kept for its own exports

    fold = commands.fold_into_llama

    def corrupted_fold(model):  # one weight off by a visible amount
        llama = fold(model)
        with torch.no_grad():
            llama.model.layers[0].mlp.down_proj.weight[0, 0] += 1.0
        return llama

    monkeypatch.setattr(commands, "fold_into_llama", corrupted_fold)
    with pytest.raises(SystemExit, match="^2$"):
        main(["llama", "--model", str(tmp_path / "minicpm"), "--output_dir", str(tmp_path / "bad_llama")])
    assert re.match(r"error: .*bad_llama: float32 model differs from its source: max \|logit diff\| \S+ > \S+ "
                    r"\(float32 tolerance\) on .*; nothing was written", error_line(capsys, "error"))

    from peft.tuners.tuners_utils import BaseTuner  # what PeftModel.merge_and_unload runs

    merge_and_unload = BaseTuner.merge_and_unload

    def corrupted_merge(self, *args, **kwargs):
        merged = merge_and_unload(self, *args, **kwargs)
        with torch.no_grad():
            merged.model.layers[0].self_attn.o_proj.weight.mul_(3.0)
        return merged

    monkeypatch.setattr(BaseTuner, "merge_and_unload", corrupted_merge)
    with pytest.raises(SystemExit, match="^2$"):
        main(["merge", "--adapter", str(adapter_dir), "--output_dir", str(tmp_path / "bad_merge")])
    assert "bad_merge: float32 model differs from its source" in error_line(capsys, "error")
    assert only_children(tmp_path) == ["adapter", "base", "llama", "merged", "minicpm"]  # nothing of the refused
    # --no_check writes what it is given, without a parity line
    assert main(["merge", "--adapter", str(adapter_dir), "--output_dir", str(tmp_path / "raw"), "--no_check"]) == 0
    assert "parity" not in capsys.readouterr().out
