"""LoRA and full fine-tuning on the tiny model: loss goes down, outputs load back with the same logits."""

import json
import os

import pytest
import torch
from conftest import QA, ROOT, run
from transformers import AutoModelForCausalLM
from minicpm_finetune.data.tokenizer import load_tokenizer

import finetune


def train(tiny_model, data_dir, output_dir, *extra):
    argv = ["--model_name_or_path", tiny_model, "--train_data_path", str(data_dir / "train.jsonl"),
            "--eval_data_path", str(data_dir / "dev.jsonl"), "--output_dir", str(output_dir), "--use_cpu",
            "--per_device_train_batch_size", "8", "--max_steps", "30", "--logging_steps", "5",
            "--eval_strategy", "steps", "--eval_steps", "15", "--save_strategy", "no",
            "--disable_tqdm", "true", "--seed", "0", *extra]
    return finetune.main(argv)


def losses(output_dir):
    with open(os.path.join(output_dir, "trainer_state.json")) as f:
        history = json.load(f)["log_history"]
    return [e["loss"] for e in history if "loss" in e], [e["eval_loss"] for e in history if "eval_loss" in e]


def logits(model, tokenizer):
    batch = tokenizer([q for q, _ in QA], return_tensors="pt", padding=True)
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_training_learns_and_saved_output_loads_back(tmp_path, tiny_model, data_dir, mode, capsys):
    output_dir = tmp_path / mode
    extra = ["--use_lora", "--learning_rate", "2e-2"] if mode == "lora" else ["--learning_rate", "5e-3"]
    trainer = train(tiny_model, data_dir, output_dir, *extra)
    # The first-loss check: one line before step 1; the tiny model (scalings applied) is not far above ln(vocab).
    out = capsys.readouterr().out
    assert out.count("first batch loss: ") == 1 and "warning: the first batch loss" not in out, out[-3000:]
    train_losses, eval_losses = losses(output_dir)
    assert train_losses[-1] < (0.9 if mode == "lora" else 0.8) * train_losses[0], train_losses
    assert eval_losses[-1] < eval_losses[0], eval_losses

    tokenizer = load_tokenizer(output_dir)
    assert tokenizer.chat_template == trainer.processing_class.chat_template
    expected = logits(trainer.model, tokenizer)
    if mode == "lora":
        from peft import PeftModel

        assert os.path.isfile(output_dir / "adapter_model.safetensors")
        assert not os.path.exists(output_dir / "model.safetensors")  # only the adapter is saved
        loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), output_dir)
    else:
        loaded = AutoModelForCausalLM.from_pretrained(output_dir)
    assert torch.allclose(logits(loaded, tokenizer), expected, atol=1e-5)
    # Training changed the model.
    assert not torch.allclose(logits(AutoModelForCausalLM.from_pretrained(tiny_model), tokenizer), expected, atol=1e-3)


@pytest.mark.slow
def test_lora_with_activation_checkpointing_and_all_linear(tmp_path, tiny_model, data_dir):
    output_dir = tmp_path / "gc"
    trainer = train(tiny_model, data_dir, output_dir, "--use_lora", "--learning_rate", "2e-2",
                    "--activation_checkpointing", "--lora_target_modules", "all-linear", "--lora_r", "4")
    config = json.loads((output_dir / "adapter_config.json").read_text())
    targeted = {name.rsplit(".", 1)[-1] for name in config["target_modules"]}
    assert targeted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert config["r"] == 4 and config["lora_alpha"] == 32
    train_losses, _ = losses(output_dir)
    assert train_losses[-1] < 0.9 * train_losses[0]
    assert trainer.model.base_model.model.is_activation_checkpointing


def test_batches_are_padded_to_their_longest_sample(tiny_model, data_dir):
    from transformers import DataCollatorForSeq2Seq

    from minicpm_finetune.data import load_conversations, tokenize_dataset

    tokenizer = load_tokenizer(tiny_model)
    dataset, _ = tokenize_dataset(load_conversations(str(data_dir / "dev.jsonl")), tokenizer, 512)
    collator = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100)
    rows = [dataset[i] for i in range(len(dataset))]
    batch = collator([{k: r[k] for k in ("input_ids", "labels")} for r in rows])
    assert batch["input_ids"].shape[1] == max(r["length"] for r in rows) < 512


@pytest.mark.slow
def test_lora_script_runs_on_cpu(tmp_path, tiny_model, data_dir):
    output_dir = tmp_path / "script"
    result = run(["bash", "lora_finetune.sh", "--max_steps", "3", "--eval_steps", "3", "--save_steps", "3",
                  "--disable_tqdm", "true"],
                 env={"MODEL_PATH": tiny_model, "DATA_DIR": str(data_dir), "OUTPUT_DIR": str(output_dir)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "no GPU found: training on the CPU" in result.stderr
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer_config.json", "checkpoint-3"):
        assert os.path.exists(output_dir / name), name
    # The recipe comes from configs/lora.yaml; the script's extra arguments override it.
    args = torch.load(output_dir / "training_args.bin", weights_only=False)
    assert "with configs/lora.yaml" in result.stdout
    assert (args.weight_decay, args.lr_scheduler_type, args.learning_rate) == (0.01, "cosine", 5e-4)
    assert (args.max_steps, args.eval_steps, args.save_steps) == (3, 3, 3)


@pytest.mark.slow
@pytest.mark.parametrize("suffix", ["yaml", "json"])
def test_config_file_values_apply_and_flags_after_it_win(tmp_path, tiny_model, data_dir, suffix):
    import yaml

    from minicpm_finetune.training.arguments import parse_args

    values = {"use_lora": True, "lora_r": 4, "learning_rate": 0.0123, "lr_scheduler_type": "cosine", "max_steps": 7,
              "report_to": "none", "eval_generation": False, "lr_scheduler_kwargs": {"num_cycles": 0.25},
              "lora_target_modules": None}
    config = tmp_path / f"run.{suffix}"
    config.write_text(yaml.safe_dump(values) if suffix == "yaml" else json.dumps(values))
    paths = ["--model_name_or_path", tiny_model, "--train_data_path", str(data_dir / "train.jsonl"),
             "--eval_data_path", str(data_dir / "dev.jsonl"), "--output_dir", str(tmp_path / "out")]
    model_args, _, args = parse_args([str(config), *paths, "--lora_r", "16", "--max_steps", "3"])
    assert (model_args.lora_r, args.max_steps) == (16, 3)  # the flags after the file win
    assert model_args.use_lora and model_args.lora_target_modules is None and not args.eval_generation
    assert (args.learning_rate, args.lr_scheduler_type, args.report_to) == (0.0123, "cosine", [])
    assert args.lr_scheduler_kwargs == {"num_cycles": 0.25}
    # Under the DeepSpeed launcher, --local_rank=N comes before the file.
    model_args, _, args = parse_args(["--local_rank=0", str(config), *paths])
    assert (model_args.lora_r, args.max_steps, args.learning_rate) == (4, 7, 0.0123)


@pytest.mark.slow
def test_missing_dev_file_is_named(tmp_path, tiny_model, data_dir):
    only_train = tmp_path / "d"
    only_train.mkdir()
    (only_train / "train.jsonl").write_text((data_dir / "train.jsonl").read_text())
    result = run(["bash", os.path.join(ROOT, "lora_finetune.sh")],
                 env={"MODEL_PATH": tiny_model, "DATA_DIR": str(only_train)})
    assert result.returncode == 2 and "no dev.jsonl or dev.json" in result.stderr


@pytest.mark.slow
def test_device_cpu_forces_the_cpu_even_with_a_gpu():
    result = run(["bash", "-c", "source scripts/common.sh; DEVICE=cpu device_args"])
    assert result.stdout.strip() == "--use_cpu" and "DEVICE=cpu: training on the CPU" in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("metric", ["loss", "rouge-l"])
def test_early_stopping_stops_and_keeps_the_best_checkpoint(tmp_path, tiny_model, data_dir, metric):
    """Validation answers are the training ones reversed: validation scores improve while the format and words
    are learned, then worsen as the training answers are memorised; training stops after 2 evaluations without
    a new best, and the saved model is the best checkpoint's."""
    from conftest import conversation, write_jsonl
    from safetensors.torch import load_file

    reversed_answers = write_jsonl(tmp_path / "dev.jsonl", [conversation(q, a[::-1]) for q, a in QA])
    output_dir = tmp_path / "out"
    trainer = train(tiny_model, data_dir, output_dir, "--learning_rate", "1e-2", "--max_steps", "80",
                    "--eval_data_path", reversed_answers, "--test_data_path", reversed_answers, "--eval_steps", "4",
                    "--save_strategy", "steps", "--save_steps", "4", "--load_best_model_at_end",
                    "--metric_for_best_model", metric, "--early_stopping_patience", "2")
    state = trainer.state
    with open(output_dir / "trainer_state.json") as f:
        scores = [e[f"eval_{metric}"] for e in json.load(f)["log_history"] if f"eval_{metric}" in e]
    best = (min if metric == "loss" else max)(scores)
    assert state.global_step < 80 and len(scores) == state.global_step // 4  # stopped early
    assert scores.index(best) == len(scores) - 3  # the (first) best, then two that are not better
    assert state.best_metric == best
    assert state.best_model_checkpoint == str(output_dir / f"checkpoint-{4 * (len(scores) - 2)}")
    saved = load_file(output_dir / "model.safetensors")
    kept = load_file(os.path.join(state.best_model_checkpoint, "model.safetensors"))
    assert saved.keys() == kept.keys() and all(torch.equal(saved[k], kept[k]) for k in saved)
    test_metrics = json.loads((output_dir / "test_metrics.json").read_text())
    assert abs(test_metrics[f"test_{metric}"] - best) < 1e-4  # the final evaluation ran on the best model


def test_docs_scripts_configs_and_notebook_use_no_deprecated_flag():
    """transformers marks deprecated TrainingArguments flags in their help (e.g. --gradient_checkpointing, now
    --activation_checkpointing); none may appear where users copy flags from."""
    import dataclasses
    import glob
    import re

    import nbformat

    from minicpm_finetune.training.arguments import TrainingArguments

    deprecated = {f.name for f in dataclasses.fields(TrainingArguments)
                  if re.search(r"\bdeprecated alias\b|will be removed", str(f.metadata.get("help", "")), re.I)}
    assert "gradient_checkpointing" in deprecated  # the check sees transformers' marks
    texts = {path: open(os.path.join(ROOT, path), encoding="utf-8").read()
             for path in ["README.md", *[os.path.relpath(p, ROOT) for p in glob.glob(f"{ROOT}/docs/*.md")],
                          "bench/README.md", "lora_finetune.sh", "sft_finetune.sh", "scripts/common.sh",
                          *[os.path.relpath(p, ROOT) for p in glob.glob(f"{ROOT}/configs/*.yaml")]]}
    notebook = nbformat.read(os.path.join(ROOT, "lora_finetune.ipynb"), as_version=4)
    texts["lora_finetune.ipynb"] = "\n".join(cell.source for cell in notebook.cells)
    used = {(path, name) for path, text in texts.items()
            for name in (re.findall(r"--(\w+)", text) + re.findall(r"^(\w+):", text, re.M)
                         + re.findall(r'"(\w+)": ', text))}
    assert not {(path, name) for path, name in used if name in deprecated}
