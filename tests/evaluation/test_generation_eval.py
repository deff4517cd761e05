"""Generation-based evaluation: samples, batched generation, stopping, and ROUGE/BLEU logged by real training runs."""

import json
import sys

import pytest
import torch
from conftest import run
from transformers import AutoConfig, AutoModelForCausalLM

from minicpm_finetune.data import IGNORE_INDEX
from minicpm_finetune.evaluation.generation import generate_replies, generation_kwargs
from minicpm_finetune.evaluation.prompts import eval_samples, stop_token_ids
from minicpm_finetune.data.tokenizer import load_tokenizer

METRICS = ("rouge-1", "rouge-2", "rouge-l", "bleu-4")

SYSTEM = {"role": "system", "content": "你是助手"}
U1, A1 = {"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}
U2, A2 = {"role": "user", "content": "推荐一条裙子"}, {"role": "assistant", "content": "这款连衣裙显瘦。"}


def test_eval_samples_last_turn_and_every_turn():
    conversations = [{"messages": [SYSTEM, U1, A1, U2, A2]}, [U2, A2]]  # records and plain message lists
    assert eval_samples(conversations) == [([SYSTEM, U1, A1, U2], "这款连衣裙显瘦。"), ([U2], "这款连衣裙显瘦。")]
    assert eval_samples(conversations, every_turn=True) == [
        ([SYSTEM, U1], "你好！"),
        ([SYSTEM, U1, A1, U2], "这款连衣裙显瘦。"),
        ([U2], "这款连衣裙显瘦。"),
    ]


def test_sampling_knobs_go_to_generate_only_when_sampling():
    """generate() warns about temperature/top_p under greedy or beam search: they are passed only with do_sample."""
    assert generation_kwargs(num_beams=2, temperature=0.7, top_p=0.9) == {"num_beams": 2, "do_sample": False}
    assert generation_kwargs(do_sample=True, temperature=0.7, top_p=0.9) == {
        "num_beams": 1, "do_sample": True, "temperature": 0.7, "top_p": 0.9}


def test_batched_left_padded_generation_equals_one_by_one(tiny_model):
    tokenizer = load_tokenizer(tiny_model)
    # Larger random weights than the fixture's, so that each prompt gets its own greedy text and any
    # padding leaking into attention or positions would change the tokens.
    config = AutoConfig.from_pretrained(tiny_model)
    config.initializer_range = 0.5
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    tokenizer.padding_side = "right"  # as training leaves them
    model.config.use_cache = False
    prompts = [[U1], [SYSTEM, U1, A1, U2], [{"role": "user", "content": "What is two plus two?"}], [U2], [SYSTEM, U2]]
    batched = generate_replies(model, tokenizer, prompts, max_new_tokens=10, batch_size=3, show_progress=False)
    one_by_one = [generate_replies(model, tokenizer, [p], max_new_tokens=10, batch_size=1, show_progress=False)[0]
                  for p in prompts]
    assert batched == one_by_one
    assert len(set(batched)) == len(prompts)  # the prompts really differ in what they produce
    # Everything it switched for generation is put back.
    assert tokenizer.padding_side == "right" and model.config.use_cache is False and model.training is False
    model.train()
    generate_replies(model, tokenizer, prompts[:1], max_new_tokens=2, show_progress=False)
    assert model.training


def test_generation_stops_at_end_of_turn(tiny_chatml_model):
    """A model taught to write text after its end-of-turn token (<|im_end|>, not eos) stops before that text."""
    tokenizer = load_tokenizer(tiny_chatml_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_chatml_model)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end != tokenizer.eos_token_id and im_end in stop_token_ids(tokenizer)
    prompt = tokenizer.apply_chat_template([U1], tokenize=False, add_generation_prompt=True)
    text = prompt + "今天天气很好<|im_end|>\n多余的话"
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    labels = ids.clone()
    labels[0, : len(tokenizer(prompt, add_special_tokens=False)["input_ids"])] = IGNORE_INDEX
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(30):  # memorise it
        model(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    # Stopping at eos only, the model goes on past <|im_end|> ...
    inputs = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
    free = model.generate(**inputs, max_new_tokens=12, eos_token_id=tokenizer.eos_token_id, do_sample=False)
    assert "多余" in tokenizer.decode(free[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    # ... and generate_replies stops there.
    assert generate_replies(model, tokenizer, [[U1]], max_new_tokens=12, show_progress=False) == ["今天天气很好"]


def test_trainer_scores_the_samples_the_evaluation_prefix_names_in_one_log_entry(tiny_model, data_dir, tmp_path):
    """MiniCPMTrainer finds the samples to generate for from the evaluation's own metric prefix (no state handed
    from one call to the next): the validation samples under eval_, the test samples under test_, none under
    another prefix; the scores are in the loss's one log entry and in the metrics the callbacks see."""
    from transformers import DataCollatorForSeq2Seq, TrainerCallback

    from minicpm_finetune.training.arguments import TrainingArguments
    from minicpm_finetune.data import load_conversations, tokenize_dataset
    from minicpm_finetune.training.trainer import MiniCPMTrainer

    class SeenByCallbacks(TrainerCallback):
        def __init__(self):
            self.metrics = []

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            self.metrics.append(dict(metrics))

    tokenizer = load_tokenizer(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    conversations = load_conversations(str(data_dir / "dev.jsonl"))
    dataset, _ = tokenize_dataset(conversations, tokenizer, 256)
    samples = eval_samples(conversations)
    seen = SeenByCallbacks()
    trainer = MiniCPMTrainer(
        model=model, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none",
                                            per_device_eval_batch_size=2, disable_tqdm=True),
        eval_dataset=dataset, processing_class=tokenizer, callbacks=[seen],
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=IGNORE_INDEX),
        generation_samples={"eval": samples[:1], "test": samples[1:]}, generation_config={"max_new_tokens": 4})

    metrics = trainer.evaluate()
    assert metrics["eval_num_samples"] == 1 and {"eval_loss", *(f"eval_{key}" for key in METRICS)} <= set(metrics)
    assert trainer.state.log_history[-1].items() >= metrics.items() and seen.metrics == [metrics]

    test = trainer.evaluate(dataset, metric_key_prefix="test")
    assert test["test_num_samples"] == 3 and "test_loss" in test and "test_rouge-l" in test
    replies = generate_replies(model, tokenizer, [prompt for prompt, _ in samples[1:]], max_new_tokens=4,
                               show_progress=False)
    assert trainer.last_predictions == replies

    other = trainer.evaluate(dataset, metric_key_prefix="other")
    assert "other_loss" in other and not any(key.startswith(("other_rouge", "other_num")) for key in other)
    assert trainer.last_predictions == replies  # nothing generated


def finetune_args(tiny_model, data_dir, output_dir, *extra):
    return ["--model_name_or_path", tiny_model, "--train_data_path", str(data_dir / "train.jsonl"),
            "--eval_data_path", str(data_dir / "dev.jsonl"), "--output_dir", str(output_dir),
            "--use_lora", "--lora_target_modules", "q_proj,v_proj", "--use_cpu", "--report_to", "none",
            "--save_strategy", "no", "--learning_rate", "5e-3", "--logging_steps", "2",
            "--eval_strategy", "steps", "--eval_steps", "2", "--max_new_tokens", "8", *extra]


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_lora_training_logs_generation_metrics(tiny_model, data_dir, tmp_path):
    out = tmp_path / "run"
    result = run([sys.executable, "finetune.py", *finetune_args(
        tiny_model, data_dir, out, "--test_data_path", str(data_dir / "test.jsonl"), "--max_steps", "4",
        "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "3", "--eval_num_samples", "3")])
    assert result.returncode == 0, result.stderr[-3000:]

    state = json.loads((out / "trainer_state.json").read_text())
    evals = [entry for entry in state["log_history"] if "eval_loss" in entry]
    assert [entry["step"] for entry in evals] == [2, 4]
    for entry in evals:  # in the same log entry as the validation loss
        assert all(0 <= entry[f"eval_{key}"] <= 100 for key in METRICS)
        assert entry["eval_num_samples"] == 3  # --eval_num_samples
    assert "'eval_rouge-1'" in result.stdout and "'eval_bleu-4'" in result.stdout

    metrics = json.loads((out / "test_metrics.json").read_text())
    assert {"test_loss", "test_num_samples", *(f"test_{key}" for key in METRICS)} <= set(metrics)
    assert metrics["test_num_samples"] == 4 and metrics["test_split"] == "test"  # the whole test set
    rows = read_jsonl(out / "test_predictions.jsonl")
    expected = eval_samples(read_jsonl(data_dir / "test.jsonl"))
    assert [(row["input"], row["reference"]) for row in rows] == expected
    assert all(isinstance(row["prediction"], str) for row in rows)
    assert (out / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_eval_generation_can_be_turned_off(tiny_model, data_dir, tmp_path):
    out = tmp_path / "run"
    result = run([sys.executable, "finetune.py", *finetune_args(
        tiny_model, data_dir, out, "--max_steps", "2", "--eval_generation", "false")])
    assert result.returncode == 0, result.stderr[-3000:]
    evals = [e for e in json.loads((out / "trainer_state.json").read_text())["log_history"] if "eval_loss" in e]
    assert evals and not any("eval_rouge-1" in e for e in evals)
    # No test set: the validation set is scored at the end, loss only.
    metrics = json.loads((out / "test_metrics.json").read_text())
    assert metrics["test_split"] == "validation" and "test_loss" in metrics and "test_rouge-1" not in metrics
    assert not (out / "test_predictions.jsonl").exists()


@pytest.mark.slow
@pytest.mark.skipif(not __import__("shutil").which("deepspeed"), reason="deepspeed launcher not installed")
def test_zero3_two_processes_match_single_process_generation(tiny_model, data_dir, tmp_path):
    """Under ZeRO-3 in two processes, with an odd sample count (one rank pads its share), the predictions
    gathered from both ranks equal a single process's generation with the saved adapter."""
    from peft import PeftModel

    out = tmp_path / "zero3"
    test_file = tmp_path / "test.jsonl"
    test_file.write_text("".join((data_dir / "test.jsonl").read_text().splitlines(keepends=True)[:3]))
    result = run(["deepspeed", "--num_gpus", "2", "--master_port", "29517", "finetune.py",
                  "--deepspeed", "configs/ds_config_zero3.json",
                  *finetune_args(tiny_model, data_dir, out, "--test_data_path", str(test_file), "--max_steps", "2",
                                 "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "1",
                                 "--disable_tqdm", "true")])
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert any("eval_rouge-1" in e for e in json.loads((out / "trainer_state.json").read_text())["log_history"])
    rows = read_jsonl(out / "test_predictions.jsonl")
    assert len(rows) == 3

    tokenizer = load_tokenizer(out)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), out)
    single = generate_replies(model, tokenizer, [row["input"] for row in rows], max_new_tokens=8, show_progress=False)
    assert [row["prediction"] for row in rows] == single
