"""compute_metrics against values worked out by hand from the jieba segmentation."""

import math

import pytest

from minicpm_finetune.evaluation.metrics import compute_metrics, segment

KEYS = {"rouge-1", "rouge-2", "rouge-l", "bleu-4"}


def f1(p, r):
    return 2 * p * r / (p + r)


def bleu4(precisions, hyp_len, ref_len):
    """BLEU-4 by the formula; method3 smoothing replaces the k-th zero precision m/n by 1/(2^k n)."""
    logs, k = [], 0
    for num, den in precisions:
        if num == 0:
            k += 1
            logs.append(math.log(1 / (2**k * den)))
        else:
            logs.append(math.log(num / den))
    brevity = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return brevity * math.exp(sum(logs) / 4)


def approx(x):
    # Means are rounded to 4 decimals.
    return pytest.approx(x, abs=1e-4)


# Chinese pair: the prediction drops one word, so ROUGE recall and BLEU's brevity penalty bite.
ZH_PRED, ZH_REF = "我喜欢吃苹果", "我非常喜欢吃苹果"
ZH_EXPECTED = {
    # unigrams: all 4 predicted words are in the 5 reference words
    "rouge-1": 100 * f1(4 / 4, 4 / 5),
    # bigrams: {我喜欢, 喜欢吃, 吃苹果} vs {我非常, 非常喜欢, 喜欢吃, 吃苹果} share 2
    "rouge-2": 100 * f1(2 / 3, 2 / 4),
    # LCS: 我 喜欢 吃 苹果 (4 words)
    "rouge-l": 100 * f1(4 / 4, 4 / 5),
    # p1 4/4, p2 2/3, p3 1/2 (喜欢吃苹果), p4 0/1 -> 1/2; brevity exp(1 - 5/4)
    "bleu-4": 100 * bleu4([(4, 4), (2, 3), (1, 2), (0, 1)], 4, 5),
}

# English pair: "the" occurs twice. rouge-chinese counts distinct n-grams (sets), BLEU clips counts.
EN_PRED, EN_REF = "the cat sat on the mat", "the cat is on the mat"
EN_EXPECTED = {
    # distinct words {the, cat, sat, on, mat} vs {the, cat, is, on, mat}: 4 of 5 each side
    "rouge-1": 100 * f1(4 / 5, 4 / 5),
    # distinct bigrams: the-cat, on-the, the-mat shared, 5 on each side
    "rouge-2": 100 * f1(3 / 5, 3 / 5),
    # LCS: the cat on the mat (5 of 6 words each side)
    "rouge-l": 100 * f1(5 / 6, 5 / 6),
    # p1 5/6 (the x2 clipped to 2), p2 3/5, p3 1/4 (on the mat), p4 0/3 -> 1/6; same length
    "bleu-4": 100 * bleu4([(5, 6), (3, 5), (1, 4), (0, 3)], 6, 6),
}


def test_segmentation_behind_the_hand_computed_pairs():
    assert segment(ZH_PRED) == ["我", "喜欢", "吃", "苹果"]
    assert segment(ZH_REF) == ["我", "非常", "喜欢", "吃", "苹果"]
    # jieba's whitespace tokens between English words are dropped.
    assert segment(EN_PRED) == ["the", "cat", "sat", "on", "the", "mat"]
    assert segment(EN_REF) == ["the", "cat", "is", "on", "the", "mat"]
    assert segment(" \n ") == []


def test_exactly_four_keys():
    assert set(compute_metrics(["我喜欢吃苹果"], ["我喜欢吃苹果"])) == KEYS


@pytest.mark.parametrize(
    "text",
    ["这款连衣裙采用棉质面料，简约大方。", "the quick brown fox jumps over the lazy dog"],
)
def test_identical_text_scores_100(text):
    assert compute_metrics([text], [text]) == {key: 100.0 for key in KEYS}


def test_no_common_word_scores_0():
    assert segment("今天天气很好") == ["今天天气", "很", "好"]
    assert segment("明天下雨") == ["明天", "下雨"]
    assert compute_metrics(["今天天气很好"], ["明天下雨"]) == {key: 0.0 for key in KEYS}
    assert compute_metrics(["red green blue"], ["one two three"]) == {key: 0.0 for key in KEYS}


def test_chinese_partial_overlap_matches_hand_computation():
    scores = compute_metrics([ZH_PRED], [ZH_REF])
    assert scores == {key: approx(value) for key, value in ZH_EXPECTED.items()}
    # The numbers, written out: F1 8/9, 4/7, 8/9; BLEU (1/6)^(1/4) * e^(-1/4).
    assert scores["rouge-1"] == approx(88.8889)
    assert scores["rouge-2"] == approx(57.1429)
    assert scores["bleu-4"] == approx(49.7609)


def test_english_partial_overlap_matches_hand_computation():
    scores = compute_metrics([EN_PRED], [EN_REF])
    assert scores == {key: approx(value) for key, value in EN_EXPECTED.items()}
    assert scores["rouge-l"] == approx(83.3333)
    assert scores["bleu-4"] == approx(37.9918)


def test_mean_over_samples():
    predictions = [ZH_PRED, EN_PRED, "今天天气很好", "我喜欢吃苹果"]
    references = [ZH_REF, EN_REF, "明天下雨", "我喜欢吃苹果"]
    # The last pair is identical but only 4 words long: still 100 on every metric.
    per_sample = [ZH_EXPECTED, EN_EXPECTED, dict.fromkeys(KEYS, 0.0), dict.fromkeys(KEYS, 100.0)]
    expected = {key: sum(s[key] for s in per_sample) / 4 for key in KEYS}
    assert compute_metrics(predictions, references) == {k: approx(v) for k, v in expected.items()}


@pytest.mark.parametrize("prediction, reference",
                         [("", "我喜欢吃苹果"), ("我喜欢吃苹果", ""), (" \n\t", "abc def"), ("", "")])
def test_empty_side_scores_0_and_counts_in_the_mean(prediction, reference):
    assert compute_metrics([prediction], [reference]) == {key: 0.0 for key in KEYS}
    # Alongside an identical pair, the empty pair halves the mean.
    both = compute_metrics([prediction, ZH_REF], [reference, ZH_REF])
    assert both == {key: 50.0 for key in KEYS}


def test_empty_lists_give_zeros():
    assert compute_metrics([], []) == {key: 0.0 for key in KEYS}


def test_length_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="2 predictions and 1 references"):
        compute_metrics(["a", "b"], ["a"])
