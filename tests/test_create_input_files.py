"""Tests for create_input_files.py: every input format, odd and broken images, caption alignment, atomic output,
determinism and the word map. Sources are tiny files written into tmp_path; one test uses real Flickr8k photos
when ../shared/data/flickr8k exists.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

import captions
import create_input_files as cif
import images
from create_input_files import Options, create_input_files
from images import load_image
from utils import SPECIAL_TOKENS, CamEyeError, Terminated, decode_caption, reverse_word_map

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "create_input_files.py"
FLICKR8K = ROOT.parent / "shared/data/flickr8k"
SIZE = 16  # output side for the hand-made sources
NUMBERS = "zero one two three four five six seven eight nine ten eleven".split()
VARIANTS = "red big old new fun".split()
OUTPUTS = {"train.hdf5", "val.hdf5", "test.hdf5", "word_map.json"}


# ------------------------------------------------------------------------------------------------ helpers
def prepare(sources, out, images=None, **options):
    """Run create_input_files in-process with small, fast defaults."""
    defaults = dict(captions_per_image=3, min_word_freq=1, max_len=20, image_size=SIZE, workers=1, seed=0)
    opt = Options(out=out, **{**defaults, **options})
    return create_input_files([Path(s) for s in sources], images, opt)


def read_split(path):
    """Everything in one split file, strings decoded."""
    with h5py.File(path, "r") as h5:
        data = {key: h5[key][()] for key in h5}
        data["attrs"] = dict(h5.attrs)
    for key in ("references", "references_raw", "image_ids", "filenames", "objects"):
        if key in data:
            data[key] = [s.decode() if isinstance(s, bytes) else s for s in data[key]]
    return data


def read_word_map(out):
    return json.loads((out / "word_map.json").read_text())


def decode_rows(rows, word_map):
    rev = reverse_word_map(word_map)
    return [decode_caption(row, rev) for row in rows]


def image_refs(split, i):
    """The reference sentences (word lists) of image i of a split read by read_split."""
    a, b = split["reference_offsets"][i : i + 2]
    return [r.split() for r in split["references"][a:b]]


def solid(path, colour, size=(8, 8), fmt=None, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path, fmt)
    return path


def load_one(path):
    """What a decoding worker makes of one file: (3 x SIZE x SIZE image, "") or (None, reason)."""
    return cif._load_jobs(SIZE, [(str(path), None)])[0]


def sentence(raw, tokens=None):
    return {"raw": raw, "tokens": tokens if tokens is not None else captions.tokenize(raw)}


def write_karpathy(path, images, dataset="flickr8k"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"dataset": dataset, "images": images}))
    return path


def mean_colour(array, cols=slice(None), rows=slice(None)):
    return array[:, rows, cols].reshape(3, -1).mean(axis=1)


def listing(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# ----------------------------------------------------------------------------------------- input formats
def test_karpathy_coco_style_uses_filepath_cocoid_and_restval(tmp_path):
    images = tmp_path / "coco_images"
    # The same file name in both folders, with different colours: the output shows which one was read.
    solid(images / "train2014" / "a.jpg", (200, 0, 0), fmt="JPEG")
    solid(images / "val2014" / "a.jpg", (0, 0, 200), fmt="JPEG")
    solid(images / "train2014" / "b.jpg", (0, 200, 0), fmt="JPEG")
    solid(images / "val2014" / "c.jpg", (200, 200, 0), fmt="JPEG")
    solid(images / "val2014" / "d.jpg", (0, 200, 200), fmt="JPEG")

    def entry(folder, name, cocoid, split, words):
        return {
            "filepath": folder,
            "filename": name,
            "cocoid": cocoid,
            "imgid": 999,  # cocoid wins over imgid
            "split": split,
            "sentences": [sentence(f"A {words}.", ["a", words]), sentence(f"The {words}!", ["the", words])],
        }

    source = write_karpathy(
        tmp_path / "dataset_coco.json",
        [
            entry("train2014", "a.jpg", 11, "train", "apple"),
            entry("val2014", "a.jpg", 22, "restval", "boat"),
            entry("train2014", "b.jpg", 33, "train", "cat"),
            entry("val2014", "c.jpg", 44, "val", "dog"),
            entry("val2014", "d.jpg", 55, "test", "egg"),
        ],
        dataset="coco",
    )
    counts = prepare([source], tmp_path / "out", images=images)
    assert counts == {"train": 3, "val": 1, "test": 1}
    train, val, test = (read_split(tmp_path / "out" / f"{s}.hdf5") for s in ("train", "val", "test"))
    assert train["image_ids"] == ["11", "22", "33"]  # restval goes to train, in file order
    assert val["image_ids"] == ["44"] and test["image_ids"] == ["55"]
    expected = {"11": (200, 0, 0), "22": (0, 0, 200), "33": (0, 200, 0), "44": (200, 200, 0), "55": (0, 200, 200)}
    for split in (train, val, test):
        assert split["images"].shape[1:] == (3, SIZE, SIZE)
        for i, image_id in enumerate(split["image_ids"]):
            np.testing.assert_allclose(mean_colour(split["images"][i]), expected[image_id], atol=8)
    assert image_refs(train, 1) == [["a", "boat"], ["the", "boat"]]
    assert train["references_raw"][2:4] == ["A boat.", "The boat!"]


def test_karpathy_flickr_style_uses_imgid_and_the_json_folder(tmp_path):
    solid(tmp_path / "src" / "x.png", (250, 0, 0))
    solid(tmp_path / "src" / "y.png", (0, 250, 0))
    solid(tmp_path / "src" / "z.png", (0, 0, 250))
    entries = [
        {"filename": "x.png", "imgid": 0, "split": "train", "sentences": [sentence("A red thing")]},
        {"filename": "y.png", "imgid": 1, "split": "val", "sentences": [sentence("A green thing")]},
        {"filename": "z.png", "imgid": 2, "split": "test", "sentences": [sentence("A blue thing")]},
    ]
    source = write_karpathy(tmp_path / "src" / "dataset_flickr8k.json", entries)
    assert prepare([source], tmp_path / "out") == {"train": 1, "val": 1, "test": 1}  # images default: JSON's folder
    for split, image_id, colour, word in (("train", "0", 0, "red"), ("val", "1", 1, "green"), ("test", "2", 2, "blue")):
        data = read_split(tmp_path / "out" / f"{split}.hdf5")
        assert data["image_ids"] == [image_id]
        assert data["filenames"] == [entries[int(image_id)]["filename"]]
        assert image_refs(data, 0) == [["a", word, "thing"]]
        assert np.argmax(mean_colour(data["images"][0])) == colour


def write_flickr8k(folder, captions, splits, images):
    """A Flickr8k-format folder: captions are (token-file key, caption) pairs, splits name lists per split."""
    (folder / "Flicker8k_Dataset").mkdir(parents=True)
    lines = [f"{key}\t{caption}\n" for key, caption in captions]
    (folder / "Flickr8k.token.txt").write_text("".join(lines), encoding="utf-8")
    for split, list_name in (("train", "train"), ("val", "dev"), ("test", "test")):
        (folder / f"Flickr_8k.{list_name}Images.txt").write_text("".join(f"{n}\n" for n in splits[split]))
    for name, colour in images.items():
        solid(folder / "Flicker8k_Dataset" / name, colour, fmt="JPEG")


def test_flickr8k_original_distribution(tmp_path):
    captions = [(f"a.jpg#{k}", f"A dog runs , number {k} .") for k in range(5)]
    captions += [(f"a.jpg.1#{k}", f"bogus zebra line {k}") for k in range(5)]  # names no image, as in the real file
    captions += [(f"b.jpg#{k}", f"Two cats sleep{'!' * k}") for k in range(5)]
    captions += [("c.jpg#0", "A bird's nest"), ("c.jpg#1", "A nest")]
    captions += [(f"d.jpg#{k}", f"A red car {k}") for k in range(5)]
    captions += [("e.jpg#0", "a giraffe in no split")]
    images = {"a.jpg": (200, 0, 0), "b.jpg": (0, 200, 0), "c.jpg": (0, 0, 200), "d.jpg": (200, 200, 0)}
    images |= {"e.jpg": (0, 0, 0), "f.jpg": (90, 90, 90)}
    splits = {"train": ["a.jpg", "b.jpg", "f.jpg"], "val": ["c.jpg"], "test": ["d.jpg"]}  # f has no captions
    write_flickr8k(tmp_path / "f8k", captions, splits, images)

    counts = prepare([tmp_path / "f8k"], tmp_path / "out", captions_per_image=5)
    assert counts == {"train": 2, "val": 1, "test": 1}
    train = read_split(tmp_path / "out" / "train.hdf5")
    assert train["image_ids"] == ["a.jpg", "b.jpg"]
    assert image_refs(train, 0) == [["a", "dog", "runs", "number", str(k)] for k in range(5)]
    assert train["references_raw"][:5] == [f"A dog runs , number {k} ." for k in range(5)]
    assert image_refs(train, 1) == [["two", "cats", "sleep"]] * 5
    assert np.diff(train["reference_offsets"]).tolist() == [5, 5]  # the bogus line added nothing to a.jpg
    word_map = read_word_map(tmp_path / "out")
    assert "zebra" not in word_map and "bogus" not in word_map and "giraffe" not in word_map
    val = read_split(tmp_path / "out" / "val.hdf5")
    assert val["image_ids"] == ["c.jpg"] and image_refs(val, 0) == [["a", "birds", "nest"], ["a", "nest"]]
    assert np.argmax(mean_colour(val["images"][0])) == 2
    test = read_split(tmp_path / "out" / "test.hdf5")
    assert test["image_ids"] == ["d.jpg"] and len(image_refs(test, 0)) == 5


def test_flickr8k_bad_token_line_is_a_one_line_error(tmp_path):
    write_flickr8k(tmp_path / "f8k", [("a.jpg#0", "fine")], {"train": ["a.jpg"], "val": [], "test": []}, {})
    with open(tmp_path / "f8k" / "Flickr8k.token.txt", "a") as f:
        f.write("no tab or hash here\n")
    with pytest.raises(CamEyeError, match=r"Flickr8k.token.txt:2: expected"):
        prepare([tmp_path / "f8k"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_coco_annotation_files_split_val_into_val_and_test(tmp_path):
    images = tmp_path / "coco"
    train_ids, val_ids = [30, 10, 20], [7, 3, 5, 1]
    for folder, ids in (("train2014", train_ids), ("val2014", val_ids)):
        for i in ids:
            solid(images / folder / f"COCO_{folder}_{i:012d}.jpg", (i * 8, 100, 250 - i * 8), fmt="JPEG")

    def annotations(folder, ids, extra=()):
        data = {
            "images": [{"id": i, "file_name": f"COCO_{folder}_{i:012d}.jpg"} for i in ids],
            "annotations": [
                {"id": 100 * i + k, "image_id": i, "caption": f"  Image {i}'s view, take {k}. "}
                for i in ids
                for k in range(2)
            ]
            + list(extra),
        }
        path = tmp_path / f"captions_{folder}.json"
        path.write_text(json.dumps(data))
        return path

    orphan = {"id": 1, "image_id": 999, "caption": "an image that is not listed"}
    sources = [annotations("train2014", train_ids), annotations("val2014", val_ids, [orphan])]
    counts = prepare(sources, tmp_path / "out", images=images, captions_per_image=2)
    assert counts == {"train": 3, "val": 2, "test": 2}
    expect = {"train": [10, 20, 30], "val": [1, 3], "test": [5, 7]}  # val halves by image id
    for split, ids in expect.items():
        data = read_split(tmp_path / "out" / f"{split}.hdf5")
        assert data["image_ids"] == [str(i) for i in ids]
        for n, i in enumerate(ids):
            assert image_refs(data, n) == [["image", f"{i}s", "view", "take", str(k)] for k in range(2)]
            a = data["reference_offsets"][n]
            assert data["references_raw"][a] == f"Image {i}'s view, take 0."  # stripped, not tokenised
            np.testing.assert_allclose(mean_colour(data["images"][n]), (i * 8, 100, 250 - i * 8), atol=8)
    assert "listed" not in read_word_map(tmp_path / "out")


def test_coco_malformed_entry_is_a_one_line_error(tmp_path):
    path = tmp_path / "captions_train2014.json"
    path.write_text(json.dumps({"images": [{"id": 1, "file_name": "x.jpg"}], "annotations": [{"image_id": 1}]}))
    with pytest.raises(CamEyeError, match="malformed") as info:
        prepare([path], tmp_path / "out")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ odd images
def _two_halves(mode, top, bottom, size=(32, 32)):
    """An image whose top half is ``top`` and bottom half ``bottom``."""
    image = Image.new(mode, size, bottom)
    image.paste(top, (0, 0, size[0], size[1] // 2))
    return image


def _left_right(mode, left, right, size=(32, 32)):
    image = Image.new(mode, size, right)
    image.paste(left, (0, 0, size[0] // 2, size[1]))
    return image


def _exif_jpeg(path, orientation):
    image = _two_halves("RGB", (230, 0, 0), (0, 0, 230), size=(48, 24))  # wide, top half red
    exif = Image.Exif()
    exif[0x0112] = orientation
    image.save(path, "JPEG", exif=exif.tobytes(), quality=95)


def _palette(transparent):
    image = _left_right("P", 1, 0)
    image.putpalette([0, 255, 0, 0, 0, 255] + [0] * 762)  # index 0 green, index 1 blue
    return image, ({"transparency": 0} if transparent else {})


LEFT, RIGHT = (slice(0, SIZE // 4)), slice(SIZE - SIZE // 4, SIZE)  # away from the resampled boundary
TOP, BOTTOM = LEFT, RIGHT


def _make(kind, path):
    """Write an odd image of ``kind``; return (file, {region: expected RGB})."""
    if kind == "grayscale L":
        Image.new("L", (30, 20), 100).save(path := path.with_suffix(".png"))
        return path, {"all": (100, 100, 100)}
    if kind == "RGBA (transparent -> white)":
        _left_right("RGBA", (255, 0, 0, 255), (0, 0, 0, 0)).save(path := path.with_suffix(".png"))
        return path, {"left": (255, 0, 0), "right": (255, 255, 255)}
    if kind == "LA (transparent -> white)":
        _left_right("LA", (40, 255), (40, 0)).save(path := path.with_suffix(".png"))
        return path, {"left": (40, 40, 40), "right": (255, 255, 255)}
    if kind == "CMYK JPEG":
        Image.new("CMYK", (24, 24), (0, 255, 255, 0)).save(path := path.with_suffix(".jpg"), "JPEG", quality=95)
        return path, {"all": (255, 0, 0)}
    if kind in ("palette P", "palette P with transparency"):
        image, extra = _palette(kind.endswith("transparency"))
        image.save(path := path.with_suffix(".png"), **extra)
        return path, {"left": (0, 0, 255), "right": (255, 255, 255) if extra else (0, 255, 0)}
    if kind.startswith("16-bit"):
        value = {"16-bit mid grey": 32768, "16-bit dark": 200, "16-bit white": 65535}[kind]
        image = Image.fromarray(np.full((20, 20), value, np.uint16))
        assert image.mode == "I;16"
        image.save(path := path.with_suffix(".png"))
        with Image.open(path) as check:
            assert check.mode.startswith("I"), check.mode  # really read back as a 16-bit image
        grey = value / 257
        return path, {"all": (grey, grey, grey)}
    if kind == "EXIF orientation 6":  # rotate 90 degrees clockwise: the top (red) goes right
        _exif_jpeg(path := path.with_suffix(".jpg"), 6)
        return path, {"left": (0, 0, 230), "right": (230, 0, 0)}
    if kind == "EXIF orientation 8":  # rotate 90 degrees counter-clockwise: the top (red) goes left
        _exif_jpeg(path := path.with_suffix(".jpg"), 8)
        return path, {"left": (230, 0, 0), "right": (0, 0, 230)}
    if kind == "EXIF orientation 1":  # control: no rotation, the top stays red
        _exif_jpeg(path := path.with_suffix(".jpg"), 1)
        return path, {"top": (230, 0, 0), "bottom": (0, 0, 230)}
    if kind == "1-bit":
        _left_right("1", 1, 0).save(path := path.with_suffix(".png"))
        return path, {"left": (255, 255, 255), "right": (0, 0, 0)}
    raise AssertionError(kind)


ODD_KINDS = [
    "grayscale L",
    "RGBA (transparent -> white)",
    "LA (transparent -> white)",
    "CMYK JPEG",
    "palette P",
    "palette P with transparency",
    "16-bit mid grey",
    "16-bit dark",
    "16-bit white",
    "EXIF orientation 6",
    "EXIF orientation 8",
    "EXIF orientation 1",
    "1-bit",
]
REGIONS = {
    "all": (slice(None), slice(None)),
    "left": (slice(None), LEFT),
    "right": (slice(None), RIGHT),
    "top": (TOP, slice(None)),
    "bottom": (BOTTOM, slice(None)),
}


def check_regions(array, expected, kind):
    assert array.shape == (3, SIZE, SIZE) and array.dtype == np.uint8, kind
    for region, colour in expected.items():
        rows, cols = REGIONS[region]
        got = mean_colour(array, cols=cols, rows=rows)
        np.testing.assert_allclose(got, colour, atol=8, err_msg=f"{kind}: {region} is {got}, expected {colour}")


@pytest.mark.parametrize("kind", ODD_KINDS)
def test_odd_image_kinds_come_out_as_rgb(tmp_path, kind):
    path, expected = _make(kind, tmp_path / "odd")
    check_regions(load_image(path, SIZE), expected, kind)


def test_16_bit_mid_grey_is_scaled_not_clipped(tmp_path):
    path, _ = _make("16-bit mid grey", tmp_path / "grey")
    assert abs(int(load_image(path, SIZE)[0, 0, 0]) - 128) <= 1


def test_odd_images_are_all_kept_by_create_input_files(tmp_path, capsys):
    (tmp_path / "src").mkdir()
    entries, expect = [], []
    for n, kind in enumerate(ODD_KINDS):
        path, expected = _make(kind, tmp_path / "src" / f"odd{n}")
        expect.append(expected)
        entries.append({"filename": path.name, "imgid": n, "split": "train", "sentences": [sentence(kind)]})
    source = write_karpathy(tmp_path / "src" / "dataset_odd.json", entries)
    counts = prepare([source], tmp_path / "out", captions_per_image=1, workers=2)
    assert counts["train"] == len(ODD_KINDS)
    assert "skipped 0 unreadable" in capsys.readouterr().out
    train = read_split(tmp_path / "out" / "train.hdf5")
    for n, kind in enumerate(ODD_KINDS):
        check_regions(train["images"][n], expect[n], kind)


# ------------------------------------------------------------------------------------------ bad images
BAD_REASONS = {
    "missing": "file not found",
    "empty": "empty file",
    "text": "not an image",
    "truncated JPEG": "unreadable image",
    "truncated PNG": "unreadable image",
}
BAD_SUFFIX = {"missing": ".png", "empty": ".jpg", "text": ".jpg", "truncated JPEG": ".jpg", "truncated PNG": ".png"}


def _bad(kind, stem):
    """Write a bad image of ``kind`` at ``stem`` + the kind's suffix (nothing for 'missing'); return the path."""
    path = stem.with_suffix(BAD_SUFFIX[kind])
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("this is not an image\n" * 10)
    elif kind.startswith("truncated"):
        noise = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
        Image.fromarray(noise).save(path, kind.split()[1])
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    return path


@pytest.mark.parametrize("kind", list(BAD_REASONS))
def test_bad_image_gives_a_reason_not_an_exception(tmp_path, kind):
    path = _bad(kind, tmp_path / "bad")
    array, reason = load_one(path)
    assert array is None
    assert reason.startswith(BAD_REASONS[kind]), reason
    assert "\n" not in reason


def colour_of(index):
    return (10 + 20 * index, 240 - 20 * index, (70 * index) % 256)


def write_indexed_source(folder, bad):
    """12 images whose colour and captions encode their index; ``bad`` maps index -> bad kind.

    Images 0-7 are train, 8-9 val, 10-11 test; image i has (i % 4) + 1 captions 'image number <i> <variant>'.
    """
    entries = []
    for i in range(12):
        if i in bad:
            path = _bad(bad[i], folder / f"{i:02d}")
        else:
            path = solid(folder / f"{i:02d}.png", colour_of(i))
        split = "train" if i < 8 else "val" if i < 10 else "test"
        raws = [f"Image number {NUMBERS[i]}, {VARIANTS[k]}." for k in range(i % 4 + 1)]
        entries.append({"filename": path.name, "imgid": i, "split": split, "sentences": [sentence(r) for r in raws]})
    return write_karpathy(folder / "dataset_indexed.json", entries)


@pytest.mark.parametrize("workers", [1, 2])
def test_bad_images_are_skipped_and_captions_stay_aligned(tmp_path, capsys, workers):
    bad = {2: "missing", 4: "empty", 5: "truncated JPEG", 7: "text", 9: "truncated PNG"}
    source = write_indexed_source(tmp_path / "src", bad)
    c = 3
    counts = prepare([source], tmp_path / "out", captions_per_image=c, workers=workers)
    assert counts == {"train": 4, "val": 1, "test": 2}

    out = capsys.readouterr().out
    for i, kind in bad.items():
        name = f"{i:02d}{BAD_SUFFIX[kind]}"
        lines = [line for line in out.splitlines() if line.startswith("skipped") and name in line]
        assert len(lines) == 1 and BAD_REASONS[kind] in lines[0], (name, out)
    assert "skipped 5 unreadable file(s)" in out

    word_map = read_word_map(tmp_path / "out")
    kept = {"train": [0, 1, 3, 6], "val": [8], "test": [10, 11]}
    for split, indices in kept.items():
        data = read_split(tmp_path / "out" / f"{split}.hdf5")
        assert data["image_ids"] == [str(i) for i in indices]
        assert data["filenames"] == [f"{i:02d}.png" for i in indices]
        assert data["captions"].shape == (len(indices) * c, 20 + 2)
        rows = decode_rows(data["captions"], word_map)
        for n, i in enumerate(indices):
            own = [["image", "number", NUMBERS[i], v] for v in VARIANTS[: i % 4 + 1]]
            encodable = [[w if w in word_map else "<unk>" for w in r] for r in own]  # val/test-only words: <unk>
            if split == "train":
                assert encodable == own
            mine = rows[n * c : (n + 1) * c]
            assert all(r in encodable for r in mine), (split, i, mine)
            assert len({tuple(r) for r in mine}) == min(c, len(own))  # distinct when enough, topped up otherwise
            assert data["caplens"][n * c : (n + 1) * c].tolist() == [len(r) + 2 for r in mine]
            assert image_refs(data, n) == own
            np.testing.assert_allclose(mean_colour(data["images"][n]), colour_of(i), atol=1)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs are POSIX")
def test_a_fifo_or_folder_listed_as_an_image_is_skipped_with_its_reason_not_waited_for(tmp_path):
    """Issue 21: a FIFO listed in a dataset hung preparation until it was killed (a worker waited to open it).
    A writer lets a waiting reader through after 20 s, so the old behaviour fails the test rather than hangs."""
    write_indexed_source(tmp_path / "src", {})
    source = tmp_path / "src" / "dataset_indexed.json"
    data = json.loads(source.read_text())
    data["images"][2]["filename"], data["images"][3]["filename"] = "pipe.png", "folder.png"
    source.write_text(json.dumps(data))
    os.mkfifo(tmp_path / "src" / "pipe.png")
    (tmp_path / "src" / "folder.png").mkdir()
    writer = subprocess.Popen(["sh", "-c", f"sleep 20; : > '{tmp_path / 'src' / 'pipe.png'}'"])
    try:
        result = run_cli(source, "--out", tmp_path / "out", "--min-word-freq", 1, "--workers", 2)
    finally:
        writer.kill()
        writer.wait()
    assert result.returncode == 0, result.stderr
    skipped = [line for line in result.stdout.splitlines() if line.startswith("skipped ")]
    assert skipped == [
        f"skipped {tmp_path / 'src' / 'pipe.png'}: not a regular file (a FIFO (named pipe))",
        f"skipped {tmp_path / 'src' / 'folder.png'}: not a regular file (a folder)",
    ]


def test_images_without_captions_are_skipped(tmp_path):
    solid(tmp_path / "src" / "a.png", (255, 0, 0))
    solid(tmp_path / "src" / "b.png", (0, 255, 0))
    solid(tmp_path / "src" / "c.png", (0, 0, 255))
    entries = [
        {"filename": "a.png", "imgid": 0, "split": "train", "sentences": [sentence("a red one")]},
        {"filename": "b.png", "imgid": 1, "split": "train", "sentences": []},
        {"filename": "c.png", "imgid": 2, "split": "train", "sentences": [sentence("!!!", [])]},
    ]
    source = write_karpathy(tmp_path / "src" / "dataset_x.json", entries)
    assert prepare([source], tmp_path / "out")["train"] == 1
    train = read_split(tmp_path / "out" / "train.hdf5")
    assert train["image_ids"] == ["0"] and image_refs(train, 0) == [["a", "red", "one"]]


# ------------------------------------------------------------------------------------------- failures
def run_cli(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, cwd=ROOT)


@pytest.mark.parametrize(
    "content",
    ['{"images": [ {"filename": "a.png",', '{"dataset": "mystery", "items": []}'],
    ids=["malformed JSON", "unknown format"],
)
def test_cli_bad_source_fails_with_one_line_and_writes_nothing(tmp_path, content):
    source = tmp_path / "dataset_bad.json"
    source.write_text(content)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("an existing output folder")
    result = run_cli(source, "--out", tmp_path / "out", "--workers", 1)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert str(source) in lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert listing(tmp_path / "out") == ["keep.txt"]


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "not found"),
        (b"[1, 2]", "unknown format"),
        (b'{"images": [{"filename": "a.png", "split": "train"}]}', "malformed"),
        (b'{"images": [{"filename": "a.png", "split": "train", "sentences": ["a b"]}]}', "malformed"),
        (b"\xff\xfe\x00garbage", "not valid JSON"),
    ],
    ids=["missing source", "JSON list", "entry without sentences", "sentence without tokens", "binary file"],
)
def test_bad_sources_raise_one_line_errors_before_writing(tmp_path, content, message):
    source = tmp_path / "dataset_x.json"
    if content is not None:
        source.write_bytes(content)
    with pytest.raises(CamEyeError, match=message) as info:
        prepare([source], tmp_path / "out")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_no_training_images_is_an_error(tmp_path):
    solid(tmp_path / "a.png", (0, 0, 0))
    source = write_karpathy(tmp_path / "d.json", [{"filename": "a.png", "split": "val", "sentences": [sentence("a")]}])
    with pytest.raises(CamEyeError, match="no training images.*--word-map"):
        prepare([source], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_failure_midway_leaves_no_outputs_and_no_temp_files(tmp_path, monkeypatch, synthetic_prepared):
    real = cif.write_split

    def failing(h5_path, split, *args, **kwargs):
        if split == "test":
            raise RuntimeError("disk full (simulated)")
        return real(h5_path, split, *args, **kwargs)

    monkeypatch.setattr(cif, "write_split", failing)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="simulated"):
        prepare([synthetic_prepared.json], out)
    assert listing(out) == []  # neither outputs nor temporary files

    # Over an existing, complete output: a failed run leaves it byte for byte as it was.
    monkeypatch.setattr(cif, "write_split", real)
    prepare([synthetic_prepared.json], out)
    before = {name: (out / name).read_bytes() for name in listing(out)}
    assert set(before) == OUTPUTS
    monkeypatch.setattr(cif, "write_split", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        prepare([synthetic_prepared.json], out, captions_per_image=2)
    assert {name: (out / name).read_bytes() for name in listing(out)} == before


def test_rerun_replaces_existing_output_cleanly(tmp_path, synthetic_prepared):
    out = tmp_path / "out"
    prepare([synthetic_prepared.json], out, captions_per_image=5, min_word_freq=1)
    first_map = read_word_map(out)
    (out / "notes.txt").write_text("a user's file")
    prepare([synthetic_prepared.json], out, captions_per_image=2, min_word_freq=40)
    assert listing(out) == sorted(OUTPUTS | {"notes.txt"})  # no temp files; unrelated files untouched
    second_map = read_word_map(out)
    assert len(SPECIAL_TOKENS) < len(second_map) < len(first_map)  # the rare words are gone
    assert list(second_map)[:4] == list(SPECIAL_TOKENS) and set(second_map) < set(first_map)
    train = read_split(out / "train.hdf5")
    assert train["attrs"]["captions_per_image"] == 2
    assert train["captions"].shape[0] == 2 * train["images"].shape[0]
    assert train["captions"].max() < len(second_map) and 3 in train["captions"]  # encoded with the new map


# ------------------------------------------------------------------------------------------ determinism
@pytest.mark.parametrize("start_method", [None, "spawn"], ids=["default start method", "spawn (Windows, macOS)"])
def test_same_inputs_give_identical_outputs_with_1_or_2_workers(tmp_path, synthetic_prepared, start_method):
    first = synthetic_prepared.out
    opts = dict(captions_per_image=5, min_word_freq=1, image_size=64, max_len=50, seed=0)
    prepare([synthetic_prepared.json], tmp_path / "again", workers=1, **opts)
    prepare([synthetic_prepared.json], tmp_path / "two", workers=2, start_method=start_method, **opts)
    for other in (tmp_path / "again", tmp_path / "two"):
        assert (other / "word_map.json").read_bytes() == (first / "word_map.json").read_bytes()
        for split in ("train", "val", "test"):
            a, b = read_split(first / f"{split}.hdf5"), read_split(other / f"{split}.hdf5")
            assert a.keys() == b.keys()
            for key in a:
                if key == "attrs":
                    assert a[key] == b[key]
                elif isinstance(a[key], list):
                    assert a[key] == b[key], key
                else:
                    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.parametrize("slots_per_worker, per_task", [(1, 8), (2, 2)], ids=["1 task in flight", "2 in flight"])
def test_shared_slots_reused_many_times_give_identical_outputs(
    tmp_path, synthetic_prepared, monkeypatch, slots_per_worker, per_task
):
    """Issue 10: workers hand images over in shared-memory slots. With 2 slots (1 task of 2 images in flight)
    or 4 (2 tasks of 2, which the two workers decode at once) for 60 images, every slot is reused 15-30 times;
    the output is still byte for byte the 1-worker one."""
    monkeypatch.setattr(cif, "SLOTS_PER_WORKER", slots_per_worker)
    monkeypatch.setattr(cif, "IMAGES_PER_TASK", per_task)
    used = []
    original = cif.ImageDecoder.__call__

    def spy(self, paths, size):
        used.append(None if self.slots is None else len(self.slots))
        yield from original(self, paths, size)

    monkeypatch.setattr(cif.ImageDecoder, "__call__", spy)
    opts = dict(
        captions_per_image=5, min_word_freq=1, image_size=synthetic_prepared.options.image_size, max_len=50, seed=0
    )
    prepare([synthetic_prepared.json], tmp_path / "two", workers=2, start_method="fork", **opts)
    assert used and set(used) == {2 * slots_per_worker}, used
    for split in ("train", "val", "test"):
        a, b = read_split(synthetic_prepared.out / f"{split}.hdf5"), read_split(tmp_path / "two" / f"{split}.hdf5")
        np.testing.assert_array_equal(a["images"], b["images"], err_msg=split)
        np.testing.assert_array_equal(a["captions"], b["captions"], err_msg=split)


def test_seed_changes_which_captions_are_chosen(tmp_path, synthetic_prepared):
    prepare([synthetic_prepared.json], tmp_path / "s0", captions_per_image=2, seed=0)
    prepare([synthetic_prepared.json], tmp_path / "s1", captions_per_image=2, seed=1)
    a, b = (read_split(tmp_path / s / "train.hdf5")["captions"] for s in ("s0", "s1"))
    assert a.shape == b.shape and not np.array_equal(a, b)


# --------------------------------------------------------------------------------------------- word map
def test_word_map_counts_training_captions_only_and_respects_min_freq(tmp_path):
    for name in "abc":
        solid(tmp_path / f"{name}.png", (0, 0, 0))
    entries = [
        {
            "filename": "a.png",
            "split": "train",
            "sentences": [sentence("dog dog cat"), sentence("dog cat bird"), sentence("dog horse horse horse")],
        },
        {"filename": "b.png", "split": "val", "sentences": [sentence("zebra zebra zebra zebra zebra dog")]},
        {"filename": "c.png", "split": "restval", "sentences": [sentence("cat")]},
    ]
    source = write_karpathy(tmp_path / "d.json", entries)
    prepare([source], tmp_path / "out", min_word_freq=3, captions_per_image=3)
    word_map = read_word_map(tmp_path / "out")
    # dog 4, cat 3 (one from restval), horse 3, bird 1; zebra is only in val. Ties are alphabetical.
    assert word_map == {"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": 3, "dog": 4, "cat": 5, "horse": 6}
    val = read_split(tmp_path / "out" / "val.hdf5")
    assert val["captions"][0].tolist()[:9] == [1, 3, 3, 3, 3, 3, 4, 2, 0]  # zebra -> <unk>
    assert image_refs(val, 0) == [["zebra"] * 5 + ["dog"]]  # references keep the real words


def test_captions_per_image_sampled_topped_up_and_max_len(tmp_path):
    for name in "abc":
        solid(tmp_path / f"{name}.png", (0, 0, 0))
    many = [sentence(f"w{k} x") for k in range(6)]
    entries = [
        {"filename": "a.png", "split": "train", "sentences": many},
        {"filename": "b.png", "split": "train", "sentences": [sentence("only one"), sentence("far too long a text")]},
        {"filename": "c.png", "split": "train", "sentences": [sentence("every caption here is long")]},
    ]
    source = write_karpathy(tmp_path / "d.json", entries)
    max_len, c = 3, 4
    prepare([source], tmp_path / "out", captions_per_image=c, max_len=max_len)
    word_map = read_word_map(tmp_path / "out")
    assert "far" not in word_map and "too" not in word_map  # words of too-long captions are not counted
    train = read_split(tmp_path / "out" / "train.hdf5")
    assert train["attrs"]["max_len"] == max_len and train["attrs"]["captions_per_image"] == c
    assert train["captions"].shape == (3 * c, max_len + 2)
    rows = decode_rows(train["captions"], word_map)
    assert len({tuple(r) for r in rows[:c]}) == c and all(r in [[f"w{k}", "x"] for k in range(6)] for r in rows[:c])
    assert rows[c : 2 * c] == [["only", "one"]] * c  # topped up by repetition, the long caption never used
    assert all(len(r) == max_len for r in rows[2 * c :])  # the only caption is truncated to max_len
    assert train["caplens"].tolist() == [len(r) + 2 for r in rows]
    assert (train["caplens"] <= max_len + 2).all()
    for row, length in zip(train["captions"], train["caplens"]):
        assert row[0] == 1 and row[length - 1] == 2 and (row[length:] == 0).all()


def test_word_map_from_synthetic_run(synthetic_prepared):
    word_map = read_word_map(synthetic_prepared.out)
    assert [word_map[t] for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert sorted(word_map.values()) == list(range(len(word_map)))
    train = read_split(synthetic_prepared.out / "train.hdf5")
    assert sum(synthetic_prepared.counts.values()) == 60
    assert train["images"].shape[1:] == (3, 64, 64)
    assert 3 not in train["captions"]  # min freq 1: every training word is known
    assert "objects" in train  # the synthetic set's boxes are carried through


# ------------------------------------------------------------------------------------------ real data
def test_flickr8k_real_subset(tmp_path):
    if not (FLICKR8K / "Flickr8k.token.txt").is_file():
        pytest.skip(f"Flickr8k not found at {FLICKR8K}: this test needs the real dataset (see its README.md)")
    folder = tmp_path / "f8k"
    (folder / "Flicker8k_Dataset").mkdir(parents=True)
    chosen = {}
    for list_name in ("train", "dev", "test"):
        names = (FLICKR8K / f"Flickr_8k.{list_name}Images.txt").read_text().split()[:10]
        chosen[list_name] = names
        (folder / f"Flickr_8k.{list_name}Images.txt").write_text("\n".join(names) + "\n")
        for name in names:
            (folder / "Flicker8k_Dataset" / name).symlink_to(FLICKR8K / "Flicker8k_Dataset" / name)
    wanted = {n for names in chosen.values() for n in names} | {"2258277193_586949ec62.jpg.1"}  # + the bogus key
    with open(FLICKR8K / "Flickr8k.token.txt", encoding="utf-8") as f:
        lines = [line for line in f if line.split("#", 1)[0] in wanted]
    (folder / "Flickr8k.token.txt").write_text("".join(lines), encoding="utf-8")

    counts = prepare([folder], tmp_path / "out", captions_per_image=5, image_size=32, workers=2)
    assert counts == {"train": 10, "val": 10, "test": 10}
    for split, list_name in (("train", "train"), ("val", "dev"), ("test", "test")):
        data = read_split(tmp_path / "out" / f"{split}.hdf5")
        assert data["image_ids"] == chosen[list_name]
        assert np.diff(data["reference_offsets"]).tolist() == [5] * 10
        assert data["captions"].shape[0] == 50
        images = data["images"].astype(np.float64)
        assert images.shape == (10, 3, 32, 32)
        stds = images.reshape(10, -1).std(axis=1)
        assert (stds > 10).all(), stds  # photos, not constant or blank images
        assert len({img.tobytes() for img in data["images"]}) == 10


# ------------------------------------------------------------------------------------------ empty results
def snapshot(folder):
    """Every file in ``folder`` (hidden temporaries included) with its bytes."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def temporaries(folder):
    return sorted(p.name for p in folder.rglob("*.tmp"))


def is_progress_bar(line):
    """A tqdm bar: its rate reads "2.42img/s", or "1.65s/img" while the first images come slowly."""
    return "img/s" in line or "s/img" in line


def one_error_line(result):
    """Assert a CLI run failed with exactly one ``error:`` line and no traceback; return that line."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    # tqdm's progress bars go to stderr too, redrawn with carriage returns
    lines = [line for line in re.split(r"[\r\n]", result.stderr) if line.strip() and not is_progress_bar(line)]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_cli_without_images_folder_fails_and_keeps_earlier_output(tmp_path):
    # Karpathy's JSON lives apart from its images; without --images every file is "not found".
    images = tmp_path / "images"
    entries = []
    for i, split in enumerate(["train"] * 4 + ["val", "test"]):
        solid(images / f"{i}.png", colour_of(i))
        entries.append({"filename": f"{i}.png", "imgid": i, "split": split, "sentences": [sentence("a red dog")]})
    source = write_karpathy(tmp_path / "json" / "dataset_flickr8k.json", entries)
    out = tmp_path / "out"
    assert run_cli(source, "--images", images, "--out", out, "--min-word-freq", 1, "--workers", 1).returncode == 0
    before = snapshot(out)
    assert set(before) == OUTPUTS

    line = one_error_line(run_cli(source, "--out", out, "--min-word-freq", 1, "--workers", 2))
    assert "none of the 4 train images could be read" in line and "file not found" in line
    assert f"nothing was written to {out}" in line and "--images" in line
    assert snapshot(out) == before  # the earlier good output is untouched, and no temporary is left


@pytest.mark.parametrize("case", ["no val images", "only val image unreadable"])
def test_empty_val_split_is_a_warning_and_an_empty_file(tmp_path, capsys, case):
    entries = []
    for i, split in enumerate(["train", "train", "test"] + (["val"] if case != "no val images" else [])):
        path = solid(tmp_path / f"{i}.png", colour_of(i)) if split != "val" else _bad("text", tmp_path / f"{i}")
        entries.append({"filename": path.name, "imgid": i, "split": split, "sentences": [sentence("a red dog")]})
    source = write_karpathy(tmp_path / "dataset_x.json", entries)
    assert prepare([source], tmp_path / "out") == {"train": 2, "val": 0, "test": 1}
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning")]
    assert warnings == ["warning: the val split is empty: val.hdf5 has no images"]
    val = read_split(tmp_path / "out" / "val.hdf5")
    assert val["images"].shape == (0, 3, SIZE, SIZE) and val["captions"].shape == (0, 22)
    assert len(val["image_ids"]) == 0 and val["reference_offsets"].tolist() == [0]


def test_out_that_is_a_file_and_missing_image_folder_are_one_line_errors(tmp_path, synthetic_prepared):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(CamEyeError, match="--out must be a folder"):
        prepare([synthetic_prepared.json], tmp_path / "file")
    with pytest.raises(CamEyeError, match="image folder not found"):
        prepare([synthetic_prepared.json], tmp_path / "out", images=tmp_path / "nowhere")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------- evaluation-only sets
def write_coco_captions(path, images, captions):
    """COCO captions_*.json: ``images`` maps id -> file name, ``captions`` is a list of (image id, caption)."""
    data = {
        "images": [{"id": i, "file_name": name} for i, name in images.items()],
        "annotations": [{"id": k, "image_id": i, "caption": c} for k, (i, c) in enumerate(captions)],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def coco_eval_set(folder, name="captions.json"):
    """Three images with two captions each, named neither train nor val (like coco-dev80)."""
    images = {i: f"{i:012d}.jpg" for i in (5, 3, 9)}
    for i, file_name in images.items():
        solid(folder / "images" / file_name, colour_of(i), fmt="JPEG")
    captions = [(i, f"A dog and a {word} number {i}.") for i in images for word in ("cat", "zebra")]
    return write_coco_captions(folder / name, images, captions), folder / "images"


def word_map_file(path, words):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({w: i for i, w in enumerate([*SPECIAL_TOKENS, *words])}, indent=2))
    return path


def test_eval_only_coco_file_is_prepared_with_a_given_word_map(tmp_path, capsys):
    source, images = coco_eval_set(tmp_path / "dev")
    given = word_map_file(tmp_path / "model" / "word_map.json", ["a", "dog", "and", "cat", "number", "3", "5"])
    out = tmp_path / "out"
    counts = prepare([source], out, images=images, captions_per_image=2, word_map=given)
    assert counts == {"train": 0, "val": 0, "test": 3}  # --split test by default for an evaluation-only set
    assert (out / "word_map.json").read_bytes() == given.read_bytes()  # a copy, not a rebuilt vocabulary
    assert "evaluation-only set" in capsys.readouterr().out
    test = read_split(out / "test.hdf5")
    assert test["image_ids"] == ["3", "5", "9"]
    word_map = read_word_map(out)
    for n, i in enumerate((3, 5, 9)):
        assert sorted(image_refs(test, n)) == [["a", "dog", "and", "a", w, "number", str(i)] for w in ("cat", "zebra")]
        rows = decode_rows(test["captions"][2 * n : 2 * n + 2], word_map)
        number = str(i) if str(i) in word_map else "<unk>"
        assert sorted(rows) == [["a", "dog", "and", "a", w, "number", number] for w in ("<unk>", "cat")]
        np.testing.assert_allclose(mean_colour(test["images"][n]), colour_of(i), atol=8)
    for split in ("train", "val"):
        assert read_split(out / f"{split}.hdf5")["images"].shape[0] == 0


def test_eval_only_split_option_and_coco_val_file_go_whole_to_one_split(tmp_path):
    source, images = coco_eval_set(tmp_path / "dev")
    given = word_map_file(tmp_path / "word_map.json", ["a", "dog"])
    assert prepare([source], tmp_path / "v", images=images, word_map=given, split="val")["val"] == 3
    # A COCO val file would be halved into val and test for a training set; evaluation-only, it stays whole.
    val_source, _ = coco_eval_set(tmp_path / "dev", name="captions_val2017.json")
    counts = prepare([val_source], tmp_path / "t", images=images, word_map=given)
    assert counts == {"train": 0, "val": 0, "test": 3}
    # The same file without a word map: a training set would have no training images.
    with pytest.raises(CamEyeError, match="no training images.*--word-map"):
        prepare([val_source], tmp_path / "none", images=images)


def test_coco_file_named_neither_train_nor_val_needs_split_or_word_map(tmp_path):
    source, images = coco_eval_set(tmp_path / "dev")
    with pytest.raises(CamEyeError, match=r"captions.json: the file name says neither train nor val.*--split"):
        prepare([source], tmp_path / "out", images=images)
    assert not (tmp_path / "out").exists()
    # --split train makes it a training set with its own vocabulary.
    assert prepare([source], tmp_path / "out", images=images, split="train")["train"] == 3
    assert "zebra" in read_word_map(tmp_path / "out")


def test_word_map_given_for_a_training_set_is_used_as_is(tmp_path, synthetic_prepared):
    given = word_map_file(tmp_path / "word_map.json", ["a", "red", "circle"])
    counts = prepare([synthetic_prepared.json], tmp_path / "out", word_map=given, min_word_freq=1)
    assert counts == synthetic_prepared.counts  # the source's own splits are kept
    assert (tmp_path / "out" / "word_map.json").read_bytes() == given.read_bytes()
    assert read_split(tmp_path / "out" / "train.hdf5")["captions"].max() < len(SPECIAL_TOKENS) + 3


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "word map not found"),
        ({"<pad>": 0, "<start>": 1, "<end>": 2, "dog": 3}, "must map <unk> to 3"),
        ({"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": 3}, "no words besides"),
        ("[1, 2]", "non-empty JSON object"),
    ],
    ids=["missing", "no <unk>", "special tokens only", "a list"],
)
def test_bad_word_map_is_a_one_line_error(tmp_path, content, message):
    source, images = coco_eval_set(tmp_path / "dev")
    path = tmp_path / "wm.json"
    if content is not None:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(CamEyeError, match=message) as info:
        prepare([source], tmp_path / "out", images=images, word_map=path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


COCO_DEV80 = ROOT.parent / "shared/data/coco-dev80"


def test_coco_dev80_with_a_word_map(tmp_path):
    if not (COCO_DEV80 / "captions.json").is_file():
        pytest.skip(f"coco-dev80 not found at {COCO_DEV80}: this test needs the real photos (see its README.md)")
    words = "a man on the of with in and is an table two dog cat people sitting street plate".split()
    given = word_map_file(tmp_path / "word_map.json", words)
    out = tmp_path / "coco80"
    result = run_cli(COCO_DEV80 / "captions.json", "--images", COCO_DEV80 / "images", "--word-map", given)
    assert result.returncode == 2 and "--out" in result.stderr  # argparse: --out is required
    result = run_cli(
        COCO_DEV80 / "captions.json", *("--images", COCO_DEV80 / "images", "--word-map", given, "--out", out),
        *("--image-size", 32, "--workers", 2),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "train 0, val 0, test 80 images" in result.stdout
    test = read_split(out / "test.hdf5")
    assert test["images"].shape == (80, 3, 32, 32) and len(set(test["image_ids"])) == 80
    assert np.diff(test["reference_offsets"]).min() >= 5 and test["captions"].shape == (400, 52)
    assert (out / "word_map.json").read_bytes() == given.read_bytes()


# ---------------------------------------------------------------------------------------------- vocabulary
def test_vocabulary_without_a_real_word_is_refused_naming_the_option(tmp_path):
    entries = []
    for i, text in enumerate(["A dog runs.", "Two cats sleep.", "A red car.", "Birds fly high."]):
        solid(tmp_path / f"{i}.png", colour_of(i))
        entries.append({"filename": f"{i}.png", "imgid": i, "split": "train", "sentences": [sentence(text)]})
    source = write_karpathy(tmp_path / "dataset_x.json", entries)
    line = one_error_line(run_cli(source, "--out", tmp_path / "out", "--workers", 1))  # default --min-word-freq 5
    assert "lower --min-word-freq (now 5)" in line and "4 training captions" in line
    assert not (tmp_path / "out").exists()
    assert run_cli(source, "--out", tmp_path / "out", "--workers", 1, "--min-word-freq", 2).returncode == 0
    assert list(read_word_map(tmp_path / "out")) == [*SPECIAL_TOKENS, "a"]


def test_captions_cut_to_max_len_are_counted_in_the_vocabulary(tmp_path):
    solid(tmp_path / "a.png", (0, 0, 0))
    solid(tmp_path / "b.png", (9, 9, 9))
    long = [sentence("a brown dog jumps over the fence"), sentence("a brown dog leaps over a gate")]
    entries = [
        {"filename": "a.png", "split": "train", "sentences": long},  # only captions longer than --max-len
        {
            "filename": "b.png",
            "split": "train",
            "sentences": [sentence("a cat"), sentence("a cat sits on a very tall wall")],
        },
    ]
    prepare([write_karpathy(tmp_path / "d.json", entries)], tmp_path / "out", max_len=4, captions_per_image=2)
    word_map = read_word_map(tmp_path / "out")
    assert {"brown", "dog", "jumps", "leaps"} <= set(word_map)  # counted after truncation
    assert not {"over", "fence", "sits", "wall"} & set(word_map)  # cut off, or in a caption never encoded
    rows = decode_rows(read_split(tmp_path / "out" / "train.hdf5")["captions"], word_map)
    assert sorted(rows[:2]) == [["a", "brown", "dog", "jumps"], ["a", "brown", "dog", "leaps"]]  # no <unk>
    assert rows[2:] == [["a", "cat"], ["a", "cat"]]


def test_max_len_help_says_what_happens():
    text = " ".join(cif.build_parser().format_help().split())
    assert "longer captions are left out when the image has a shorter one, and cut to this length" in text


# -------------------------------------------------------------------------------------------------- text
@pytest.mark.parametrize(
    "text, words",
    [
        ("Café crème brûlée, jalapeño!", ["café", "crème", "brûlée", "jalapeño"]),
        ("cafe\u0301 CAFÉ", ["café", "café"]),  # decomposed and composed: NFC makes them one word
        ("a girl’s dog's toyʼs ＇quote＇", ["a", "girls", "dogs", "toys", "quote"]),
        ("Straße ΣΟΦΙΑ İstanbul", ["strasse", "σοφια", "i̇stanbul"]),  # case-folded
        ("一只狗在草地上跑。", ["一只狗在草地上跑"]),  # no spaces: one word per run of letters
        ("犬が公園を走っている", ["犬が公園を走っている"]),
        ("कुत्ता घास पर दौड़ता है", ["कुत्ता", "घास", "पर", "दौड़ता", "है"]),  # vowel signs and nukta stay in
        ("كلب يجري", ["كلب", "يجري"]),
        ("2 dogs, 3rd place; 10:30 🐶 !!! ...", ["2", "dogs", "3rd", "place", "10", "30"]),
        ("t-shirt\tand\u00a0jeans\r\n", ["t", "shirt", "and", "jeans"]),
    ],
)
def test_tokenize_keeps_unicode_words_whole(text, words):
    assert captions.tokenize(text) == words


def test_flickr8k_unicode_captions_are_kept(tmp_path):
    captions = [
        ("a.jpg#0", "A café serves crème brûlée"),
        ("a.jpg#1", "A girl’s jalapeño"),
        ("a.jpg#2", "A girl's café"),
    ]
    captions += [("b.jpg#0", "一只狗在草地上跑。"), ("c.jpg#0", "A dog")]
    splits = {"train": ["a.jpg", "b.jpg"], "val": [], "test": ["c.jpg"]}
    write_flickr8k(tmp_path / "f8k", captions, splits, {n: (9, 9, 9) for n in ("a.jpg", "b.jpg", "c.jpg")})
    assert prepare([tmp_path / "f8k"], tmp_path / "out")["train"] == 2  # the Chinese caption's image is kept
    train = read_split(tmp_path / "out" / "train.hdf5")
    assert image_refs(train, 0) == [
        ["a", "café", "serves", "crème", "brûlée"],
        ["a", "girls", "jalapeño"],
        ["a", "girls", "café"],
    ]
    assert image_refs(train, 1) == [["一只狗在草地上跑"]]
    assert train["references_raw"][1] == "A girl’s jalapeño"
    assert {"café", "crème", "brûlée", "jalapeño", "girls", "一只狗在草地上跑"} <= set(read_word_map(tmp_path / "out"))


def test_karpathy_tokens_are_normalised_like_captions(tmp_path):
    solid(tmp_path / "a.png", (0, 0, 0))
    tokens = ["A", "Girl’s", "!!!", "...", "T-shirt", "cafe\u0301", "2", "-"]
    entries = [{"filename": "a.png", "split": "train", "sentences": [{"tokens": tokens}]}]
    prepare([write_karpathy(tmp_path / "d.json", entries)], tmp_path / "out", captions_per_image=1)
    train = read_split(tmp_path / "out" / "train.hdf5")
    assert image_refs(train, 0) == [["a", "girls", "t", "shirt", "café", "2"]]
    assert train["references_raw"] == [" ".join(tokens)]  # no raw sentence: the tokens as given


@pytest.mark.parametrize(
    "sentences, message",
    [
        ([{"tokens": "a dog runs", "raw": "a dog runs"}], r"'tokens' must be a list of strings, got \"a dog runs\""),
        ([{"tokens": ["a", 2]}], r"'tokens' must be a list of strings, got \[\"a\", 2\]"),
        ([{"tokens": ["a"], "raw": None}], "'raw' must be a string"),
        ("a dog", "'sentences' must be a list"),
    ],
    ids=["tokens a string", "tokens with a number", "raw not a string", "sentences a string"],
)
def test_malformed_karpathy_captions_name_the_image(tmp_path, sentences, message):
    solid(tmp_path / "a.png", (0, 0, 0))
    entries = [
        {"filename": "a.png", "split": "train", "sentences": [sentence("a dog")]},
        {"filename": "b.png", "split": "train", "sentences": sentences},
    ]
    with pytest.raises(CamEyeError, match=message) as info:
        prepare([write_karpathy(tmp_path / "d.json", entries)], tmp_path / "out")
    assert "d.json: image entry 1 (b.png)" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("which", ["token file", "split list"])
def test_latin1_flickr8k_file_is_one_line_naming_file_and_line(tmp_path, which):
    captions = [("a.jpg#0", "A dog"), ("b.jpg#0", "A cat")]
    write_flickr8k(tmp_path / "f8k", captions, {"train": ["a.jpg"], "val": ["b.jpg"], "test": []}, {})
    if which == "token file":
        name, content = "Flickr8k.token.txt", "a.jpg#0\tA dog\nb.jpg#0\tA caf\xe9 with a cat\n"
    else:
        name, content = "Flickr_8k.devImages.txt", "b.jpg\nc\xe9.jpg\n"
    (tmp_path / "f8k" / name).write_bytes(content.encode("latin-1"))
    column = content.splitlines()[1].index("\xe9") + 1
    line = one_error_line(run_cli(tmp_path / "f8k", "--out", tmp_path / "out", "--workers", 1))
    path = tmp_path / "f8k" / name
    assert line == f"error: {path}:2: not UTF-8 text (byte 0xe9 at column {column}); save the file as UTF-8"
    assert not (tmp_path / "out").exists()


def test_byte_order_marks_crlf_and_windows_paths_are_read(tmp_path):
    # Flickr8k files saved by a Windows editor: UTF-8 BOM and CRLF line ends.
    images = {"a.jpg": (200, 0, 0), "b.jpg": (0, 200, 0)}
    write_flickr8k(tmp_path / "f8k", [], {"train": [], "val": [], "test": []}, images)
    bom = b"\xef\xbb\xbf"
    (tmp_path / "f8k" / "Flickr8k.token.txt").write_bytes(
        bom + "a.jpg#0\tA red café\r\nb.jpg#0\tA green one \r\n".encode()
    )
    (tmp_path / "f8k" / "Flickr_8k.trainImages.txt").write_bytes(bom + b"a.jpg\r\nb.jpg\r\n")
    assert prepare([tmp_path / "f8k"], tmp_path / "out1", captions_per_image=1)["train"] == 2
    train = read_split(tmp_path / "out1" / "train.hdf5")
    assert train["image_ids"] == ["a.jpg", "b.jpg"] and train["references_raw"] == ["A red café", "A green one"]
    # Karpathy JSON with a BOM, a Windows folder in filepath, and a null filepath; a COCO file with a BOM.
    solid(tmp_path / "k" / "train2014" / "x.png", (0, 0, 200))
    solid(tmp_path / "k" / "y.png", (0, 200, 0))
    entries = [
        {"filepath": "train2014\\", "filename": "x.png", "split": "train", "sentences": [sentence("a blue one")]},
        {"filepath": None, "filename": "y.png", "split": "train", "sentences": [sentence("a green one")]},
    ]
    source = tmp_path / "k" / "dataset_k.json"
    source.write_bytes(bom + json.dumps({"images": entries}).encode())
    assert prepare([source], tmp_path / "out2", captions_per_image=1)["train"] == 2
    images = read_split(tmp_path / "out2" / "train.hdf5")["images"]
    assert [np.argmax(mean_colour(image)) for image in images] == [2, 1]
    coco = write_coco_captions(tmp_path / "k" / "captions_train2014.json", {1: "x.png"}, [(1, "a blue one")])
    coco.write_bytes(bom + coco.read_bytes())
    assert prepare([coco], tmp_path / "out3", images=tmp_path / "k", captions_per_image=1)["train"] == 1


def test_coco_captions_that_are_empty_are_dropped_and_non_strings_refused(tmp_path):
    images = {1: "a.png", 2: "b.png"}
    for i, name in images.items():
        solid(tmp_path / "img" / name, colour_of(i))
    captions = [(1, "A dog."), (1, "   "), (1, "!!!"), (2, "A cat."), (2, "")]
    source = write_coco_captions(tmp_path / "captions_train2014.json", images, captions)
    assert prepare([source], tmp_path / "out", images=tmp_path / "img", captions_per_image=1)["train"] == 2
    train = read_split(tmp_path / "out" / "train.hdf5")
    assert train["references"] == ["a dog", "a cat"] and train["references_raw"] == ["A dog.", "A cat."]
    for bad in (None, 5, ["a", "dog"]):
        source = write_coco_captions(tmp_path / "captions_train2014.json", images, [(1, "A dog."), (2, bad)])
        with pytest.raises(CamEyeError, match=r"annotation 1 of image 2: 'caption' must be a string"):
            prepare([source], tmp_path / "bad", images=tmp_path / "img")


def test_unknown_karpathy_split_is_named_in_a_warning(tmp_path, capsys):
    solid(tmp_path / "a.png", (0, 0, 0))
    entries = [
        {"filename": "a.png", "split": s, "sentences": [sentence("a dog")]} for s in ("train", "dev", "dev", "Test")
    ]
    prepare([write_karpathy(tmp_path / "d.json", entries)], tmp_path / "out")
    err = capsys.readouterr().err
    assert "ignored images whose split is not train/val/test/restval: 'Test' (1), 'dev' (2)" in err


# ------------------------------------------------------------------------------------------ interruptions
def slow_source(folder, n=100):
    """``n`` entries of one large noise PNG (~0.1 s each to decode), so preparation takes a few seconds. (A PNG:
    a large JPEG is now decoded at a reduced scale, fast enough for preparation to end before the signal.)"""
    folder.mkdir(parents=True, exist_ok=True)
    noise = np.random.default_rng(0).integers(0, 256, (2000, 2000, 3), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "big.png", compress_level=1)
    entries = [
        {
            "filename": "big.png",
            "imgid": i,
            "split": "val" if i % 10 == 0 else "train",
            "sentences": [sentence("a dog")],
        }
        for i in range(n)
    ]
    return write_karpathy(folder / "dataset_slow.json", entries)


def small_source(folder):
    for i in range(3):
        solid(folder / f"{i}.png", colour_of(i))
    entries = [{"filename": f"{i}.png", "imgid": i, "split": s, "sentences": [sentence("a dog")]} for i, s in
               enumerate(["train", "val", "test"])]  # fmt: skip
    return write_karpathy(folder / "dataset_small.json", entries)


def worker_pids(pid):
    """Child processes of ``pid`` (Linux /proc), e.g. its pool workers."""
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def running(pid):
    """True while ``pid`` exists and is not a zombie (an orphan's zombie may wait for a reaper that never comes)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_for(condition, what, proc, timeout=120):
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended (status {proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc to find the pool workers")
@pytest.mark.parametrize("how", ["SIGTERM to the process group", "Ctrl-C (SIGINT to the group)", "SIGKILL"])
def test_interrupted_preparation_leaves_no_temporary_and_keeps_earlier_output(tmp_path, how):
    out = tmp_path / "out"
    prepare([small_source(tmp_path / "small")], out, captions_per_image=1)
    before = snapshot(out)
    # 200 images: the first HDF5 write (32 images) must come well before the end, with workers decoding ahead
    source = slow_source(tmp_path / "slow", n=200)
    log_out, log_err = open(tmp_path / "stdout", "w+"), open(tmp_path / "stderr", "w+")
    args = [sys.executable, str(SCRIPT), source, "--out", out, "--workers", 2, "--min-word-freq", 1]
    # Ctrl-C as in a terminal: a test run started in the background of a non-interactive shell (CI) inherits
    # SIGINT ignored, and so would the child, which then finished instead of stopping.
    proc = subprocess.Popen(list(map(str, args)), stdout=log_out, stderr=log_err, cwd=ROOT, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    try:
        # Mid-way: the training split's temporary file holds a few images (256 px: 196 kB each).
        def big_temporary() -> bool:
            return any(p.stat().st_size > 1_000_000 for p in out.glob(f".train.hdf5.*-pid{proc.pid}.*.tmp"))

        wait_for(big_temporary, "a partly written train.hdf5", proc)
        workers = worker_pids(proc.pid)
        assert len(workers) == 2
        if how == "SIGKILL":
            os.kill(proc.pid, signal.SIGKILL)
        else:
            os.killpg(proc.pid, signal.SIGTERM if how.startswith("SIGTERM") else signal.SIGINT)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    log_out.seek(0), log_err.seek(0)
    stdout, stderr = log_out.read(), log_err.read()
    assert "Traceback" not in stdout + stderr and "Error" not in stderr  # no worker tracebacks, no BrokenPipeError
    deadline = time.monotonic() + 30
    while any(running(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(running(p) for p in workers), "pool workers outlived their parent"
    visible = {name: data for name, data in snapshot(out).items() if not name.startswith(".")}
    assert visible.keys() == before.keys()
    changed = [name for name in visible if visible[name] != before[name]]
    assert changed == [], f"earlier outputs replaced (exit {proc.returncode}): {stdout[-500:]!r} {stderr[-1500:]!r}"

    if how == "SIGKILL":
        assert proc.returncode == -signal.SIGKILL
        assert temporaries(out)  # a killed process cannot clean up: the next run (a new process) does
        again = [
            sys.executable,
            str(SCRIPT),
            small_source(tmp_path / "small"),
            "--out",
            out,
            "--captions-per-image",
            1,
            "--min-word-freq",
            1,
            "--max-len",
            20,
            "--image-size",
            SIZE,
            "--workers",
            1,
        ]  # as prepare() above
        subprocess.run(list(map(str, again)), cwd=ROOT, check=True, capture_output=True)
    else:
        status, what = (143, "terminated (SIGTERM)") if how.startswith("SIGTERM") else (130, "interrupted")
        assert proc.returncode == status, stderr
        last = [line for line in re.split(r"[\r\n]", stderr) if line.strip() and not is_progress_bar(line)]
        assert last == [f"{what} while preparing {out}: nothing was half-written there; run again"]
    assert temporaries(out) == [] and snapshot(out) == before


# ---------------------------------------------------------------------------------------------- full disk
def test_full_disk_is_one_line_and_keeps_earlier_output(small_disk, synthetic_prepared):
    out = small_disk / "out"
    source = synthetic_prepared.json
    prepare([source], out, image_size=16)  # 60 images at 16 px fit in 2 MB
    before = snapshot(out)
    args = [source, "--out", out, "--min-word-freq", 1, "--image-size", 128, "--workers", 2]  # 3 MB of images

    # Checked before starting, from the estimated size.
    line = one_error_line(run_cli(*args))
    assert line.startswith("error: preparing 60 images needs about") and f"is free on {small_disk}" in line
    assert snapshot(out) == before

    # When the estimate fits but the disk fills anyway (another job writes): the write that fails is reported
    # in one line, HDF5 is closed cleanly (it used to segfault at exit, status 139), and nothing is half-written.
    code = "import sys, create_input_files as c; c.check_free_space = lambda *a: None; c.main(sys.argv[1:])"
    result = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, cwd=ROOT)
    assert one_error_line(result) == f"error: no space left on {small_disk} while writing {out / 'train.hdf5'}"
    assert snapshot(out) == before and temporaries(out) == []


# ------------------------------------------------------------------------------------------ fast decoding
def smooth_photo(h, w, seed=0):
    """A photo-like H x W x 3 uint8 image: smooth colour gradients plus mild noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([np.sin(6 * xx + c) * np.cos(4 * yy - c) for c in range(3)], axis=-1)
    return np.clip(127 + 100 * base + rng.normal(0, 6, (h, w, 3)), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("shape", [(224, 224), (300, 500), (40, 30)])
def test_resize_equals_pil_bicubic_within_rounding(shape):
    """The torch uint8 kernel load_image uses is PIL's bicubic filter (up and down), not a cheaper one: their
    fixed-point roundings differ by a grey level at a few pixels (two, rarely, at an 8x enlargement)."""
    rgb = smooth_photo(*shape)
    expected = np.asarray(Image.fromarray(rgb).resize((256, 256), Image.Resampling.BICUBIC)).transpose(2, 0, 1)
    got = images.resize_uint8(rgb, 256)
    assert got.shape == (3, 256, 256) and got.dtype == np.uint8
    diff = np.abs(got.astype(int) - expected)
    assert diff.max() <= 2 and diff.mean() < 0.01


def test_large_jpeg_draft_decoding_matches_a_full_decode(tmp_path):
    """A JPEG 8x the target side is decoded at a reduced DCT scale (2x the target side), then resized: the
    result is within a few grey levels of decoding it whole."""
    path = tmp_path / "big.jpg"
    Image.fromarray(smooth_photo(2048, 2048)).save(path, quality=90)
    with Image.open(path) as im:
        im.draft(im.mode, (512, 512))
        assert im.size == (512, 512)  # the reduced scale is really used
    with Image.open(path) as im:
        full = np.asarray(im.convert("RGB").resize((256, 256), Image.Resampling.BICUBIC)).transpose(2, 0, 1)
    got = load_image(path, 256)
    diff = np.abs(got.astype(int) - full)
    assert diff.mean() < 1.5 and np.percentile(diff, 99) <= 6


# ------------------------------------------------------------------------------- the fast decoding paths
def _jpeg_variants(folder):
    """JPEGs of the kinds photos come in, each (path, whether simplejpeg should decode it)."""
    photo = Image.fromarray(smooth_photo(75, 101, seed=3))  # odd sides: partial MCUs at the edges
    kinds = {
        "4:2:0": dict(subsampling=2),
        "4:2:2": dict(subsampling=1),
        "4:4:4": dict(subsampling=0),
        "progressive": dict(progressive=True),
        "restart markers": dict(restart_marker_blocks=2),
        "low quality": dict(quality=20),
    }
    files = []
    for name, options in kinds.items():
        photo.save(path := folder / f"{name}.jpg", "JPEG", **{"quality": 90, **options})
        files.append((path, True))
    photo.convert("L").save(path := folder / "grey.jpg", "JPEG")
    files.append((path, True))
    _exif_jpeg(path := folder / "exif 1.jpg", 1)
    files.append((path, True))
    _exif_jpeg(path := folder / "exif 6.jpg", 6)  # turned by PIL: not simplejpeg's
    files.append((path, False))
    Image.new("CMYK", (24, 24), (0, 255, 255, 0)).save(path := folder / "cmyk.jpg", "JPEG")
    files.append((path, False))
    Image.fromarray(smooth_photo(128, 160)).save(path := folder / "big.jpg", "JPEG")  # 4 x 32: PIL's draft
    files.append((path, False))
    return files


def test_jpegs_decode_to_the_same_pixels_by_simplejpeg_as_by_pil(tmp_path, monkeypatch):
    """Issue 10: plain JPEGs are decoded by simplejpeg, pixel for pixel what PIL's decode gives; orientated,
    CMYK and draft-sized ones (at least 4 x 32 px) still go through PIL."""
    files = _jpeg_variants(tmp_path)
    by_pil = {}
    with monkeypatch.context() as m:
        m.setattr(images, "_decodes_as_plain_jpeg", lambda im, size: False)
        for path, _ in files:
            by_pil[path] = images.decode_image(path, 32)
    calls = []
    original = images.simplejpeg.decode_jpeg
    monkeypatch.setattr(images.simplejpeg, "decode_jpeg", lambda *a, **k: calls.append(1) or original(*a, **k))
    for path, plain in files:
        calls.clear()
        got = images.decode_image(path, 32)
        assert bool(calls) == plain, path.name
        assert got.dtype == np.uint8 and got.ndim == 3 and got.shape[2] == 3, path.name
        np.testing.assert_array_equal(got, by_pil[path], err_msg=path.name)


def test_a_jpeg_libjpeg_only_warns_about_is_decoded_as_pil_decodes_it(tmp_path, monkeypatch):
    """A JPEG with junk after its end marker makes simplejpeg (strict) raise; PIL decodes it: so do we."""
    path = tmp_path / "junk.jpg"
    Image.fromarray(smooth_photo(40, 40)).save(path, "JPEG")
    data = path.read_bytes()
    path.write_bytes(data[:-2] + b"\x00" * 64 + data[-2:])  # stray bytes before the end marker
    with Image.open(path) as im:
        expected = np.asarray(im.convert("RGB"))
    raised = []
    original = images.simplejpeg.decode_jpeg

    def spy(*args, **kwargs):
        try:
            return original(*args, **kwargs)
        except ValueError as e:
            raised.append(e)
            raise

    monkeypatch.setattr(images.simplejpeg, "decode_jpeg", spy)
    np.testing.assert_array_equal(images.decode_image(path, SIZE), expected)
    assert len(raised) == 1  # simplejpeg was tried, and refused the file


def test_a_task_resizes_same_shaped_images_together_with_the_same_pixels(tmp_path, monkeypatch):
    """_load_jobs resizes the images of one shape in one call; each comes out as load_image makes it alone,
    in its own slot or returned, and a bad file keeps its place with its reason."""
    files = [p for p, _ in _jpeg_variants(tmp_path)]
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    files.insert(3, tmp_path / "broken.jpg")
    solid(png := tmp_path / "solid.png", (10, 200, 30), size=(75, 101))
    files.append(png)
    expected = [load_one(p) for p in files]
    assert expected[3] == (None, "not an image (or an unsupported format)") and sum(e[0] is None for e in expected) == 1
    got = cif._load_jobs(SIZE, [(str(p), None) for p in files])
    slots = np.zeros((len(files), 3, SIZE, SIZE), np.uint8)
    monkeypatch.setattr(cif, "_worker_slots", slots)
    in_slots = cif._load_jobs(SIZE, [(str(p), k) for k, p in enumerate(files)])
    for k, ((want, reason), (image, why), (slot, why2)) in enumerate(zip(expected, got, in_slots)):
        assert why == why2 == reason, files[k].name
        if want is None:
            assert image is None and slot is None
            continue
        assert image.flags.c_contiguous and image.shape == (3, SIZE, SIZE)
        np.testing.assert_array_equal(image, want, err_msg=files[k].name)
        assert slot == k
        np.testing.assert_array_equal(slots[k], want, err_msg=files[k].name)


def test_the_parent_process_does_not_import_torch(synthetic_prepared, tmp_path):
    """Issue 10: only the decoding workers need torch (to resize); the parent reads captions and writes HDF5
    while they import it, and exits without torch's 0.6 s of interpreter shutdown."""
    source, out = synthetic_prepared.json, tmp_path / "out"
    code = (
        "import sys, create_input_files as c\n"
        f"c.main([{str(source)!r}, '--out', {str(out)!r}, '--workers', '2', '--min-word-freq', '1'])\n"
        "print('torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.splitlines()[-1] == "False" and (out / "train.hdf5").is_file()


@pytest.mark.parametrize("workers, imported", [(2, False), (3, True)])
def test_more_than_two_workers_share_the_parents_import_of_torch(workers, imported):
    """Beyond the default 2 workers the parent imports torch before forking them, so that they share its pages
    (each worker's own import costs it 0.3 GB)."""
    if imported and not sys.platform.startswith("linux"):
        pytest.skip("workers share the parent's pages only when forked (Linux)")
    code = (
        "import sys, create_input_files as c\n"
        f"with c.ImageDecoder({workers}, None, 16) as d:\n"
        "    assert len(d.workers) == " + str(workers) + "\n"
        "print('torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == str(imported)


def _paths_for_workers(folder, n=400):
    for i in range(n):
        Image.fromarray(smooth_photo(60, 60, seed=i % 7)).save(folder / f"{i}.jpg", "JPEG")
    return [str(folder / f"{i}.jpg") for i in range(n)]


def test_a_worker_dying_while_the_writer_is_busy_is_the_same_one_line_error(tmp_path):
    """A worker killed while the parent is still writing earlier images breaks the pool before the next task
    is handed out: that is the same one-line error, not the pool's BrokenProcessPool traceback."""
    paths = _paths_for_workers(tmp_path)
    with pytest.raises(CamEyeError, match=r"worker process died \(exit status -9"):
        with cif.ImageDecoder(2, "fork", 32) as decode:
            for k, _ in enumerate(decode(paths, 32)):
                if k == 20:
                    os.kill(decode.workers[0].pid, signal.SIGKILL)
                    time.sleep(1.0)  # a slow HDF5 write


def test_each_image_stays_valid_until_the_next_is_asked_for(tmp_path):
    """Slots are reused: an image handed over is compared, after a pause that lets the workers run ahead, with
    the same image decoded alone, across several rounds of the slots."""
    paths = _paths_for_workers(tmp_path, n=150)
    expected = {p: load_image(p, 32) for p in paths[:7]}  # the photos repeat with period 7 (seed i % 7)
    with cif.ImageDecoder(2, "fork", 32) as decode:
        assert decode.slots is not None and len(decode.slots) < len(paths)
        for k, (image, reason) in enumerate(decode(paths, 32)):
            if k % 10 == 0:
                time.sleep(0.05)
            assert reason == "" and np.array_equal(image, expected[paths[k % 7]]), k


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["one killed (OOM)", "all sent SIGTERM"])
def test_a_worker_dying_midway_is_a_one_line_error_or_terminated(tmp_path, sig):
    """A worker killed (the OOM killer's SIGKILL) stops preparation with a one-line CamEyeError naming the exit
    status; workers that all died of SIGTERM (sent to the process group) mean Terminated, even if the
    parent's own SIGTERM was lost."""
    paths = _paths_for_workers(tmp_path)
    with pytest.raises(Terminated if sig == signal.SIGTERM else CamEyeError) as info:
        with cif.ImageDecoder(2, "fork", 32) as decode:
            for k, _ in enumerate(decode(paths, 32)):
                if k == 20:
                    for p in decode.workers if sig == signal.SIGTERM else decode.workers[:1]:
                        os.kill(p.pid, sig)
    if sig == signal.SIGKILL:
        assert str(info.value).startswith("an image-decoding worker process died (exit status -9")
    assert all(p.exitcode is not None for p in decode.workers)


# ------------------------------------------------------------------------------------- paths on the command line
@pytest.mark.parametrize("where", ["source", "--images", "--word-map"])
def test_a_url_is_refused_in_one_line_naming_it(tmp_path, where):
    """Issue 21: a URL became a mangled path (https:/...) reported as not found."""
    url = "https://example.com/dataset_x.json"
    args = {"source": [url], "--images": ["x.json", "--images", url], "--word-map": ["x.json", "--word-map", url]}
    result = run_cli(*args[where], "--out", tmp_path / "out")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1].endswith(f"{url}: URLs are not read: download the file first")


@pytest.mark.parametrize("out", ["file", "file/sub"])
def test_out_under_or_at_a_file_is_one_line_and_nothing_is_written(tmp_path, synthetic_prepared, out):
    """Issue 21: `--out FILE/sub` was a NotADirectoryError traceback after the captions had been read."""
    (tmp_path / "file").write_text("not a folder")
    line = one_error_line(run_cli(synthetic_prepared.json, "--out", tmp_path / out, "--workers", 1))
    if out == "file":
        assert line == f"error: --out must be a folder, but {tmp_path / 'file'} is a file"
    else:
        assert line == f"error: --out {tmp_path / out}: cannot make this folder: {tmp_path / 'file'} is a file"
    assert (tmp_path / "file").read_text() == "not a folder"


def test_no_exception_at_exit_after_a_one_line_error_from_a_running_pool():
    """Issue 21: once in ~124 runs an "Exception ignored ... Bad file descriptor" traceback followed a correct
    one-line error. At exit Python wakes each process pool's manager thread (concurrent.futures'
    ``_python_exit``: check that the wake-up pipe is open, then write to it) while that thread, still winding
    the killed pool down, may close the pipe in between. The race is made certain here by widening both sides:
    the manager closes the pipe 0.3 s late, and the exit's wake-up waits 0.6 s between its check and its write.
    The decoder now waits for the manager thread when it stops the pool, so nothing is left to race."""
    code = """if True:
        import time
        import concurrent.futures.process as cfp
        import create_input_files as c
        from utils import CamEyeError, cli_errors

        join_internals, wakeup = cfp._ExecutorManagerThread.join_executor_internals, cfp._ThreadWakeup.wakeup

        def join_later(self):
            time.sleep(0.3)
            join_internals(self)

        def wakeup_at_exit_slowly(self):
            if cfp._global_shutdown and not self._closed:  # _python_exit's call
                time.sleep(0.6)
                self._writer.send_bytes(b"")
            else:
                wakeup(self)

        cfp._ExecutorManagerThread.join_executor_internals = join_later
        cfp._ThreadWakeup.wakeup = wakeup_at_exit_slowly
        with cli_errors(), c.ImageDecoder(2, "fork", 16):
            raise CamEyeError("a bad dataset")
    """
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stderr) == (2, "error: a bad dataset\n")


# ------------------------------------------------------------------------------------------------ duplicates
def test_an_image_or_caption_listed_twice_is_used_once_with_a_warning(tmp_path, capsys):
    """Issue 21: a COCO file listing an image twice had it prepared (and scored) twice, and a repeated caption
    became an extra reference, silently."""
    for i in range(3):
        solid(tmp_path / "val2014" / f"{i}.jpg", colour_of(i), fmt="JPEG")
    images = {0: "0.jpg", 1: "1.jpg", 2: "2.jpg"}
    captions = [(0, "A red dog."), (0, "A red dog."), (0, "A  red dog. "), (0, "A big dog."), (1, "A cat."),
                (2, "A bird."), (2, "A small bird.")]  # fmt: skip
    source = write_coco_captions(tmp_path / "captions_val2014.json", images, captions)
    data = json.loads(source.read_text())
    data["images"].append(dict(data["images"][1]))  # image 1 listed twice
    source.write_text(json.dumps(data))
    words = word_map_file(tmp_path / "word_map.json", ["a", "red", "dog", "big", "cat", "bird", "small"])
    counts = prepare([source], tmp_path / "out", images=tmp_path, word_map=words)
    assert counts == {"train": 0, "val": 0, "test": 3}  # evaluation-only: all in test
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning")]
    assert warnings == [
        f"warning: {source}: dropped 1 image listed more than once and 2 repeated captions of one image "
        "(each image and caption is used once)"
    ]
    test = read_split(tmp_path / "out" / "test.hdf5")
    assert test["image_ids"] == ["0", "1", "2"]
    assert test["reference_offsets"].tolist() == [0, 2, 3, 5]
    assert test["references_raw"][:2] == ["A red dog.", "A big dog."]


def test_a_karpathy_image_listed_twice_keeps_the_captions_of_both_listings(tmp_path, capsys):
    solid(tmp_path / "a.png", (200, 0, 0))
    solid(tmp_path / "b.png", (0, 200, 0))
    entries = [
        {"filename": "a.png", "imgid": 0, "split": "train", "sentences": [sentence("a red one"), sentence("red")]},
        {"filename": "b.png", "imgid": 1, "split": "train", "sentences": [sentence("a green one")]},
        {"filename": "a.png", "imgid": 0, "split": "test", "sentences": [sentence("red"), sentence("a red square")]},
    ]
    source = write_karpathy(tmp_path / "dataset_x.json", entries)
    assert prepare([source], tmp_path / "out") == {"train": 2, "val": 0, "test": 0}  # the first listing's split
    assert "dropped 1 image listed more than once (each" in capsys.readouterr().err
    train = read_split(tmp_path / "out" / "train.hdf5")
    assert train["image_ids"] == ["0", "1"]
    assert image_refs(train, 0) == [["a", "red", "one"], ["red"], ["a", "red", "square"]]
