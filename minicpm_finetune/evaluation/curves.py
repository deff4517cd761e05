"""Training-curve PNG from a transformers ``Trainer.state.log_history``.

Usage: ``python -m minicpm_finetune.curves OUTPUT_DIR`` reads ``OUTPUT_DIR/trainer_state.json``
(or the latest ``checkpoint-*/trainer_state.json``) and writes ``OUTPUT_DIR/training_curves.png``.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from ..cli import FinetuneError, OneLineParser, atomic_path, command

LOSS_KEY = "loss"
EVAL_LOSS_KEY = "eval_loss"
# Generation metrics as compute_metrics names them, with the Trainer's "eval_" prefix.
METRIC_LABELS = {
    "eval_rouge-1": "ROUGE-1",
    "eval_rouge-2": "ROUGE-2",
    "eval_rouge-l": "ROUGE-L",
    "eval_bleu-4": "BLEU-4",
    "eval_accuracy": "accuracy",  # --eval_metrics accuracy (label tasks)
}
# DPO (--stage dpo): TRL's reward metrics on the validation set.
REWARD_LABELS = {
    "eval_rewards/margins": "margin (chosen - rejected)",
    "eval_rewards/chosen": "chosen reward",
    "eval_rewards/rejected": "rejected reward",
}
REWARD_ACCURACY_KEY = "eval_rewards/accuracies"
PNG_NAME = "training_curves.png"


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def curve_series(log_history: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """The points to plot, as {log key: (steps, values)}, in log order.

    Keys are ``loss`` (training), ``eval_loss``, each ``eval_rouge-*`` / ``eval_bleu-4`` / ``eval_accuracy``
    and, for DPO, each ``eval_rewards/*`` present. Skipped: entries without a numeric ``step``, the end-of-training
    summary (it carries ``train_runtime`` and an average ``train_loss``, not a point on the curve), and values
    that are not finite numbers (they cannot be drawn). Series without points are absent.
    """
    series: dict[str, tuple[list[int], list[float]]] = {}
    for entry in log_history:
        step = entry.get("step")
        if not _is_number(step) or "train_runtime" in entry:
            continue
        for key in (LOSS_KEY, EVAL_LOSS_KEY, *METRIC_LABELS, *REWARD_LABELS, REWARD_ACCURACY_KEY):
            value = entry.get(key)
            if _is_number(value):
                steps, values = series.setdefault(key, ([], []))
                steps.append(int(step))
                values.append(float(value))
    return series


def smooth(values: list[float]) -> list[float]:
    """Debiased exponential moving average (as TensorBoard draws it).

    The weight grows with the number of points (about 0.4 at 20, 0.8 at 100, 0.9 at 200+),
    so short runs stay close to the raw values and long noisy runs get a readable trend.
    """
    weight = 1.8 * (1 / (1 + math.exp(-0.05 * len(values))) - 0.5)
    smoothed, average = [], 0.0
    for i, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        # Dividing by (1 - weight^i) removes the pull towards the 0 the average starts from.
        smoothed.append(average / (1 - weight**i))
    return smoothed


def _draw_loss(ax, series) -> None:
    if LOSS_KEY in series:
        steps, values = series[LOSS_KEY]
        if len(values) < 3:  # too few points to smooth: draw the raw line in full
            ax.plot(steps, values, color="tab:blue", marker=".", linewidth=1.5, label="training loss")
        else:
            ax.plot(steps, values, color="tab:blue", alpha=0.3, linewidth=1, label="training loss")
            ax.plot(steps, smooth(values), color="tab:blue", linewidth=2,
                    label="training loss (smoothed)")
    if EVAL_LOSS_KEY in series:
        steps, values = series[EVAL_LOSS_KEY]
        best = min(range(len(values)), key=values.__getitem__)
        ax.plot(steps, values, color="tab:red", marker="o", markersize=5, linestyle="--",
                linewidth=1, label=f"validation loss (best {values[best]:.4g} @ step {steps[best]})")
    ax.set_title("Loss")
    ax.set_ylabel("loss")


def _draw_metrics(ax, series) -> None:
    for key, label in METRIC_LABELS.items():
        if key in series:
            steps, values = series[key]
            ax.plot(steps, values, marker="o", markersize=4, linewidth=1.5,
                    label=f"{label} (last {values[-1]:.2f})")
    ax.set_title("Validation generation metrics")
    ax.set_ylabel("score (x100)")
    ax.set_ylim(bottom=0)


def _draw_rewards(ax, series) -> None:
    for key, label in REWARD_LABELS.items():
        if key in series:
            steps, values = series[key]
            ax.plot(steps, values, marker="o", markersize=4, linewidth=1.5, label=f"{label} (last {values[-1]:.3g})")
    ax.axhline(0, color="gray", linewidth=0.8)
    ax.set_title("Validation rewards (DPO)")
    ax.set_ylabel("reward (beta x log-ratio)")
    if REWARD_ACCURACY_KEY in series:  # a share in [0, 1]: its own axis on the right
        steps, values = series[REWARD_ACCURACY_KEY]
        right = ax.twinx()
        right.plot(steps, values, color="black", linestyle="--", marker="s", markersize=4,
                   label=f"reward accuracy (last {values[-1]:.2f})")
        right.set_ylim(-0.02, 1.02)
        right.set_ylabel("reward accuracy")
        right.legend(loc="lower right", fontsize="small")


def plot_training_curves(log_history: list[dict], output_path) -> Path:
    """Write a PNG of the training curves and return its path.

    Left panel: training loss (raw, light) with a smoothed line, validation loss as markers.
    Then, only when the log has them: ROUGE-1/2/L, BLEU-4 and accuracy over steps; for DPO the
    validation rewards (margin, chosen, rejected) with the reward accuracy on a right axis. The file is
    written to a temporary name and renamed, so readers never see half a PNG.
    Raises ValueError when the log has nothing to plot.
    """
    # Figure + Agg canvas instead of pyplot: no display needed and no global backend switch.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    series = curve_series(log_history)
    if not series:
        raise ValueError("the log history has no training loss, validation loss or metric to plot")
    has_metrics = any(key in series for key in METRIC_LABELS)
    has_rewards = any(key in series for key in (*REWARD_LABELS, REWARD_ACCURACY_KEY))
    has_loss = LOSS_KEY in series or EVAL_LOSS_KEY in series

    panels = []
    if has_loss:
        panels.append(_draw_loss)
    if has_metrics:
        panels.append(_draw_metrics)
    if has_rewards:
        panels.append(_draw_rewards)
    fig = Figure(figsize=(6.5 * len(panels), 4.5), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    # Shared step axis, so a point on the right lines up with the loss at that step.
    axes = fig.subplots(1, len(panels), sharex=True, squeeze=False)[0]
    for ax, draw in zip(axes, panels):
        draw(ax, series)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", fontsize="small")
    low, high = axes[0].get_xlim()
    if high - low < 2:  # a single logged step: widen so the ticks stay whole steps
        axes[0].set_xlim((low + high) / 2 - 1, (low + high) / 2 + 1)

    output_path = Path(output_path)
    with atomic_path(output_path) as tmp_path:
        fig.savefig(tmp_path, format="png")
    return output_path


def find_trainer_state(output_dir: Path) -> Path:
    """``output_dir/trainer_state.json``, else the one in the highest-step ``checkpoint-N``."""
    top = output_dir / "trainer_state.json"
    if top.is_file():
        return top
    checkpoints = [
        path for path in output_dir.glob("checkpoint-*/trainer_state.json")
        if path.parent.name.removeprefix("checkpoint-").isdigit()
    ]
    if not checkpoints:
        raise FinetuneError(f"no trainer_state.json in {output_dir} or its checkpoint-*/ folders")
    # By step number, not name: checkpoint-1000 is newer than checkpoint-900.
    return max(checkpoints, key=lambda path: int(path.parent.name.removeprefix("checkpoint-")))


def read_log_history(output_dir: Path) -> tuple[Path, list[dict]]:
    """The trainer state file of a run folder (see find_trainer_state) and its log history; FinetuneError if none."""
    if not output_dir.is_dir():
        raise FinetuneError(f"{output_dir} is not a directory")
    state_path = find_trainer_state(output_dir)
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise FinetuneError(f"{state_path}: invalid JSON ({e})") from None
    except OSError as e:
        raise FinetuneError(f"{state_path}: cannot read ({e.strerror or e})") from None
    log_history = state.get("log_history") if isinstance(state, dict) else None
    if not isinstance(log_history, list) or not all(isinstance(x, dict) for x in log_history):
        raise FinetuneError(f"{state_path}: no log_history list of objects")
    return state_path, log_history


@command
def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(
        prog="python -m minicpm_finetune.curves",
        description=f"Plot the training curves of a run into OUTPUT_DIR/{PNG_NAME}.",
    )
    parser.add_argument("output_dir", type=Path, help="the training output folder")
    output_dir = parser.parse_args(argv).output_dir
    state_path, log_history = read_log_history(output_dir)
    try:
        png = plot_training_curves(log_history, output_dir / PNG_NAME)
    except ValueError as e:  # nothing to plot
        raise FinetuneError(f"{state_path}: {e}") from None
    print(png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
