"""Outputs that work anywhere: every output (LoRA adapter, its checkpoints, full model, merged model, Llama
export, DPO) keeps the tokenizer it was trained with, byte for byte, and gives its SentencePiece model's ids
in plain transformers 5 and in transformers 4.40, on a tokenizer laid out as MiniCPM-2B's (tokenizer.model +
legacy: true); full and merged MiniCPM folders load without this package
(trust_remote_code, the official layout) with the same logits; adapters name their base as an absolute
path or a hub id, and merge and inference find a hub-id base in the hub's local cache, offline."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import sentencepiece as spm
from conftest import QA, ROOT, mixed_text_corpus, write_jsonl
from transformers import AutoModelForCausalLM, AutoTokenizer

import finetune
from minicpm_finetune.export import main as export_main
from minicpm_finetune.models.families import FAMILIES
from minicpm_finetune.data.templates import MINICPM_TEMPLATE
from minicpm_finetune.tiny import MINICPM_2B_TEMPLATE, USER_DEFINED_PIECES, build_tokenizer, tiny_config
from minicpm_finetune.data.tokenizer import PORTABLE_CLASS

CORPUS = mixed_text_corpus()


@pytest.fixture(scope="module")
def legacy_base(tmp_path_factory, data_dir):
    """A tiny MiniCPM whose tokenizer is laid out as MiniCPM-2B's: tokenizer.model, legacy: true,
    Chinese punctuation as user-defined pieces, MiniCPM-2B's own chat template inside tokenizer_config.json
    and no pad token."""
    folder = str(tmp_path_factory.mktemp("legacy") / "base")
    with open(data_dir / "train.jsonl", encoding="utf-8") as f:
        texts = [message["content"] for line in f for message in json.loads(line)["messages"]]
    tokenizer = build_tokenizer(folder, texts)
    path = os.path.join(folder, "tokenizer_config.json")
    with open(path, encoding="utf-8") as f:
        settings = {key: value for key, value in json.load(f).items() if key != "pad_token"}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(dict(settings, chat_template=MINICPM_2B_TEMPLATE), f, ensure_ascii=False, indent=2)
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
    # The fixed pipeline in tokenizer.json, under a class that loads it as it is (tokenizer.py).
    assert settings["legacy"] is True and settings["tokenizer_class"] == PORTABLE_CLASS
    assert settings["add_prefix_space"] is False and len(settings["added_tokens_decoder"]) > len(USER_DEFINED_PIECES)
    assert settings["chat_template"] == MINICPM_TEMPLATE  # ours, also where transformers 4.40 reads it

    reloaded = AutoTokenizer.from_pretrained(folder)  # plain transformers 5, nothing of this package
    processor = spm.SentencePieceProcessor(model_file=os.path.join(legacy_base, "tokenizer.model"))
    assert [reloaded(text, add_special_tokens=False).input_ids for text in CORPUS] == [
        processor.encode(text) for text in CORPUS]
    assert reloaded.chat_template == MINICPM_TEMPLATE != MINICPM_2B_TEMPLATE  # the template we trained with
    assert reloaded.pad_token == "<unk>"  # the pad token we trained with


@pytest.fixture(scope="module")
def transformers_4_40():
    """The python of a virtual environment holding transformers 4.40 (what OpenBMB's MiniCPM-2B code runs on),
    made once and kept under ~/.cache; skipped, saying why, where it cannot be installed."""
    folder = os.path.join(os.path.expanduser("~"), ".cache", "minicpm-finetune", "transformers-4.40")
    python = os.path.join(folder, "bin", "python")
    if not os.path.isfile(os.path.join(folder, "ready")):
        shutil.rmtree(folder, ignore_errors=True)
        steps = [[sys.executable, "-m", "venv", folder],
                 [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "transformers==4.40.2",
                  "tokenizers==0.19.1", "sentencepiece", "protobuf", "jinja2"]]
        for step in steps:
            result = subprocess.run(step, capture_output=True, text=True, timeout=900)
            if result.returncode != 0:
                pytest.skip(f"transformers 4.40 could not be installed here: {result.stderr.strip()[-300:]}")
        open(os.path.join(folder, "ready"), "w").close()
    return python


# Run by transformers 4.40: each folder's ids for the corpus and its rendering of a conversation, as JSON.
OLD_STACK_SCRIPT = """
import json, sys
from transformers import AutoTokenizer
corpus, messages = json.loads(sys.stdin.read())
out = {}
for folder in sys.argv[1:]:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    out[folder] = {"ids": [tokenizer(text, add_special_tokens=False).input_ids for text in corpus],
                   "bos": tokenizer("x").input_ids[0],
                   "prompt": tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)}
print(json.dumps(out))
"""


@pytest.mark.slow
def test_every_output_gives_sentencepiece_ids_in_transformers_4_40(outputs, legacy_base, transformers_4_40):
    folders = [str(outputs[name]) for name in ("lora", "checkpoint", "full", "merged", "llama", "dpo")]
    messages = [{"role": "system", "content": "你是一个广告文案助手。"},
                {"role": "user", "content": "推荐一条裙子，好吗？"}]
    result = subprocess.run([transformers_4_40, "-c", OLD_STACK_SCRIPT, *folders],
                            input=json.dumps([CORPUS, messages]), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    processor = spm.SentencePieceProcessor(model_file=os.path.join(legacy_base, "tokenizer.model"))
    expected = [processor.encode(text) for text in CORPUS]
    ours = AutoTokenizer.from_pretrained(folders[0])
    prompt = ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    for folder, seen in json.loads(result.stdout).items():
        assert seen["ids"] == expected, folder
        assert seen["bos"] == processor.bos_id() and seen["prompt"] == prompt, folder


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
    package = os.path.join(ROOT, "minicpm_finetune", "models")  # the code files live beside the family table
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
    assert type(native).__module__ == "minicpm_finetune.models.modeling_minicpm"
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
    from minicpm_finetune.export.portable import copy_tokenizer

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
    # The template also in tokenizer_config.json: transformers 4.40 reads it only there.
    assert json.loads((out / "tokenizer_config.json").read_text()) == {"legacy": True, "chat_template": "ours",
                                                                       "pad_token": "<unk>"}
    assert (out / "chat_template.jinja").read_text() == "ours"
    plain = tmp_path / "plain"
    copy_tokenizer(str(source), str(plain))  # no template or pad token given: the files as they are
    assert (plain / "tokenizer_config.json").read_bytes() == (source / "tokenizer_config.json").read_bytes()
    assert (plain / "chat_template.jinja").read_text() == "base's"



@pytest.mark.slow
def test_a_run_stores_its_first_training_prompts_for_the_parity_check(outputs, data_dir):
    """finetune.py writes them; merge and the Llama export keep them for the gate of their own exports."""
    from minicpm_finetune.export.parity import MAX_PROMPTS, PROMPTS_FILE

    with open(data_dir / "train.jsonl", encoding="utf-8") as f:
        first = [json.loads(line)["messages"][:-1] for line in f.readlines()[:MAX_PROMPTS]]
    for name in ("lora", "full", "merged", "llama"):
        with open(outputs[name] / PROMPTS_FILE, encoding="utf-8") as f:
            assert json.load(f) == first, name
