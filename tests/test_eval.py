"""Tests for eval.py: the files it writes, its COCO metrics against COCOEvalCap run directly on those files,
its nltk BLEU against hand arithmetic, attention correctness, and the command line's one-line errors.

A tiny model is trained once per session on a 60-image synthetic set (tests/_tiny_model.py) and evaluated
once per module on the 6-image test split. The COCO comparison starts Java: METEOR alone needs ~10-20 s to
load its paraphrase tables, so the JVM for the direct COCOEvalCap run is started before eval.evaluate and
loads while evaluate works. Without Java those tests are skipped.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import torch
from _tiny_model import SPECIAL_TOKENS, one_torch_thread, started_cli, tiny_model
from conftest import fake_java
from nltk.translate.bleu_score import corpus_bleu

import decoding
import eval as cameye_eval
from checkpoint import load_captioner, load_checkpoint_file
from create_input_files import Options, create_input_files
from decoding import DecodeConfig, Decoded, beam_search, content_word_mask
from metrics import attention_in_box, java_available
from models import Preprocess
from utils import CamEyeError

REPO = Path(cameye_eval.__file__).resolve().parent
COCO_DEV80 = REPO.parent / "shared" / "data" / "coco-dev80"
SHIPPED = REPO / "checkpoints" / "flickr8k" / "cameye-flickr8k.pt"
needs_java = pytest.mark.skipif(
    not java_available(), reason="no `java` on PATH: pycocoevalcap's PTB tokenizer and METEOR need Java"
)
# eval.py's metric names -> COCOEvalCap's
COCO_NAMES = {
    "BLEU-1": "Bleu_1",
    "BLEU-2": "Bleu_2",
    "BLEU-3": "Bleu_3",
    "BLEU-4": "Bleu_4",
    "METEOR": "METEOR",
    "ROUGE-L": "ROUGE_L",
    "CIDEr": "CIDEr",
}


def strict_json(path: Path):
    """Parse ``path`` as standard JSON: NaN and Infinity, which Python's json accepts, are errors."""

    def reject(token: str):
        raise ValueError(f"{path.name} holds {token}, which is not JSON")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=reject)


def read_split(path: Path) -> SimpleNamespace:
    """The test split read with h5py alone: ids, file names, raw and tokenised references per image."""
    with h5py.File(path, "r") as f:
        text = {k: [s.decode() for s in f[k][:]] for k in ("image_ids", "filenames", "references_raw", "references")}
        offsets = f["reference_offsets"][:].tolist()
        images = f["images"][:]
    spans = list(zip(offsets[:-1], offsets[1:]))
    return SimpleNamespace(
        ids=[int(i) for i in text["image_ids"]],  # the synthetic ids are numbers, which eval keeps as COCO ids
        names=text["filenames"],
        raw=[text["references_raw"][a:b] for a, b in spans],
        tokens=[[r.split() for r in text["references"][a:b]] for a, b in spans],
        images=images,
    )


def stop_meteor(meteor) -> None:
    """End a pycocoevalcap Meteor's JVM now (its __del__ would do it whenever the collector runs)."""
    process = meteor.meteor_p
    for stream in (process.stdin, process.stdout, process.stderr):
        stream.close()
    process.kill()
    process.wait()


@contextlib.contextmanager
def path_first(folder: Path):
    """``folder`` first on this process's PATH inside the block (for fixtures that cannot use monkeypatch)."""
    before = os.environ["PATH"]
    os.environ["PATH"] = f"{folder}{os.pathsep}{before}"
    try:
        yield
    finally:
        os.environ["PATH"] = before


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    return tiny_model(tmp_path_factory)


@pytest.fixture(scope="module")
def eval_only(model: SimpleNamespace, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An evaluation-only set prepared with the tiny model's word map: every image in test, val.hdf5 empty."""
    folder = tmp_path_factory.mktemp("eval_only")
    source = _hand_json(folder, model.images, HAND_IMAGES)
    options = Options(
        out=folder / "prepared", image_size=64, workers=1, word_map=model.data / "word_map.json", split="test"
    )
    counts = create_input_files([source], None, options)
    assert counts["val"] == 0 and counts["test"] == len(HAND_IMAGES) + 1
    return options.out


@pytest.fixture(scope="module")
def split(model: SimpleNamespace) -> SimpleNamespace:
    return read_split(model.data / "test.hdf5")


@pytest.fixture(scope="module")
def evaluated(model: SimpleNamespace, cli_procs: dict, tmp_path_factory: pytest.TempPathFactory):
    """eval.evaluate on the synthetic test split (beam 3, two batches), with a METEOR JVM warming up beside it
    (and the command-line runs of ``cli_procs``)."""
    meteor = None
    if java_available():
        from pycocoevalcap.meteor.meteor import Meteor

        meteor = Meteor()  # starts its JVM now; test_coco_metrics_equal_cocoevalcap_on_the_written_files uses it
    out = tmp_path_factory.mktemp("eval_out")
    try:
        results = cameye_eval.evaluate(
            model.checkpoint,
            model.data,
            "test",
            out,
            decode=DecodeConfig(max_len=20),
            batch_size=4,  # 6 test images: two batches, so results are gathered across batches
            device="cpu",
            workers=0,
            coco=True,
        )
        yield SimpleNamespace(out=out, results=results, meteor=meteor)
    finally:
        if meteor is not None:
            stop_meteor(meteor)


# ------------------------------------------------------------------------------------- the written files
def test_evaluate_writes_predictions_references_and_metrics(
    evaluated: SimpleNamespace, split: SimpleNamespace, model: SimpleNamespace
) -> None:
    out = evaluated.out
    assert sorted(p.name for p in out.iterdir()) == [
        "metrics_test.json",
        "predictions_test.json",
        "references_test.json",
    ]

    # predictions: COCO results format, a list of {image_id: int, caption: str}, one per test image.
    predictions = strict_json(out / "predictions_test.json")
    assert isinstance(predictions, list)
    for p in predictions:
        assert isinstance(p["image_id"], int) and not isinstance(p["image_id"], bool)
        assert isinstance(p["caption"], str)
    counts = Counter(p["image_id"] for p in predictions)
    assert counts == Counter(split.ids), "every test image must appear exactly once in the predictions"
    assert len(predictions) == len(split.ids) == 6
    vocabulary = set(model.word_map) - SPECIAL_TOKENS
    for p in predictions:
        assert set(p["caption"].split()) <= vocabulary, p["caption"]
    # file_name is the image's file, not its id (eval.py used to write the id here)
    assert {p["image_id"]: p["file_name"] for p in predictions} == dict(zip(split.ids, split.names))

    # references: COCO caption annotations, every reference of every image, exactly as stored
    references = strict_json(out / "references_test.json")
    assert references["type"] == "captions"
    assert references["images"] == [{"id": i, "file_name": n} for i, n in zip(split.ids, split.names)]
    anns = references["annotations"]
    assert len({a["id"] for a in anns}) == len(anns), "annotation ids must be unique"
    for image_id, raw in zip(split.ids, split.raw):
        assert len(raw) == 5
        assert [a["caption"] for a in anns if a["image_id"] == image_id] == raw
    assert len(anns) == 5 * len(split.ids)

    # metrics: standard JSON (no NaN) with what was evaluated and how
    metrics = strict_json(out / "metrics_test.json")
    assert metrics["split"] == "test" and metrics["images"] == 6 and metrics["beam_size"] == 3
    assert metrics["checkpoint"] == str(model.checkpoint)
    assert set(metrics["nltk_corpus_bleu"]) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4"}
    assert all(0.0 <= v <= 1.0 for v in metrics["nltk_corpus_bleu"].values())
    if java_available():
        assert set(metrics["coco_caption_metrics"]) == set(COCO_NAMES)
    else:
        assert metrics["coco_caption_metrics_skipped"] == "no Java on this machine"
    assert metrics == json.loads(json.dumps(cameye_eval.json_safe(evaluated.results))), "the file must hold the results"


def test_predictions_belong_to_their_images(
    evaluated: SimpleNamespace, split: SimpleNamespace, model: SimpleNamespace
) -> None:
    """Decode each test image alone, straight from the HDF5 pixels: same caption under the same image id."""
    encoder, decoder, word_map, cfg = load_captioner(model.checkpoint, "cpu")
    rev = {i: w for w, i in word_map.items()}
    preprocess = Preprocess(cfg.backbone, cfg.input_size)
    written = {p["image_id"]: p["caption"] for p in strict_json(evaluated.out / "predictions_test.json")}
    with torch.no_grad():
        for image_id, image in zip(split.ids, split.images):
            feats = encoder(preprocess(torch.from_numpy(image)).unsqueeze(0))
            (decoded,) = beam_search(decoder, feats, DecodeConfig(max_len=20), content_word_mask(word_map))
            assert written[image_id] == " ".join(rev[t] for t in decoded.tokens), f"image {image_id}"


def test_nltk_bleu_equals_corpus_bleu_on_the_written_predictions(
    evaluated: SimpleNamespace, split: SimpleNamespace
) -> None:
    """eval's nltk numbers are nltk's corpus_bleu of the predictions file against the HDF5's tokenised references."""
    written = {p["image_id"]: p["caption"].split() for p in strict_json(evaluated.out / "predictions_test.json")}
    hyps = [written[i] for i in split.ids]
    weights = [(1.0,), (0.5, 0.5), (1 / 3, 1 / 3, 1 / 3), (0.25, 0.25, 0.25, 0.25)]
    expected = corpus_bleu(split.tokens, hyps, weights=weights)
    got = evaluated.results["nltk_corpus_bleu"]
    for n, value in enumerate(expected, 1):
        assert math.isclose(got[f"BLEU-{n}"], value, rel_tol=1e-12, abs_tol=0.0), f"BLEU-{n}"


class _NoSpice:
    """Stands in for SPICE in COCOEvalCap.evaluate's scorer list (SPICE downloads Stanford CoreNLP)."""

    def method(self) -> str:
        return "SPICE"

    def compute_score(self, gts, res):
        return 0.0, [0.0] * len(gts)


@needs_java
def test_coco_metrics_equal_cocoevalcap_on_the_written_files(
    evaluated: SimpleNamespace, split: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    """BLEU-1..4, METEOR, ROUGE-L and CIDEr from eval.py equal the official COCOEvalCap, run on eval's
    predictions file against references built independently from the HDF5 file (all 5 per image)."""
    from pycocoevalcap import eval as coco_eval
    from pycocotools.coco import COCO

    annotations = [{"image_id": i, "caption": c} for i, raw in zip(split.ids, split.raw) for c in raw]
    for n, ann in enumerate(annotations, 1):
        ann["id"] = n
    gts = COCO()
    gts.dataset = {
        "info": {},
        "licenses": [],
        "type": "captions",
        "images": [{"id": i} for i in split.ids],
        "annotations": annotations,
    }
    gts.createIndex()
    assert all(len(gts.imgToAnns[i]) == 5 for i in split.ids), "every image has its 5 references"
    res = gts.loadRes(str(evaluated.out / "predictions_test.json"))

    monkeypatch.setattr(coco_eval, "Spice", _NoSpice)
    monkeypatch.setattr(coco_eval, "Meteor", lambda: evaluated.meteor)  # the JVM started by the fixture
    official = coco_eval.COCOEvalCap(gts, res)
    official.evaluate()
    assert sorted(official.params["image_id"]) == sorted(split.ids)

    ours = strict_json(evaluated.out / "metrics_test.json")["coco_caption_metrics"]
    assert set(ours) == set(COCO_NAMES)
    for name, coco_name in COCO_NAMES.items():
        assert math.isclose(ours[name], official.eval[coco_name], rel_tol=1e-9, abs_tol=0.0), (
            f"{name}: eval.py {ours[name]!r} vs COCOEvalCap {official.eval[coco_name]!r}"
        )


def test_attention_correctness_on_synthetic_data(evaluated: SimpleNamespace) -> None:
    a = strict_json(evaluated.out / "metrics_test.json")["attention_correctness"]
    assert set(a) == {"attention_correctness", "uniform_baseline", "n_words"}
    assert isinstance(a["n_words"], int) and a["n_words"] >= 0
    # The tiny model is trained to name objects (see _tiny_model.py); without object words there is nothing
    # to check here, and the NaN case is covered by test_metrics_file_is_standard_json_without_object_words.
    assert a["n_words"] > 0, "the tiny model named no object in the test split"
    assert 0.0 <= a["attention_correctness"] <= 1.0
    assert 0.0 < a["uniform_baseline"] <= 1.0


# --------------------------------------------------------------------------- hand-checked BLEU and boxes
# Three test images with hand-written references, the caption the (faked) decoder "generates" for each, the
# objects in the image (64 x 64) and the attention grid cell (of 2 x 2) every step looks at (None: uniform).
HAND_IMAGES = [
    {
        "refs": ["a red circle above a blue square", "a red circle"],
        "hyp": "a red circle above a square",
        "objects": [{"shape": "circle", "colour": "red", "size": "small", "box": [0, 0, 32, 32]}],
        "cell": 0,  # top left: exactly the circle's box
    },
    {
        "refs": ["a green star to the left of a white triangle", "there is a green star"],
        "hyp": "a green star to the right of a triangle",
        "objects": [{"shape": "star", "colour": "green", "size": "large", "box": [0, 0, 64, 32]}],
        "cell": None,  # uniform attention: half of it on the star's box (the top half)
    },
    {
        "refs": ["a blue circle above", "blue circle"],
        "hyp": "a blue circle",
        "objects": [{"shape": "circle", "colour": "blue", "size": "small", "box": [32, 32, 64, 64]}],
        "cell": 0,  # top left, while the circle is bottom right
    },
]


def _hand_json(folder: Path, images: Path, entries: list[dict]) -> Path:
    """A Karpathy-format JSON: one training image plus ``entries`` as the test split (ids 10, 11, ...)."""
    records = [
        {
            "filepath": str(images),
            "filename": "000000.png",
            "imgid": 0,
            "split": "train",
            "sentences": [{"tokens": ["a", "red", "circle"], "raw": "A red circle."}],
            "objects": [],
            "width": 64,
            "height": 64,
        }
    ]
    for k, entry in enumerate(entries):
        records.append(
            {
                "filepath": str(images),
                "filename": f"{k + 1:06d}.png",
                "imgid": 10 + k,
                "split": "test",
                "sentences": [{"tokens": r.split(), "raw": r[0].upper() + r[1:] + "."} for r in entry["refs"]],
                "objects": entry["objects"],
                "width": 64,
                "height": 64,
            }
        )
    path = folder / "dataset_hand.json"
    path.write_text(json.dumps({"dataset": "hand", "images": records}), encoding="utf-8")
    return path


def _evaluate_with_fake_decoder(model, folder: Path, entries: list[dict], monkeypatch) -> dict:
    """Prepare ``entries`` and run eval.evaluate with beam search replaced by the entries' "hyp" captions."""
    source = _hand_json(folder, model.images, entries)
    create_input_files([source], None, Options(out=folder / "prepared", min_word_freq=1, image_size=64, workers=1))
    queue = list(entries)

    def fake_beam_search(decoder, encoder_out, cfg, content_words=None, word_bonus=None):
        decoded = []
        for _ in range(encoder_out.shape[0]):
            entry = queue.pop(0)
            words = entry["hyp"].split()
            alphas = torch.full((len(words), 4), 0.25)
            if entry["cell"] is not None:
                alphas = torch.zeros(len(words), 4)
                alphas[:, entry["cell"]] = 1.0
            decoded.append(Decoded([model.word_map[w] for w in words], 0.0, alphas))
        return decoded

    monkeypatch.setattr(decoding, "beam_search", fake_beam_search)
    own_words = DecodeConfig(ground="off")  # the fake decoder stands for the decoder's own beam search
    results = cameye_eval.evaluate(
        model.checkpoint, folder / "prepared", "test", folder / "out", own_words, batch_size=2, device="cpu",
        workers=0, coco=False,
    )  # fmt: skip
    assert not queue, "every test image was decoded once"
    written = {p["image_id"]: p["caption"] for p in strict_json(folder / "out" / "predictions_test.json")}
    assert written == {10 + k: e["hyp"] for k, e in enumerate(entries)}
    return results


def test_nltk_bleu_and_attention_correctness_match_hand_arithmetic(
    model: SimpleNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    results = _evaluate_with_fake_decoder(model, tmp_path, HAND_IMAGES, monkeypatch)

    # Clipped n-gram matches / hypothesis n-grams, per image (counts clip at the most any one reference has):
    #  A "a red circle above a square" (c=6) vs "a red circle above a blue square" (7), "a red circle" (3):
    #    1-grams a a red circle above square: 6/6 ("a" twice, twice in the first reference)
    #    2-grams a-red red-circle circle-above above-a | a-square: 4/5
    #    3-grams a-red-circle red-circle-above circle-above-a | above-a-square: 3/4
    #    4-grams a-red-circle-above red-circle-above-a | circle-above-a-square: 2/3
    #    closest reference length: 7 (|7-6| = 1 < |3-6| = 3)
    #  B "a green star to the right of a triangle" (c=9) vs "a green star to the left of a white triangle" (10),
    #    "there is a green star" (5):
    #    1-grams: all but "right": 8/9 ("a" twice, twice in the first reference)
    #    2-grams a-green green-star star-to to-the of-a | the-right right-of a-triangle: 5/8
    #    3-grams a-green-star green-star-to star-to-the | 4 with right or a-triangle: 3/7
    #    4-grams a-green-star-to green-star-to-the | 4 others: 2/6
    #    closest reference length: 10
    #  C "a blue circle" (c=3) vs "a blue circle above" (4), "blue circle" (2):
    #    1-grams 3/3, 2-grams 2/2, 3-grams 1/1; no 4-gram, which nltk counts as 0/1 (its denominator is
    #    max(1, number of hypothesis n-grams))
    #    closest reference length: 4 and 2 are both 1 away; the tie goes to the shorter, 2
    # Corpus BLEU adds numerators and denominators over the images before dividing:
    p1 = (6 + 8 + 3) / (6 + 9 + 3)  # 17/18
    p2 = (4 + 5 + 2) / (5 + 8 + 2)  # 11/15
    p3 = (3 + 3 + 1) / (4 + 7 + 1)  # 7/12
    p4 = (2 + 2 + 0) / (3 + 6 + 1)  # 4/10
    c, r = 6 + 9 + 3, 7 + 10 + 2  # 18 < 19: brevity penalty exp(1 - r/c)
    bp = math.exp(1 - r / c)
    expected = {
        "BLEU-1": bp * p1,
        "BLEU-2": bp * (p1 * p2) ** (1 / 2),
        "BLEU-3": bp * (p1 * p2 * p3) ** (1 / 3),
        "BLEU-4": bp * (p1 * p2 * p3 * p4) ** (1 / 4),
    }
    got = results["nltk_corpus_bleu"]
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert math.isclose(got[name], value, rel_tol=1e-12), f"{name}: {got[name]!r} vs hand {value!r}"

    # Attention correctness: the object words are "red circle" (A), "green star" (B), "blue circle" (C);
    # A's "square" names no object of A, and no size word matches. Share of attention inside the box:
    #   A: all on the top-left cell = the circle's box: 1, 1;  B: uniform, box = top half: 1/2, 1/2;
    #   C: all on the top-left cell, box = bottom-right cell: 0, 0.  Mean (1+1+.5+.5+0+0)/6 = 1/2.
    # Uniform baseline = box area / image area: A 1/4, 1/4; B 1/2, 1/2; C 1/4, 1/4. Mean 2/6 = 1/3.
    a = results["attention_correctness"]
    assert a["n_words"] == 6
    assert a["attention_correctness"] == pytest.approx(0.5, abs=1e-12)
    assert a["uniform_baseline"] == pytest.approx(1 / 3, abs=1e-12)


def test_metrics_file_is_standard_json_without_object_words(
    model: SimpleNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No object word -> attention correctness is NaN in memory, null in the file (NaN is not JSON)."""
    entries = [dict(HAND_IMAGES[0], hyp="a purple star"), dict(HAND_IMAGES[1], hyp="a picture of a square")]
    results = _evaluate_with_fake_decoder(model, tmp_path, entries, monkeypatch)
    a = results["attention_correctness"]
    assert a["n_words"] == 0 and math.isnan(a["attention_correctness"]) and math.isnan(a["uniform_baseline"])
    written = strict_json(tmp_path / "out" / "metrics_test.json")["attention_correctness"]
    assert written == {"attention_correctness": None, "uniform_baseline": None, "n_words": 0}
    assert "nan" in cameye_eval.format_results(results)


# ------------------------------------------------------------------------------------ object_word_records
def _one_hot(grid: int, cells: list[tuple[int, int]]) -> torch.Tensor:
    """One attention row per step, all mass on that step's (row, col) cell of a grid x grid map."""
    alphas = torch.zeros(len(cells), grid * grid)
    for t, (row, col) in enumerate(cells):
        alphas[t, row * grid + col] = 1.0
    return alphas


def test_object_word_records_links_each_object_word_to_its_box() -> None:
    circle = {"shape": "circle", "colour": "red", "size": "small", "box": [16, 16, 48, 48]}
    star = {"shape": "star", "colour": "green", "size": "large", "box": [48, 0, 96, 64]}
    objects = {"objects": [circle, star], "width": 96, "height": 64}
    # a 4 x 4 grid over 96 x 64 px: cells are 24 px wide, 16 px high; (1, 1) is x 24-48, y 16-32: inside the
    # circle's box. Every step looks at a different cell, so each record's grid shows which step it is.
    tokens = ["a", "small", "red", "circle", "and", "a", "blue", "square"]
    alphas = _one_hot(4, [(0, 0), (1, 1), (2, 1), (1, 0), (3, 3), (3, 2), (0, 3), (0, 2)])
    records = list(cameye_eval.object_word_records(tokens, alphas, objects))

    # "small", "red", "circle" name the circle (steps 1-3); the hallucinated "blue square" gives nothing
    assert len(records) == 3
    for (grid, box, size), step in zip(records, (1, 2, 3)):
        np.testing.assert_array_equal(grid, alphas[step].reshape(4, 4).numpy())
        assert box == circle["box"] and size == (96, 64)
    assert attention_in_box(*records[0]) == 1.0  # all mass in cell (1, 1), inside the box

    # Two real objects: each phrase gets its own object's box; a size word that is not the object's
    # ("small" star) is not linked, but colour and shape are.
    tokens = ["a", "large", "red", "circle", "and", "a", "small", "green", "star"]
    records = list(cameye_eval.object_word_records(tokens, _one_hot(4, [(0, 0)] * 9), objects))
    assert [r[1] for r in records] == [circle["box"]] * 2 + [star["box"]] * 2


@pytest.mark.parametrize(
    "tokens",
    [["a", "blue", "square"], ["a", "green", "circle"], ["circle"], ["a", "small", "circle"], []],
    ids=["hallucinated", "wrong colour", "bare shape first", "no colour", "empty"],
)
def test_object_word_records_ignores_words_naming_no_object(tokens: list[str]) -> None:
    objects = {
        "objects": [{"shape": "circle", "colour": "red", "size": "small", "box": [0, 0, 32, 32]}],
        "width": 64,
        "height": 64,
    }
    alphas = torch.full((len(tokens), 4), 0.25)
    assert list(cameye_eval.object_word_records(tokens, alphas, objects)) == []


# ------------------------------------------------------------------------------------------- command line
@pytest.fixture(scope="module")
def cli_procs(model: SimpleNamespace, eval_only: Path, tmp_path_factory: pytest.TempPathFactory):
    """``python eval.py`` with --help and two bad inputs, started side by side before eval.evaluate runs (the
    ``evaluated`` fixture asks for them first), since each subprocess spends seconds importing torch."""
    tmp = tmp_path_factory.mktemp("eval_cli")
    common = ["--out", str(tmp / "out"), "--workers", "0"]
    commands = {
        "help": ["--help"],
        "missing checkpoint": ["--checkpoint", str(tmp / "missing.pt"), "--data", str(model.data), *common],
        "missing data": ["--checkpoint", str(model.checkpoint), "--data", str(tmp / "no_such_folder"), *common],
        "empty split": ["--checkpoint", str(model.checkpoint), "--data", str(eval_only), "--split", "val", *common],
    }
    # a `java` that exits 1 (pycocoevalcap's tokenizer and METEOR both run it); eval must still write everything
    broken = fake_java(tmp / "bin", 'echo "Error: Could not create the Java Virtual Machine." >&2\nexit 1\n')
    broken_out = tmp / "broken_java_out"
    broken_command = {
        "broken java": ["--checkpoint", str(model.checkpoint), "--data", str(model.data), "--max-len", "20"]
        + ["--out", str(broken_out), "--workers", "0"]
    }
    with contextlib.ExitStack() as stack:
        procs = stack.enter_context(started_cli("eval.py", commands, tmp))
        with path_first(broken):  # started_cli copies the environment as it starts the processes
            procs |= stack.enter_context(started_cli("eval.py", broken_command, tmp))
        procs["broken java"].out = broken_out
        yield procs


@pytest.fixture(scope="module")
def cli_runs(cli_procs: dict) -> dict:
    runs = {}
    for name, proc in cli_procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        runs[name] = SimpleNamespace(
            returncode=proc.returncode, stdout=stdout, stderr=stderr, out=getattr(proc, "out", None)
        )
    return runs


def test_cli_help_exits_zero(cli_runs: dict) -> None:
    run = cli_runs["help"]
    assert run.returncode == 0, run.stderr
    assert "usage:" in run.stdout and "--checkpoint" in run.stdout and "--data" in run.stdout
    assert run.stderr == ""


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing checkpoint", "error: checkpoint not found: "),
        ("missing data", "error: "),
    ],
)
def test_cli_bad_input_is_one_error_line_and_exit_2(cli_runs: dict, case: str, message: str) -> None:
    run = cli_runs[case]
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr + run.stdout
    lines = [line for line in run.stderr.splitlines() if not line.startswith("note: no Java")]
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith(message)
    culprit = "missing.pt" if case == "missing checkpoint" else "no_such_folder/test.hdf5"
    assert culprit in lines[0] and "not found" in lines[0], "the message names what is missing"
    assert run.stdout == ""


def test_cli_refuses_an_empty_split_in_one_line(cli_runs: dict, eval_only: Path) -> None:
    run = cli_runs["empty split"]
    assert run.returncode == 2, run.stderr
    lines = [line for line in run.stderr.splitlines() if not line.startswith("note: no Java")]
    assert lines == [lines[0]] and lines[0].startswith("error: val.hdf5 has no images: ")
    assert str(eval_only / "val.hdf5") in lines[0] and "Traceback" not in run.stderr
    assert run.stdout == ""


@needs_java
def test_cli_with_a_broken_java_writes_everything_and_exits_3(cli_runs: dict, model: SimpleNamespace) -> None:
    """`java` on PATH exits 1: each COCO metric family is one error line, nltk BLEU and the predictions are
    written, the failures are recorded in the metrics file, and the exit status says something failed."""
    run = cli_runs["broken java"]
    assert run.returncode == cameye_eval.EXIT_METRIC_FAILED == 3, run.stderr
    assert "Traceback" not in run.stderr + run.stdout
    errors = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    reason = "the PTB tokenizer (Java) failed with exit status 1: Error: Could not create the Java Virtual Machine."
    families = ["BLEU", "METEOR", "ROUGE-L", "CIDEr"]
    assert errors[:4] == [f"error: {family} not computed: {reason}" for family in families]
    assert len(errors) == 5 and "predictions and every other metric are in" in errors[4]
    out = run.out
    assert sorted(p.name for p in out.iterdir()) == [
        "metrics_test.json",
        "predictions_test.json",
        "references_test.json",
    ]
    metrics = strict_json(out / "metrics_test.json")
    assert metrics["failed_metrics"] == dict.fromkeys(families, reason)
    assert set(metrics["nltk_corpus_bleu"]) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4"}
    assert "coco_caption_metrics" not in metrics and metrics["attention_correctness"]["n_words"] > 0
    assert len(strict_json(out / "predictions_test.json")) == 6
    assert "BLEU-4" in run.stdout and "METEOR FAILED" in run.stdout


# ----------------------------------------------------------------------------- refused before any work
def test_split_problems_are_refused_before_the_model_is_loaded(model: SimpleNamespace, eval_only: Path, tmp_path: Path):
    """Each check runs before the checkpoint is read: the checkpoint here does not exist, so a check that came
    after loading would fail with "checkpoint not found" instead."""
    missing_checkpoint = tmp_path / "never_read.pt"
    out = tmp_path / "out"
    with pytest.raises(CamEyeError, match=r"^val\.hdf5 has no images: .*val\.hdf5"):
        cameye_eval.evaluate(missing_checkpoint, eval_only, "val", out, device="cpu", workers=0)
    with pytest.raises(CamEyeError, match="train.hdf5 not found"):
        cameye_eval.evaluate(missing_checkpoint, tmp_path, "train", out, device="cpu", workers=0)
    assert not out.exists(), "nothing may be written for a refused split"
    a_file = tmp_path / "a_file"
    a_file.write_text("x", encoding="utf-8")
    with pytest.raises(CamEyeError, match="cannot write the results to"):
        cameye_eval.evaluate(missing_checkpoint, eval_only, "test", a_file / "out", device="cpu", workers=0)
    with pytest.raises(CamEyeError, match="--skip-images 4 leaves none of the 4 images of test.hdf5"):
        cameye_eval.evaluate(missing_checkpoint, eval_only, "test", out, device="cpu", workers=0, skip_images=4)


def _instances(image_ids: list[int], **changes) -> dict:
    data = {
        "images": [{"id": i, "width": 640, "height": 480} for i in image_ids],
        "annotations": [{"id": 1, "image_id": image_ids[0], "category_id": 18, "bbox": [10, 20, 100, 50]}],
        "categories": [{"id": 18, "name": "dog"}, {"id": 17, "name": "cat"}],
    }
    data.update(changes)
    return data


@pytest.mark.parametrize(
    ("instances", "message"),
    [
        (_instances([10, 11]), r"2 of 4 test images are not in .*instances\.json \(e\.g\. 0, 12\)"),
        ({"images": []}, "not COCO instance annotations"),
        (_instances([0, 10, 11, 12], categories=[{"id": 18, "name": "wolf"}]), "categories outside COCO's 80"),
        (
            _instances(
                [0, 10, 11, 12], annotations=[{"id": 1, "image_id": 0, "category_id": 18, "bbox": [0, 0, -1, 5]}]
            ),
            "bad bbox",
        ),
    ],
    ids=["ids not covered", "not instances", "unknown category", "negative box"],
)
def test_instances_that_do_not_fit_are_refused_before_the_model_is_loaded(
    eval_only: Path, tmp_path: Path, instances: dict, message: str
) -> None:
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(instances), encoding="utf-8")
    with pytest.raises(CamEyeError, match=message):
        cameye_eval.evaluate(
            tmp_path / "never_read.pt", eval_only, "test", tmp_path / "out", device="cpu", workers=0, instances=path
        )


def test_read_instances_matches_coco_ids_and_turns_boxes_into_corners(tmp_path: Path) -> None:
    data = _instances([7, 42])
    data["annotations"] += [
        {"id": 2, "image_id": 7, "category_id": 18, "bbox": [200, 100, 10.5, 20]},
        {"id": 3, "image_id": 7, "category_id": 17, "bbox": [0, 0, 640, 480]},
    ]
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    images = cameye_eval.read_instances(path, ["42", "7"], "test")  # split order, not the file's
    assert images[0] == {"width": 640.0, "height": 480.0, "boxes": {}}
    assert images[1]["boxes"] == {"dog": [(10, 20, 110, 70), (200, 100, 210.5, 120)], "cat": [(0, 0, 640, 480)]}


# ---------------------------------------------------------------------------------- metrics that fail
@needs_java
def test_a_failing_meteor_loses_no_other_metric(
    evaluated: SimpleNamespace, model: SimpleNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real JVM that cannot start for METEOR (an initial heap above METEOR's -Xmx2G): METEOR's reason in
    one line; predictions, nltk BLEU, BLEU, ROUGE-L and CIDEr exactly as in a run where everything worked."""
    fake = fake_java(
        tmp_path / "bin", 'case " $* " in *" -jar "*) exec REAL_JAVA -Xms3G "$@";; esac\nexec REAL_JAVA "$@"\n'
    )
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    out = tmp_path / "out"
    results = cameye_eval.evaluate(
        model.checkpoint, model.data, "test", out, DecodeConfig(max_len=20), batch_size=4, device="cpu", workers=0
    )
    good = evaluated.results
    assert set(results["failed_metrics"]) == {"METEOR"}
    assert "Initial heap size set to a larger value than the maximum heap size" in results["failed_metrics"]["METEOR"]
    assert results["nltk_corpus_bleu"] == good["nltk_corpus_bleu"]
    assert results["coco_caption_metrics"] == {k: v for k, v in good["coco_caption_metrics"].items() if k != "METEOR"}
    assert results["attention_correctness"] == good["attention_correctness"]
    assert (out / "predictions_test.json").read_bytes() == (evaluated.out / "predictions_test.json").read_bytes()
    assert strict_json(out / "metrics_test.json") == json.loads(json.dumps(cameye_eval.json_safe(results)))


@needs_java
def test_sigterm_while_meteor_hangs_keeps_predictions_and_finished_metrics(model: SimpleNamespace, tmp_path: Path):
    """SIGTERM (SLURM, Kubernetes) while METEOR's JVM hangs: exit 143 with one line, the predictions and the
    metrics finished so far stay, no temporary file is left, and the hung process is killed."""
    pid_file = tmp_path / "meteor.pid"
    fake = fake_java(
        tmp_path / "bin",
        f'case " $* " in *" -jar "*) echo $$ > {pid_file}; exec sleep 300;; esac\nexec REAL_JAVA "$@"\n',
    )
    out = tmp_path / "out"
    env = {**os.environ, "PATH": f"{fake}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(REPO / "eval.py"), "--checkpoint", str(model.checkpoint), "--data", str(model.data)]
    proc = subprocess.Popen(
        [*command, "--out", str(out), "--workers", "0", "--max-len", "20"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not pid_file.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert pid_file.exists(), "METEOR's (fake) JVM never started"
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 143, stderr
    assert "Traceback" not in stderr and stderr.strip().splitlines()[-1] == "terminated (SIGTERM)"
    metrics = strict_json(out / "metrics_test.json")
    assert set(metrics["coco_caption_metrics"]) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4"}, "BLEU came first"
    assert "nltk_corpus_bleu" in metrics and len(strict_json(out / "predictions_test.json")) == 6
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "no temporary file may be left"
    meteor_pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(meteor_pid, 0)


# ----------------------------------------------------------------------------------- objects and CHAIR
def test_coco_ids_stay_unique() -> None:
    assert cameye_eval.coco_ids(["7", "42"]) == [7, 42]
    assert cameye_eval.coco_ids(["1000268201_693b08cb0e.jpg", "99"]) == [0, 1]  # mixed: rows for all
    assert cameye_eval.coco_ids(["5", "5", "6"]) == [0, 1, 2]  # a repeated id would merge two images
    assert cameye_eval.coco_ids(["5", "05"]) == [0, 1]


def _decoded(words: list[str], cells: list[int | None]) -> Decoded:
    """A decoded caption whose step t looks at 2 x 2 cell ``cells[t]`` (None: uniform attention)."""
    alphas = torch.full((len(words), 4), 0.25)
    for t, cell in enumerate(cells):
        if cell is not None:
            alphas[t] = 0.0
            alphas[t, cell] = 1.0
    return Decoded(list(range(len(words))), 0.0, alphas)


def test_object_scores_by_hand() -> None:
    """CHAIR and attention correctness in the union of a category's boxes, worked out by hand.

    Image A (200 x 100 px; the 2 x 2 grid's cells are 100 x 50): a cat box = the top-left cell; two couch
    boxes covering the bottom half and the top-right cell. "a dog and a cat on a couch": the dog is
    hallucinated (CHAIR-i 1/3); "cat" looks at the top-left cell: all of it inside (baseline 1/4); "couch"
    attends uniformly: 3/4 inside, as its baseline (the union covers 3/4). Image B: "a man with a frisbee",
    a person box only, the frisbee named by a reference: no hallucination; "man" looks at the bottom-right
    cell, outside the person box (the top-left cell): 0 inside, baseline 1/4.
    """
    hyps = [["a", "dog", "and", "a", "cat", "on", "a", "couch"], ["a", "man", "with", "a", "frisbee"]]
    preds = [_decoded(hyps[0], [None, 2, None, None, 0, None, None, None]), _decoded(hyps[1], [None, 3, 0, 0, 0])]
    images = [
        {
            "width": 200,
            "height": 100,
            "boxes": {"cat": [(0, 0, 100, 50)], "couch": [(0, 50, 200, 100), (100, 0, 200, 50)]},
        },
        {"width": 64, "height": 64, "boxes": {"person": [(0, 0, 32, 32)]}},
    ]
    references = [["A cat on a sofa."], ["A man throws a Frisbee."]]
    entries, statistics, details = cameye_eval.object_scores(hyps, preds, images, references)
    chair = entries["chair"]
    assert (chair["mentions"], chair["hallucinated"], chair["captions"]) == (5, 1, 2)
    assert chair["CHAIR-i"] == pytest.approx(1 / 5) and chair["CHAIR-s"] == pytest.approx(1 / 2)
    attention = entries["attention_correctness"]
    assert attention["n_words"] == 3  # cat, couch, man: the hallucinated dog and the box-less frisbee have no box
    assert attention["attention_correctness"] == pytest.approx((1 + 0.75 + 0) / 3)
    assert attention["uniform_baseline"] == pytest.approx((0.25 + 0.75 + 0.25) / 3)
    assert details[0] == {
        "mentioned": ["dog", "cat", "couch"],
        "hallucinated": ["dog"],
        "covered": True,
        "in_boxes": ["cat", "couch"],
        "in_references_only": [],
    }
    assert details[1]["hallucinated"] == [] and details[1]["in_references_only"] == ["frisbee"]
    assert statistics["CHAIR-i"] == ([1, 0], [3, 2]) and statistics["CHAIR-s"] == ([1.0, 0.0], None)
    # coverage: both captions name something that is there (the cat; the man and the referenced frisbee)
    assert chair["coverage"] == 1.0 and statistics["coverage"] == ([1.0, 1.0], None)
    assert statistics["attention_correctness"] == ([1.75, 0.0], [2, 1])


def test_evaluate_notes_a_different_vocabulary(
    model: SimpleNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Data prepared with its own word map (not the model's) is fine for evaluation: a note says so, with the
    share of reference words the model cannot say, and the results record it."""
    results = _evaluate_with_fake_decoder(model, tmp_path, HAND_IMAGES, monkeypatch)
    note = results["vocabulary"]
    assert note["model_words"] == len(model.word_map) and note["data_words"] != note["model_words"]
    refs = [w for e in HAND_IMAGES for r in e["refs"] for w in r.split()]
    outside = sum(w not in model.word_map for w in refs) / len(refs)
    assert note["reference_words_outside_vocabulary"] == pytest.approx(outside)
    err = capsys.readouterr().err
    assert "note: the model's vocabulary" in err and "fine for evaluation" in err


def test_format_results_shows_intervals_and_failures() -> None:
    results = {
        "split": "test",
        "images": 80,
        "beam_size": 3,
        "coco_caption_metrics": {"BLEU-4": 0.086, "CIDEr": 0.316},
        "chair": {"CHAIR-s": 0.5625, "CHAIR-i": 0.4923, "mentions": 130, "coverage": 0.5875},
        "attention_correctness": {"attention_correctness": 0.45, "uniform_baseline": 0.319, "n_words": 58},
        "intervals": {
            "resamples": 1000,
            "level": 0.95,
            "CIDEr": [0.25, 0.391],
            "CHAIR-s": [0.45, 0.6625],
            "coverage": [0.475, 0.7],
        },  # fmt: skip
        "failed_metrics": {"METEOR": "METEOR's Java process failed"},
    }
    text = cameye_eval.format_results(results)
    assert "BLEU-4 8.6  CIDEr 31.6 [25.0, 39.1]" in text
    assert "CHAIR-s 56.2 [45.0, 66.2]" in text and "CHAIR-i 49.2 (% of 130 object mentions)" in text
    assert "object coverage (higher is better): 58.8 [47.5, 70.0]" in text
    assert "attention correctness 0.450 vs uniform baseline 0.319 over 58 object words" in text
    assert "95% bootstrap intervals over images (1000 resamples)" in text
    assert "METEOR FAILED: METEOR's Java process failed" in text


# --------------------------------------------------------------------------------- coco-dev80, real photos
@pytest.fixture(scope="module")
def coco_dev80(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """coco-dev80 prepared with the shipped model's word map (an evaluation-only set: all 80 photos in test)."""
    if not (COCO_DEV80 / "instances.json").is_file():
        pytest.skip(f"coco-dev80 is not at {COCO_DEV80} (real data, never shipped)")
    if not SHIPPED.is_file():
        pytest.skip(f"the shipped model is not at {SHIPPED}")
    folder = tmp_path_factory.mktemp("coco_dev80")
    word_map = folder / "word_map.json"
    word_map.write_text(json.dumps(load_checkpoint_file(SHIPPED)["word_map"]), encoding="utf-8")
    options = Options(out=folder / "prepared", workers=1, word_map=word_map, split="test")
    counts = create_input_files([COCO_DEV80 / "captions.json"], COCO_DEV80 / "images", options)
    assert counts["test"] == 80
    return options.out


def test_chair_and_attention_on_coco_dev80_with_the_shipped_model(coco_dev80: Path, tmp_path: Path) -> None:
    """The real case: COCO ids of the prepared split match instances.json, and the written per-image objects
    agree with the reported CHAIR (recomputed here from the objects file)."""
    out = tmp_path / "out"
    results = cameye_eval.evaluate(
        SHIPPED,
        coco_dev80,
        "test",
        out,
        max_images=12,
        skip_images=68,  # the last 12 photos by COCO id
        device="cpu",
        workers=0,
        coco=False,
        instances=COCO_DEV80 / "instances.json",
        bootstrap=200,
    )
    rows = strict_json(out / "objects_test.json")
    predictions = strict_json(out / "predictions_test.json")
    all_ids = sorted(
        im["id"] for im in json.loads((COCO_DEV80 / "captions.json").read_text(encoding="utf-8"))["images"]
    )
    assert [r["image_id"] for r in rows] == [p["image_id"] for p in predictions] == all_ids[68:]
    instances = json.loads((COCO_DEV80 / "instances.json").read_text(encoding="utf-8"))
    names = {c["id"]: c["name"] for c in instances["categories"]}
    for row in rows:
        boxed = {names[a["category_id"]] for a in instances["annotations"] if a["image_id"] == row["image_id"]}
        assert set(row["in_boxes"]) == boxed, row["image_id"]
        truth = boxed | set(row["in_references_only"])
        assert row["hallucinated"] == [c for c in row["mentioned"] if c not in truth]
    chair = results["chair"]
    assert chair["mentions"] == sum(len(r["mentioned"]) for r in rows) > 0
    assert chair["CHAIR-s"] == pytest.approx(sum(bool(r["hallucinated"]) for r in rows) / 12)
    attention = results["attention_correctness"]
    assert attention["n_words"] > 0 and 0 <= attention["attention_correctness"] <= 1
    assert 0 < attention["uniform_baseline"] <= 1
    for name, value in [("CHAIR-s", chair["CHAIR-s"]), ("attention_correctness", attention["attention_correctness"])]:
        low, high = results["intervals"][name]
        assert low <= value <= high, name


def test_decoding_options_reach_beam_search(model: SimpleNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """--block-trigrams (shared with caption.py) is passed to beam search and recorded, not silently ignored."""
    seen = []
    original = decoding.beam_search

    def recording(decoder, encoder_out, cfg, *args):
        seen.append(cfg.block_trigrams)
        return original(decoder, encoder_out, cfg, *args)

    monkeypatch.setattr(decoding, "beam_search", recording)
    results = cameye_eval.evaluate(
        model.checkpoint, model.data, "test", tmp_path, DecodeConfig(max_len=20, block_trigrams=False, ground="off"),
        device="cpu", workers=0, coco=False, max_images=2,
    )  # fmt: skip
    assert seen == [False] and results["block_trigrams"] is False and results["images"] == 2


@needs_java
def test_intervals_cover_the_reported_scores_and_skip_meteor(tmp_path: Path) -> None:
    """Fix: METEOR's interval was of its per-image mean, which is not the METEOR reported (it pools statistics
    over all captions), and did not contain it. Only ROUGE-L and CIDEr get intervals, each covering its score."""
    colours = "big small brown black white".split()
    references = {i: [f"a {w} dog runs on the grass", f"the {w} dog is running"] for i, w in enumerate(colours)}
    guesses = ["a big dog runs", "a cat", "a brown dog running", "the dog", "a white dog is running on grass"]
    predictions = dict(zip(references, guesses))
    metrics = cameye_eval.MetricsFile({}, tmp_path / "metrics.json")
    cameye_eval.coco_metrics_into(metrics, references, predictions)
    assert set(metrics.per_image) == {"ROUGE-L", "CIDEr"}
    spans = cameye_eval.intervals(metrics.per_image, 500)
    for name in ("ROUGE-L", "CIDEr"):
        low, high = spans[name]
        assert low <= metrics.results["coco_caption_metrics"][name] <= high, name


@needs_java
def test_cider_of_one_image_is_reported_as_not_computed(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Issue 21: CIDEr's document frequencies need several images; with one it was a silent 0.0."""
    metrics = cameye_eval.MetricsFile({}, tmp_path / "metrics.json")
    cameye_eval.coco_metrics_into(metrics, {1: ["a dog runs on the grass", "a dog running"]}, {1: "a dog runs"})
    assert metrics.results["coco_caption_metrics"]["CIDEr"] is None
    assert "CIDEr" in " ".join(metrics.results["notes"]) and "not computed" in capsys.readouterr().err
