"""Training-curve series extraction, the PNG, and the command line."""

import json
import math
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest
from conftest import ROOT

from minicpm_finetune.evaluation.curves import curve_series, plot_training_curves

REPO = Path(ROOT)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def synthetic_log(steps=200, with_metrics=True):
    """A log_history shaped like the Trainer's: train loss every 5 steps, eval every 50."""
    log = []
    for step in range(5, steps + 1, 5):
        noise = 0.1 * math.sin(step)
        log.append({"loss": 2 * math.exp(-step / 80) + 1 + noise, "grad_norm": 1.5,
                    "learning_rate": 1e-4, "epoch": step / steps, "step": step})
        if step % 50 == 0:
            log.append({"eval_loss": 2 * math.exp(-step / 80) + 1.1, "eval_runtime": 0.5,
                        "eval_samples_per_second": 40.0, "epoch": step / steps, "step": step})
            if with_metrics:
                log.append({"eval_rouge-1": step / 10, "eval_rouge-2": step / 30,
                            "eval_rouge-l": step / 15, "eval_bleu-4": step / 40,
                            "epoch": step / steps, "step": step})
    log.append({"train_runtime": 12.0, "train_samples_per_second": 80.0, "train_loss": 1.4,
                "epoch": 1.0, "step": steps})
    return log


def test_curve_series_extracts_exactly_the_plotted_points():
    log = [
        {"loss": 2.5, "grad_norm": 3.0, "learning_rate": 1e-4, "epoch": 0.1, "step": 10},
        {"loss": 2.0, "epoch": 0.2, "step": 20},
        {"eval_loss": 2.2, "eval_runtime": 1.0, "epoch": 0.2, "step": 20},
        {"eval_rouge-1": 30.5, "eval_rouge-2": 10.0, "eval_rouge-l": 25.0, "eval_bleu-4": 8.5,
         "step": 20},
        {"loss": 1.5, "epoch": 0.3},                     # no step: ignored
        {"loss": float("nan"), "step": 30},              # cannot be drawn: ignored
        {"loss": 1.2, "step": 40},
        {"eval_loss": 1.9, "eval_rouge-1": 35.0, "step": 40},
        {"eval_f1": 0.5, "step": 40},                    # not a curve we plot
        # End-of-training summary: ignored even if it carried a "loss".
        {"train_runtime": 9.0, "train_loss": 1.9, "loss": 1.9, "epoch": 1.0, "step": 40},
    ]
    assert curve_series(log) == {
        "loss": ([10, 20, 40], [2.5, 2.0, 1.2]),
        "eval_loss": ([20, 40], [2.2, 1.9]),
        "eval_rouge-1": ([20, 40], [30.5, 35.0]),
        "eval_rouge-2": ([20], [10.0]),
        "eval_rouge-l": ([20], [25.0]),
        "eval_bleu-4": ([20], [8.5]),
    }


def test_curve_series_of_a_log_without_metrics_has_only_losses():
    series = curve_series(synthetic_log(100, with_metrics=False))
    assert set(series) == {"loss", "eval_loss"}
    assert series["loss"][0] == list(range(5, 101, 5))
    assert series["eval_loss"][0] == [50, 100]
    assert curve_series([]) == {}


def read_png(path):
    data = Path(path).read_bytes()
    assert data[:8] == PNG_SIGNATURE
    return matplotlib.image.imread(path)


def test_plot_writes_a_readable_png_with_two_panels(tmp_path):
    out = plot_training_curves(synthetic_log(), tmp_path / "curves.png")
    assert out == tmp_path / "curves.png"
    height, width, _ = read_png(out).shape
    # Two side-by-side panels: a wide figure of a useful size.
    assert 400 <= height <= 800 and width > 2 * height
    # Only the PNG is left behind, no temporary file.
    assert [p.name for p in tmp_path.iterdir()] == ["curves.png"]


def test_plot_without_metrics_is_a_single_panel_and_replaces_the_old_file(tmp_path):
    out = tmp_path / "sub" / "curves.png"
    plot_training_curves(synthetic_log(), out)
    plot_training_curves(synthetic_log(with_metrics=False), out)
    height, width, _ = read_png(out).shape
    assert height < width < 2 * height


def test_plot_with_nothing_to_draw_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no training loss"):
        plot_training_curves([{"train_runtime": 1.0, "train_loss": 1.0, "step": 5}],
                             tmp_path / "curves.png")
    assert not list(tmp_path.iterdir())


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "minicpm_finetune.curves", *map(str, args)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)


def write_state(folder, log_history):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 200,
                                                           "log_history": log_history}))


@pytest.mark.slow
def test_cli_writes_png_from_top_level_state(tmp_path):
    write_state(tmp_path, synthetic_log())
    result = run_cli(tmp_path)
    png = tmp_path / "training_curves.png"
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(png)
    read_png(png)


@pytest.mark.slow
def test_cli_falls_back_to_the_highest_step_checkpoint(tmp_path):
    # checkpoint-100 sorts after checkpoint-1000 by name; the step number decides.
    write_state(tmp_path / "checkpoint-100", [{"loss": 1.0, "step": 100}])
    write_state(tmp_path / "checkpoint-1000", synthetic_log(with_metrics=True))
    result = run_cli(tmp_path)
    assert result.returncode == 0, result.stderr
    # The metrics in checkpoint-1000's log make a two-panel figure.
    height, width, _ = read_png(tmp_path / "training_curves.png").shape
    assert width > 2 * height


@pytest.mark.slow
@pytest.mark.parametrize("case", ["missing_folder", "no_state", "bad_json", "no_log_history"])
def test_cli_errors_are_one_line_with_exit_code_2(tmp_path, case):
    target = tmp_path / "run"
    if case == "no_state":
        target.mkdir()
    if case == "bad_json":
        target.mkdir()
        (target / "trainer_state.json").write_text("{not json")
    if case == "no_log_history":
        write_state(target, None)
    result = run_cli(target)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(target) in lines[0]
    assert not (target / "training_curves.png").exists()


def test_label_accuracy_and_dpo_rewards_are_plotted(tmp_path):
    """--eval_metrics accuracy joins the metrics panel; DPO's validation rewards get their own panel."""
    log = [
        {"loss": 0.69, "rewards/margins": 0.0, "step": 1},  # training rewards: not plotted (noisy per batch)
        {"eval_loss": 0.69, "eval_rewards/accuracies": 0.0, "eval_rewards/margins": 0.0,
         "eval_rewards/chosen": 0.0, "eval_rewards/rejected": 0.0, "eval_accuracy": 25.0, "step": 0},
        {"eval_loss": 0.4, "eval_rewards/accuracies": 1.0, "eval_rewards/margins": 0.5,
         "eval_rewards/chosen": 0.2, "eval_rewards/rejected": -0.3, "eval_accuracy": 75.0, "step": 8},
    ]
    series = curve_series(log)
    assert series["eval_accuracy"] == ([0, 8], [25.0, 75.0])
    assert series["eval_rewards/accuracies"] == ([0, 8], [0.0, 1.0])
    assert series["eval_rewards/margins"] == ([0, 8], [0.0, 0.5])
    assert series["eval_rewards/rejected"] == ([0, 8], [0.0, -0.3])
    assert "rewards/margins" not in series
    width = matplotlib.image.imread(plot_training_curves(log, tmp_path / "all.png")).shape[1]
    loss_only = matplotlib.image.imread(plot_training_curves(log[:1], tmp_path / "loss.png")).shape[1]
    assert round(width / loss_only) == 3  # loss, metrics and rewards panels side by side
