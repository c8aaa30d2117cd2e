"""Tests for compare.py: the paired comparison of two eval.py runs on tiny hand-made files, and its one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import compare
from metrics import coco_metrics, java_available

REFERENCES = {
    1: ["a black dog runs on the grass", "a dog running across a green field", "the dog is running outside"],
    2: ["a man rides a bike down the street", "a person riding a bicycle on a road", "a cyclist in the city"],
    3: ["two children play in the sand", "kids playing on the beach", "two young boys dig in the sand"],
    4: ["a woman sits on a bench in the park", "a lady resting on a park bench", "a woman on a wooden bench"],
    5: ["a brown horse stands in a field", "a horse grazing in the meadow", "a horse in the grass"],
    6: ["a boy jumps into the swimming pool", "a child jumping into the water", "a kid leaps into a pool"],
}
GOOD = {i: refs[0] for i, refs in REFERENCES.items()}  # a reference itself: the best caption there is
POOR = {i: "a man is standing in front of a building" for i in REFERENCES}


def write_run(folder: Path, captions: dict[int, str], references: dict[int, list[str]] = REFERENCES) -> Path:
    """predictions_test.json and references_test.json in the formats eval.py writes; returns the predictions."""
    folder.mkdir(parents=True, exist_ok=True)
    names = {i: f"{i:06d}.jpg" for i in references}
    rows = [{"image_id": i, "caption": c, "file_name": names.get(i, "x.jpg")} for i, c in captions.items()]
    (folder / "predictions_test.json").write_text(json.dumps(rows), encoding="utf-8")
    anns = [{"image_id": i, "id": n, "caption": c} for n, (i, c) in enumerate(
        (i, c) for i, caps in references.items() for c in caps)]  # fmt: skip
    coco = {"info": {}, "licenses": [], "type": "captions", "images": [
        {"id": i, "file_name": names[i]} for i in references], "annotations": anns}  # fmt: skip
    (folder / "references_test.json").write_text(json.dumps(coco), encoding="utf-8")
    return folder / "predictions_test.json"


def run(tmp_path: Path, a: dict, b: dict, *extra: str) -> list[str]:
    return [str(write_run(tmp_path / "a", a)), str(write_run(tmp_path / "b", b)), "--references",
            str(tmp_path / "a" / "references_test.json"), *extra]  # fmt: skip


def test_identical_systems_differ_by_exactly_zero(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert compare.main(run(tmp_path, GOOD, GOOD, "--samples", "200")) == 0
    out = capsys.readouterr().out
    for metric in ("BLEU-4", "CIDEr-D"):
        line = next(line for line in out.splitlines() if line.split()[:1] == [metric])
        assert line.split()[-3:] == ["+0.0", "[+0.0,", "+0.0]"], line
    assert "6 images" in out and "200 paired resamples" in out


def test_a_system_better_on_every_image_has_an_interval_above_zero(tmp_path: Path, capsys) -> None:
    argv = run(tmp_path, POOR, GOOD, "--samples", "500", "--seed", "1")
    assert compare.main(argv) == 0
    results = compare.compare(*compare.read_inputs(Path(argv[0]), Path(argv[1]), Path(argv[3])), 500, 1)
    for metric, r in results.items():
        assert 0 < r.low <= r.difference <= r.high, metric
    assert results["BLEU-4"].b == pytest.approx(1.0)  # every caption is one of its references
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("BLEU-4") and f"{100 * results['BLEU-4'].b:.1f}" in line for line in lines)


def test_images_are_matched_by_id_not_by_order(tmp_path: Path) -> None:
    shuffled = dict(reversed(list(GOOD.items())))
    argv = run(tmp_path, GOOD, shuffled)
    results = compare.compare(*compare.read_inputs(Path(argv[0]), Path(argv[1]), Path(argv[3])), 100, 0)
    assert all(r.difference == 0.0 for r in results.values())


@pytest.mark.skipif(not java_available(), reason="the PTB tokenizer needs Java")
def test_ptb_tokens_give_pycocoevalcaps_cider(tmp_path: Path) -> None:
    argv = run(tmp_path, POOR, GOOD)
    inputs = compare.read_inputs(Path(argv[0]), Path(argv[1]), Path(argv[3]))
    results = compare.compare(*inputs, 100, 0, tokenizer="ptb")
    coco = coco_metrics(REFERENCES, GOOD, use_meteor=False)
    assert results["CIDEr-D"].b == pytest.approx(coco["CIDEr"], rel=1e-9)


def one_error_line(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        compare.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
    return err[0]


def test_bad_input_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    fewer = {i: c for i, c in GOOD.items() if i != 3}
    message = one_error_line(capsys, run(tmp_path / "1", GOOD, fewer))
    assert "B" in message and "1 of the 6" in message and "e.g. 3" in message
    argv = run(tmp_path / "2", GOOD, GOOD)
    Path(argv[1]).write_text('{"not": "a list"}', encoding="utf-8")
    assert "list" in one_error_line(capsys, argv)
    Path(argv[1]).write_text('[{"image_id": 1}]', encoding="utf-8")
    assert "caption" in one_error_line(capsys, argv)
    twice = json.dumps([{"image_id": 1, "caption": "a dog"}, {"image_id": 1, "caption": "a cat"}])
    Path(argv[1]).write_text(twice, encoding="utf-8")
    assert "twice" in one_error_line(capsys, argv)
    assert "not found" in one_error_line(capsys, [argv[0], str(tmp_path / "missing.json"), *argv[2:]])
    argv = run(tmp_path / "3", GOOD, GOOD)
    Path(argv[3]).write_text('{"images": []}', encoding="utf-8")
    assert "annotations" in one_error_line(capsys, argv)


def test_help_explains_every_option(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        compare.main(["--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for option in ("predictions_a", "predictions_b", "--references", "--samples", "--seed", "--tokenizer"):
        assert option in text
    assert "B - A" in text


def test_chair_s_and_coverage_are_compared_where_eval_wrote_objects_files(tmp_path: Path, capsys) -> None:
    """objects_test.json beside both predictions (eval.py --instances) adds CHAIR-s and coverage rows: here B
    stops hallucinating on images 1-3 and names a true object on 1-4."""
    argv = run(tmp_path, POOR, GOOD, "--samples", "300")
    for system, hallucinated, covered in (("a", {1, 2, 3}, {5}), ("b", set(), {1, 2, 3, 4, 5})):
        rows = [{"image_id": i, "caption": "x", "mentioned": ["dog"] * (i in hallucinated | covered),
                 "hallucinated": ["dog"] if i in hallucinated else []} for i in REFERENCES]  # fmt: skip
        (tmp_path / system / "objects_test.json").write_text(json.dumps(rows), encoding="utf-8")
    assert compare.main(argv) == 0
    lines = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines() if line}
    assert lines["CHAIR-s"][1:4] == ["50.0", "0.0", "-50.0"] and float(lines["CHAIR-s"][-1].rstrip("]")) <= 0
    assert lines["coverage"][1:4] == ["16.7", "83.3", "+66.7"] and float(lines["coverage"][-2].strip("[,")) > 0
