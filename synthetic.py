"""Generate a small synthetic captioning dataset: coloured shapes on muted backgrounds, with exact captions.

Why a synthetic set? Real datasets (Flickr8k, COCO) are large, slow to prepare and have no ground truth for
*where* a caption's words are in the image. This generator makes, in a few seconds, a dataset that

* lets the tests and the demo run the whole pipeline (``create_input_files.py`` -> training -> captioning)
  on a laptop without downloading anything;
* is easy enough that a tiny model learns it quickly, so a falling loss or a rising BLEU score is a real
  signal that the pipeline works;
* records each object's bounding box and which caption words name which object, so one can check that the
  decoder's attention really looks at the red circle while it says "red circle".

Each image shows 1-3 non-overlapping objects (a shape in a colour and a size) on a solid, gradient or lightly
noisy background whose muted tones never equal an object colour. Each image gets five different captions from
a small grammar, e.g. "a small red circle to the left of a blue square" or "there is a green triangle and a
white star"; spatial relations are read from the objects' real box centres. The output follows Karpathy's
``dataset_*.json`` format (what ``create_input_files.py`` reads) plus three extra fields per image::

    out_dir/
        images/000000.png ...
        dataset_synthetic.json
            {"dataset": "synthetic", "images": [{
                "filepath": "images", "filename": "000000.png", "imgid": 0, "split": "train",
                "sentids": [0, 1, 2, 3, 4],
                "sentences": [{"tokens": ["a", "red", "circle"], "raw": "A red circle.", "imgid": 0,
                               "sentid": 0}, ...],
                "objects": [{"shape": "circle", "colour": "red", "size": "small", "box": [x0, y0, x1, y1]}],
                "width": 128, "height": 128,
                "caption_objects": [[-1, 0, 0], ...]}]}

``box`` is the tight box of the object's pixels (x0, y0 inclusive, x1, y1 exclusive).
``caption_objects[s][t]`` is the index (into ``objects``) of the object that token ``t`` of sentence ``s``
names - its size, colour and shape words - and -1 for every other word.

Everything is deterministic: the same seed and arguments give byte-identical JSON and identical PNGs. Image
``i`` is drawn from its own generator seeded with ``(seed, i)``, so a larger dataset starts with the images
of a smaller one.

Usage::

    python synthetic.py --out data/synthetic --num-images 300 --seed 0 --image-size 128 --splits 0.8 0.1 0.1
"""

from __future__ import annotations

import argparse
import colorsys
import itertools
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from cli import HelpFormatter
from utils import atomic_path, cli_errors, handle_sigterm

# Saturated, clearly distinct object colours. Every one has a channel above BACKGROUND_MAX or a channel spread
# (max - min) far above what a muted background can reach, so a background pixel can never equal one of them.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "white": (255, 255, 255),
    "purple": (140, 60, 190),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
SIZES: tuple[str, ...] = ("small", "large")
# Side of an object's box as a fraction of the image side; the ranges are far apart so "large" is obvious.
SIZE_FRACTIONS: dict[str, tuple[float, float]] = {"small": (0.19, 0.25), "large": (0.42, 0.48)}
# Relation words, keyed by name; a relation is phrased "<subject> <words> <reference>".
RELATIONS: dict[str, tuple[str, ...]] = {
    "left": ("to", "the", "left", "of"),
    "right": ("to", "the", "right", "of"),
    "above": ("above",),
    "below": ("below",),
}
OBJECT_COUNT_PROBS: tuple[float, float, float] = (0.2, 0.4, 0.4)  # P(1 object), P(2), P(3)
# Along a relation's axis the centre offset must be this many times the offset along the other axis, so that
# "above" never describes an object that is just as much to the side.
DOMINANCE_RATIO = 1.5
BACKGROUND_MAX = 200  # cap on background channels (see COLOURS)
NOISE_STD, NOISE_MAX = 4.0, 10
JSON_NAME = "dataset_synthetic.json"
IMAGE_DIR = "images"
SPLIT_NAMES = ("train", "val", "test")
MIN_IMAGE_SIZE = 32

Box = tuple[int, int, int, int]
Token = tuple[str, int]  # a caption word and the index of the object it names (-1: none)


# ------------------------------------------------------------------------------------------------ geometry
def box_centre(box: Sequence[int]) -> tuple[float, float]:
    """Centre ``(x, y)`` of a box ``[x0, y0, x1, y1]`` (x1, y1 exclusive; y grows downwards)."""
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def spatial_relation(box_a: Sequence[int], box_b: Sequence[int]) -> str:
    """Where object ``a`` is relative to ``b``: ``"left"``, ``"right"``, ``"above"`` or ``"below"``.

    The relation follows the dominant axis of the offset between the two box centres, so a circle far to the
    left and slightly higher than a square is "to the left of" it. Image y grows downwards, hence "above"
    means a smaller y.
    """
    (ax, ay), (bx, by) = box_centre(box_a), box_centre(box_b)
    dx, dy = ax - bx, ay - by
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "above" if dy < 0 else "below"


def _layout_ok(a: Box, b: Box, gap: int) -> bool:
    """True if boxes ``a`` and ``b`` are ``gap`` pixels apart along a clearly dominant axis.

    Requiring a gap along the relation's own axis (not just no overlap) makes "to the left of" mean the whole
    object is left of the other, and the dominance ratio keeps diagonal layouts (ambiguous words) out.
    """
    (ax, ay), (bx, by) = box_centre(a), box_centre(b)
    dx, dy = abs(ax - bx), abs(ay - by)
    lo, hi = (0, 2) if dx >= dy else (1, 3)  # indices of the dominant axis' start and end
    apart = a[hi] + gap <= b[lo] or b[hi] + gap <= a[lo]
    return apart and max(dx, dy) >= DOMINANCE_RATIO * min(dx, dy)


# ------------------------------------------------------------------------------------------------ drawing
def _muted_colour(rng: np.random.Generator) -> np.ndarray:
    """A dull, mid-dark colour (low saturation and value), as float RGB 0-255."""
    hue, sat, val = rng.random(), rng.uniform(0.05, 0.3), rng.uniform(0.3, 0.7)
    return np.array(colorsys.hsv_to_rgb(hue, sat, val)) * 255


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    """A solid or linear-gradient background in muted tones, with light noise half of the time."""
    start = _muted_colour(rng)
    if rng.random() < 0.5:
        pixels = np.broadcast_to(start, (size, size, 3)).astype(np.float64)
    else:
        angle = rng.uniform(0, 2 * math.pi)
        ys, xs = np.mgrid[0:size, 0:size]
        t = xs * math.cos(angle) + ys * math.sin(angle)
        t = ((t - t.min()) / (t.max() - t.min()))[..., None]
        pixels = start * (1 - t) + _muted_colour(rng) * t
    if rng.random() < 0.5:
        pixels = pixels + np.clip(rng.normal(0, NOISE_STD, pixels.shape), -NOISE_MAX, NOISE_MAX)
    return Image.fromarray(np.clip(np.rint(pixels), 0, BACKGROUND_MAX).astype(np.uint8), "RGB")


def _star_points(box: Box) -> list[tuple[float, float]]:
    """A five-pointed star stretched to fill ``box`` (so its tight box is the box we placed)."""
    angles = [-math.pi / 2 + k * math.pi / 5 for k in range(10)]
    radii = [1.0 if k % 2 == 0 else 0.45 for k in range(10)]  # fat inner radius: still a star when small
    pts = [(r * math.cos(a), r * math.sin(a)) for r, a in zip(radii, angles, strict=True)]
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    sx = (box[2] - 1 - box[0]) / (max(xs) - min(xs))
    sy = (box[3] - 1 - box[1]) / (max(ys) - min(ys))
    return [(box[0] + (x - min(xs)) * sx, box[1] + (y - min(ys)) * sy) for x, y in pts]


def _shape_mask(shape: str, box: Box, size: int) -> Image.Image:
    """A binary (0/255) mask of ``shape`` drawn to fill ``box``; no anti-aliasing, so colours stay exact."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    x0, y0, x1, y1 = box[0], box[1], box[2] - 1, box[3] - 1  # Pillow's corners are inclusive
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=255)
    elif shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=255)
    elif shape == "triangle":
        draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=255)
    elif shape == "star":
        draw.polygon(_star_points(box), fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return mask


# ------------------------------------------------------------------------------------------------ scenes
def _sample_objects(rng: np.random.Generator) -> list[dict[str, Any]]:
    """Pick 1-3 objects; each (colour, shape) pair at most once, so "a red circle" names one object."""
    count = int(rng.choice(len(OBJECT_COUNT_PROBS), p=OBJECT_COUNT_PROBS)) + 1
    kinds = list(itertools.product(COLOURS, SHAPES))
    picks = rng.choice(len(kinds), size=count, replace=False)
    sizes = rng.choice(len(SIZES), size=count)
    return [
        {"shape": kinds[k][1], "colour": kinds[k][0], "size": SIZES[s]}
        for k, s in zip(picks.tolist(), sizes.tolist(), strict=True)
    ]


def _place(objects: list[dict[str, Any]], rng: np.random.Generator, size: int) -> list[Box] | None:
    """Random square boxes for ``objects``, pairwise well apart; None if random tries do not find a layout."""
    margin, gap = max(1, size // 64), max(2, round(0.04 * size))
    sides = [round(rng.uniform(*SIZE_FRACTIONS[obj["size"]]) * size) for obj in objects]
    boxes: list[Box | None] = [None] * len(objects)
    for i in sorted(range(len(objects)), key=lambda k: -sides[k]):  # big ones first: they are hardest to fit
        for _ in range(100):
            x0, y0 = (int(v) for v in rng.integers(margin, size - sides[i] - margin + 1, size=2))
            box = (x0, y0, x0 + sides[i], y0 + sides[i])
            if all(_layout_ok(box, other, gap) for other in boxes if other is not None):
                boxes[i] = box
                break
        else:
            return None
    return [b for b in boxes if b is not None]


def make_scene(rng: np.random.Generator, image_size: int) -> tuple[Image.Image, list[dict[str, Any]]]:
    """Draw one random scene: a background and 1-3 well-separated objects.

    Returns the RGB image and its objects, each ``{"shape", "colour", "size", "box"}`` where ``box`` is the
    tight ``[x0, y0, x1, y1]`` box of the pixels painted in the object's exact colour (x1, y1 exclusive).
    Layouts that do not fit (e.g. three large objects) are redrawn; all randomness comes from ``rng``.
    """
    for _ in range(1000):
        objects = _sample_objects(rng)
        boxes = _place(objects, rng, image_size)
        if boxes is not None:
            break
    else:  # practically unreachable: a single object always fits
        raise RuntimeError(f"could not lay out a scene in a {image_size}px image")
    image = _background(rng, image_size)
    for obj, box in zip(objects, boxes, strict=True):
        mask = _shape_mask(obj["shape"], box, image_size)
        image.paste(COLOURS[obj["colour"]], (0, 0, image_size, image_size), mask)
        obj["box"] = [int(v) for v in mask.getbbox()]  # tight box of what was really drawn
    return image, objects


# ------------------------------------------------------------------------------------------------ captions
def _noun_phrase(index: int, obj: dict[str, Any], with_size: bool) -> list[Token]:
    """The noun phrase "a [size] colour shape"; every word but the article points at the object."""
    words = [obj["size"]] if with_size else []
    return [("a", -1)] + [(w, index) for w in (*words, obj["colour"], obj["shape"])]


def _plain(*words: str) -> list[Token]:
    return [(w, -1) for w in words]


def _single_object_templates(obj: dict[str, Any]) -> dict[str, list[list[Token]]]:
    """Captions for a lone object: one noun phrase with or without its size, behind a few prefixes."""
    prefixes = ((), ("there", "is"), ("a", "picture", "of"), ("an", "image", "of"), ("this", "is"))
    groups = {" ".join(p): [_plain(*p) + _noun_phrase(0, obj, s) for s in (True, False)] for p in prefixes}
    words = [obj["size"], obj["colour"], obj["shape"]]
    groups["single"] = [
        _plain("a", "single") + [(w, 0) for w in words],
        _plain("a", "single") + [(w, 0) for w in words[1:]],
    ]
    return groups


def _relation_captions(objects: list[dict[str, Any]], prefix: tuple[str, ...]) -> list[list[Token]]:
    """Captions "[prefix] A <relation> B" for every ordered pair and every choice of size words."""
    out = []
    for i, j in itertools.permutations(range(len(objects)), 2):
        rel = _plain(*RELATIONS[spatial_relation(objects[i]["box"], objects[j]["box"])])
        for si, sj in itertools.product((True, False), repeat=2):
            a, b = _noun_phrase(i, objects[i], si), _noun_phrase(j, objects[j], sj)
            out.append(_plain(*prefix) + a + rel + b)
    return out


def _conjunction_captions(objects: list[dict[str, Any]], prefix: tuple[str, ...]) -> list[list[Token]]:
    """Captions "[prefix] A and B [and C]" for every ordering of 2 or all objects and choice of size words."""
    out = []
    for k in range(2, len(objects) + 1):
        for order in itertools.permutations(range(len(objects)), k):
            for sizes in itertools.product((True, False), repeat=k):
                phrases = [_noun_phrase(i, objects[i], s) for i, s in zip(order, sizes, strict=True)]
                out.append(_plain(*prefix) + list(itertools.chain(*_join(phrases, _plain("and")))))
    return out


def _double_relation_captions(objects: list[dict[str, Any]]) -> list[list[Token]]:
    """Captions "A <relation> B and <relation> C": both relations are relative to A, the first named."""
    out = []
    for i, j, k in itertools.permutations(range(len(objects)), 3):
        rel_j = _plain(*RELATIONS[spatial_relation(objects[i]["box"], objects[j]["box"])])
        rel_k = _plain(*RELATIONS[spatial_relation(objects[i]["box"], objects[k]["box"])])
        for si, sj, sk in itertools.product((True, False), repeat=3):
            a, b, c = (_noun_phrase(n, objects[n], s) for n, s in ((i, si), (j, sj), (k, sk)))
            out.append(a + rel_j + b + _plain("and") + rel_k + c)
    return out


def _join(items: list[list[Token]], sep: list[Token]) -> list[list[Token]]:
    return [part for n, item in enumerate(items) for part in ([sep, item] if n else [item])]


def _caption_templates(objects: list[dict[str, Any]]) -> dict[str, list[list[Token]]]:
    """All captions the grammar can say about ``objects``, grouped by template."""
    if len(objects) == 1:
        return _single_object_templates(objects[0])
    groups = {
        "relation": _relation_captions(objects, ()),
        "there is relation": _relation_captions(objects, ("there", "is")),
        "picture relation": _relation_captions(objects, ("a", "picture", "of")),
        "conjunction": _conjunction_captions(objects, ()),
        "there is conjunction": _conjunction_captions(objects, ("there", "is")),
    }
    if len(objects) == 3:
        groups["double relation"] = _double_relation_captions(objects)
    return groups


def make_captions(
    objects: list[dict[str, Any]], rng: np.random.Generator, n: int = 5
) -> tuple[list[list[str]], list[list[int]]]:
    """Write ``n`` different captions for a scene's ``objects`` (as returned by :func:`make_scene`).

    Returns ``(tokens, caption_objects)``: for each caption its lowercase words, and for each word the index
    of the object it names (its size, colour or shape word) or -1. A template (e.g. "A <relation> B",
    "there is A and B") is drawn uniformly first and then one of its unused wordings, so templates with many
    wordings do not crowd out the others. Scenes with 2-3 objects always mention at least two of them.
    """
    groups = {name: list(captions) for name, captions in _caption_templates(objects).items()}
    if sum(len(c) for c in groups.values()) < n:
        raise ValueError(f"the grammar has fewer than {n} captions for {objects}")
    tokens: list[list[str]] = []
    caption_objects: list[list[int]] = []
    while len(tokens) < n:
        names = [name for name, captions in groups.items() if captions]
        pool = groups[names[int(rng.integers(len(names)))]]
        caption = pool.pop(int(rng.integers(len(pool))))  # popped, so captions never repeat
        tokens.append([word for word, _ in caption])
        caption_objects.append([index for _, index in caption])
    return tokens, caption_objects


# ------------------------------------------------------------------------------------------------ dataset
def split_counts(num_images: int, fractions: Sequence[float]) -> list[int]:
    """How many images go to train/val/test: the fractions' shares, rounded so they sum to ``num_images``.

    Rounds down, then hands the left-over images to the splits with the largest remainders (ties: earlier
    split first), so every count is within one image of ``fraction * num_images``.
    """
    shares = [f * num_images for f in fractions]
    counts = [math.floor(s + 1e-9) for s in shares]  # 1e-9: 0.8 * 10 is 7.999...
    by_remainder = sorted(range(len(shares)), key=lambda k: (-(shares[k] - counts[k]), k))
    for k in by_remainder[: num_images - sum(counts)]:
        counts[k] += 1
    return counts


def _assign_splits(num_images: int, fractions: Sequence[float], seed: int) -> list[str]:
    """Split names for each image, shuffled by their own generator so they do not depend on the images."""
    names = [name for name, c in zip(SPLIT_NAMES, split_counts(num_images, fractions), strict=True) for _ in range(c)]
    order = np.random.default_rng([seed, 2**32]).permutation(num_images)  # 2**32: never an image's key
    return [names[k] for k in order.tolist()]


def _atomic_write(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Write ``path`` through :func:`utils.atomic_path`: readers never see half a file, and the temporary file
    is removed on errors, Ctrl-C and SIGTERM (a killed run's is removed when the next run writes ``path``)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write(f)


def _raw_sentence(tokens: list[str]) -> str:
    """The caption as a human would write it: capital first letter and a full stop."""
    text = " ".join(tokens)
    return text[:1].upper() + text[1:] + "."


def _image_entry(index: int, split: str, image_size: int, seed: int, images_dir: Path) -> dict[str, Any]:
    """Draw, save and caption image ``index``; return its Karpathy-style JSON entry (sentids filled later)."""
    rng = np.random.default_rng([seed, index])
    image, objects = make_scene(rng, image_size)
    tokens, caption_objects = make_captions(objects, rng)
    filename = f"{index:06d}.png"
    _atomic_write(images_dir / filename, lambda f: image.save(f, format="PNG"))
    sentences = [{"tokens": words, "raw": _raw_sentence(words), "imgid": index, "sentid": -1} for words in tokens]
    return {
        "filepath": IMAGE_DIR,
        "filename": filename,
        "imgid": index,
        "split": split,
        "sentids": [],
        "sentences": sentences,
        "objects": objects,
        "width": image_size,
        "height": image_size,
        "caption_objects": caption_objects,
    }


def _check_arguments(num_images: int, image_size: int, seed: int, split_fractions: Sequence[float]) -> None:
    """Raise ValueError with a one-line reason for arguments the generator cannot honour."""
    if num_images < 1:
        raise ValueError(f"the number of images must be at least 1, got {num_images}")
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"the image size must be at least {MIN_IMAGE_SIZE} pixels, got {image_size}")
    if seed < 0:
        raise ValueError(f"the seed must be non-negative, got {seed}")
    if len(split_fractions) != 3 or any(not 0 <= f <= 1 for f in split_fractions):
        raise ValueError(f"the split fractions must be three numbers in [0, 1], got {list(split_fractions)}")
    if not math.isclose(sum(split_fractions), 1.0, abs_tol=1e-6):
        raise ValueError(
            f"the split fractions must sum to 1, got {list(split_fractions)} (sum {sum(split_fractions):g})"
        )


def generate_dataset(
    out_dir: str | Path,
    num_images: int = 300,
    image_size: int = 128,
    seed: int = 0,
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    *,
    progress: bool = False,
) -> Path:
    """Write ``num_images`` synthetic images and their captions to ``out_dir``; return the JSON's path.

    Creates ``out_dir/images/NNNNNN.png`` and ``out_dir/dataset_synthetic.json`` (Karpathy's format, plus
    ``objects``, ``width``, ``height`` and ``caption_objects``; see the module docstring). Splits get
    ``split_fractions`` of the images (train, val, test), shuffled deterministically. Any old JSON is removed
    first and the new one is written last, so a folder that has the JSON holds a complete dataset. Images
    left over from an earlier, larger run are not deleted; the JSON does not list them.
    ``progress`` shows a tqdm bar.
    """
    _check_arguments(num_images, image_size, seed, split_fractions)
    out_dir = Path(out_dir)
    images_dir = out_dir / IMAGE_DIR
    images_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / JSON_NAME
    json_path.unlink(missing_ok=True)  # the old JSON would describe images we are about to overwrite
    splits = _assign_splits(num_images, split_fractions, seed)
    entries = []
    for index in tqdm(range(num_images), desc="synthetic images", unit="img", disable=not progress):
        entries.append(_image_entry(index, splits[index], image_size, seed, images_dir))
    sentid = 0
    for entry in entries:  # sentence ids run over the whole dataset, as in Karpathy's files
        for sentence in entry["sentences"]:
            sentence["sentid"] = sentid
            entry["sentids"].append(sentid)
            sentid += 1
    data = {"dataset": "synthetic", "images": entries}
    _atomic_write(json_path, lambda f: f.write(json.dumps(data).encode("utf-8")))
    return json_path


# ------------------------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Generate the synthetic shapes captioning dataset (images/*.png and "
        "dataset_synthetic.json, Karpathy's format with object boxes) used by the tests and the demo.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--out", metavar="DIR", default="data/synthetic", help="output folder (created if missing)")
    parser.add_argument("--num-images", metavar="N", type=int, default=300, help="number of images to generate (>= 1)")
    parser.add_argument("--seed", metavar="N", type=int, default=0, help="random seed (>= 0); same seed, same dataset")
    parser.add_argument(
        "--image-size",
        metavar="PX",
        type=int,
        default=128,
        help="side of the square images in pixels (>= 32)",
    )
    parser.add_argument(
        "--splits",
        type=float,
        nargs=3,
        default=[0.8, 0.1, 0.1],
        metavar=("TRAIN", "VAL", "TEST"),
        help="fractions of the images in the train, val and test splits (must sum to 1)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _check_arguments(args.num_images, args.image_size, args.seed, args.splits)
    except ValueError as exc:
        parser.error(str(exc))  # exits with status 2 and a one-line message, no traceback
    handle_sigterm()
    with cli_errors():  # a full disk, Ctrl-C or SIGTERM: one line, and no temporary file left behind
        path = generate_dataset(
            args.out, args.num_images, args.image_size, args.seed, tuple(args.splits), progress=True
        )
    counts = split_counts(args.num_images, args.splits)
    summary = ", ".join(f"{name} {c}" for name, c in zip(SPLIT_NAMES, counts, strict=True))
    print(f"wrote {args.num_images} images ({summary}) to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
