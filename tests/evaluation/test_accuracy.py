"""--eval_metrics: accuracy (exact match of the normalised reply) on hand cases, the metric choice, and an
OCNLI-style label task that reports accuracy during training and on the test set."""

import json

import pytest
from conftest import write_jsonl

import finetune
from minicpm_finetune.cli import ArgumentError
from minicpm_finetune.training.arguments import parse_args
from minicpm_finetune.evaluation.metrics import accuracy, compute_metrics, normalise_label, parse_metric_names


@pytest.mark.parametrize("prediction, reference, equal", [
    ("蕴含", "蕴含", True),
    ("蕴含。", "蕴含", True),  # trailing punctuation
    ("  Entailment. ", "entailment", True),  # case, surrounding space, trailing full stop
    ("ＮＥＵＴＲＡＬ！", "neutral", True),  # full-width letters (NFKC)
    ("not  entailment", "Not entailment", True),  # inner whitespace run
    ("蕴含", "矛盾", False),
    ("蕴含，矛盾", "蕴含", False),  # a second label is not the label
    ("", "中立", False),
    ("中立", "", False),
])
def test_accuracy_is_exact_match_after_normalising(prediction, reference, equal):
    assert (normalise_label(prediction) == normalise_label(reference)) is equal
    assert accuracy([prediction], [reference]) == (100.0 if equal else 0.0)


def test_accuracy_is_the_percentage_of_hits():
    assert accuracy(["a", "b", "c"], ["a", "x", "C."]) == 66.6667  # 2 of 3, 4 decimals
    assert accuracy([], []) == 0.0


def test_metric_choice():
    assert set(compute_metrics(["蕴含"], ["蕴含"], ("accuracy",))) == {"accuracy"}
    assert set(compute_metrics(["我喜欢吃苹果"], ["我喜欢吃苹果"], ("rouge",))) == {"rouge-1", "rouge-2", "rouge-l"}
    assert set(compute_metrics(["a"], ["a"], ("bleu", "accuracy"))) == {"bleu-4", "accuracy"}
    assert set(compute_metrics(["a"], ["a"])) == {"rouge-1", "rouge-2", "rouge-l", "bleu-4"}  # the default
    assert parse_metric_names(" Accuracy, rouge,accuracy") == ("accuracy", "rouge")
    with pytest.raises(ValueError, match="unknown metric 'f1'; choose from rouge, bleu, accuracy"):
        parse_metric_names("rouge,f1")


@pytest.mark.parametrize("argv, message", [
    (["--eval_metrics", "rouge,f1"], "--eval_metrics: unknown metric 'f1'; choose from rouge, bleu, accuracy"),
    (["--eval_metrics", ","], "--eval_metrics: no metric given; choose from rouge, bleu, accuracy"),
    (["--stage", "dpo", "--dpo_beta", "0"], "--dpo_beta must be positive, got 0.0"),
    (["--stage", "dpo", "--sft_loss_weight", "-1"], "--sft_loss_weight must be 0 or more, got -1.0"),
    (["--stage", "dpo", "--packing"], "--packing does not apply to --stage dpo"),
    (["--stage", "dpo", "--early_stopping_patience", "2", "--load_best_model_at_end", "true", "--eval_strategy",
      "steps", "--save_strategy", "steps"], "--early_stopping_patience does not apply to --stage dpo"),
    (["--stage", "dpo", "--max_new_tokens", "64"], "--max_new_tokens does not apply to --stage dpo (no reply is "
                                                   "generated: DPO evaluates by rewards)"),
    (["--stage", "dpo", "--data_format", "conversation"], "--data_format names SFT formats"),
], ids=["unknown_metric", "no_metric", "dpo_beta", "sft_loss_weight", "dpo_packing", "dpo_early_stopping",
        "dpo_generation_flag", "dpo_data_format"])
def test_impossible_metric_and_dpo_arguments_are_one_line(tmp_path, tiny_model, data_dir, argv, message):
    base = ["--model_name_or_path", tiny_model, "--train_data_path", str(data_dir / "train.jsonl"),
            "--eval_data_path", str(data_dir / "dev.jsonl"), "--output_dir", str(tmp_path / "out"), "--use_cpu"]
    with pytest.raises(ArgumentError) as error:
        parse_args(base + argv)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_dpo_without_trl_is_one_line(tmp_path, tiny_model, data_dir, monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "trl" else real_find_spec(name, *a))
    with pytest.raises(ArgumentError, match="^--stage dpo needs TRL: pip install trl$"):  # as without TRL installed
        parse_args(["--stage", "dpo", "--model_name_or_path", tiny_model, "--train_data_path",
                    str(data_dir / "train.jsonl"), "--eval_data_path", str(data_dir / "dev.jsonl"),
                    "--output_dir", str(tmp_path / "out"), "--use_cpu"])


# OCNLI-style: a sentence pair in, one label out.
INSTRUCTION = "判断两句话的关系，回答蕴含、矛盾或中立。"
LABELLED = [("你好", "你好，有什么可以帮你的吗？", "蕴含"), ("今天天气怎么样", "今天天气很好，适合散步。", "中立"),
            ("推荐一条裙子", "这款连衣裙显瘦又文艺。", "矛盾")]


@pytest.mark.slow
def test_label_task_reports_accuracy_during_training_and_on_the_test_set(tmp_path, tiny_model):
    records = [{"instruction": INSTRUCTION, "input": f"句子1：{a}\n句子2：{b}", "output": label}
               for a, b, label in LABELLED]
    train, dev = write_jsonl(tmp_path / "train.jsonl", records * 8), write_jsonl(tmp_path / "dev.jsonl", records)
    out = tmp_path / "out"
    finetune.main(["--model_name_or_path", tiny_model, "--train_data_path", train, "--eval_data_path", dev,
                   "--test_data_path", dev, "--output_dir", str(out), "--use_cpu", "--use_lora",
                   "--learning_rate", "2e-2", "--per_device_train_batch_size", "8", "--max_steps", "40",
                   "--lr_scheduler_type", "constant", "--logging_steps", "10", "--eval_strategy", "steps",
                   "--eval_steps", "40", "--save_strategy", "no", "--eval_metrics", "accuracy",
                   "--max_new_tokens", "6", "--disable_tqdm", "true", "--report_to", "none", "--seed", "0"])
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    evaluation = [e for e in history if "eval_loss" in e][-1]
    assert "eval_accuracy" in evaluation and not any("rouge" in key or "bleu" in key for key in evaluation)
    test = json.loads((out / "test_metrics.json").read_text())
    predictions = [json.loads(line) for line in (out / "test_predictions.jsonl").read_text().splitlines()]
    assert [p["reference"] for p in predictions] == [label for *_, label in LABELLED]
    hits = sum(normalise_label(p["prediction"]) == normalise_label(p["reference"]) for p in predictions)
    assert test["test_accuracy"] == round(100 * hits / len(predictions), 4)
    assert test["test_accuracy"] == evaluation["eval_accuracy"]  # same model, same samples
    assert test["test_accuracy"] > 0, predictions  # learnable in 40 steps (a label: 6 byte pieces in the tiny vocab)


def test_inference_scores_a_label_file_by_accuracy(tmp_path, tiny_model, capsys):
    import inference

    records = [{"instruction": INSTRUCTION, "input": f"句子1：{a}\n句子2：{b}", "output": label}
               for a, b, label in LABELLED]
    data = write_jsonl(tmp_path / "test.jsonl", records)
    out = tmp_path / "pred.jsonl"
    base = ["--model_name_or_path", tiny_model, "--input_file", data, "--output_file", str(out),
            "--max_new_tokens", "4", "--device", "cpu"]
    assert inference.main(base + ["--eval_metrics", "accuracy"]) == 0
    metrics = json.loads((tmp_path / "pred.metrics.json").read_text())
    predictions = [json.loads(line)["prediction"] for line in out.read_text().splitlines()]
    assert metrics == {"accuracy": accuracy(predictions, [label for *_, label in LABELLED]), "num_samples": 3}
    capsys.readouterr()
    with pytest.raises(SystemExit, match="^2$"):
        inference.main(base + ["--eval_metrics", "f1"])
    assert capsys.readouterr().err == "error: --eval_metrics: unknown metric 'f1'; choose from rouge, bleu, accuracy\n"
