"""DeepSpeed on two CPU processes (gloo): ZeRO-2 and ZeRO-3 full fine-tuning through sft_finetune.sh,
LoRA under ZeRO-3, and two simulated nodes. Four launches in all; each asserts everything it can.
"""

import os
import re
import subprocess

import pytest
import torch

from conftest import ROOT, free_port, run
from minicpm_finetune.data.tokenizer import load_tokenizer

pytestmark = [pytest.mark.slow,  # several processes training together
              pytest.mark.skipif(not __import__("shutil").which("deepspeed"),
                                 reason="deepspeed launcher not installed")]

# lr high enough, no warm-up: two steps change the logits visibly.
TRAIN_ARGS = ["--max_steps", "2", "--eval_steps", "2", "--save_steps", "2", "--logging_steps", "1",
              "--learning_rate", "1e-3", "--warmup_steps", "0", "--report_to", "none", "--disable_tqdm", "true"]


def logits(model_dir, tokenizer_dir=None, adapter=None):
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(tokenizer_dir or model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "你好"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        return model.eval()(ids).logits


def assert_trained_model_saved(out, tiny_model):
    """The output folder loads as a causal LM whose logits moved, with the tokenizer and its chat template."""

    trained = logits(out)
    assert torch.isfinite(trained).all()
    assert (trained - logits(tiny_model)).abs().max() > 1e-3
    saved, base = load_tokenizer(out), load_tokenizer(tiny_model)
    assert saved.chat_template == base.chat_template and "<用户>" in saved.chat_template
    messages = [{"role": "user", "content": "你好"}]
    assert saved.apply_chat_template(messages, add_generation_prompt=True) == \
        base.apply_chat_template(messages, add_generation_prompt=True)


def assert_both_processes_trained(log):
    for rank in (0, 1):
        assert re.search(f"process {rank} of 2 .*: training finished at step 2", log), log[-3000:]


def sft(tiny_model, data_dir, out, env=None, extra=()):
    settings = dict(MODEL_PATH=tiny_model, DATA_DIR=str(data_dir), OUTPUT_DIR=str(out), NUM_GPUS="2",
                    MASTER_PORT=free_port(), **(env or {}))
    return run(["bash", "sft_finetune.sh", *TRAIN_ARGS, *extra], env=settings, timeout=900)


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_full_fine_tuning_two_processes_through_sft_script(tmp_path, tiny_model, data_dir, stage):
    out = tmp_path / "out"
    result = sft(tiny_model, data_dir, out, {"DS_CONFIG": f"configs/ds_config_{stage}.json"})
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-5000:]
    assert_both_processes_trained(log)
    assert os.path.isfile(out / "checkpoint-2" / "trainer_state.json")
    assert_trained_model_saved(out, tiny_model)
    # The recipe comes from configs/sft.yaml (weight decay, schedule); the script's arguments override it.
    args = torch.load(out / "training_args.bin", weights_only=False)
    assert (args.weight_decay, args.lr_scheduler_type, args.save_total_limit) == (0.1, "cosine", 3)
    assert (args.learning_rate, args.max_steps, args.warmup_steps) == (1e-3, 2, 0)


def test_lora_under_zero3_saves_the_trained_adapter(tmp_path, tiny_model, data_dir):
    from safetensors.torch import load_file

    out = tmp_path / "out"
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", free_port(), "finetune.py", "--use_lora",
           "--lora_target_modules", "q_proj,v_proj", "--lora_r", "4", "--deepspeed", "configs/ds_config_zero3.json",
           "--use_cpu", "--model_name_or_path", tiny_model, "--train_data_path", str(data_dir / "train.jsonl"),
           "--eval_data_path", str(data_dir / "dev.jsonl"), "--output_dir", str(out),
           "--per_device_train_batch_size", "4", *TRAIN_ARGS]
    result = run(cmd, timeout=900)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-5000:]
    assert_both_processes_trained(log)
    # The first-loss check: all-reduced over both processes, said once by the first, no warning for the tiny model.
    assert log.count("first batch loss: ") == 1 and "warning: the first batch loss" not in log, log[-5000:]

    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_model)
    head_dim = config.hidden_size // config.num_attention_heads
    out_features = {"q_proj": config.num_attention_heads * head_dim, "v_proj": config.num_key_value_heads * head_dim}
    weights = load_file(out / "adapter_model.safetensors")
    assert len(weights) == 4 * config.num_hidden_layers  # A and B, q and v, every layer
    for name, tensor in weights.items():
        module = "q_proj" if "q_proj" in name else "v_proj"
        if "lora_A" in name:
            assert tuple(tensor.shape) == (4, config.hidden_size), name
        else:
            assert tuple(tensor.shape) == (out_features[module], 4), name
            assert tensor.abs().max() > 0, f"{name} is still zero: the trained adapter was not saved"
    with_adapter = logits(tiny_model, adapter=str(out))
    assert (with_adapter - logits(tiny_model)).abs().max() > 1e-4


def test_two_nodes_on_localhost_train_together_and_save_one_model(tmp_path, tiny_model, data_dir):
    """Two launchers, one per 'node' (--no_ssh, node_rank 0 and 1), as on two machines with shared storage."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    out = tmp_path / "out"
    port = free_port()
    env = dict(os.environ, MODEL_PATH=tiny_model, DATA_DIR=str(data_dir), OUTPUT_DIR=str(out), HOSTFILE=str(hostfile),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=port, DS_CONFIG="configs/ds_config_zero3.json")
    nodes, logs = [], []
    for rank in (0, 1):
        log = open(tmp_path / f"node{rank}.log", "w+")
        node_env = dict(env, LAUNCHER_ARGS=f"--no_ssh --node_rank {rank}")
        nodes.append(subprocess.Popen(["bash", "sft_finetune.sh", *TRAIN_ARGS], cwd=ROOT, env=node_env,
                                      stdout=log, stderr=subprocess.STDOUT))
        logs.append(log)
    try:
        codes = [node.wait(timeout=900) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    texts = []
    for log in logs:
        log.seek(0)
        texts.append(log.read())
        log.close()
    assert codes == [0, 0], "\n\n".join(t[-3000:] for t in texts)
    # Each node's log shows its own process training, in a world of two.
    for rank, text in enumerate(texts):
        assert re.search(f"process {rank} of 2 .*: training finished at step 2", text), text[-3000:]
        assert f"process {1 - rank} of 2" not in text
    assert_trained_model_saved(out, tiny_model)
