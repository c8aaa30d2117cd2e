"""Tests for synthetic.py: the dataset must be well-formed, truthful about its images, and reproducible."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import synthetic
import utils
from synthetic import COLOURS, SHAPES, SIZES, generate_dataset, make_captions, make_scene, split_counts

SCRIPT = Path(__file__).resolve().parents[1] / "synthetic.py"
NUM_IMAGES = 30
SIZE = 128
ATTRIBUTE_WORDS = {*COLOURS, *SHAPES, *SIZES}
RELATION_PHRASES = {
    ("to", "the", "left", "of"): "left",
    ("to", "the", "right", "of"): "right",
    ("above",): "above",
    ("below",): "below",
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synthetic")
    json_path = generate_dataset(out, num_images=NUM_IMAGES, image_size=SIZE, seed=3)
    return json_path, json.loads(json_path.read_text())


def load_pixels(json_path: Path, entry: dict) -> np.ndarray:
    with Image.open(json_path.parent / entry["filepath"] / entry["filename"]) as image:
        assert image.mode == "RGB"
        return np.asarray(image)


def mentions(caption_objects: list[int]) -> list[tuple[int, int, int]]:
    """Runs ``(object, start, end)`` of consecutive tokens that name the same object."""
    runs: list[tuple[int, int, int]] = []
    for t, obj in enumerate(caption_objects):
        if obj < 0:
            continue
        if runs and runs[-1][0] == obj and runs[-1][2] == t:
            runs[-1] = (obj, runs[-1][1], t + 1)
        else:
            runs.append((obj, t, t + 1))
    return runs


def centre(box: list[int]) -> tuple[float, float]:
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


# ------------------------------------------------------------------------------------------------ structure
def test_json_follows_karpathy_format(dataset: tuple[Path, dict]) -> None:
    json_path, data = dataset
    assert json_path.name == "dataset_synthetic.json"
    assert data["dataset"] == "synthetic"
    assert len(data["images"]) == NUM_IMAGES
    all_sentids = []
    for imgid, entry in enumerate(data["images"]):
        assert entry["imgid"] == imgid
        assert entry["filepath"] == "images"
        assert entry["filename"] == f"{imgid:06d}.png"
        assert entry["split"] in {"train", "val", "test"}
        assert (entry["width"], entry["height"]) == (SIZE, SIZE)
        assert load_pixels(json_path, entry).shape == (SIZE, SIZE, 3)
        assert entry["sentids"] == [s["sentid"] for s in entry["sentences"]]
        assert len(entry["caption_objects"]) == len(entry["sentences"]) == 5
        assert 1 <= len(entry["objects"]) <= 3
        for sentence, owners in zip(entry["sentences"], entry["caption_objects"], strict=True):
            assert sentence["imgid"] == imgid
            assert all(re.fullmatch(r"[a-z]+", token) for token in sentence["tokens"])
            text = " ".join(sentence["tokens"])
            assert sentence["raw"] == text[0].upper() + text[1:] + "."
            assert len(owners) == len(sentence["tokens"])
        all_sentids += entry["sentids"]
    assert all_sentids == list(range(5 * NUM_IMAGES))  # unique over the dataset, like Karpathy's


def test_five_distinct_captions_per_image(dataset: tuple[Path, dict]) -> None:
    for entry in dataset[1]["images"]:
        captions = {tuple(s["tokens"]) for s in entry["sentences"]}
        assert len(captions) == 5


def test_single_object_scenes_always_get_five_distinct_captions() -> None:
    rng = np.random.default_rng(0)
    for colour in COLOURS:
        for shape in SHAPES:
            for size in SIZES:
                obj = {"shape": shape, "colour": colour, "size": size, "box": [10, 10, 40, 40]}
                tokens, owners = make_captions([obj], rng, n=5)
                assert len({tuple(t) for t in tokens}) == 5
                assert all(len(t) == len(o) for t, o in zip(tokens, owners, strict=True))


# ------------------------------------------------------------------------------------------------ captions
def test_attribute_words_name_the_right_objects(dataset: tuple[Path, dict]) -> None:
    for entry in dataset[1]["images"]:
        objects = entry["objects"]
        for sentence, owners in zip(entry["sentences"], entry["caption_objects"], strict=True):
            tokens = sentence["tokens"]
            for token, owner in zip(tokens, owners, strict=True):
                assert (token in ATTRIBUTE_WORDS) == (owner >= 0), (tokens, owners)
            named = mentions(owners)
            for obj, start, end in named:
                words, target = tokens[start:end], objects[obj]
                # Each mention is "a [size] colour shape" and every word is true of the object it points at.
                assert tokens[start - 1] in {"a", "single"}
                assert words[-2:] == [target["colour"], target["shape"]]
                assert words[:-2] in ([], [target["size"]])
            assert len({obj for obj, _, _ in named}) == len(named)  # no object is named twice
            assert len(named) >= min(2, len(objects))  # multi-object scenes: at least two objects mentioned


def test_relation_words_agree_with_box_centres(dataset: tuple[Path, dict]) -> None:
    checked = 0
    for entry in dataset[1]["images"]:
        objects = entry["objects"]
        for sentence, owners in zip(entry["sentences"], entry["caption_objects"], strict=True):
            tokens, named = sentence["tokens"], mentions(owners)
            subject = named[0][0] if named else None  # the grammar relates everything to the first object
            for phrase, relation in RELATION_PHRASES.items():
                for t in range(len(tokens) - len(phrase) + 1):
                    if tuple(tokens[t : t + len(phrase)]) != phrase:
                        continue
                    after = [obj for obj, start, _ in named if start > t + len(phrase)]
                    reference = after[0]  # the first object named after the phrase
                    (sx, sy), (rx, ry) = centre(objects[subject]["box"]), centre(objects[reference]["box"])
                    dx, dy = sx - rx, sy - ry
                    expected = (
                        ("left" if dx < 0 else "right") if abs(dx) >= abs(dy) else ("above" if dy < 0 else "below")
                    )
                    assert relation == expected, (tokens, objects)
                    assert relation == synthetic.spatial_relation(objects[subject]["box"], objects[reference]["box"])
                    checked += 1
    assert checked > 10  # the fixture must actually exercise relations


def test_make_captions_uses_real_relation() -> None:
    left = {"shape": "circle", "colour": "red", "size": "small", "box": [0, 50, 20, 70]}
    right = {"shape": "square", "colour": "blue", "size": "large", "box": [80, 40, 120, 80]}
    tokens, _ = make_captions([left, right], np.random.default_rng(1), n=40)
    text = [" ".join(t) for t in tokens]
    assert any("red circle to the left of a" in t for t in text)
    assert not any("red circle to the right of" in t or "above" in t or "below" in t for t in text)
    assert not any("square to the left of" in t for t in text)


# ------------------------------------------------------------------------------------------------ images
def test_boxes_are_inside_apart_and_painted(dataset: tuple[Path, dict]) -> None:
    json_path, data = dataset
    palette = np.array(list(COLOURS.values()))
    for entry in data["images"]:
        pixels = load_pixels(json_path, entry)
        outside = np.ones((SIZE, SIZE), dtype=bool)
        for obj in entry["objects"]:
            x0, y0, x1, y1 = obj["box"]
            assert 0 <= x0 < x1 <= SIZE and 0 <= y0 < y1 <= SIZE
            colour = np.array(COLOURS[obj["colour"]])
            # The centre of every shape we draw (circle, square, triangle, star) is inside the shape.
            cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
            assert (pixels[cy, cx] == colour).all(), (obj, pixels[cy, cx])
            # The box is tight: the object's colour touches all four edges of the box.
            inside = (pixels[y0:y1, x0:x1] == colour).all(axis=-1)
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
            outside[y0:y1, x0:x1] = False
        # The background never uses an object colour, so colour alone finds the objects.
        background = pixels[outside]
        assert not (background[:, None, :] == palette[None]).all(axis=-1).any()
        boxes = [obj["box"] for obj in entry["objects"]]
        for i, a in enumerate(boxes):
            for b in boxes[i + 1 :]:
                assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], (a, b)


def test_sizes_are_clearly_different(dataset: tuple[Path, dict]) -> None:
    sides = {"small": [], "large": []}
    for entry in dataset[1]["images"]:
        for obj in entry["objects"]:
            x0, y0, x1, y1 = obj["box"]
            sides[obj["size"]].append(max(x1 - x0, y1 - y0))
    assert sides["small"] and sides["large"]
    assert max(sides["small"]) * 1.5 < min(sides["large"])


def test_make_scene_is_reusable() -> None:
    image, objects = make_scene(np.random.default_rng(5), 64)
    assert image.size == (64, 64) and image.mode == "RGB"
    assert all(set(obj) == {"shape", "colour", "size", "box"} for obj in objects)


# ------------------------------------------------------------------------------------------------ determinism
def test_same_seed_same_dataset_other_seed_differs(tmp_path: Path) -> None:
    first = generate_dataset(tmp_path / "a", num_images=8, seed=11)
    second = generate_dataset(tmp_path / "b", num_images=8, seed=11)
    other = generate_dataset(tmp_path / "c", num_images=8, seed=12)
    assert first.read_bytes() == second.read_bytes()
    for entry in json.loads(first.read_text())["images"]:
        name = Path(entry["filepath"]) / entry["filename"]
        assert (first.parent / name).read_bytes() == (second.parent / name).read_bytes()
    assert first.read_bytes() != other.read_bytes()
    assert (first.parent / "images/000000.png").read_bytes() != (other.parent / "images/000000.png").read_bytes()
    # Atomic writes leave no temporary files behind.
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".") or p.suffix == ".tmp"]


def test_regenerating_in_place_gives_the_same_files(tmp_path: Path) -> None:
    path = generate_dataset(tmp_path, num_images=4, seed=1)
    before = path.read_bytes()
    assert generate_dataset(tmp_path, num_images=4, seed=1).read_bytes() == before


# ------------------------------------------------------------------------------------------------ splits
def test_split_counts_follow_fractions(tmp_path: Path) -> None:
    path = generate_dataset(tmp_path, num_images=20, seed=0, split_fractions=(0.6, 0.25, 0.15))
    splits = [entry["split"] for entry in json.loads(path.read_text())["images"]]
    assert [splits.count(s) for s in ("train", "val", "test")] == [12, 5, 3]
    assert splits != sorted(splits)  # assigned in shuffled order, not in blocks
    for n in (1, 7, 10, 33, 300):
        for fractions in ((0.8, 0.1, 0.1), (0.5, 0.5, 0.0), (1 / 3, 1 / 3, 1 / 3)):
            counts = split_counts(n, fractions)
            assert sum(counts) == n
            assert all(abs(c - f * n) < 1 for c, f in zip(counts, fractions, strict=True))


@pytest.mark.parametrize(
    "kwargs",
    [{"num_images": 0}, {"image_size": 31}, {"split_fractions": (0.5, 0.5, 0.5)}, {"seed": -1}],
)
def test_generate_dataset_rejects_bad_arguments(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        generate_dataset(tmp_path, **kwargs)


# ------------------------------------------------------------------------------------------------ CLI
@pytest.mark.parametrize(
    "args",
    [["--num-images", "0"], ["--splits", "0.5", "0.3", "0.1"], ["--image-size", "16"]],
)
def test_cli_bad_arguments_exit_2_with_one_line_error(tmp_path: Path, args: list[str]) -> None:
    cmd = [sys.executable, str(SCRIPT), "--out", str(tmp_path / "out"), *args]
    result = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and result.stderr.rstrip().endswith(errors[0])
    assert not (tmp_path / "out").exists()


def test_cli_writes_dataset_and_summary(tmp_path: Path) -> None:
    cmd = [sys.executable, str(SCRIPT), "--out", str(tmp_path), "--num-images", "10", "--image-size", "48"]
    result = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "train 8, val 1, test 1" in result.stdout
    data = json.loads((tmp_path / "dataset_synthetic.json").read_text())
    assert len(data["images"]) == 10 and data["images"][0]["width"] == 48


# ------------------------------------------------------------------------------------ interruptions, full disk
def progress_free_lines(stderr: str) -> list[str]:
    """stderr without tqdm's progress bar (redrawn with carriage returns)."""
    return [line for line in re.split(r"[\r\n]", stderr) if line.strip() and "img/s" not in line and "img]" not in line]


def test_stale_temporary_of_a_killed_run_is_removed_and_a_live_one_kept(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    images = tmp_path / "images"
    images.mkdir()
    stale = images / f".000000.png.{utils._HOST}-pid{int(dead.stdout)}.k9x2.tmp"  # what SIGKILL leaves behind
    stale.write_bytes(b"half a png")
    running = images / f".000000.png.{utils._HOST}-pid{os.getpid()}.a1b2.tmp"  # a run still going (this process)
    running.write_bytes(b"being written")
    generate_dataset(tmp_path, num_images=2, seed=0)
    assert not stale.exists() and running.exists()


@pytest.mark.skipif(not hasattr(os, "killpg"), reason="needs POSIX process groups")
def test_sigterm_stops_generation_in_one_line_without_temporary_files(tmp_path: Path) -> None:
    out = tmp_path / "out"
    cmd = [sys.executable, str(SCRIPT), "--out", str(out), "--num-images", "100000", "--image-size", "256"]
    with open(tmp_path / "stderr", "w+") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        try:
            deadline = time.monotonic() + 120
            while len(list(out.glob("images/*.png"))) < 10:
                assert proc.poll() is None and time.monotonic() < deadline, "generation did not get going"
                time.sleep(0.05)
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        err.seek(0)
        stderr = err.read()
    assert proc.returncode == 143 and progress_free_lines(stderr) == ["terminated (SIGTERM)"], stderr
    assert not [p.name for p in out.rglob("*") if p.name.startswith(".") or p.suffix == ".tmp"]
    assert not (out / "dataset_synthetic.json").exists()  # never a JSON that lists images not written


def test_full_disk_is_one_line_without_temporary_files(small_disk: Path) -> None:
    cmd = [sys.executable, str(SCRIPT), "--out", str(small_disk), "--num-images", "2000", "--image-size", "128"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = progress_free_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert re.fullmatch(
        rf"error: no space left on {small_disk} while writing {small_disk}/images/\d{{6}}\.png", lines[0]
    )
    assert not [p.name for p in small_disk.rglob("*") if p.name.startswith(".") or p.suffix == ".tmp"]
