"""The model-family table (families.py): per family its template, end-of-turn token, LoRA targets on a model of
that family, chunked loss, decoder layers, export and Liger rules; a model type the table does not know trains
with the defaults and says so in one note."""

import json
import os

import pytest
import torch
from conftest import SMALL, TINY_CONFIGS, VOCAB
from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, MiniCPM3Config,
                          MistralConfig, Qwen2Config)

import finetune
from minicpm_finetune.cli import ArgumentError
from minicpm_finetune.training.checks import check_liger
from minicpm_finetune.export import main as export_main
from minicpm_finetune.models.families import FAMILIES, UNKNOWN_FAMILY, family_of, note
from minicpm_finetune.models.loading import compile_decoder_layers
from minicpm_finetune.export.portable import ship_model_code
from minicpm_finetune.data.templates import (CHATML_TEMPLATE, MINICPM_TEMPLATE, TEMPLATES, apply_template,
                                        end_of_turn_token, resolve_chat_template)
from minicpm_finetune.tiny import MINICPM_2B_TEMPLATE
from minicpm_finetune.data.tokenizer import load_tokenizer

# conftest's TINY_CONFIGS has a tiny config of every family in the table (test_every_family_has_a_tiny_config);
# these are model types the table does not know.
UNKNOWN_CONFIGS = {
    "qwen2": lambda: Qwen2Config(**SMALL, num_key_value_heads=2),
    "mistral": lambda: MistralConfig(**SMALL, num_key_value_heads=2),
}
# What each family says, written out.
EXPECTED = {  # model_type: (template, LoRA targets, chunked loss)
    "minicpm": (MINICPM_TEMPLATE, ["q_proj", "v_proj"], True),
    "minicpm3": (CHATML_TEMPLATE, ["q_b_proj", "kv_b_proj"], False),
    "llama": (MINICPM_TEMPLATE, ["q_proj", "v_proj"], False),
    "qwen2": (MINICPM_TEMPLATE, ["q_proj", "v_proj"], False),
    "mistral": (MINICPM_TEMPLATE, ["q_proj", "v_proj"], False),
}
ALL_CONFIGS = {**TINY_CONFIGS, **UNKNOWN_CONFIGS}


def test_every_family_has_a_tiny_config():
    assert set(TINY_CONFIGS) == set(FAMILIES)
    assert not set(UNKNOWN_CONFIGS) & set(FAMILIES)
    for model_type, make in ALL_CONFIGS.items():
        assert make().model_type == model_type


def meta_model(config):
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("model_type", sorted(ALL_CONFIGS))
def test_template_lora_targets_and_decoder_layers_fit_a_model_of_the_family(model_type, tiny_chatml_model):
    config = ALL_CONFIGS[model_type]()
    family = family_of(config)
    assert (family is UNKNOWN_FAMILY) == (model_type in UNKNOWN_CONFIGS)
    template, targets, chunked = EXPECTED[model_type]

    tokenizer = load_tokenizer(tiny_chatml_model)
    tokenizer.chat_template = None  # a tokenizer without a template: the family's
    assert resolve_chat_template(tokenizer, model_type) == template

    assert family.lora_targets(config) == targets
    model = meta_model(config)
    linear = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    assert set(targets) <= linear
    assert family.chunked_loss == chunked
    assert compile_decoder_layers(model) == config.num_hidden_layers  # found where the table says


def test_minicpm3_without_query_low_rank_targets_its_query_projection():
    config = MiniCPM3Config(**SMALL, num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=8,
                            qk_rope_head_dim=8, v_head_dim=16)
    targets = family_of(config).lora_targets(config)
    assert targets == ["q_proj", "kv_b_proj"]
    names = {name.rsplit(".", 1)[-1] for name, _ in meta_model(config).named_modules()}
    assert set(targets) <= names and "q_b_proj" not in names


@pytest.mark.parametrize("model_type", sorted(ALL_CONFIGS))
def test_the_chunked_loss_flag_is_what_the_model_does(model_type):
    """With labels, a family with the chunked loss returns no logits (never materialised); the others do."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(ALL_CONFIGS[model_type]())
    ids = torch.randint(3, VOCAB, (2, 8))
    output = model(input_ids=ids, labels=ids)
    assert torch.isfinite(output.loss)
    assert (output.logits is None) == family_of(model).chunked_loss


def test_native_families_are_registered_from_the_table():
    for model_type, family in FAMILIES.items():
        if not family.native:
            continue
        config = AutoConfig.for_model(model_type)
        assert f"{type(config).__module__.rsplit('.', 1)[-1]}.{type(config).__name__}" == family.native["AutoConfig"]
        for auto_class in (AutoModel, AutoModelForCausalLM):
            model_class = auto_class._model_mapping[type(config)]
            assert f"{model_class.__module__.rsplit('.', 1)[-1]}.{model_class.__name__}" == \
                family.native[auto_class.__name__]


# ------------------------------------------------------------------------------ end-of-turn token


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_a_builtin_template_knows_its_end_of_turn_token(name, tiny_chatml_model):
    tokenizer = load_tokenizer(tiny_chatml_model)
    apply_template(tokenizer, TEMPLATES[name].text)
    assert end_of_turn_token(tokenizer) == {"minicpm": "</s>", "chatml": "<|im_end|>", "minicpm5": "<|im_end|>"}[name]


# Templates of other origins: the special token written right after a reply, else eos.
CHATML_LIKE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
               "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
MENTIONS_IM_END = ("{# replies end with eos, not <|im_end|> #}{{ bos_token }}{% for m in messages %}"
                   "{{ m['role'] }}: {{ m['content'] }}{% if m['role'] == 'assistant' %} {{ eos_token }}{% endif %}"
                   "\n{% endfor %}")
REFUSES = "{{ raise_exception('only system-first conversations') }}"


@pytest.mark.parametrize("template, expected", [
    (CHATML_LIKE, "<|im_end|>"),
    (MENTIONS_IM_END, "</s>"),  # a text search for <|im_end|> would pick the wrong token here
    (MINICPM_2B_TEMPLATE, "</s>"),  # writes nothing after a reply
    (REFUSES, "</s>"),
], ids=["chatml_like", "mentions_im_end", "nothing_after_reply", "cannot_render"])
def test_another_template_ends_turns_with_the_special_token_after_a_reply(template, expected, tiny_chatml_model):
    tokenizer = load_tokenizer(tiny_chatml_model)
    apply_template(tokenizer, template)
    assert end_of_turn_token(tokenizer) == expected


# ------------------------------------------------------------------------------ notes, export, Liger


def test_notes_say_what_a_family_lacks():
    assert note(TINY_CONFIGS["minicpm"]()) is None
    assert note(TINY_CONFIGS["minicpm3"]()) == ("note: MiniCPM3 (minicpm3) has no chunked loss here: the loss is "
                                                "computed from full-vocabulary logits")
    assert note(TINY_CONFIGS["llama"]()).startswith("note: Llama-format MiniCPM, MiniCPM5 (llama) has no chunked")
    assert note(UNKNOWN_CONFIGS["mistral"]()) == (
        "note: model_type 'mistral' is not in the model-family table (families.py); using defaults: chat template "
        "minicpm when the tokenizer has none, LoRA targets q_proj,v_proj, loss from full logits (no chunked loss)")


def save_tiny(config, folder):
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("model_type", ["minicpm3", "llama"])
def test_export_llama_folds_only_the_families_the_table_names(model_type, tmp_path, capsys):
    folder = save_tiny(TINY_CONFIGS[model_type](), tmp_path / model_type)
    capsys.readouterr()  # the save's progress output
    with pytest.raises(SystemExit, match="^2$"):
        export_main(["llama", "--model", folder, "--output_dir", str(tmp_path / "out")])
    assert capsys.readouterr().err.splitlines() == [
        f"error: expected a model_type 'minicpm' model, got '{model_type}': {folder}"]
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_only_native_families_ship_model_code(model_type, tmp_path):
    folder = save_tiny(TINY_CONFIGS[model_type](), tmp_path / model_type)
    ship_model_code(folder)
    family = FAMILIES[model_type]
    config = json.loads((tmp_path / model_type / "config.json").read_text())
    assert config.get("auto_map") == (family.native or None)
    assert all(os.path.isfile(os.path.join(folder, name)) for name in family.code_files)
    assert bool(family.code_files) == bool(family.native)
    assert not {name for name in os.listdir(folder) if name.endswith(".py")} - set(family.code_files)


@pytest.mark.parametrize("model_type", ["minicpm", "minicpm3"])
def test_liger_is_refused_where_the_table_says_it_does_nothing(model_type):
    with pytest.raises(ArgumentError) as refused:
        check_liger(TINY_CONFIGS[model_type]())
    done = "the native model already computes the loss in chunks" if model_type == "minicpm" else \
        "the loss is computed from full logits"
    assert str(refused.value).startswith(f"--use_liger_kernel has no effect on {model_type} (Liger Kernel does not "
                                         f"patch it; {done}")


def test_liger_is_left_to_its_own_rules_for_llama():
    try:
        check_liger(TINY_CONFIGS["llama"]())
    except ArgumentError as err:  # only when liger-kernel is not installed
        assert "pip install liger-kernel" in str(err)


# ------------------------------------------------------------------------------ a model type the table does not know


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["minicpm", "minicpm3", sorted(UNKNOWN_CONFIGS)[0]])
def test_a_run_trains_with_the_family_defaults_and_one_note(model_type, tmp_path, tiny_model, tiny_chatml_model,
                                                            data_dir, capsys):
    """A tiny model of the family (for a type the table does not know, transformers' own config class) with the
    test tokenizer, its chat template removed: LoRA training works with the family's template and LoRA targets,
    and the run says once, at its start, what the family lacks (MiniCPM3: the chunked loss) or which defaults it
    took (an unknown type); the native MiniCPM says nothing."""
    template, targets, _ = EXPECTED[model_type]
    tokenizer = load_tokenizer(tiny_chatml_model if template == CHATML_TEMPLATE else tiny_model)
    config = ALL_CONFIGS[model_type]()
    config.vocab_size, config.bos_token_id, config.eos_token_id = (len(tokenizer), tokenizer.bos_token_id,
                                                                   tokenizer.eos_token_id)
    folder = save_tiny(config, tmp_path / model_type)
    tokenizer.chat_template = None
    tokenizer.save_pretrained(folder)
    assert load_tokenizer(folder).chat_template is None
    capsys.readouterr()
    output_dir = tmp_path / "out"
    trainer = finetune.main([
        "--model_name_or_path", folder, "--train_data_path", str(data_dir / "train.jsonl"),
        "--eval_data_path", str(data_dir / "dev.jsonl"), "--output_dir", str(output_dir), "--use_cpu",
        "--use_lora", "--learning_rate", "2e-2", "--per_device_train_batch_size", "8", "--max_steps", "12",
        "--logging_steps", "4", "--eval_strategy", "no", "--save_strategy", "no", "--eval_generation", "false",
        "--disable_tqdm", "true", "--seed", "0"])
    lines = capsys.readouterr().out.splitlines()
    expected_note = note(config)
    assert [line for line in lines if line.startswith("note: ") and "chunked loss" in line] == (
        [expected_note] if expected_note else [])
    if expected_note:
        assert lines[0] == expected_note  # at the start, before the data summary
    if model_type in UNKNOWN_CONFIGS:
        assert expected_note == (
            f"note: model_type '{model_type}' is not in the model-family table (families.py); using defaults: chat "
            "template minicpm when the tokenizer has none, LoRA targets q_proj,v_proj, loss from full logits (no "
            "chunked loss)")
    assert trainer.processing_class.chat_template == template
    adapter = json.loads((output_dir / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == sorted(targets)
    with open(output_dir / "trainer_state.json") as f:
        train_losses = [e["loss"] for e in json.load(f)["log_history"] if "loss" in e]
    assert train_losses[-1] < train_losses[0], train_losses


# ------------------------------------------------------------------------------ MiniCPM4/4.1 and MiniCPM5


def test_minicpm5_a_llama_with_its_vocabulary_takes_its_template_and_ends_turns_with_im_end(tmp_path, data_dir):
    """MiniCPM5 is a Llama whose tokenizer holds <|im_start|>, <|im_end|>, <think>, </think>: without a template of
    its own it gets the minicpm5 one (its <|im_end|> ends turns); a Llama-format MiniCPM-2B (no such tokens) keeps
    minicpm. LoRA targets: the Llama projections."""
    from minicpm_finetune.tiny import build_tokenizer

    build_tokenizer(str(tmp_path / "tok"), [], chat_template="minicpm5")
    tokenizer = load_tokenizer(str(tmp_path / "tok"))
    tokenizer.chat_template = None
    assert resolve_chat_template(tokenizer, "llama") == TEMPLATES["minicpm5"].text
    assert resolve_chat_template(tokenizer, "minicpm") == MINICPM_TEMPLATE  # MiniCPM-1/2/4's fallback
    apply_template(tokenizer, TEMPLATES["minicpm5"].text)
    assert end_of_turn_token(tokenizer) == "<|im_end|>"
    config = TINY_CONFIGS["llama"]()
    assert family_of(config).name == "Llama-format MiniCPM, MiniCPM5" and family_of(config).lora_targets(config) == [
        "q_proj", "v_proj"]


@pytest.mark.parametrize("dense_len, max_length, refused", [(8192, 512, False), (8192, 8192, True), (-1, 512, True)])
def test_minicpm4_sparse_attention_trains_dense_below_dense_len_and_is_refused_beyond(dense_len, max_length,
                                                                                      refused):
    """MiniCPM4/4.1's sparse_config (InfLLM v2): below dense_len the model itself attends densely, as the native
    model does; a run reaching dense_len (or dense_len -1: always sparse) is one line before anything loads."""
    from types import SimpleNamespace

    from minicpm_finetune.training.checks import check_against_model
    from minicpm_finetune.tiny import tiny_config

    config = tiny_config(VOCAB, sparse_config={"kernel_size": 32, "dense_len": dense_len})
    model_args = SimpleNamespace(use_lora=False)
    training_args = SimpleNamespace(model_max_length=max_length, use_liger_kernel=False)
    if refused:
        with pytest.raises(ArgumentError, match="sparse_config asks for InfLLM v2 sparse attention") as error:
            check_against_model(model_args, training_args, config)
        assert "\n" not in str(error.value)
    else:
        check_against_model(model_args, training_args, config)
    assert family_of(config).name == "MiniCPM-1/2/4/4.1"
