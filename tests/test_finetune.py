"""LoRA and full fine-tuning on the tiny model: loss goes down, outputs load back with the same logits."""

import json
import os

import pytest
import torch
from conftest import QA, ROOT, run
from transformers import AutoModelForCausalLM, AutoTokenizer

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


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_training_learns_and_saved_output_loads_back(tmp_path, tiny_model, data_dir, mode):
    output_dir = tmp_path / mode
    extra = ["--use_lora", "--learning_rate", "2e-2"] if mode == "lora" else ["--learning_rate", "5e-3"]
    trainer = train(tiny_model, data_dir, output_dir, *extra)
    train_losses, eval_losses = losses(output_dir)
    assert train_losses[-1] < (0.9 if mode == "lora" else 0.8) * train_losses[0], train_losses
    assert eval_losses[-1] < eval_losses[0], eval_losses

    tokenizer = AutoTokenizer.from_pretrained(output_dir)
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


def test_lora_with_gradient_checkpointing_and_all_linear(tmp_path, tiny_model, data_dir):
    output_dir = tmp_path / "gc"
    trainer = train(tiny_model, data_dir, output_dir, "--use_lora", "--learning_rate", "2e-2",
                    "--gradient_checkpointing", "--lora_target_modules", "all-linear", "--lora_r", "4")
    config = json.loads((output_dir / "adapter_config.json").read_text())
    targeted = {name.rsplit(".", 1)[-1] for name in config["target_modules"]}
    assert targeted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert config["r"] == 4 and config["lora_alpha"] == 32
    train_losses, _ = losses(output_dir)
    assert train_losses[-1] < 0.9 * train_losses[0]
    assert trainer.model.base_model.model.is_gradient_checkpointing


def test_batches_are_padded_to_their_longest_sample(tiny_model, data_dir):
    from transformers import DataCollatorForSeq2Seq

    from minicpm_finetune.data import load_conversations, tokenize_dataset

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    dataset, _ = tokenize_dataset(load_conversations(str(data_dir / "dev.jsonl")), tokenizer, 512)
    collator = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100)
    rows = [dataset[i] for i in range(len(dataset))]
    batch = collator([{k: r[k] for k in ("input_ids", "labels")} for r in rows])
    assert batch["input_ids"].shape[1] == max(r["length"] for r in rows) < 512


def test_lora_script_runs_on_cpu(tmp_path, tiny_model, data_dir):
    output_dir = tmp_path / "script"
    result = run(["bash", "lora_finetune.sh", "--max_steps", "3", "--eval_steps", "3", "--save_steps", "3",
                  "--disable_tqdm", "true"],
                 env={"MODEL_PATH": tiny_model, "DATA_DIR": str(data_dir), "OUTPUT_DIR": str(output_dir)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "no GPU found: training on the CPU" in result.stderr
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer_config.json", "checkpoint-3"):
        assert os.path.exists(output_dir / name), name


@pytest.mark.parametrize("script, env, message", [
    ("lora_finetune.sh", {"MODEL_PATH": "./no-such-model"}, "MODEL_PATH ./no-such-model: folder not found"),
    ("lora_finetune.sh", {"DATA_DIR": "/no/such/dir"}, "DATA_DIR /no/such/dir: folder not found"),
    ("sft_finetune.sh", {"DS_CONFIG": "configs/nope.json"}, "DS_CONFIG configs/nope.json: file not found"),
    ("sft_finetune.sh", {"HOSTFILE": "/no/hostfile"}, "HOSTFILE /no/hostfile: file not found"),
])
def test_scripts_fail_fast_with_one_line(tmp_path, tiny_model, data_dir, script, env, message):
    base = {"MODEL_PATH": tiny_model, "DATA_DIR": str(data_dir), "OUTPUT_DIR": str(tmp_path / "out")}
    result = run(["bash", script], env=dict(base, **env))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {message}"]
    assert not os.path.exists(tmp_path / "out")


def test_missing_dev_file_is_named(tmp_path, tiny_model, data_dir):
    only_train = tmp_path / "d"
    only_train.mkdir()
    (only_train / "train.jsonl").write_text((data_dir / "train.jsonl").read_text())
    result = run(["bash", os.path.join(ROOT, "lora_finetune.sh")], env={"MODEL_PATH": tiny_model, "DATA_DIR": str(only_train)})
    assert result.returncode == 2 and "no dev.jsonl or dev.json" in result.stderr


def test_device_cpu_forces_the_cpu_even_with_a_gpu():
    result = run(["bash", "-c", "source scripts/common.sh; DEVICE=cpu device_args"])
    assert result.stdout.strip() == "--use_cpu" and "DEVICE=cpu: training on the CPU" in result.stderr
