"""Tests for metrics.py: BLEU checked against hand arithmetic, COCO metrics against COCOEvalCap itself,
attention-in-box against a brute-force pixel count.

The COCO tests start Java (METEOR alone takes ~8 s to load its paraphrase tables), so they are skipped
when Java is absent; everything else runs in well under a second.
"""

from __future__ import annotations

import gc
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from conftest import fake_java

import metrics
from metrics import (
    BLEU_WEIGHTS,
    COCO_FAMILIES,
    MEAN_OF_PER_IMAGE,
    CiderD,
    JavaNotFoundError,
    MetricError,
    attention_in_box,
    attention_in_boxes,
    bootstrap_interval,
    box_area_share,
    boxes_area_share,
    caption_words,
    chair,
    cider_d_corpus,
    coco_mentions,
    coco_metrics,
    image_truth,
    iter_coco_metrics,
    java_available,
    mean_attention_correctness,
    nltk_bleu,
    object_coverage,
    paired_bootstrap,
    paired_mean_difference,
    ptb_tokenize,
)
from metrics_data import COCO_SYNONYMS

REPO = Path(metrics.__file__).resolve().parent
COCO_DEV80 = REPO.parent / "shared" / "data" / "coco-dev80"

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
def test_bootstrapped_metrics_are_the_means_of_their_per_image_scores() -> None:
    """Bootstrap intervals resample per-image scores, so only scores that are their mean get one: ROUGE-L and
    CIDEr. METEOR pools its statistics over all segments (fix: its interval did not contain the METEOR)."""
    results = {r.family: r for r in iter_coco_metrics(REFS, MIXED_PREDICTIONS)}
    assert all(r.error is None for r in results.values())
    assert MEAN_OF_PER_IMAGE == {"ROUGE-L", "CIDEr"}
    for family in ("METEOR", "ROUGE-L", "CIDEr"):
        scores = results[family].per_image[family]
        assert len(scores) == len(REFS)
        if family in MEAN_OF_PER_IMAGE:
            assert np.mean(scores) == pytest.approx(results[family].scores[family], abs=1e-9)


@pytest.fixture(scope="module")
def mixed_scores() -> dict[str, float]:
    """coco_metrics(REFS, MIXED_PREDICTIONS), computed once (METEOR's JVM takes ~10 s to load)."""
    return coco_metrics(REFS, MIXED_PREDICTIONS)


@needs_java
def test_coco_metrics_equals_cocoevalcap(monkeypatch: pytest.MonkeyPatch, mixed_scores: dict[str, float]) -> None:
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

    ours = mixed_scores
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


def put_first_on_path(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")


@needs_java
def test_meteor_that_cannot_start_loses_no_other_metric(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mixed_scores: dict[str, float]
) -> None:
    """A real JVM that cannot set up its heap for METEOR (initial heap above METEOR's -Xmx2G): METEOR is
    reported in one line with Java's own reason; BLEU, ROUGE-L and CIDEr are computed and unchanged."""
    # -Xms before METEOR's own -Xmx2G: "Initial heap size set to a larger value than the maximum heap size"
    put_first_on_path(
        monkeypatch,
        fake_java(
            tmp_path / "bin", 'case " $* " in *" -jar "*) exec REAL_JAVA -Xms3G "$@";; esac\nexec REAL_JAVA "$@"\n'
        ),
    )
    families = {f.family: f for f in iter_coco_metrics(REFS, MIXED_PREDICTIONS)}
    assert list(families) == list(COCO_FAMILIES)
    meteor = families.pop("METEOR")
    assert meteor.scores == {} and meteor.error is not None
    assert "\n" not in meteor.error and "METEOR" in meteor.error
    assert "Initial heap size set to a larger value than the maximum heap size" in meteor.error
    for family in families.values():
        assert family.error is None, family.error
        for name, value in family.scores.items():
            assert value == pytest.approx(mixed_scores[name], rel=1e-12), name
    with pytest.raises(MetricError, match="METEOR"):  # the strict function raises instead
        coco_metrics(REFS, MIXED_PREDICTIONS)
    gc.collect()  # no Meteor.__del__ may block or complain


@needs_java
@pytest.mark.parametrize(
    ("script", "reason"),
    [
        ('echo "Error: could not create the Java Virtual Machine" >&2\nexit 1\n', "exit status 1: Error: could not"),
        # a real JVM that cannot set up its heap (it says so on stdout)
        ('exec REAL_JAVA -Xms3G -Xmx2G "$@"\n', "exit status 1: Initial heap size set to a larger value"),
    ],
    ids=["exits 1", "cannot allocate"],
)
def test_broken_java_fails_every_family_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str], script: str, reason: str
) -> None:
    """A ``java`` on PATH that fails: the PTB tokenizer's failure is every family's, in one line, and nothing
    raises or prints a traceback (not even Meteor.__del__ at garbage collection)."""
    put_first_on_path(monkeypatch, fake_java(tmp_path / "bin", script))
    assert java_available()
    families = list(iter_coco_metrics(REFS, MIXED_PREDICTIONS))
    assert [f.family for f in families] == list(COCO_FAMILIES)
    for family in families:
        assert family.scores == {} and family.error is not None
        assert "PTB tokenizer" in family.error and reason in family.error and "\n" not in family.error
    gc.collect()
    captured = capfd.readouterr()
    assert "Traceback" not in captured.err + captured.out and "Exception ignored" not in captured.err


@needs_java
def test_meteor_that_cannot_execute_is_one_line_without_a_destructor_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """Java starts for the tokenizer but not for METEOR (exec fails inside Meteor.__init__): one line, and
    the half-built Meteor's __del__ prints nothing ("Exception ignored in ... Meteor.__del__" before)."""
    import pycocoevalcap.meteor.meteor as meteor_module

    class Unstartable(meteor_module.Meteor):
        def __init__(self) -> None:
            raise FileNotFoundError(2, "No such file or directory", "java")

    monkeypatch.setattr(meteor_module, "Meteor", Unstartable)
    families = {f.family: f for f in iter_coco_metrics(REFS, MIXED_PREDICTIONS, use_meteor=True)}
    assert families["METEOR"].error.startswith("METEOR could not start Java")
    assert all(families[f].error is None for f in ("BLEU", "ROUGE-L", "CIDEr"))
    gc.collect()
    assert "Exception ignored" not in capfd.readouterr().err


@needs_java
def test_a_hung_meteor_is_stopped_and_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A METEOR JVM that never answers would block the evaluation forever: it is killed after the timeout
    (shortened here), reported in one line, and the other families are kept."""
    script = f'case " $* " in *" -jar "*) echo $$ > {tmp_path / "pid"}; exec sleep 300;; esac\nexec REAL_JAVA "$@"\n'
    put_first_on_path(monkeypatch, fake_java(tmp_path / "bin", script))
    monkeypatch.setattr(metrics, "_java_timeout", lambda n_lines: 2.0)
    start = time.monotonic()
    families = {f.family: f for f in iter_coco_metrics(REFS, MIXED_PREDICTIONS)}
    assert time.monotonic() - start < 60
    assert families["METEOR"].error == "METEOR's Java process gave no answer within 2 s and was stopped"
    assert all(families[f].error is None for f in ("BLEU", "ROUGE-L", "CIDEr"))
    with pytest.raises(ProcessLookupError):
        os.kill(int((tmp_path / "pid").read_text()), 0)


# Captions a caption file may well hold: accents, another script, punctuation only, separators METEOR uses,
# tabs, and line breaks that Java (not Python's split("\n")) treats as line ends.
ODD_CAPTIONS = {
    "cafe": ["A café, crème brûlée & jalapeño!", "the girl’s café"],
    "chinese": ["一只猫坐在垫子上。", "猫在垫子上"],
    "separator": ["a ||| b", "x\ty"],
    "empty": ["...", ""],
    "breaks": ["a dog\u2028runs on grass", "a dog\u2029runs\u0085fast\rnow", "two\x0bcats\x0csit"],
}


@needs_java
def test_ptb_tokenize_equals_pycocoevalcap_and_keeps_odd_captions_on_their_images() -> None:
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    plain = {key: caps for key, caps in ODD_CAPTIONS.items() if key != "breaks"} | {k: caps for k, caps in REFS.items()}
    theirs = PTBTokenizer().tokenize({k: [{"caption": c} for c in caps] for k, caps in plain.items()})
    assert ptb_tokenize(plain) == theirs
    ours = ptb_tokenize(ODD_CAPTIONS)
    assert ours["cafe"] == ["a café crème brûlée & jalapeño", "the girl 's café"]
    assert ours["chinese"] == [
        "一只猫坐在垫子上 。",
        "猫在垫子上",
    ]  # "。" is no PTB punctuation: kept, as by pycocoevalcap
    assert ours["empty"] == ["", ""]
    # pycocoevalcap replaces only "\n": these would add lines in Java and shift every later caption
    assert ours["breaks"] == ["a dog runs on grass", "a dog runs fast now", "two cats sit"]
    assert list(ours) == list(ODD_CAPTIONS)
    # a lone surrogate (JSON allows "\\ud800") would make pycocoevalcap's .encode() raise; here it becomes "?"
    assert ptb_tokenize({"x": ["a b\ud800c"]}) == {"x": ["a b?c"]}


@needs_java
def test_coco_metrics_score_non_ascii_captions_on_the_right_images() -> None:
    """Identical non-ASCII captions score 1 per image (METEOR and ROUGE-L), a wrong one 0: nothing shifted."""
    references = {key: caps for key, caps in ODD_CAPTIONS.items() if key != "empty"} | {"other": ["a red bus"]}
    predictions = {key: caps[0] for key, caps in references.items()} | {"other": "zebra"}
    families = {f.family: f for f in iter_coco_metrics(references, predictions)}
    assert all(f.error is None for f in families.values()), {k: f.error for k, f in families.items()}
    for name in ("METEOR", "ROUGE-L"):
        per_image = dict(zip(references, families[name].per_image[name]))
        assert per_image.pop("other") == pytest.approx(0.0), name
        assert all(v == pytest.approx(1.0, abs=1e-6) for v in per_image.values()), (name, per_image)


@needs_java
def test_coco_metrics_work_from_a_read_only_install(tmp_path: Path, mixed_scores: dict[str, float]) -> None:
    """pycocoevalcap bind-mounted read-only (a shared install, a container): same numbers, METEOR included.

    The mount lives in a private mount namespace (``unshare``), so other processes never see it; the shell
    unmounts it on exit in any case. Skipped where mounting is not allowed (not root, no CAP_SYS_ADMIN)."""
    from pycocoevalcap.tokenizer import ptbtokenizer

    package = Path(ptbtokenizer.__file__).resolve().parents[1]  # pycocoevalcap has no __init__.py
    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1) to make a private mount namespace")
    probe = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", f"mount --bind '{package}' '{package}'"],
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:
        pytest.skip(f"mounting is not allowed here: {probe.stderr.strip()}")
    script = tmp_path / "score.py"
    script.write_text(
        "import json, sys\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "import pathlib\n"
        "from metrics import coco_metrics\n"
        f"target = pathlib.Path({str(package)!r}) / 'tokenizer' / 'probe.tmp'\n"
        "try:\n"
        "    target.write_text('x')\n"
        "    read_only = False\n"
        "except OSError:\n"
        "    read_only = True\n"
        f"refs = {json.dumps({str(k): v for k, v in REFS.items()})}\n"
        f"preds = {json.dumps({str(k): v for k, v in MIXED_PREDICTIONS.items()})}\n"
        "print(json.dumps({'read_only': read_only, 'scores': coco_metrics(refs, preds)}))\n",
        encoding="utf-8",
    )
    before = sorted(p.relative_to(package) for p in package.rglob("*") if "__pycache__" not in p.parts)
    shell = (
        f"mount --bind '{package}' '{package}' && mount -o remount,bind,ro '{package}' || exit 99\n"
        f"trap \"umount '{package}'\" EXIT\n"
        f"'{sys.executable}' '{script}'\n"
    )
    run = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", shell], capture_output=True, text=True
    )
    if run.returncode == 99:
        pytest.skip(f"a read-only remount is not allowed here: {run.stderr.strip()}")
    assert run.returncode == 0, run.stderr
    answer = json.loads(run.stdout.strip().splitlines()[-1])
    assert answer["read_only"], "the package was writable inside the namespace: the test proves nothing"
    assert answer["scores"] == pytest.approx(mixed_scores, rel=1e-12)
    after = sorted(p.relative_to(package) for p in package.rglob("*") if "__pycache__" not in p.parts)
    assert after == before, "nothing may be left in the package folder"
    probe_file = package / "tokenizer" / "probe.tmp"
    assert not probe_file.exists()


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


def test_attention_in_boxes_of_one_box_equals_attention_in_box() -> None:
    rng = np.random.default_rng(1)
    alpha = rng.random((7, 5))
    for box, size in [((10, 20, 63, 97), (100, 140)), ((-5, 0, 30, 500), (90, 120)), ((0, 0, 90, 120), (90, 120))]:
        assert attention_in_boxes(alpha, [box], size) == pytest.approx(attention_in_box(alpha, box, size), abs=1e-12)
        assert boxes_area_share([box], size) == pytest.approx(box_area_share(box, size), abs=1e-12)


def test_attention_in_boxes_counts_overlapping_boxes_once_like_a_pixel_count() -> None:
    # 4 x 6 grid over a 12 x 8 image scaled by 10: cells are 20 x 20 px, so the pixel map is exact.
    rng = np.random.default_rng(2)
    alpha = rng.random((4, 6))
    boxes_px = [(5, 7, 61, 44), (30, 20, 95, 71), (30, 20, 40, 30), (100, 60, 200, 200)]  # overlapping, one clipped
    scale = 10
    pixels = np.repeat(np.repeat(alpha / alpha.sum() / 400, 20, axis=0), 20, axis=1)
    union = np.zeros_like(pixels, dtype=bool)
    for x0, y0, x1, y1 in boxes_px:
        union[y0:y1, x0:x1] = True
    boxes = [tuple(v / scale for v in b) for b in boxes_px]
    assert attention_in_boxes(alpha, boxes, (12, 8)) == pytest.approx(pixels[union].sum(), abs=1e-12)
    assert boxes_area_share(boxes, (12, 8)) == pytest.approx(union.mean(), abs=1e-12)
    with pytest.raises(ValueError, match="at least one box"):
        attention_in_boxes(alpha, [], (12, 8))


# ---------------------------------------------------------------------------------------------- CIDEr-D
def _random_corpus(seed: int, images: int, vocabulary: int = 25) -> tuple[list, list]:
    """References (1-6 per image, 0-12 words, repeats common) and one candidate per image, as word lists."""
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(vocabulary)]

    def sentence() -> list[str]:
        return [rng.choice(words) for _ in range(rng.randint(0, 12))]

    references = [[sentence() for _ in range(rng.randint(1, 6))] for _ in range(images)]
    candidates = [sentence() for _ in range(images)]
    candidates[0] = []  # an empty caption scores 0
    candidates[1] = list(references[1][0])  # a caption equal to one of its references
    candidates[2] = ["w0"]  # one word: no bigram, length 0 in the penalty
    return references, candidates


def _pycocoevalcap_cider(references: list, candidates: list) -> tuple[float, np.ndarray]:
    from pycocoevalcap.cider.cider import Cider

    gts = {i: [" ".join(r) for r in refs] for i, refs in enumerate(references)}
    res = {i: [" ".join(c)] for i, c in enumerate(candidates)}
    score, per_image = Cider().compute_score(gts, res)
    return float(score), np.asarray(per_image)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cider_d_corpus_equals_pycocoevalcap_cider(seed: int) -> None:
    references, candidates = _random_corpus(seed, images=60)
    expected, expected_per_image = _pycocoevalcap_cider(references, candidates)
    score, per_image = cider_d_corpus(references, candidates)
    assert score == pytest.approx(expected, abs=1e-6)
    np.testing.assert_allclose(per_image, expected_per_image, rtol=0, atol=1e-6)
    assert per_image[0] == 0.0 and per_image[1] > 0.0
    assert 0.0 < score < 10.0


def test_cider_d_with_fixed_document_frequencies_equals_pycocoevalcap() -> None:
    """Document frequencies from one corpus (the "training references"), candidates scored against other
    images' references: the same as pycocoevalcap's CiderScorer given those document frequencies and that
    corpus size (fixed on a scorer subclass), including n-grams the corpus never saw."""
    from pycocoevalcap.cider.cider_scorer import CiderScorer

    corpus, _ = _random_corpus(3, images=80)
    references, candidates = _random_corpus(4, images=30, vocabulary=30)  # words w25..w29: unseen in corpus

    document_frequency: dict[tuple, float] = defaultdict(float)
    for refs in corpus:
        for gram in {g for ref in refs for g in metrics._ngrams(ref, 4)}:
            document_frequency[tuple(gram)] += 1

    class FixedDocumentFrequency(CiderScorer):
        ref_len = property(lambda self: np.log(float(len(corpus))), lambda self, value: None)

        def compute_doc_freq(self) -> None:
            self.document_frequency = defaultdict(float, document_frequency)

    scorer = FixedDocumentFrequency(n=4, sigma=6.0)
    for refs, cand in zip(references, candidates):
        scorer += (" ".join(cand), [" ".join(r) for r in refs])
    scorer.compute_doc_freq()
    expected = np.asarray(scorer.compute_cider())
    ours = CiderD(corpus).scores(candidates, references)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-6)
    assert np.count_nonzero(expected) > 10


def test_cider_d_groups_samples_by_image_and_takes_word_ids() -> None:
    """Five samples per image scored with image_index equal each scored alone; integer tokens (word-map ids)
    score as the words they stand for."""
    references, candidates = _random_corpus(5, images=12)
    scorer = CiderD(references)
    samples = [candidates[(j + k) % 12] for j in range(12) for k in range(5)]
    image_index = np.repeat(np.arange(12), 5)
    grouped = scorer.scores(samples, references, image_index)
    one_by_one = [scorer.scores([s], [references[j]])[0] for s, j in zip(samples, image_index)]
    np.testing.assert_allclose(grouped, one_by_one, rtol=0, atol=1e-12)
    ids = {w: i for i, w in enumerate(sorted({w for refs in references for r in refs for w in r} | {"w0"}))}
    as_ids = CiderD([[[ids[w] for w in r] for r in refs] for refs in references])
    np.testing.assert_allclose(
        as_ids.scores(
            [[ids[w] for w in s] for s in samples],
            [[[ids[w] for w in r] for r in refs] for refs in references],
            image_index,
        ),
        grouped,
        rtol=0,
        atol=1e-12,
    )
    with pytest.raises(ValueError, match="no references"):
        scorer.scores([["w1"]], [[]])
    with pytest.raises(ValueError, match="image_index"):
        scorer.scores([["w1"]], references, [12])


def test_cider_d_speed_for_a_training_step() -> None:
    """320 sampled captions (5 for each of 64 images) against document frequencies of 6,000 images, as one
    SCST step on Flickr8k would ask; prints the time (ms per 320 captions)."""
    rng = random.Random(6)
    words = [f"w{i}" for i in range(2500)]
    zipf = [1 / (r + 1) for r in range(len(words))]

    def sentence() -> list[str]:
        return rng.choices(words, weights=zipf, k=rng.randint(8, 14))

    corpus = [[sentence() for _ in range(5)] for _ in range(6000)]
    scorer = CiderD(corpus)
    batch = corpus[:64]
    samples = [sentence() for _ in range(320)]
    image_index = np.repeat(np.arange(64), 5)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        scores = scorer.scores(samples, batch, image_index)
        times.append(time.perf_counter() - start)
    print(
        f"CiderD.scores: {1000 * min(times):.1f} ms per 320 captions (best of 5; median {1000 * np.median(times):.1f})"
    )
    assert scores.shape == (320,) and np.all(np.isfinite(scores))
    assert min(times) < 1.0, "far slower than expected: a training step must not wait on its reward"


# ------------------------------------------------------------------------------------------------- CHAIR
def test_chair_on_the_examples_of_the_issue() -> None:
    result = chair([caption_words("a man riding a motorcycle on a street")], [{"person", "motorcycle"}])
    assert (result["CHAIR-s"], result["CHAIR-i"], result["mentions"]) == (0.0, 0.0, 2)
    result = chair([caption_words("a dog and a cat on a couch")], [{"cat", "couch"}])
    assert result["CHAIR-i"] == pytest.approx(1 / 3) and result["CHAIR-s"] == 1.0
    assert result["per_image"] == [{"mentioned": ["dog", "cat", "couch"], "hallucinated": ["dog"]}]


def test_object_coverage_counts_captions_naming_something_that_is_there() -> None:
    captions = [
        "a dog and a cat on a couch",  # cat and couch true, dog not: covered (and a CHAIR-s caption)
        "a brown dog is sitting in the grass",  # only a hallucinated dog: not covered
        "a view of the sky",  # names nothing: not covered
        "a teddy bear on a bed",  # "teddy bear" is one object, not a bear: covered by the bed... and the bear
    ]
    truths = [{"cat", "couch"}, {"cup", "dining table"}, {"airplane"}, {"teddy bear"}]
    share, flags = object_coverage([caption_words(c) for c in captions], truths)
    assert flags == [True, False, False, True] and share == pytest.approx(0.5)
    assert math.isnan(object_coverage([], [])[0])
    with pytest.raises(ValueError, match="one truth set per caption"):
        object_coverage([["a", "dog"]], [])


def test_paired_mean_difference_of_per_image_flags() -> None:
    """B - A of a per-image mean with its paired interval: identical systems differ by exactly 0 on every
    draw; a system that gains on every image has an interval above 0; the interval is narrower than the
    difference of two independent marginal intervals would suggest."""
    a = [0, 1, 0, 1, 0, 0, 1, 0, 1, 0]
    same = paired_mean_difference(a, a, "coverage", resamples=300)
    assert (same.a, same.b, same.difference, same.low, same.high) == (0.4, 0.4, 0.0, 0.0, 0.0)
    better = paired_mean_difference(a, [1] * 10, "coverage", resamples=300, seed=3)
    assert better.difference == pytest.approx(0.6) and 0 < better.low <= 0.6 <= better.high <= 1
    assert better.metric == "coverage" and better.resamples == 300
    with pytest.raises(ValueError, match="one value per image"):
        paired_mean_difference([0, 1], [1])


def test_chair_counts_over_captions_and_mentions() -> None:
    captions = [
        "a man riding a motorcycle on a street",  # person, motorcycle: both true
        "a dog and a cat on a couch",  # dog hallucinated
        "two dogs play with a dog",  # dog twice, both true: every mention counts
        "a view of the sky",  # no object: counts for CHAIR-s, not CHAIR-i
        "a pizza next to a laptop and a teddy bear",  # pizza and teddy bear hallucinated
    ]
    truths = [{"person", "motorcycle"}, {"cat", "couch"}, {"dog"}, {"airplane"}, {"laptop", "bear"}]
    result = chair([caption_words(c) for c in captions], truths)
    # mentions 2 + 3 + 2 + 0 + 3 = 10, hallucinated 0 + 1 + 0 + 0 + 2 = 3; captions with one: 2 of 5
    assert (result["mentions"], result["hallucinated"], result["captions"]) == (10, 3, 5)
    assert result["CHAIR-i"] == pytest.approx(3 / 10) and result["CHAIR-s"] == pytest.approx(2 / 5)
    empty = chair([["a", "sky"]], [set()])
    assert math.isnan(empty["CHAIR-i"]) and empty["CHAIR-s"] == 0.0
    with pytest.raises(TypeError, match="list of words"):
        chair(["a dog"], [{"dog"}])


@pytest.mark.parametrize(
    ("caption", "expected"),
    [
        ("two hot dogs and a dog", ["hot dog", "dog"]),  # the compound first, then the animal
        ("a teddy bear next to a bear", ["teddy bear", "bear"]),
        ("a stop sign near two cell phones", ["stop sign", "cell phone"]),
        ("men, women and children on buses", ["person", "person", "person", "bus"]),  # plurals, irregular too
        ("knives, wine glasses and mice", ["knife", "wine glass", "mouse"]),
        ("a baby elephant and an adult giraffe", ["elephant", "giraffe"]),  # "baby" is no person here
        ("a passenger train on the train tracks", ["train"]),  # no passenger; tracks are no train
        ("a toilet with the seat up", ["toilet"]),  # the toilet's seat is no chair
        ("two toilets and their seats", ["toilet"]),
        ("a urinal beside a seat", ["toilet", "chair"]),  # only the word "toilet" makes a seat the toilet's
        ("a toilet seat next to a potty seat", ["toilet", "toilet"]),  # "toilet" is there: no seat counts
        ("a stove top oven in a kitchen", ["oven", "oven"]),  # the reference counts "stove" and "oven"
        ("two stove top ovens and a stove top", ["oven", "oven", "oven"]),
        ("a man on a seat", ["person", "chair"]),
        ("a glass of water by the plant under a light", []),  # ambiguous words name nothing
        ("a boy with a bow tie", ["person", "tie"]),
        ("A Skier's POLES; a Snowboarder", ["person", "person"]),  # case, punctuation, possessive
        ("the café has a sofa", ["couch"]),  # Unicode words do not break matching
    ],
)
def test_coco_mentions_follow_the_papers_rules(caption: str, expected: list[str]) -> None:
    assert [category for _, _, category in coco_mentions(caption_words(caption))] == expected


def test_mentions_locate_their_words() -> None:
    words = caption_words("a hot dog beside a dog")
    assert coco_mentions(words) == [(1, 3, "hot dog"), (5, 6, "dog")]
    assert coco_mentions(caption_words("a stove top oven")) == [(1, 2, "oven"), (3, 4, "oven")]


def test_chair_counts_a_stove_top_oven_twice_as_the_reference_does() -> None:
    result = chair([caption_words("a stove top oven")], [set()])
    assert (result["mentions"], result["hallucinated"], result["CHAIR-i"]) == (2, 2, 1.0)


def test_image_truth_adds_objects_named_by_references() -> None:
    truth = image_truth({"person": [(0, 0, 1, 1)]}, ["A man holding a frisbee.", "Someone with a Frisbee and a dog"])
    assert truth == {"person", "frisbee", "dog"}


def test_synonym_table_has_the_80_coco_categories() -> None:
    assert len(COCO_SYNONYMS) == 80
    words = [w for names in COCO_SYNONYMS.values() for w in names]
    assert len(words) == len(set(words)), "a word must name one category"
    for category in COCO_SYNONYMS:
        assert coco_mentions(category.split()) == [(0, len(category.split()), category)], category
    instances = COCO_DEV80 / "instances.json"
    if instances.is_file():  # the real names, where the data is present
        names = {c["name"] for c in json.loads(instances.read_text(encoding="utf-8"))["categories"]}
        assert names == set(COCO_SYNONYMS)


# --------------------------------------------------------------------------------------------- bootstrap
def test_bootstrap_interval_of_a_mean_covers_the_truth_with_the_expected_width() -> None:
    rng = np.random.default_rng(7)
    flags = (rng.random(400) < 0.3).astype(float)
    low, high = bootstrap_interval(flags, resamples=2000)
    assert low < flags.mean() < high
    assert low < 0.3 < high
    expected_width = 2 * 1.96 * math.sqrt(0.3 * 0.7 / 400)  # the normal approximation
    assert (high - low) == pytest.approx(expected_width, rel=0.2)
    assert bootstrap_interval(flags, resamples=2000) == (low, high), "seeded: repeatable"
    assert bootstrap_interval(np.full(50, 0.25)) == (0.25, 0.25)


def test_bootstrap_interval_of_a_ratio_of_sums() -> None:
    hallucinated = np.array([0, 1, 0, 2, 1, 0, 0, 3])
    mentions = np.array([2, 2, 1, 3, 1, 0, 2, 4])
    low, high = bootstrap_interval(hallucinated, mentions, resamples=3000)
    assert low < hallucinated.sum() / mentions.sum() < high
    # by hand: the same draws, ratio of sums per resample
    rng = np.random.default_rng(0)
    idx = rng.integers(0, 8, size=(256, 8))
    ratios = hallucinated[idx].sum(1) / mentions[idx].sum(1)
    assert np.percentile(ratios, 2.5) == pytest.approx(bootstrap_interval(hallucinated, mentions, resamples=256)[0])
    nan_low, nan_high = bootstrap_interval([0.0, 0.0], [0.0, 0.0])
    assert math.isnan(nan_low) and math.isnan(nan_high)
    assert all(math.isnan(v) for v in bootstrap_interval([]))


def _corpus(seed: int, n_images: int = 60) -> tuple[list, list]:
    """Random references (5 per image) and one caption per image drawn near them, over a small vocabulary."""
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(25)]
    refs = [[[rng.choice(vocab) for _ in range(rng.randint(6, 12))] for _ in range(5)] for _ in range(n_images)]
    hyps = [[w if rng.random() < 0.6 else rng.choice(vocab) for w in rng.choice(r)][: rng.randint(1, 12)] for r in refs]
    return refs, hyps


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bleu_from_summed_statistics_equals_nltk(seed: int) -> None:
    refs, hyps = _corpus(seed)
    hyps[0] = []  # an empty caption, and a corpus without 4-gram matches below
    sums = metrics._bleu_statistics(refs, hyps).sum(axis=0, keepdims=True)
    for name, weights in BLEU_WEIGHTS.items():
        assert metrics._bleu_from_sums(sums, weights)[0] == pytest.approx(nltk_bleu(refs, hyps)[name], rel=1e-12)
    no_4grams = [[h[0]] if h else [] for h in hyps]
    sums = metrics._bleu_statistics(refs, no_4grams).sum(axis=0, keepdims=True)
    assert metrics._bleu_from_sums(sums, BLEU_WEIGHTS["BLEU-4"])[0] == pytest.approx(
        nltk_bleu(refs, no_4grams)["BLEU-4"], abs=1e-300
    )
    nothing = [["zz"] for _ in hyps]  # no unigram match: nltk returns 0
    assert metrics._bleu_from_sums(metrics._bleu_statistics(refs, nothing).sum(0, keepdims=True), (1.0,))[0] == 0.0


def test_paired_bootstrap_of_identical_systems_is_exactly_zero() -> None:
    refs, hyps = _corpus(3)
    result = paired_bootstrap(refs, hyps, [list(h) for h in hyps], resamples=200)
    assert set(result) == {"BLEU-4", "CIDEr-D"}
    for metric, r in result.items():
        assert (r.difference, r.low, r.high) == (0.0, 0.0, 0.0), metric
        assert r.a == r.b and r.resamples == 200 and r.level == 0.95
    assert result["BLEU-4"].a == nltk_bleu(refs, hyps)["BLEU-4"]
    assert result["CIDEr-D"].a == cider_d_corpus(refs, hyps)[0]


def test_paired_bootstrap_of_a_system_better_on_every_image_lies_above_zero() -> None:
    refs, hyps = _corpus(4)
    better = [list(r[0]) for r in refs]  # a reference itself: better than the noisy caption on every image
    result = paired_bootstrap(refs, hyps, better, metrics=("BLEU-1", "BLEU-4", "CIDEr-D"), resamples=500)
    for metric, r in result.items():
        assert 0 < r.low <= r.difference <= r.high, metric
        assert r.difference == pytest.approx(r.b - r.a)
    worse = paired_bootstrap(refs, better, hyps, resamples=500)  # B - A: the order matters
    assert worse["CIDEr-D"].high < 0 and worse["CIDEr-D"].difference == -result["CIDEr-D"].difference


def test_paired_bootstrap_resamples_the_same_images_for_both_systems() -> None:
    """CIDEr-D is a mean over images, so the paired interval is the interval of the per-image differences with
    bootstrap_interval's own draws; it is much narrower than the two marginal intervals when the systems'
    per-image scores go together, which is why model comparisons need it."""
    refs, hyps = _corpus(5, n_images=80)
    rng = random.Random(0)
    edited = [[w if rng.random() < 0.9 else r[0][i % len(r[0])] for i, w in enumerate(h)] for h, r in zip(hyps, refs)]
    paired = paired_bootstrap(refs, hyps, edited, metrics=("CIDEr-D",), resamples=1000, seed=3)["CIDEr-D"]
    per_a, per_b = cider_d_corpus(refs, hyps)[1], cider_d_corpus(refs, edited)[1]
    assert (paired.low, paired.high) == pytest.approx(bootstrap_interval(per_b - per_a, resamples=1000, seed=3))
    low_a, high_a = bootstrap_interval(per_a, resamples=1000, seed=3)
    low_b, high_b = bootstrap_interval(per_b, resamples=1000, seed=3)
    assert paired.high - paired.low < 0.5 * min(high_a - low_a, high_b - low_b)
    assert paired_bootstrap(refs, hyps, edited, resamples=300, seed=3) == paired_bootstrap(
        refs, hyps, edited, resamples=300, seed=3
    ), "seeded: repeatable"


def test_paired_bootstrap_rejects_bad_input() -> None:
    refs, hyps = _corpus(6, n_images=4)
    with pytest.raises(ValueError, match="one caption per image"):
        paired_bootstrap(refs, hyps, hyps[:3])
    with pytest.raises(ValueError, match="unknown metric"):
        paired_bootstrap(refs, hyps, hyps, metrics=("METEOR",))
    with pytest.raises(ValueError, match="no reference"):
        paired_bootstrap([[], *refs[1:]], hyps, hyps)


def test_cider_d_is_the_same_float_in_every_process() -> None:
    """A resumed run must log the validation CIDEr of an uninterrupted one to the last bit: the document
    frequencies are numbered in the order n-grams appear, not in a set's order, which follows each process's
    string hashing (PYTHONHASHSEED)."""
    code = (
        "import random\nfrom metrics import cider_d_corpus\n"
        "rng = random.Random(0)\nwords = [f'w{i}' for i in range(40)]\n"
        "refs = [[rng.choices(words, k=9) for _ in range(5)] for _ in range(60)]\n"
        "cands = [rng.choices(words, k=8) for _ in range(60)]\n"
        "print(repr(cider_d_corpus(refs, cands)[1].tolist()))\n"
    )
    outputs = set()
    for seed in ("1", "2", "3"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        outputs.add(result.stdout)
    assert len(outputs) == 1, outputs
