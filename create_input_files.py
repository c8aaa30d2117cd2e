"""Turn a captioning dataset (images + captions) into the HDF5 + JSON files that training reads.

Input formats, detected from the source path(s):

* Karpathy's split JSON ``dataset_{coco,flickr8k,flickr30k}.json`` (also the synthetic set's JSON), with the
  image folder given by ``--images``; COCO's ``restval`` images go to the training split;
* Flickr8k's original distribution: a folder with ``Flickr8k.token.txt``, ``Flickr_8k.{train,dev,test}Images.txt``
  and the images in ``Flicker8k_Dataset/``;
* COCO's own annotation files ``captions_{train,val}{2014,2017}.json``: train files go to train; the images of a
  val file are split in two halves (by image id) into val and test, since COCO has no public test captions.

Output, in ``--out``: ``word_map.json`` (``<pad>``=0, ``<start>``=1, ``<end>``=2, ``<unk>``=3, then the words of
the training captions seen at least ``--min-word-freq`` times, most frequent first) and one ``{split}.hdf5``
per split holding

* ``images``: uint8, N x 3 x S x S (RGB, squashed to S x S like the common tutorial, so nothing is cropped away);
* ``captions``: int32, N*C x (L+2) encoded ``<start> words <end> <pad>...``, C = ``--captions-per-image``;
  caption k of image i is row i*C + k; ``caplens``: their lengths including ``<start>`` and ``<end>``;
* ``references`` (all captions of each image, as space-joined tokens), ``references_raw`` (the original
  sentences) and ``reference_offsets`` (image i owns rows offsets[i]:offsets[i+1]), for evaluation;
* ``image_ids`` and ``filenames``; ``objects`` (per-image JSON) when the source has object boxes.

Images are decoded and resized in worker processes. A file that cannot be read is reported and skipped along
with its captions, so captions never shift onto the wrong image. Everything is written under temporary names
and renamed only when every split is complete.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import random
import re
import sys
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from utils import SPECIAL_TOKENS, CamEyeError, atomic_path, cli_errors, read_json

SPLITS = ("train", "val", "test")
_TOKEN_RE = re.compile(r"[a-z0-9]+")


@dataclass
class ImageRecord:
    """One image and every caption it has (tokenised) in one split."""

    path: Path
    split: str
    image_id: str
    tokens: list[list[str]]
    raw: list[str]
    objects: dict | None = field(default=None)  # synthetic data only: boxes and which words name them


def tokenize(text: str) -> list[str]:
    """Lower-case words and numbers; punctuation is dropped and ``dog's`` becomes ``dogs``."""
    return _TOKEN_RE.findall(text.lower().replace("'", ""))


# --------------------------------------------------------------------------------------------- readers
def read_karpathy(json_path: Path, image_folder: Path) -> tuple[str, list[ImageRecord]]:
    """Read Karpathy's ``dataset_*.json`` (and the synthetic set's JSON, which follows it)."""
    data = read_json(json_path, "Karpathy split JSON")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise CamEyeError(f"{json_path}: expected an object with an 'images' list (Karpathy's format)")
    name = str(data.get("dataset", json_path.stem.replace("dataset_", "")))
    records = []
    for k, img in enumerate(data["images"]):
        try:
            sentences = img["sentences"]
            split = {"restval": "train"}.get(img["split"], img["split"])
            tokens = [[str(t).lower() for t in s["tokens"]] for s in sentences]
            raw = [str(s.get("raw", " ".join(s["tokens"]))) for s in sentences]
            path = image_folder / img.get("filepath", "") / img["filename"]
            image_id = str(img.get("cocoid", img.get("imgid", k)))
        except (KeyError, TypeError) as exc:
            raise CamEyeError(f"{json_path}: image entry {k} is malformed (missing {exc})") from None
        objects = None
        if "objects" in img:
            objects = {key: img.get(key) for key in ("objects", "caption_objects", "width", "height")}
        if split in SPLITS:
            records.append(ImageRecord(path, split, image_id, tokens, raw, objects))
    return name, records


def read_flickr8k(folder: Path) -> tuple[str, list[ImageRecord]]:
    """Read Flickr8k as distributed: the token file, the three split lists and ``Flicker8k_Dataset/``."""
    captions: dict[str, list[str]] = {}
    with open(folder / "Flickr8k.token.txt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            key, sep, caption = line.partition("\t")
            if not sep or "#" not in key:
                raise CamEyeError(f"{folder / 'Flickr8k.token.txt'}:{n}: expected 'IMAGE.jpg#N<TAB>caption'")
            # One known line names "2258277193_586949ec62.jpg.1", an image that does not exist: it is in no
            # split list, so its captions are dropped below like those of the 91 photos in no split.
            captions.setdefault(key.rsplit("#", 1)[0], []).append(caption.strip())
    records = []
    for split, list_name in (("train", "train"), ("val", "dev"), ("test", "test")):
        list_file = folder / f"Flickr_8k.{list_name}Images.txt"
        if not list_file.is_file():
            raise CamEyeError(f"Flickr8k split list not found: {list_file}")
        for name in list_file.read_text(encoding="utf-8").split():
            raw = captions.get(name, [])
            tokens = [tokenize(c) for c in raw]
            records.append(ImageRecord(folder / "Flicker8k_Dataset" / name, split, name, tokens, raw))
    return "flickr8k", records


def read_coco_annotations(files: Sequence[Path], image_folder: Path) -> tuple[str, list[ImageRecord]]:
    """Read COCO's ``captions_*.json``: train files -> train, val files -> halves into val and test."""
    records = []
    for path in files:
        data = read_json(path, "COCO annotation file")
        if not isinstance(data, dict) or "annotations" not in data or "images" not in data:
            raise CamEyeError(f"{path}: expected COCO captions with 'images' and 'annotations'")
        is_train = "train" in path.name
        caps: dict[int, list[str]] = {}
        # Fix: a malformed entry (missing key, non-numeric id) used to crash with a traceback, not one line.
        try:
            for ann in data["annotations"]:
                caps.setdefault(int(ann["image_id"]), []).append(str(ann["caption"]).strip())
            images = sorted(data["images"], key=lambda im: int(im["id"]))
            _ = [im["file_name"] for im in images]  # checked here so the loop below cannot fail
        except (KeyError, TypeError, ValueError) as exc:
            raise CamEyeError(f"{path}: malformed COCO entry ({type(exc).__name__}: {exc})") from None
        sub = "train2014" if "2014" in path.name and is_train else "val2014" if "2014" in path.name else ""
        sub = sub or ("train2017" if is_train else "val2017")
        for i, im in enumerate(images):
            split = "train" if is_train else ("val" if i < len(images) // 2 else "test")
            raw = caps.get(int(im["id"]), [])
            folder = image_folder / sub if (image_folder / sub).is_dir() else image_folder
            records.append(ImageRecord(folder / im["file_name"], split, str(im["id"]), [tokenize(c) for c in raw], raw))
    return "coco", records


def read_source(sources: Sequence[Path], image_folder: Path | None) -> tuple[str, list[ImageRecord]]:
    """Detect the format of ``sources`` and read it, or fail with one line before anything is written."""
    first = sources[0]
    if first.is_dir() and (first / "Flickr8k.token.txt").is_file():
        return read_flickr8k(first)
    if not first.is_file():
        raise CamEyeError(f"source not found or not a recognised dataset: {first}")
    head = read_json(first, "dataset JSON")
    folder = image_folder if image_folder is not None else first.parent
    if isinstance(head, dict) and "annotations" in head:
        return read_coco_annotations(sources, folder)
    if isinstance(head, dict) and isinstance(head.get("images"), list):
        if len(sources) > 1:
            raise CamEyeError("give one Karpathy JSON at a time")
        return read_karpathy(first, folder)
    raise CamEyeError(
        f"{first}: unknown format (expected Karpathy's dataset_*.json, COCO captions_*.json "
        "or a Flickr8k folder with Flickr8k.token.txt)"
    )


# ----------------------------------------------------------------------------------------- captions
def build_word_map(records: Iterable[ImageRecord], min_word_freq: int, max_len: int) -> dict[str, int]:
    """Word map from the *training* captions only (the common tutorial also counts val/test words)."""
    freq: Counter[str] = Counter()
    for r in records:
        if r.split == "train":
            for toks in r.tokens:
                if len(toks) <= max_len:
                    freq.update(toks)
    words = sorted(
        (w for w, c in freq.items() if c >= min_word_freq and w not in SPECIAL_TOKENS), key=lambda w: (-freq[w], w)
    )
    return {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *words])}


def sample_captions(record: ImageRecord, per_image: int, max_len: int, seed: int) -> list[list[str]]:
    """Choose ``per_image`` captions of at most ``max_len`` words, topping up by repetition if too few.

    The RNG is seeded from (seed, image id), so an image's choice does not depend on which other images
    were skipped; a caption longer than ``max_len`` is only used (truncated) when the image has no other.
    """
    rng = random.Random(f"{seed}:{record.image_id}")
    fits = [t for t in record.tokens if 0 < len(t) <= max_len]
    pool = fits or [t[:max_len] for t in record.tokens if t]
    if len(pool) >= per_image:
        return rng.sample(pool, per_image)
    return pool + rng.choices(pool, k=per_image - len(pool))


def encode_caption(tokens: Sequence[str], word_map: dict[str, int], max_len: int) -> list[int]:
    """``<start> w1 .. wn <end>`` padded with ``<pad>`` to ``max_len + 2`` ids."""
    unk = word_map["<unk>"]
    ids = [word_map["<start>"], *(word_map.get(w, unk) for w in tokens), word_map["<end>"]]
    return ids + [word_map["<pad>"]] * (max_len + 2 - len(ids))


# ------------------------------------------------------------------------------------------- images
def load_image(path: str | Path, size: int) -> np.ndarray:
    """Decode any common image as RGB uint8, 3 x size x size; raises ``OSError``/``ValueError`` if unusable.

    Handles EXIF orientation, grayscale, palette, CMYK, alpha (composited on white, how viewers show it) and
    16-bit images (scaled down to 8 bits rather than clipped, which would turn them white).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        peak = arr.max() if arr.size else 0.0
        scale = 1.0 if peak <= 255 else (257.0 if peak <= 65535 else peak / 255.0)
        if im.mode.startswith("I;16"):
            # Fix: an I;16 image is 16-bit whatever its content; guessing from the peak made a dark one
            # (all values <= 255, e.g. 200/65535) come out bright (200/255) instead of nearly black.
            scale = 257.0
        im = Image.fromarray(np.clip(arr / scale, 0, 255).astype(np.uint8), mode="L")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, rgba)
    im = im.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1).copy()


def _load_job(job: tuple[str, int]) -> tuple[np.ndarray | None, str]:
    """Worker entry point: an image or ``None`` with the reason it could not be used."""
    path, size = job
    try:
        return load_image(path, size), ""
    except FileNotFoundError:
        return None, "file not found"
    except UnidentifiedImageError:
        empty = Path(path).stat().st_size == 0
        return None, "empty file" if empty else "not an image"
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return None, f"unreadable image ({type(e).__name__}: {e})"


# ------------------------------------------------------------------------------------------- writing
@dataclass
class Options:
    """What ``create_input_files`` should make (mirrors the command-line options)."""

    out: Path
    captions_per_image: int = 5
    min_word_freq: int = 5
    max_len: int = 50
    image_size: int = 256
    workers: int = 2
    seed: int = 0


def write_split(
    h5_path: Path, split: str, records: list[ImageRecord], word_map: dict[str, int], opt: Options, pool
) -> tuple[int, list[tuple[str, str]]]:
    """Write one split's HDF5 file; returns the number of images kept and the (file, reason) of skips."""
    n, s, c, width = len(records), opt.image_size, opt.captions_per_image, opt.max_len + 2
    skipped: list[tuple[str, str]] = []
    kept: list[ImageRecord] = []
    with h5py.File(h5_path, "w") as h5:
        h5.attrs.update(captions_per_image=c, max_len=opt.max_len, image_size=s, seed=opt.seed)
        images = h5.create_dataset("images", (n, 3, s, s), np.uint8, maxshape=(None, 3, s, s), chunks=(1, 3, s, s))
        captions = h5.create_dataset("captions", (n * c, width), np.int32, maxshape=(None, width))
        caplens = h5.create_dataset("caplens", (n * c,), np.int32, maxshape=(None,))
        jobs = ((str(r.path), s) for r in records)
        results = pool.imap(_load_job, jobs, chunksize=4) if pool else map(_load_job, jobs)
        for record, (array, reason) in tqdm(zip(records, results), total=n, desc=split, unit="img"):
            if array is None:
                skipped.append((str(record.path), reason))
                tqdm.write(f"skipped {record.path}: {reason}")
                continue
            i = len(kept)
            images[i] = array
            chosen = sample_captions(record, c, opt.max_len, opt.seed)
            captions[i * c : (i + 1) * c] = [encode_caption(t, word_map, opt.max_len) for t in chosen]
            caplens[i * c : (i + 1) * c] = [len(t) + 2 for t in chosen]
            kept.append(record)
        images.resize(len(kept), axis=0)
        captions.resize(len(kept) * c, axis=0)
        caplens.resize(len(kept) * c, axis=0)
        _write_references(h5, kept)
    return len(kept), skipped


def _write_references(h5: h5py.File, kept: list[ImageRecord]) -> None:
    """All captions of each kept image (for BLEU and the COCO metrics), ids, file names and boxes."""
    text = h5py.string_dtype()
    offsets = np.cumsum([0] + [len(r.tokens) for r in kept]).astype(np.int64)
    h5.create_dataset("reference_offsets", data=offsets)
    h5.create_dataset("references", data=[" ".join(t) for r in kept for t in r.tokens], dtype=text)
    h5.create_dataset("references_raw", data=[c for r in kept for c in r.raw], dtype=text)
    h5.create_dataset("image_ids", data=[r.image_id for r in kept], dtype=text)
    h5.create_dataset("filenames", data=[r.path.name for r in kept], dtype=text)
    if kept and all(r.objects is not None for r in kept):
        h5.create_dataset("objects", data=[json.dumps(r.objects) for r in kept], dtype=text)


def create_input_files(sources: Sequence[Path], image_folder: Path | None, opt: Options) -> dict[str, int]:
    """Read ``sources``, then write the word map and one HDF5 file per split atomically.

    Returns the number of images written per split.
    """
    name, records = read_source(sources, image_folder)
    records = [r for r in records if any(r.tokens)]  # an image without captions teaches nothing
    if not any(r.split == "train" for r in records):
        raise CamEyeError(f"{sources[0]}: no training images with captions found")
    word_map = build_word_map(records, opt.min_word_freq, opt.max_len)
    print(f"{name}: {len(records)} images with captions, vocabulary of {len(word_map)} words")
    counts: dict[str, int] = {}
    all_skipped: list[tuple[str, str]] = []
    pool = multiprocessing.get_context("fork").Pool(opt.workers) if opt.workers > 1 else None
    try:
        # Renames happen in reverse order of entering, so the word map (entered first) is renamed last: a
        # crash between renames never pairs a new word map with caption ids encoded by an old one.
        with (
            atomic_path(opt.out / "word_map.json") as word_map_tmp,
            atomic_path(opt.out / "train.hdf5") as train_tmp,
            atomic_path(opt.out / "val.hdf5") as val_tmp,
            atomic_path(opt.out / "test.hdf5") as test_tmp,
        ):
            for split, tmp in zip(SPLITS, (train_tmp, val_tmp, test_tmp)):
                split_records = [r for r in records if r.split == split]
                counts[split], skipped = write_split(tmp, split, split_records, word_map, opt, pool)
                all_skipped += skipped
            with open(word_map_tmp, "w", encoding="utf-8") as f:
                json.dump(word_map, f, indent=1)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    summary = ", ".join(f"{k} {v}" for k, v in counts.items())
    print(f"wrote {opt.out}: {summary} images; skipped {len(all_skipped)} unreadable file(s)")
    return counts


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Prepare a captioning dataset (Karpathy JSON, Flickr8k folder or COCO annotations) "
        "as HDF5 images + encoded captions + a word map.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "sources",
        nargs="+",
        type=Path,
        help="Karpathy dataset_*.json, a Flickr8k folder (with Flickr8k.token.txt), "
        "or one or more COCO captions_*.json files",
    )
    p.add_argument(
        "--images", type=Path, default=None, help="image folder for JSON sources (default: the JSON's folder)"
    )
    p.add_argument("--out", type=Path, required=True, help="output folder for {split}.hdf5 and word_map.json")
    p.add_argument("--captions-per-image", type=int, default=5, help="captions kept per training image")
    p.add_argument("--min-word-freq", type=int, default=5, help="rarer training words become <unk>")
    p.add_argument("--max-len", type=int, default=50, help="longest caption in words (longer ones are dropped)")
    p.add_argument("--image-size", type=int, default=256, help="images are resized to this square size")
    p.add_argument("--workers", type=int, default=2, help="processes that decode and resize images")
    p.add_argument("--seed", type=int, default=0, help="seed for choosing captions per image")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    for name in ("captions_per_image", "min_word_freq", "max_len", "image_size", "workers"):
        if getattr(args, name) < 1:
            build_parser().error(f"--{name.replace('_', '-')} must be at least 1")
    opt = Options(
        args.out, args.captions_per_image, args.min_word_freq, args.max_len, args.image_size, args.workers, args.seed
    )
    with cli_errors():
        create_input_files(args.sources, args.images, opt)


if __name__ == "__main__":
    sys.exit(main())
