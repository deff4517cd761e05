"""results.py: the predictions and metrics files, readable as written (UTF-8, not escaped)."""

import json

from minicpm_finetune.evaluation.prompts import Prompt
from minicpm_finetune.evaluation.results import save_metrics, save_predictions

TOOLS = [{"type": "function", "function": {"name": "get_weather"}}]


def test_predictions_are_one_json_line_per_sample(tmp_path):
    path = tmp_path / "predictions.jsonl"
    path.write_text("an older file\n")
    samples = [([{"role": "user", "content": "你好"}], "你好！"),
               (Prompt([{"role": "user", "content": "天气"}], TOOLS), None)]
    save_predictions(str(path), samples, ["您好", "晴"])
    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n") and "你好" in text  # replaced whole; Chinese kept as written, not \\u escapes
    assert [json.loads(line) for line in text.splitlines()] == [
        {"input": [{"role": "user", "content": "你好"}], "reference": "你好！", "prediction": "您好"},
        {"input": [{"role": "user", "content": "天气"}], "reference": None, "prediction": "晴"},
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["predictions.jsonl"]  # no temporary file left


def test_metrics_are_indented_json(tmp_path):
    path = tmp_path / "metrics.json"
    save_metrics(str(path), {"rouge-l": 12.5, "test_split": "验证"})
    assert path.read_text(encoding="utf-8") == '{\n  "rouge-l": 12.5,\n  "test_split": "验证"\n}\n'
