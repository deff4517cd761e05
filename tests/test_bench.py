"""The training benchmark runs on the CPU in CI time: table, JSON and plot; data preparation too."""

import json
import os
import sys

import matplotlib.image
import pytest
from conftest import ROOT, run

pytestmark = pytest.mark.slow  # each runs a benchmark script

BENCH = os.path.join(ROOT, "bench", "bench_training.py")
# The benchmark imports the installed package; here the repository stands in for the installation.
ENV = {"PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}


def test_training_benchmark_prints_table_json_and_plot(tmp_path):
    result = run([sys.executable, BENCH, "--device", "cpu", "--model", "tiny", "--steps", "1", "--warmup", "0",
                  "--rows", "1", "--recipes", "0", "4", "--json", str(tmp_path / "b.json"),
                  "--plot", str(tmp_path / "b.png")], env=ENV)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| seed: LoRA r8 q,v, batch 1, padded to 512 |" in result.stdout
    assert "| LoRA q,v, 1x512 packed, fused loss |" in result.stdout

    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from bench_training import MODELS, synthetic_samples

    seed, packed = json.loads((tmp_path / "b.json").read_text())["results"]
    first_sample = synthetic_samples(8, MODELS["tiny"]["vocab_size"])[0]["length"]
    assert seed["real_tokens"] == first_sample  # batch 1: one sample, its padding to 512 not counted
    assert 480 < packed["real_tokens"] <= 512  # one packed row, nearly full
    assert packed["loss"] == "fused" and seed["loss"] == "logits"
    assert seed["tokens_per_s"] > 0 and packed["tokens_per_s"] > 0 and packed["peak_mib"] > 0
    assert matplotlib.image.imread(tmp_path / "b.png").shape[0] > 100


def test_data_preparation_benchmark(tmp_path):
    result = run([sys.executable, BENCH, "--data_prep", "--samples", "300", "--num_proc", "1",
                  "--json", str(tmp_path / "prep.json")], env=ENV)
    assert result.returncode == 0, result.stderr[-2000:]
    timings = json.loads((tmp_path / "prep.json").read_text())
    assert timings["samples"] == 300 and timings["tokenize_num_proc_1_s"] > 0 and timings["pack_s"] > 0
    assert "pack into rows of 512" in result.stdout


def test_data_benchmark_runs_preparation_and_bare_tokenizer_side_by_side(tmp_path):
    result = run([sys.executable, os.path.join(ROOT, "bench", "bench_data.py"), "--samples", "300",
                  "--preview_samples", "100", "200", "--json", str(tmp_path / "data.json")])
    assert result.returncode == 0, result.stderr[-2000:]
    numbers = json.loads((tmp_path / "data.json").read_text())
    assert numbers["samples"] == 300 and numbers["fast_path"] and len(numbers["bare_tokenizer_s"]) == 2
    assert len(numbers["prepare_s"]) == 2
    assert abs(numbers["ratio"] - sum(numbers["prepare_s"]) / sum(numbers["bare_tokenizer_s"])) < 1e-9
    assert numbers["cpu_ratio"] > 0
    assert len(numbers["load_average_before"]) == 3 and len(numbers["load_average_after"]) == 3
    assert 0 < numbers["cached_s"] < numbers["prepare_s"][0]  # the second run is served from the cache
    assert [p["samples"] for p in numbers["preview"]] == [100, 200] and numbers["preview_peak_ratio"] > 0
    assert "the bare call" in result.stdout and "peak RSS" in result.stdout and "load average" in result.stdout


def test_tokenizer_benchmark_compares_with_sentencepiece(tmp_path):
    bench = os.path.join(ROOT, "bench", "bench_tokenizer.py")
    result = run([sys.executable, bench, "--json", str(tmp_path / "t.json")])
    assert result.returncode == 0, result.stderr[-2000:]
    numbers = json.loads((tmp_path / "t.json").read_text())
    assert numbers["texts"] >= 10_000 and "| toolkit |" in result.stdout
    assert numbers["toolkit"]["equal"] == numbers["output"]["equal"] == numbers["texts"]
    assert numbers["plain"]["equal"] < numbers["texts"] // 2  # transformers 5 alone, on MiniCPM-2B's layout
