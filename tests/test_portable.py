"""Outputs that work anywhere: every output (LoRA adapter, its checkpoints, full model, merged model, Llama
export) keeps the tokenizer it was trained with, byte for byte and id for id, on a tokenizer laid out as
MiniCPM-2B's (tokenizer.model + legacy: true); full and merged MiniCPM folders load without this package
(trust_remote_code, the official layout) with the same logits; adapters name their base as an absolute
path or a hub id, and merge and inference find a hub-id base in the hub's local cache, offline."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import QA, ROOT, write_jsonl
from transformers import AutoModelForCausalLM, AutoTokenizer

import finetune
from minicpm_finetune.export import main as export_main
from minicpm_finetune.families import FAMILIES
from minicpm_finetune.templates import MINICPM_TEMPLATE
from minicpm_finetune.tiny import MINICPM_2B_TEMPLATE, build_tokenizer, tiny_config

# AdvertiseGen-like text: Chinese punctuation (added tokens in MiniCPM's vocabulary) followed by text, with and
# without spaces, plus English and digits.
TEXTS = [
    "类型#裙*颜色#红色*风格#文艺",
    "这款连衣裙显瘦又文艺，适合夏天穿。",
    "你好，世界！今天天气很好。",
    "你好， 世界。 再见！ 好的？",
    "简约的设计，搭配精致的印花；穿出优雅气质：时尚、百搭。",
    "Hello, how can I help you today? 你好，有什么可以帮你的吗？",
    "价格：199元，3件包邮！",
    "<用户>推荐一条裙子<AI>这款连衣裙，显瘦又文艺。",
]


def ids(tokenizer):
    return [tokenizer(text).input_ids for text in TEXTS]


@pytest.fixture(scope="module")
def legacy_base(tmp_path_factory, data_dir):
    """A tiny MiniCPM whose tokenizer is laid out as MiniCPM-2B's: tokenizer.model, legacy: true,
    Chinese punctuation as user-defined pieces, MiniCPM-2B's own chat template inside tokenizer_config.json."""
    folder = str(tmp_path_factory.mktemp("legacy") / "base")
    with open(data_dir / "train.jsonl", encoding="utf-8") as f:
        texts = [message["content"] for line in f for message in json.loads(line)["messages"]]
    tokenizer = build_tokenizer(folder, texts, sentencepiece_files=True)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config(len(tokenizer))).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def outputs(legacy_base, data_dir, tmp_path_factory):
    """Train a LoRA adapter (from a RELATIVE model path) and a full model, merge the adapter, export the merged
    model to Llama layout, tune the full model on preference pairs (DPO); returns the folders."""
    work = tmp_path_factory.mktemp("outputs")
    common = ["--train_data_path", str(data_dir / "train.jsonl"), "--eval_data_path", str(data_dir / "dev.jsonl"),
              "--use_cpu", "--report_to", "none", "--eval_strategy", "no", "--eval_generation", "false",
              "--per_device_train_batch_size", "4", "--model_max_length", "64", "--disable_tqdm", "true"]
    shutil.copytree(legacy_base, work / "base")
    cwd = os.getcwd()
    os.chdir(work)  # the base is given relative to here
    try:
        finetune.main(["--model_name_or_path", "base", "--output_dir", "lora", "--use_lora", "--max_steps", "2",
                       "--save_steps", "2", "--learning_rate", "1e-2", *common])
    finally:
        os.chdir(cwd)
    finetune.main(["--model_name_or_path", legacy_base, "--output_dir", str(work / "full"), "--max_steps", "1",
                   "--save_strategy", "no", "--learning_rate", "1e-3", *common])
    assert export_main(["merge", "--adapter", str(work / "lora"), "--output_dir", str(work / "merged")]) == 0
    assert export_main(["llama", "--model", str(work / "merged"), "--output_dir", str(work / "llama")]) == 0
    # Preference tuning of the full SFT output: its own Trainer saves the same way.
    pairs = [{"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": a}],
              "rejected": [{"role": "assistant", "content": QA[(i + 1) % len(QA)][1]}]} for i, (q, a) in enumerate(QA)]
    write_jsonl(work / "pairs.jsonl", pairs * 2)
    finetune.main(["--stage", "dpo", "--model_name_or_path", str(work / "full"), "--output_dir", str(work / "dpo"),
                   "--max_steps", "1", "--save_strategy", "no", "--learning_rate", "1e-3",
                   *[str(work / "pairs.jsonl") if arg.endswith(".jsonl") else arg for arg in common]])
    return {name: work / name for name in ("lora", "full", "merged", "llama", "dpo")} | {
        "checkpoint": work / "lora" / "checkpoint-2", "base": work / "base"}


def test_the_legacy_setting_changes_ids_when_lost(legacy_base, tmp_path):
    """Why this matters (and proof the tokenizer test below can fail): re-saving the loaded tokenizer, as
    transformers 5 does, drops tokenizer.model and `legacy: true`, and the ids of the texts change."""
    with open(os.path.join(legacy_base, "tokenizer_config.json"), encoding="utf-8") as f:
        assert json.load(f)["legacy"] is True
    base = AutoTokenizer.from_pretrained(legacy_base)
    base.save_pretrained(tmp_path)
    assert not os.path.exists(tmp_path / "tokenizer.model")
    resaved = AutoTokenizer.from_pretrained(tmp_path)
    changed = [text for text, a, b in zip(TEXTS, ids(base), ids(resaved)) if a != b]
    assert len(changed) >= 5, changed
    # legacy: true starts the segment after an added token ("，") with "▁", as if a space were there.
    legacy, plain = base.tokenize("你好，有什么"), resaved.tokenize("你好，有什么")
    assert legacy[legacy.index("，") + 1].startswith("▁") and not plain[plain.index("，") + 1].startswith("▁")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lora", "checkpoint", "full", "merged", "llama", "dpo"])
def test_every_output_keeps_the_tokenizer_it_was_trained_with(outputs, legacy_base, name):
    folder = outputs[name]
    with open(os.path.join(legacy_base, "tokenizer.model"), "rb") as f:
        model_file = f.read()
    with open(folder / "tokenizer.model", "rb") as f:  # llama.cpp's converter reads MiniCPM vocabularies from it
        assert f.read() == model_file
    with open(folder / "tokenizer_config.json", encoding="utf-8") as f:
        settings = json.load(f)
    assert settings["legacy"] is True and settings["tokenizer_class"] == "LlamaTokenizer"
    assert "chat_template" not in settings  # ours is in chat_template.jinja, not MiniCPM-2B's
    assert not os.path.exists(folder / "tokenizer.json")  # nothing that would be read instead of tokenizer.model

    reloaded = AutoTokenizer.from_pretrained(folder)
    assert ids(reloaded) == ids(AutoTokenizer.from_pretrained(legacy_base))
    assert reloaded.chat_template == MINICPM_TEMPLATE != MINICPM_2B_TEMPLATE  # the template we trained with
    assert reloaded.pad_token == "<unk>"  # the pad token we trained with


@pytest.mark.slow
def test_adapter_names_its_relative_base_as_an_absolute_path(outputs):
    for folder in (outputs["lora"], outputs["checkpoint"]):
        with open(folder / "adapter_config.json", encoding="utf-8") as f:
            assert json.load(f)["base_model_name_or_path"] == str(outputs["base"])


# ------------------------------------------------------------------ portable model folders

# Runs in a fresh interpreter (-I: no PYTHONPATH, no script folder) from a temporary folder, with any import of
# minicpm_finetune refused, so only the model folder's own code can serve model_type "minicpm".
PORTABLE_LOAD = r"""
import importlib.abc, json, sys

class NoPackage(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "minicpm_finetune":
            raise ModuleNotFoundError(f"No module named {name!r}")

sys.meta_path.insert(0, NoPackage())
sys.path = [p for p in sys.path if p and not __import__("os").path.isdir(p + "/minicpm_finetune")]
try:
    import minicpm_finetune
    raise SystemExit("minicpm_finetune is importable")
except ImportError:
    pass
import torch
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
ids = torch.tensor(json.loads(sys.argv[2]))
with torch.no_grad():
    logits = model(ids).logits
generated = model.generate(ids[:1], max_new_tokens=6, do_sample=False)
print(json.dumps({"class": f"{type(model).__module__}.{type(model).__name__}", "logits": logits.tolist(),
                  "generated": generated.tolist()}))
"""
INPUT_IDS = [[1, 5, 9, 30, 42, 77, 100], [1, 8, 13, 21, 34, 55, 89]]
# config.json fields of the official MiniCPM-2B checkpoints, read by serving stacks with native MiniCPM support.
OFFICIAL_FIELDS = {"architectures", "bos_token_id", "eos_token_id", "hidden_act", "hidden_size", "initializer_range",
                   "intermediate_size", "max_position_embeddings", "model_type", "num_attention_heads",
                   "num_hidden_layers", "num_key_value_heads", "rms_norm_eps", "rope_scaling", "rope_theta",
                   "use_cache", "vocab_size", "scale_emb", "dim_model_base", "scale_depth", "auto_map"}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["full", "merged", "dpo"])
def test_model_folders_load_without_the_package(outputs, name, tmp_path):
    folder = outputs[name]
    with open(folder / "config.json", encoding="utf-8") as f:
        config = json.load(f)
    assert OFFICIAL_FIELDS <= set(config), OFFICIAL_FIELDS - set(config)
    minicpm = FAMILIES["minicpm"]
    assert config["auto_map"] == minicpm.native and config["architectures"] == ["MiniCPMForCausalLM"]
    assert config["rope_theta"] == 10000.0 and config["rope_scaling"] is None
    package = os.path.join(ROOT, "minicpm_finetune")
    for code in minicpm.code_files:
        with open(folder / code, "rb") as shipped, open(os.path.join(package, code), "rb") as source:
            assert shipped.read() == source.read()

    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-I", "-c", PORTABLE_LOAD, str(folder), json.dumps(INPUT_IDS)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    remote = json.loads(result.stdout.strip().splitlines()[-1])
    assert remote["class"].startswith("transformers_modules.") and remote["class"].endswith(".MiniCPMForCausalLM")

    # Here, with the package imported, its registered native class serves the same folder, even asked for remote code.
    native = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(native).__module__ == "minicpm_finetune.modeling_minicpm"
    ids_ = torch.tensor(INPUT_IDS)
    with torch.no_grad():
        torch.testing.assert_close(torch.tensor(remote["logits"]), native(ids_).logits, rtol=0, atol=1e-5)
    assert remote["generated"] == native.generate(ids_[:1], max_new_tokens=6, do_sample=False).tolist()


# ------------------------------------------------------------------ a hub-id base, offline from the hub's cache


@pytest.fixture(scope="module")
def hub_env(legacy_base, tmp_path_factory):
    """A populated hub cache holding the tiny model as `owner/tiny` (the layout huggingface_hub writes:
    models--owner--tiny/snapshots/<commit>/..., refs/main), and an environment that uses only it."""
    cache = tmp_path_factory.mktemp("hub")
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--owner--tiny"
    shutil.copytree(legacy_base, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1")


@pytest.mark.slow
def test_hub_id_base_trains_merges_and_infers_offline_from_the_cache(hub_env, legacy_base, data_dir, tmp_path):
    from peft import PeftModel

    def run(*args):
        return subprocess.run([sys.executable, *args], cwd=ROOT, env=hub_env, capture_output=True, text=True,
                              timeout=600)

    adapter = tmp_path / "adapter"
    result = run("finetune.py", "--model_name_or_path", "owner/tiny", "--use_lora", "--lora_r", "4",
                 "--train_data_path", str(data_dir / "train.jsonl"), "--eval_data_path", str(data_dir / "dev.jsonl"),
                 "--output_dir", str(adapter), "--use_cpu", "--report_to", "none", "--save_strategy", "no",
                 "--eval_strategy", "no", "--eval_generation", "false", "--max_steps", "3", "--learning_rate", "5e-2",
                 "--per_device_train_batch_size", "4", "--model_max_length", "64", "--disable_tqdm", "true")
    assert result.returncode == 0, result.stderr[-3000:]
    with open(adapter / "adapter_config.json", encoding="utf-8") as f:
        assert json.load(f)["base_model_name_or_path"] == "owner/tiny"  # a hub id stays a hub id
    with open(adapter / "tokenizer.model", "rb") as a, open(os.path.join(legacy_base, "tokenizer.model"), "rb") as b:
        assert a.read() == b.read()  # the tokenizer files came from the cached snapshot

    merged = tmp_path / "merged"
    result = run("-m", "minicpm_finetune.export", "merge", "--adapter", str(adapter), "--output_dir", str(merged))
    assert result.returncode == 0, result.stderr[-3000:]
    ids_ = torch.tensor(INPUT_IDS)
    expected = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(legacy_base), adapter).eval()
    with torch.no_grad():
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(merged).eval()(ids_).logits,
                                   expected(ids_).logits, rtol=0, atol=1e-5)
        assert not torch.allclose(expected(ids_).logits, AutoModelForCausalLM.from_pretrained(legacy_base)(ids_).logits)

    replies = []
    for model in (adapter, merged):
        result = run("inference.py", "--model_name_or_path", str(model), "--prompt", "推荐一条裙子",
                     "--max_new_tokens", "8", "--no_stream")
        assert result.returncode == 0, result.stderr[-3000:]
        replies.append(result.stdout)
    assert replies[0] == replies[1] and replies[0].strip()


@pytest.mark.slow
def test_hub_id_base_missing_from_the_cache_is_one_line(hub_env, outputs, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(outputs["lora"], adapter)
    with open(adapter / "adapter_config.json", encoding="utf-8") as f:
        config = json.load(f)
    with open(adapter / "adapter_config.json", "w", encoding="utf-8") as f:
        json.dump(dict(config, base_model_name_or_path="owner/missing"), f)
    for args in (["-m", "minicpm_finetune.export", "merge", "--adapter", str(adapter), "--output_dir",
                  str(tmp_path / "merged")],
                 ["inference.py", "--model_name_or_path", str(adapter), "--prompt", "你好"]):
        result = subprocess.run([sys.executable, *args], cwd=ROOT, env=hub_env, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 2, result.stderr[-3000:]
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "owner/missing" in lines[0], lines
    assert not os.path.exists(tmp_path / "merged")


# --------------------------------------------------------------------------- the parts, called directly


def test_copy_tokenizer_replaces_the_saved_one_and_records_template_and_pad_token(tmp_path):
    from minicpm_finetune.portable import copy_tokenizer

    source, out = tmp_path / "base", tmp_path / "out"
    source.mkdir()
    out.mkdir()
    (source / "tokenizer.model").write_bytes(b"\x00sentencepiece\xff")
    (source / "tokenizer_config.json").write_text(json.dumps({"legacy": True, "chat_template": "base's"}))
    (source / "chat_template.jinja").write_text("base's")
    (source / "model.safetensors").write_text("weights: not the tokenizer's")
    (out / "tokenizer.json").write_text("what save_pretrained wrote")
    (out / "config.json").write_text("{}")
    copy_tokenizer(str(source), str(out), chat_template="ours", pad_token="<unk>")
    assert sorted(os.listdir(out)) == ["chat_template.jinja", "config.json", "tokenizer.model",
                                       "tokenizer_config.json"]
    assert (out / "tokenizer.model").read_bytes() == b"\x00sentencepiece\xff"
    assert json.loads((out / "tokenizer_config.json").read_text()) == {"legacy": True, "pad_token": "<unk>"}
    assert (out / "chat_template.jinja").read_text() == "ours"
    plain = tmp_path / "plain"
    copy_tokenizer(str(source), str(plain))  # no template or pad token given: the files as they are
    assert (plain / "tokenizer_config.json").read_bytes() == (source / "tokenizer_config.json").read_bytes()
    assert (plain / "chat_template.jinja").read_text() == "base's"

