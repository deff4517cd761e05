"""Generation metrics: ROUGE-1/2/L and BLEU-4 on jieba-segmented words, and accuracy for label tasks.

The ROUGE/BLEU recipe follows ChatGLM3's fine-tuning demo (also used by LLaMA-Factory), so numbers are
comparable with what those toolkits report for AdvertiseGen and similar data sets. Accuracy is the share
of replies equal to their reference once both are normalised (``normalise_label``): what a
classification task such as OCNLI is scored by.
"""

from __future__ import annotations

import unicodedata

METRIC_KEYS = ("rouge-1", "rouge-2", "rouge-l", "bleu-4")
METRIC_NAMES = ("rouge", "bleu", "accuracy")  # what --eval_metrics chooses from
DEFAULT_METRICS = ("rouge", "bleu")
# Trailing punctuation a label reply may carry ("entailment." / "蕴含。") without changing the label.
_TRAILING_PUNCTUATION = " \t\n.。!！?？,，;；:：\"'“”‘’"


def parse_metric_names(text: str) -> tuple[str, ...]:
    """``"rouge,bleu"`` -> ("rouge", "bleu"); ValueError for an unknown or empty list."""
    names = tuple(dict.fromkeys(name.strip().lower() for name in str(text).split(",") if name.strip()))
    unknown = [name for name in names if name not in METRIC_NAMES]
    if unknown or not names:
        problem = f"unknown metric {unknown[0]!r}" if unknown else "no metric given"
        raise ValueError(f"{problem}; choose from {', '.join(METRIC_NAMES)}")
    return names


def metric_keys(metrics=DEFAULT_METRICS) -> tuple[str, ...]:
    """The keys ``compute_metrics`` returns for ``metrics`` (names of METRIC_NAMES), e.g. ("rouge-1", ...)."""
    metrics = parse_metric_names(",".join(metrics))
    keys = tuple(key for key in METRIC_KEYS if ("bleu" if key == "bleu-4" else "rouge") in metrics)
    return keys + (("accuracy",) if "accuracy" in metrics else ())


def normalise_label(text: str) -> str:
    """NFKC (full-width letters and digits to ASCII), case folded, inner whitespace runs as one space,
    surrounding whitespace and trailing punctuation removed."""
    text = " ".join(unicodedata.normalize("NFKC", text).casefold().split())
    return text.rstrip(_TRAILING_PUNCTUATION).strip()


def accuracy(predictions: list[str], references: list[str]) -> float:
    """Percentage (x100, 4 decimals) of predictions equal to their reference after ``normalise_label``;
    0 for no pairs."""
    hits = sum(normalise_label(p) == normalise_label(r) for p, r in zip(predictions, references))
    return round(hits / max(len(predictions), 1) * 100, 4)

# Built on first use: importing nltk takes about a second and jieba loads its dictionary lazily.
_tools = None


def _get_tools():
    global _tools
    if _tools is None:
        import logging

        import jieba
        from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
        from rouge_chinese import Rouge

        # jieba logs "Building prefix dict ..." to stderr on first use; keep evaluation quiet.
        jieba.setLogLevel(logging.WARNING)
        jieba.initialize()
        _tools = {
            "cut": jieba.lcut,
            "rouge": Rouge(),
            "bleu": sentence_bleu,
            "smoothing": SmoothingFunction().method3,
        }
    return _tools


def segment(text: str) -> list[str]:
    """jieba words of `text`, without the whitespace tokens jieba emits between English words."""
    return [w for w in _get_tools()["cut"](text) if w.strip()]


def _score_pair(prediction: str, reference: str) -> dict[str, float]:
    """Scores of one pair, each in [0, 1]; 0 for all when either side has no word."""
    tools = _get_tools()
    hyp, ref = segment(prediction), segment(reference)
    # rouge-chinese raises on an empty hypothesis; an empty side can match nothing anyway.
    if not hyp or not ref:
        return dict.fromkeys(METRIC_KEYS, 0.0)
    rouge = tools["rouge"].get_scores(" ".join(hyp), " ".join(ref))[0]
    scores = {key: rouge[key]["f"] for key in ("rouge-1", "rouge-2", "rouge-l")}
    scores["bleu-4"] = tools["bleu"](
        [ref], hyp, weights=(0.25, 0.25, 0.25, 0.25), smoothing_function=tools["smoothing"]
    )
    return scores


def compute_metrics(predictions: list[str], references: list[str], metrics=DEFAULT_METRICS) -> dict:
    """Mean ROUGE-1/2/L F1 and BLEU-4 over prediction/reference pairs, each x 100; ``metrics`` (names of
    METRIC_NAMES) chooses among ``rouge`` (the three ROUGE keys), ``bleu`` (``bleu-4``) and ``accuracy``.

    Both sides are segmented into words with jieba (whitespace tokens dropped). ROUGE is
    rouge-chinese's ``Rouge().get_scores`` F1 on the words joined by spaces; BLEU-4 is nltk's
    ``sentence_bleu`` on the word lists with weights (0.25,) * 4 and ``SmoothingFunction().method3``.

    Scaling: all four values are scaled to [0, 100]. ChatGLM3's demo scales ROUGE by 100 but
    leaves BLEU-4 in [0, 1]; we scale both, as LLaMA-Factory does, so divide our BLEU-4 by 100
    to compare with ChatGLM3's. Means are rounded to 4 decimals (rouge-chinese's F1 adds 1e-8 to
    its denominator, so identical texts would otherwise give 99.999999).

    A pair whose prediction or reference is empty or whitespace-only scores 0 on every metric
    (it still counts in the mean). Texts of fewer than 2 words (ROUGE-2) or 4 words (BLEU-4)
    cannot reach 100 even when identical. Empty input lists give all zeros. With the default ``metrics``
    returns exactly the keys ``rouge-1``, ``rouge-2``, ``rouge-l``, ``bleu-4``; ``accuracy`` adds ``accuracy``.
    """
    if len(predictions) != len(references):
        raise ValueError(
            f"compute_metrics needs one reference per prediction, "
            f"got {len(predictions)} predictions and {len(references)} references"
        )
    metrics = parse_metric_names(",".join(metrics))
    keys = [key for key in metric_keys(metrics) if key != "accuracy"]
    result = {}
    if keys:  # segmenting is the slow part: only when ROUGE or BLEU is asked for
        totals = dict.fromkeys(METRIC_KEYS, 0.0)
        for prediction, reference in zip(predictions, references):
            for key, value in _score_pair(prediction, reference).items():
                totals[key] += value
        count = max(len(predictions), 1)
        result = {key: round(totals[key] / count * 100, 4) for key in keys}
    if "accuracy" in metrics:
        result["accuracy"] = accuracy(predictions, references)
    return result
