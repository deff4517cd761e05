"""The one-command demos, end to end as a new user runs them: `bash lora_finetune.sh --demo` and
`bash sft_finetune.sh --demo` (DeepSpeed ZeRO-3 over 2 CPU processes) make the sample data and the tiny
pretrained model when missing, train with configs/demo_*.yaml, evaluate and write every output. About a minute
each on 2 CPU cores; they share one demo folder, so the second reuses the model the first built.
"""

import json
import os
import shutil
import time

import pytest
import torch

from conftest import ROOT, free_port, run

pytestmark = pytest.mark.slow  # the demo scripts, end to end

EXPECTED = ("tokenizer_config.json", "chat_template.jinja", "trainer_state.json", "training_args.bin",
            "test_metrics.json", "test_predictions.jsonl", "training_curves.png")


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("demo")


def run_demo(script, demo_dir, name, **env):
    env = {"DEMO_DIR": str(demo_dir), "DATA_DIR": str(demo_dir / "data"), "OUTPUT_DIR": str(demo_dir / name),
           "OMP_NUM_THREADS": "1", **env}
    start = time.time()
    result = run(["bash", script, "--demo", "--disable_tqdm", "true"], env=env, timeout=900)
    print(f"{script} --demo: {time.time() - start:.0f} s")
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    return result, demo_dir / name


def assert_learned(out, config):
    """From the files the run wrote: training loss falls by >= 30%, test ROUGE-L >= 80, the config's settings."""
    for name in EXPECTED:
        assert os.path.isfile(out / name), name
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    losses = [entry["loss"] for entry in history if "loss" in entry]
    metrics = json.loads((out / "test_metrics.json").read_text())
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} ({1 - losses[-1] / losses[0]:.0%} lower); "
          f"test ROUGE-L {metrics['test_rouge-l']:.1f}")
    assert losses[-1] <= 0.7 * losses[0], losses
    assert metrics["test_split"] == "test" and metrics["test_num_samples"] == 100
    assert metrics["test_rouge-l"] >= 80, metrics
    args = torch.load(out / "training_args.bin", weights_only=False)
    import yaml

    recipe = yaml.safe_load(open(os.path.join(ROOT, "configs", config), encoding="utf-8"))
    assert (args.max_steps, args.learning_rate, args.model_max_length) == \
        (recipe["max_steps"], recipe["learning_rate"], recipe["model_max_length"])
    assert os.path.isdir(out / f"checkpoint-{recipe['max_steps']}")


def test_lora_demo_makes_data_and_model_then_learns(demo_dir):
    result, out = run_demo("lora_finetune.sh", demo_dir, "lora")
    assert "demo: converting the sample" in result.stdout
    assert "demo: building a tiny pretrained MiniCPM" in result.stdout
    for split in ("train", "dev", "test"):  # the same conversations as the committed data/advertisegen_chat
        with open(demo_dir / "data" / f"{split}.jsonl", "rb") as made, \
                open(os.path.join(ROOT, "data", "advertisegen_chat", f"{split}.jsonl"), "rb") as committed:
            assert made.read() == committed.read(), split
    assert os.path.isfile(out / "adapter_model.safetensors") and not os.path.exists(out / "model.safetensors")
    assert_learned(out, "demo_lora.yaml")


@pytest.mark.skipif(not shutil.which("deepspeed"), reason="deepspeed launcher not installed")
def test_sft_demo_under_zero3_on_two_processes_learns(demo_dir):
    result, out = run_demo("sft_finetune.sh", demo_dir, "sft", MASTER_PORT=free_port())
    log = result.stdout + result.stderr
    if os.path.isdir(demo_dir / "lora"):  # the LoRA demo ran first: its data and model are reused
        assert "demo: converting" not in log and "demo: building" not in log
    assert "configs/ds_config_zero3.json" in log
    for rank in (0, 1):
        assert f"process {rank} of 2" in log
    assert os.path.isfile(out / "model.safetensors")
    assert_learned(out, "demo_sft.yaml")


def test_demo_never_builds_over_a_model_path_that_is_given(tmp_path):
    """--demo builds its tiny model only when MODEL_PATH is unset: a given one that is missing is an error."""
    result = run(["bash", "lora_finetune.sh", "--demo"],
                 env={"MODEL_PATH": "./no-such-model", "DEMO_DIR": str(tmp_path)})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: MODEL_PATH ./no-such-model: folder not found"]
    assert not os.path.exists(os.path.join(ROOT, "no-such-model")) and not os.listdir(tmp_path)
