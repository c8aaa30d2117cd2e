"""Caption sources: the words of a captioning dataset, read and tokenized (no images are opened here).

Readers for Flickr8k's original distribution, Karpathy's split JSON and COCO's ``captions_*.json`` turn a
dataset into :class:`ImageRecord` s (an image's path, split, id and its captions as words); create_input_files.py
prepares them for training, and train_text.py (issue 20) reads caption text alone from the same files. The text
rule (:func:`tokenize`) is written here once, so a caption is the same words in preparation and in text training.
"""

from __future__ import annotations

import json
import re
import sys
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from utils import CamEyeError

SPLITS = ("train", "val", "test")
# Apostrophes (ASCII, typographic, modifier letter, fullwidth, and the accents people type for one) are removed,
# so "girl’s" and "girl's" are both "girls".
APOSTROPHES = "'\u2019\u2018\u201b\u02bc\uff07`\u00b4"
_NO_APOSTROPHES = str.maketrans("", "", APOSTROPHES)
_ASCII_WORD = re.compile(r"[a-z0-9]+")


@dataclass
class ImageRecord:
    """One image and every caption it has (tokenised) in one split."""

    path: Path
    split: str
    image_id: str
    tokens: list[list[str]]
    raw: list[str]
    objects: dict | None = field(default=None)  # synthetic data only: boxes and which words name them


# ------------------------------------------------------------------------------------------------ text
def tokenize(text: str) -> list[str]:
    """Words of ``text``: NFC-normalised, case-folded runs of letters (any script), digits and combining marks.

    Apostrophes are removed first (``dog's`` -> ``dogs``, ``girl’s`` -> ``girls``); every other character
    (punctuation, spaces, symbols, emoji) separates words. Text without spaces (Chinese, Japanese) stays one
    word per run of letters.
    """
    if text.isascii():  # the common case, 10x faster
        return _ASCII_WORD.findall(text.lower().translate(_NO_APOSTROPHES))
    text = unicodedata.normalize("NFC", unicodedata.normalize("NFC", text).casefold()).translate(_NO_APOSTROPHES)
    words, current = [], []
    for ch in text:
        # Combining marks (Devanagari vowel signs, a decomposed accent NFC cannot compose) belong to their word.
        if ch.isalnum() or unicodedata.category(ch).startswith("M"):
            current.append(ch)
        elif current:
            words.append("".join(current))
            current = []
    if current:
        words.append("".join(current))
    return [w for w in words if any(ch.isalnum() for ch in w)]


def read_text_lines(path: Path) -> list[str]:
    """The lines of a UTF-8 text file; a byte-order mark and CRLF or CR line ends are accepted.

    Raises CamEyeError naming the file and line when the file is missing or a line is not UTF-8.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CamEyeError(f"cannot read {path}: {exc.strerror}") from None
    data = data.removeprefix(b"\xef\xbb\xbf")  # Windows editors' UTF-8 BOM
    lines = []
    for n, line in enumerate(data.splitlines(), 1):
        try:
            lines.append(line.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise CamEyeError(
                f"{path}:{n}: not UTF-8 text (byte 0x{line[exc.start]:02x} at column {exc.start + 1}); "
                "save the file as UTF-8"
            ) from None
    return lines


def read_dataset_json(path: Path, what: str) -> Any:
    """A JSON source file (a UTF-8 BOM is accepted, unlike ``json.load``), or a one-line CamEyeError."""
    if not path.is_file():
        raise CamEyeError(f"{what} not found: {path}")
    data = path.read_bytes().removeprefix(b"\xef\xbb\xbf")
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise CamEyeError(f"{what} {path} is not valid JSON: not UTF-8 text at byte {exc.start}") from None
    except (json.JSONDecodeError, RecursionError) as exc:
        raise CamEyeError(f"{what} {path} is not valid JSON: {exc}") from None


# --------------------------------------------------------------------------------------------- readers
def _karpathy_captions(img: dict, where: str) -> tuple[list[list[str]], list[str]]:
    """Tokens (normalised like any caption) and raw sentences of one Karpathy image entry."""
    sentences = img["sentences"]
    if not isinstance(sentences, list):
        raise CamEyeError(f"{where}: 'sentences' must be a list, got {type(sentences).__name__}")
    tokens, raw = [], []
    for s in sentences:
        given = s["tokens"]
        if not isinstance(given, list) or not all(isinstance(t, str) for t in given):
            raise CamEyeError(f"{where}: 'tokens' must be a list of strings, got {json.dumps(given)[:60]}")
        text = s.get("raw", " ".join(given))
        if not isinstance(text, str):
            raise CamEyeError(f"{where}: 'raw' must be a string, got {json.dumps(text)[:60]}")
        # Kept as given (vocabularies stay comparable with the published splits), but "!!!" is no word and
        # "Girl’s" is "girls" as in every other source.
        tokens.append([w for t in given for w in tokenize(t)])
        raw.append(text)
    return tokens, raw


def read_karpathy(json_path: Path, image_folder: Path, data: Any = None) -> tuple[str, list[ImageRecord]]:
    """Read Karpathy's ``dataset_*.json`` (and the synthetic set's JSON, which follows it).

    ``data`` is the file's parsed content when the caller already read it.
    """
    data = read_dataset_json(json_path, "Karpathy split JSON") if data is None else data
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise CamEyeError(f"{json_path}: expected an object with an 'images' list (Karpathy's format)")
    name = str(data.get("dataset", json_path.stem.replace("dataset_", "")))
    records, unknown = [], Counter()
    for k, img in enumerate(data["images"]):
        where = f"{json_path}: image entry {k}"
        try:
            where += f" ({img['filename']})"
            split = {"restval": "train"}.get(img["split"], img["split"])
            tokens, raw = _karpathy_captions(img, where)
            # Files written on Windows may use backslashes; they are folder separators, never part of a name.
            subfolder = str(img.get("filepath") or "").replace("\\", "/")
            path = image_folder / subfolder / str(img["filename"]).replace("\\", "/")
            image_id = str(img.get("cocoid", img.get("imgid", k)))
        except KeyError as exc:
            raise CamEyeError(f"{where} is malformed (missing {exc})") from None
        except (TypeError, AttributeError) as exc:
            raise CamEyeError(f"{where} is malformed ({exc})") from None
        objects = None
        if "objects" in img:
            objects = {key: img.get(key) for key in ("objects", "caption_objects", "width", "height")}
        if split in SPLITS:
            records.append(ImageRecord(path, split, image_id, tokens, raw, objects))
        else:
            unknown[str(split)] += 1
    if unknown:
        listed = ", ".join(f"{s!r} ({n})" for s, n in sorted(unknown.items()))
        print(
            f"warning: {json_path}: ignored images whose split is not train/val/test/restval: {listed}", file=sys.stderr
        )
    return name, records


def read_flickr8k(folder: Path) -> tuple[str, list[ImageRecord]]:
    """Read Flickr8k as distributed: the token file, the three split lists and ``Flicker8k_Dataset/``."""
    token_file = folder / "Flickr8k.token.txt"
    captions: dict[str, list[str]] = {}
    for n, line in enumerate(read_text_lines(token_file), 1):
        if not line.strip():
            continue
        key, sep, caption = line.partition("\t")
        if not sep or "#" not in key:
            raise CamEyeError(f"{token_file}:{n}: expected 'IMAGE.jpg#N<TAB>caption'")
        # One known line names "2258277193_586949ec62.jpg.1", an image that does not exist: it is in no
        # split list, so its captions are dropped below like those of the 91 photos in no split.
        captions.setdefault(key.rsplit("#", 1)[0].strip(), []).append(caption.strip())
    records = []
    for split, list_name in (("train", "train"), ("val", "dev"), ("test", "test")):
        list_file = folder / f"Flickr_8k.{list_name}Images.txt"
        if not list_file.is_file():
            raise CamEyeError(f"Flickr8k split list not found: {list_file}")
        for name in (word for line in read_text_lines(list_file) for word in line.split()):
            raw = captions.get(name, [])
            tokens = [tokenize(c) for c in raw]
            records.append(ImageRecord(folder / "Flicker8k_Dataset" / name, split, name, tokens, raw))
    return "flickr8k", records


def _coco_split_of(path: Path, unnamed_split: str | None) -> str | None:
    """ "train", "val" (halved later) or ``unnamed_split`` for a file whose name says neither (or both)."""
    says_train, says_val = "train" in path.name, "val" in path.name
    if says_train != says_val:
        return "train" if says_train else "val"
    if unnamed_split is None:
        raise CamEyeError(
            f"{path}: the file name says neither train nor val, so its split is unknown: give --split "
            "(train, val or test), or --word-map to prepare it for evaluation only"
        )
    return unnamed_split


def read_coco_annotations(
    files: Sequence[Path], image_folder: Path, unnamed_split: str | None = None, first: Any = None
) -> tuple[str, list[ImageRecord]]:
    """Read COCO's ``captions_*.json``: train files -> train, val files -> halves into val and test.

    A file whose name says neither train nor val goes whole to ``unnamed_split`` (CamEyeError when None).
    ``first`` is the first file's parsed content when the caller already read it.
    """
    records = []
    for n_file, path in enumerate(files):
        data = first if n_file == 0 and first is not None else read_dataset_json(path, "COCO annotation file")
        if not isinstance(data, dict) or "annotations" not in data or "images" not in data:
            raise CamEyeError(f"{path}: expected COCO captions with 'images' and 'annotations'")
        split = _coco_split_of(path, unnamed_split)
        caps: dict[int, list[str]] = {}
        # A malformed entry (missing key, non-numeric id) is one line, not a traceback.
        try:
            for ann in data["annotations"]:
                caption = ann["caption"]
                if not isinstance(caption, str):  # str(None) would have become the word "none"
                    raise CamEyeError(
                        f"{path}: annotation {ann.get('id', '?')} of image {ann.get('image_id', '?')}: "
                        f"'caption' must be a string, got {json.dumps(caption)[:60]}"
                    )
                caps.setdefault(int(ann["image_id"]), []).append(caption.strip())
            images = sorted(data["images"], key=lambda im: int(im["id"]))
            names = [str(im["file_name"]).replace("\\", "/") for im in images]
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CamEyeError(f"{path}: malformed COCO entry ({type(exc).__name__}: {exc})") from None
        sub = "train2014" if "2014" in path.name and split == "train" else "val2014" if "2014" in path.name else ""
        sub = sub or ("train2017" if split == "train" else "val2017")
        folder = image_folder / sub if (image_folder / sub).is_dir() else image_folder
        for i, (im, name) in enumerate(zip(images, names)):
            image_split = ("val" if i < len(images) // 2 else "test") if split == "val" else split
            raw = caps.get(int(im["id"]), [])
            records.append(ImageRecord(folder / name, image_split, str(im["id"]), [tokenize(c) for c in raw], raw))
    return "coco", records


def read_source(
    sources: Sequence[Path], image_folder: Path | None, unnamed_split: str | None = None
) -> tuple[str, list[ImageRecord]]:
    """Detect the format of ``sources`` and read it, or fail with one line before anything is written.

    ``unnamed_split``: where the images of a COCO file whose name says neither train nor val go.
    """
    first = sources[0]
    if image_folder is not None and not image_folder.is_dir():
        raise CamEyeError(f"image folder not found: {image_folder}")
    if first.is_dir() and (first / "Flickr8k.token.txt").is_file():
        return read_flickr8k(first)
    if not first.is_file():
        raise CamEyeError(f"source not found or not a recognised dataset: {first}")
    head = read_dataset_json(first, "dataset JSON")
    folder = image_folder if image_folder is not None else first.parent
    if isinstance(head, dict) and "annotations" in head:
        return read_coco_annotations(sources, folder, unnamed_split, first=head)
    if isinstance(head, dict) and isinstance(head.get("images"), list):
        if len(sources) > 1:
            raise CamEyeError("give one Karpathy JSON at a time")
        return read_karpathy(first, folder, head)
    raise CamEyeError(
        f"{first}: unknown format (expected Karpathy's dataset_*.json, COCO captions_*.json "
        "or a Flickr8k folder with Flickr8k.token.txt)"
    )


def keep_real_captions(records: Iterable[ImageRecord]) -> list[ImageRecord]:
    """Drop captions without a word (empty, "!!!") from each image, then images left without captions."""
    kept = []
    for r in records:
        pairs = [(t, raw) for t, raw in zip(r.tokens, r.raw) if t]
        if pairs:
            r.tokens, r.raw = [t for t, _ in pairs], [raw for _, raw in pairs]
            kept.append(r)
    return kept


def drop_duplicates(records: Iterable[ImageRecord], source: str) -> list[ImageRecord]:
    """Each image once, and each of an image's captions once; one warning line counts what was dropped.

    A repeated image would be trained on and scored twice, and a repeated caption would count twice as a
    reference. An image listed again (its image id again: COCO's id, Karpathy's cocoid or imgid, Flickr8k's
    file name; the id is what evaluation scores by) is dropped; the captions of that listing which the first
    lacks join the first (a Karpathy file may list an image twice with different sentences), and the first
    listing's split stands. One file under two ids is two images, as the dataset says. A caption is repeated
    when its text is the same up to spaces ("A dog." and "A  dog. ").
    """
    kept: list[ImageRecord] = []
    first: dict[str, ImageRecord] = {}
    seen: dict[int, set[str]] = {}  # id(record) -> its captions' texts
    images = captions = 0
    for r in records:
        earlier = first.get(r.image_id)
        target = earlier or r
        texts = seen.setdefault(id(target), set())
        pairs = list(zip(r.tokens, r.raw))
        if earlier is None:
            r.tokens, r.raw = [], []
            kept.append(r)
            first[r.image_id] = r
        else:
            images += 1
        for tokens, raw in pairs:
            text = " ".join(raw.split())
            if text in texts:
                captions += earlier is None  # a dropped listing's copies are counted as its image
                continue
            texts.add(text)
            target.tokens.append(tokens)
            target.raw.append(raw)
    if images or captions:
        parts = [f"{images} image{'s' * (images != 1)} listed more than once"] if images else []
        parts += [f"{captions} repeated caption{'s' * (captions != 1)} of one image"] if captions else []
        print(
            f"warning: {source}: dropped {' and '.join(parts)} (each image and caption is used once)", file=sys.stderr
        )
    return kept
