"""Tests for metrics.py: BLEU checked against hand arithmetic, COCO metrics against COCOEvalCap itself,
attention-in-box against a brute-force pixel count.

The COCO tests start Java (METEOR alone takes ~8 s to load its paraphrase tables), so they are skipped
when Java is absent; everything else runs in well under a second.
"""

from __future__ import annotations

import gc
import math

import numpy as np
import pytest

import metrics
from metrics import (
    JavaNotFoundError,
    attention_in_box,
    box_area_share,
    coco_metrics,
    java_available,
    mean_attention_correctness,
    nltk_bleu,
)

needs_java = pytest.mark.skipif(
    not java_available(), reason="no `java` on PATH: pycocoevalcap's PTB tokenizer and METEOR need Java"
)


# --------------------------------------------------------------------------------------------- nltk BLEU
def _words(sentence: str) -> list[str]:
    return sentence.split()


def test_nltk_bleu_identical_hypothesis_scores_one() -> None:
    refs = [[["a", "cat", "sat", "on", "the", "mat"], ["a", "cat", "is", "sitting"]]]
    hyps = [["a", "cat", "sat", "on", "the", "mat"]]
    assert nltk_bleu(refs, hyps) == pytest.approx({f"BLEU-{n}": 1.0 for n in range(1, 5)})


def test_nltk_bleu_matches_hand_arithmetic_single_sentence() -> None:
    ref = _words("a cat sat on the mat today")  # r = 7
    hyp = _words("a cat sat on a mat")  # c = 6
    # Clipped matches: unigrams a(2 in hyp, 1 in ref -> 1) cat sat on mat = 5 of 6;
    # bigrams "a cat", "cat sat", "sat on" = 3 of 5; trigrams "a cat sat", "cat sat on" = 2 of 4;
    # 4-grams "a cat sat on" = 1 of 3. The hypothesis is shorter than the reference, so BP < 1.
    p1, p2, p3, p4 = 5 / 6, 3 / 5, 2 / 4, 1 / 3
    bp = math.exp(1 - 7 / 6)
    expected = {
        "BLEU-1": bp * p1,
        "BLEU-2": bp * (p1 * p2) ** (1 / 2),
        "BLEU-3": bp * (p1 * p2 * p3) ** (1 / 3),
        "BLEU-4": bp * (p1 * p2 * p3 * p4) ** (1 / 4),
    }
    assert nltk_bleu([[ref]], [hyp]) == pytest.approx(expected, rel=1e-12)


def test_nltk_bleu_is_corpus_level_not_a_mean_of_sentences() -> None:
    refs = [
        [_words("a cat sat on the mat today")],
        [_words("a dog runs"), _words("the brown dog is running")],
    ]
    hyps = [_words("a cat sat on a mat"), _words("a dog runs")]
    # Image 2 matches its first reference exactly: 3/3 unigrams, 2/2 bigrams, 1/1 trigram, and it has no
    # 4-gram at all -- which nltk counts as 0/1, not 0/0 (modified_precision's denominator is max(1, count)).
    # Its closest reference length is 3. Corpus BLEU adds the counts of both images before dividing:
    p1, p2, p3, p4 = (5 + 3) / (6 + 3), (3 + 2) / (5 + 2), (2 + 1) / (4 + 1), (1 + 0) / (3 + 1)
    c, r = 6 + 3, 7 + 3
    bp = math.exp(1 - r / c)
    expected = {
        "BLEU-1": bp * p1,
        "BLEU-2": bp * (p1 * p2) ** (1 / 2),
        "BLEU-3": bp * (p1 * p2 * p3) ** (1 / 3),
        "BLEU-4": bp * (p1 * p2 * p3 * p4) ** (1 / 4),
    }
    assert nltk_bleu(refs, hyps) == pytest.approx(expected, rel=1e-12)


def test_nltk_bleu_no_smoothing_zero_4gram_overlap_gives_zero() -> None:
    refs = [[_words("a cat sat on the mat")]]
    hyps = [["a", "cat", "on", "mat"]]  # bigram "a cat" matches, no trigram does
    scores = nltk_bleu(refs, hyps)
    assert scores["BLEU-2"] > 0.1
    assert scores["BLEU-3"] == pytest.approx(0.0, abs=1e-50)
    assert scores["BLEU-4"] == pytest.approx(0.0, abs=1e-50)
    assert nltk_bleu([[_words("x y")]], [["z"]]) == {f"BLEU-{n}": 0.0 for n in range(1, 5)}


@pytest.mark.parametrize(
    ("refs", "hyps", "message"),
    [
        ([], [], "empty"),
        ([[["a"]]], [["a"], ["b"]], "one list of references per hypothesis"),
        ([[]], [["a"]], "no reference"),
        ([["a cat"]], [["a", "cat"]], "not strings"),
        ([[["a", "cat"]]], ["a cat"], "not a string"),
    ],
)
def test_nltk_bleu_rejects_bad_input(refs: list, hyps: list, message: str) -> None:
    # A string where a word list belongs is a TypeError; wrong sizes are ValueErrors.
    with pytest.raises(TypeError if "string" in message else ValueError, match=message):
        nltk_bleu(refs, hyps)


# ------------------------------------------------------------------------------------------ COCO metrics
# CIDEr's IDF is computed over the test set itself, so it needs several images with different captions.
REFS: dict[int, list[str]] = {
    1: ["A cat sits on the mat.", "The cat is sitting on a red mat", "a small cat on a mat"],
    2: ["A dog runs in the park!", "A brown dog running on grass.", "the dog is running outside"],
    3: ["Two birds fly over the sea.", "Birds flying above the water", "two seagulls over the ocean"],
    4: ["A man rides a bicycle down the street.", "a person cycling on a road"],
}
MIXED_PREDICTIONS: dict[int, str] = {
    1: "a cat sitting on a mat",
    2: "A dog is running in a park.",
    3: "birds over the water",
    4: "a red car parked",
}
ALL_KEYS = {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"}


@needs_java
def test_coco_metrics_identical_captions_score_high_and_print_nothing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import pycocoevalcap.meteor.meteor as meteor_module

    started: list[meteor_module.Meteor] = []

    class RecordingMeteor(meteor_module.Meteor):
        def __init__(self) -> None:
            super().__init__()
            started.append(self)

    # coco_metrics imports Meteor from this module at call time, so it picks up the recording subclass.
    monkeypatch.setattr(meteor_module, "Meteor", RecordingMeteor)
    predictions = {key: refs[0] for key, refs in REFS.items()}
    scores = coco_metrics(REFS, predictions)

    assert set(scores) == ALL_KEYS
    assert all(isinstance(value, float) for value in scores.values())
    for n in range(1, 5):
        assert scores[f"BLEU-{n}"] == pytest.approx(1.0, abs=1e-6)
    assert scores["ROUGE-L"] == pytest.approx(1.0)
    assert scores["METEOR"] > 0.9
    assert scores["CIDEr"] > 1.0
    # BLEU's "{'testlen': ...}" and friends must not leak onto stdout.
    assert capsys.readouterr().out == ""
    # The METEOR JVM is stopped when the function returns, not whenever the garbage collector runs.
    assert len(started) == 1 and started[0].meteor_p.poll() is not None


@needs_java
def test_coco_metrics_disjoint_captions_score_zero_and_meteor_is_optional() -> None:
    predictions = {1: "purple elephants", 2: "quantum zebra", 3: "violin", 4: "xylophone concert"}
    scores = coco_metrics(REFS, predictions, use_meteor=False)
    assert set(scores) == ALL_KEYS - {"METEOR"}
    for key, value in scores.items():
        assert value == pytest.approx(0.0, abs=1e-6), key


@needs_java
def test_coco_metrics_equals_cocoevalcap(monkeypatch: pytest.MonkeyPatch) -> None:
    """Same numbers as the official COCOEvalCap driven by pycocotools COCO objects (SPICE stubbed out)."""
    import pycocoevalcap.eval as coco_eval
    from pycocotools.coco import COCO

    class NoSpice:  # the real one downloads Stanford CoreNLP
        def compute_score(self, gts: dict, res: dict) -> tuple[float, list[float]]:
            return 0.0, [0.0] * len(gts)

        def method(self) -> str:
            return "SPICE"

    monkeypatch.setattr(coco_eval, "Spice", NoSpice)
    coco = COCO()
    coco.dataset = {
        "images": [{"id": key} for key in REFS],
        "annotations": [
            {"id": n, "image_id": key, "caption": caption}
            for n, (key, caption) in enumerate(((k, c) for k, caps in REFS.items() for c in caps), start=1)
        ],
    }
    coco.createIndex()
    coco_res = coco.loadRes([{"image_id": key, "caption": cap} for key, cap in MIXED_PREDICTIONS.items()])
    official = coco_eval.COCOEvalCap(coco, coco_res)
    official.evaluate()

    ours = coco_metrics(REFS, MIXED_PREDICTIONS)
    renamed = {"Bleu_1": "BLEU-1", "Bleu_2": "BLEU-2", "Bleu_3": "BLEU-3", "Bleu_4": "BLEU-4"}
    renamed |= {"METEOR": "METEOR", "ROUGE_L": "ROUGE-L", "CIDEr": "CIDEr"}
    expected = {ours_key: float(official.eval[key]) for key, ours_key in renamed.items()}
    assert ours == pytest.approx(expected, rel=1e-9, abs=1e-12)
    # A meaningful mixed case: neither perfect nor zero.
    assert 0.1 < ours["BLEU-1"] < 1.0 and ours["CIDEr"] > 0.0 and 0.0 < ours["METEOR"] < 1.0


@needs_java
def test_coco_metrics_reports_a_dead_meteor_jvm_and_does_not_hang(monkeypatch: pytest.MonkeyPatch) -> None:
    import pycocoevalcap.meteor.meteor as meteor_module

    class DeadMeteor(meteor_module.Meteor):
        def __init__(self) -> None:
            super().__init__()
            self.meteor_p.kill()
            self.meteor_p.wait()

    monkeypatch.setattr(meteor_module, "Meteor", DeadMeteor)
    with pytest.raises(RuntimeError, match="METEOR's Java process failed"):
        coco_metrics(REFS, MIXED_PREDICTIONS)
    # compute_score died holding Meteor's lock; Meteor.__del__ takes that lock, so without the fresh lock
    # coco_metrics swaps in, this collection (or interpreter exit) would block forever.
    gc.collect()


def test_coco_metrics_rejects_mismatched_keys() -> None:
    # Runs without Java: the inputs are checked before Java is looked for.
    with pytest.raises(ValueError, match="1 image\\(s\\) without a prediction"):
        coco_metrics(REFS, {1: "a", 2: "b", 3: "c"})
    with pytest.raises(ValueError, match="1 prediction\\(s\\) for unknown images"):
        coco_metrics(REFS, {**MIXED_PREDICTIONS, 5: "extra"})
    with pytest.raises(TypeError, match="one caption string"):
        coco_metrics(REFS, {**MIXED_PREDICTIONS, 1: ["a cat"]})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="non-empty list"):
        coco_metrics({1: []}, {1: "a cat"})


def test_coco_metrics_without_java_raises_java_not_found(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics.shutil, "which", lambda name: None)
    assert not java_available()
    with pytest.raises(JavaNotFoundError, match="java is not on PATH") as info:
        coco_metrics(REFS, MIXED_PREDICTIONS)
    assert isinstance(info.value, RuntimeError)


# --------------------------------------------------------------------------------- attention correctness
def test_uniform_attention_gives_box_area_share_on_non_square_grid_and_image() -> None:
    alpha = np.full((7, 5), 1 / 35)  # 7 rows x 5 columns
    box, image_size = (10, 20, 63, 97), (100, 140)  # image is 100 wide, 140 high
    expected = (63 - 10) * (97 - 20) / (100 * 140)
    assert box_area_share(box, image_size) == pytest.approx(expected)
    assert attention_in_box(alpha, box, image_size) == pytest.approx(expected)


def test_all_mass_in_one_cell_inside_the_box_gives_one() -> None:
    # 4 rows x 3 columns over a 90 x 120 image: every cell is 30 x 30 px. Cell (row 1, col 2) spans
    # x in [60, 90) and y in [30, 60).
    alpha = np.zeros((4, 3))
    alpha[1, 2] = 1.0
    assert attention_in_box(alpha, (55, 25, 90, 70), (90, 120)) == pytest.approx(1.0)
    assert attention_in_box(alpha, (0, 0, 60, 120), (90, 120)) == pytest.approx(0.0)  # touches, x1 exclusive


def test_cell_half_inside_counts_half_its_mass() -> None:
    alpha = np.zeros((4, 3))
    alpha[1, 2] = 0.6  # cell x in [60, 90), y in [30, 60)
    alpha[3, 0] = 0.4  # cell x in [0, 30), y in [90, 120): outside the box below
    box = (60, 0, 75, 120)  # covers the left half of column 2
    assert attention_in_box(alpha, box, (90, 120)) == pytest.approx(0.6 * 0.5)
    # Unnormalised attention is treated as a share of its own total.
    assert attention_in_box(alpha * 3, box, (90, 120)) == pytest.approx(0.3)


def test_box_reaching_outside_the_image_is_clipped() -> None:
    alpha = np.full((2, 2), 0.25)
    assert box_area_share((-50, -50, 50, 200), (100, 100)) == pytest.approx(0.5)
    assert attention_in_box(alpha, (-50, -50, 50, 200), (100, 100)) == pytest.approx(0.5)


def test_attention_in_box_matches_brute_force_pixel_count() -> None:
    # A 3 x 4 grid over a 10 x 7 image has fractional cells (2.5 x 2.33 px). Scaling everything by 12 makes
    # every cell a whole number of pixels (30 x 28), so nearest-neighbour upsampling is then exact and the
    # box's mass can be counted pixel by pixel. The share is scale-invariant.
    rng = np.random.default_rng(0)
    alpha = rng.random((3, 4))
    alpha /= alpha.sum()
    width, height, scale = 10, 7, 12
    cell_h, cell_w = height * scale // 3, width * scale // 4
    pixels = np.repeat(np.repeat(alpha / (cell_h * cell_w), cell_h, axis=0), cell_w, axis=1)
    assert pixels.shape == (height * scale, width * scale) and pixels.sum() == pytest.approx(1.0)
    # Box corners on the 1/12 px lattice, so that they fall on whole pixels of the scaled image.
    boxes_in_twelfths = [(18, 3, 84, 66), (0, 0, 120, 84), (37, 35, 39, 79), (108, 72, 360, 360)]
    for twelfths in boxes_in_twelfths:
        box = tuple(v / scale for v in twelfths)
        x0, y0, x1, y1 = twelfths
        brute = pixels[y0:y1, x0:x1].sum()  # slicing clips the box to the image
        assert attention_in_box(alpha, box, (width, height)) == pytest.approx(brute, abs=1e-12), box


@pytest.mark.parametrize(
    ("alpha", "box", "image_size", "message"),
    [
        (np.full(4, 0.25), (0, 0, 1, 1), (10, 10), "2-D"),
        (np.zeros((2, 2)), (0, 0, 1, 1), (10, 10), "sums to 0"),
        (np.array([[1.0, -0.5], [0.25, 0.25]]), (0, 0, 1, 1), (10, 10), "non-negative"),
        (np.full((2, 2), 0.25), (5, 0, 1, 1), (10, 10), "x0 <= x1"),
        (np.full((2, 2), 0.25), (0, 0, 1, 1), (0, 10), "positive"),
    ],
)
def test_attention_in_box_rejects_bad_input(
    alpha: np.ndarray, box: tuple[float, ...], image_size: tuple[int, int], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        attention_in_box(alpha, box, image_size)


def test_mean_attention_correctness_averages_over_words() -> None:
    focused = np.zeros((4, 3))
    focused[1, 2] = 1.0
    uniform = np.full((4, 3), 1 / 12)
    box, image_size = (60, 30, 90, 60), (90, 120)  # exactly cell (1, 2): 1/12 of the image
    result = mean_attention_correctness([(focused, box, image_size), (uniform, box, image_size)])
    assert result == pytest.approx(
        {"attention_correctness": (1.0 + 1 / 12) / 2, "uniform_baseline": 1 / 12, "n_words": 2}
    )
    assert isinstance(result["n_words"], int)


def test_mean_attention_correctness_of_no_words_is_nan() -> None:
    result = mean_attention_correctness(iter([]))
    assert result["n_words"] == 0
    assert math.isnan(result["attention_correctness"]) and math.isnan(result["uniform_baseline"])
