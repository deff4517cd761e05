"""The result files of evaluation and inference: predictions (one JSON line per sample) and metrics (JSON)."""

from __future__ import annotations

import json

from ..cli import write_atomic


def save_predictions(path: str, samples: list[tuple[list[dict], str | None]], predictions: list[str]) -> None:
    """One JSON line per sample: {"input": prompt messages, "reference": str or null, "prediction": str}."""
    lines = [json.dumps({"input": prompt, "reference": reference, "prediction": prediction}, ensure_ascii=False)
             for (prompt, reference), prediction in zip(samples, predictions)]
    write_atomic(path, "".join(line + "\n" for line in lines))


def save_metrics(path: str, metrics: dict) -> None:
    write_atomic(path, json.dumps(metrics, indent=2, ensure_ascii=False) + "\n")
