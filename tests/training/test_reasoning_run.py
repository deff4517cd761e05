"""A LoRA run of the tiny model on reasoning data: thinking and non-thinking samples mixed in one run, under a
template that drops earlier reasoning (conversations split), with the template audit before the model loads."""

import json
import re

import pytest
from conftest import STRIPPING, write_jsonl

import finetune
from minicpm_finetune.tiny import build_tiny



def reasoning_records():
    records = []
    for i in range(12):
        a, b = i % 5, i % 3
        records.append({"messages": [
            {"role": "user", "content": f"{a}加{b}？"},
            {"role": "assistant", "content": f"{a + b}。", "reasoning_content": f"{a}加{b}得{a + b}"},
            {"role": "user", "content": "再加一？"},
            {"role": "assistant", "content": f"{a + b + 1}。", "reasoning_content": f"{a + b}加一"}],
            "enable_thinking": True})
        records.append({"messages": [{"role": "user", "content": f"{a}和{b}"},
                                     {"role": "assistant", "content": f"{a}{b}"}], "enable_thinking": False})
    return records


@pytest.mark.slow
def test_thinking_and_non_thinking_samples_train_in_one_lora_run(tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", reasoning_records())
    model = build_tiny(str(tmp_path / "model"), [data], chat_template="minicpm5")
    template = tmp_path / "stripping.jinja"
    template.write_text(STRIPPING)
    args = ["--model_name_or_path", model, "--train_data_path", data, "--eval_data_path", data,
            "--chat_template", str(template), "--output_dir", str(tmp_path / "out"), "--use_cpu", "--use_lora",
            "--learning_rate", "5e-2", "--per_device_train_batch_size", "8", "--max_steps", "12",
            "--logging_steps", "4", "--eval_strategy", "no", "--save_strategy", "no", "--eval_generation", "false",
            "--disable_tqdm", "true", "--seed", "0", "--model_max_length", "128"]
    capsys.readouterr()
    finetune.main(args)
    out = capsys.readouterr().out
    # 12 two-turn reasoning conversations become 24 samples (the first reply loses its reasoning once the second
    # follows), plus 12 without thinking: 36.
    assert f"train ({data}): 36 samples" in out and "12 conversation(s) split into 24 samples" in out, out
    with open(tmp_path / "out" / "trainer_state.json") as f:
        losses = [e["loss"] for e in json.load(f)["log_history"] if "loss" in e]
    assert losses[-1] < losses[0], losses
    # The same run with a template whose prompt breaks its replies' first tokens stops before the model loads.
    (tmp_path / "wrong.jinja").write_text(template.read_text().replace("'<|im_start|>assistant\\n' -}}{%- if enable",
                                                                       "'<|im_start|>assistant\\n ' -}}{%- if enable"))
    wrong = args[:args.index("--chat_template") + 1] + [str(tmp_path / "wrong.jinja")] + \
        args[args.index("--chat_template") + 2:]
    wrong[wrong.index("--output_dir") + 1] = str(tmp_path / "out2")
    with pytest.raises(SystemExit) as stop:
        finetune.main(wrong)
    error = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(error) == 1
    assert re.fullmatch(r"error: .*train.jsonl:1: turn 2: .* \(the template parity audit of the first 32 training "
                        r"conversations; python -m minicpm_finetune.data --audit lists every difference\)", error[0])
    assert "Loading" not in capsys.readouterr().out and not (tmp_path / "out2" / "adapter_config.json").exists()
