"""Caption photos with a trained CamEye model and show, word by word, where it looked.

    python caption.py photo.jpg                      # the shipped Flickr8k model, beam search of 3
    python caption.py photos/ more.png --gif         # a folder and a file; also an animated GIF each
    python caption.py photo.jpg --checkpoint checkpoints/run/best.pt --beam-size 5

Prints one ``file: caption`` line per image and writes ``<out-dir>/<name>_attention.png``: the photo, then
one panel per generated word with that step's attention drawn over the photo. As in the paper's figures,
the coarse attention grid is upsampled smoothly (a Gaussian pyramid expansion), not as blocky squares.

Images are decoded like the training data (EXIF rotation, any colour mode, squashed to the training size)
and captioned in batches. A file that cannot be used is reported in one line and skipped; the exit status
is 2 if any input failed.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import torch
from PIL import Image, ImageDraw, UnidentifiedImageError

from create_input_files import load_image
from models import Decoded, Preprocess, load_captioner
from utils import (
    CamEyeError,
    add_decoding_arguments,
    cli_errors,
    keep_freed_memory,
    positive_int,
    read_json,
    reverse_word_map,
    select_device,
    validate_word_map,
)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


def collect_images(inputs: Sequence[Path]) -> list[Path]:
    """Expand folders into their image files (sorted); files are kept as given, even with odd suffixes."""
    paths: list[Path] = []
    for p in inputs:
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise CamEyeError(f"no images found in folder {p}")
            paths += found
        else:
            paths.append(p)
    return paths


def read_image(path: Path, size: int) -> np.ndarray:
    """The image as uint8 3 x size x size, or a one-line :class:`CamEyeError` saying why not."""
    if not path.exists():
        raise CamEyeError(f"{path}: file not found")
    if not path.is_file():
        raise CamEyeError(f"{path}: not a file")
    try:
        return load_image(path, size)
    except UnidentifiedImageError:
        raise CamEyeError(f"{path}: not an image (or an unsupported format)") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise CamEyeError(f"{path}: unreadable image ({e})") from None


# ------------------------------------------------------------------------------------------ attention maps
def smooth_attention(alpha: np.ndarray, size: int) -> np.ndarray:
    """Upsample a grid x grid attention map to size x size smoothly (like the paper's figures), in [0, 1]."""
    from skimage.transform import pyramid_expand, resize

    grid = alpha.shape[0]
    upscale = size / grid
    heat = pyramid_expand(alpha.astype(np.float64), upscale=upscale, sigma=upscale / 2, channel_axis=None)
    if heat.shape != (size, size):
        heat = resize(heat, (size, size), order=1)
    heat -= heat.min()
    peak = heat.max()
    return heat / peak if peak > 0 else heat


def attention_grids(decoded: Decoded) -> np.ndarray:
    """Each word's attention as a square grid: words x grid x grid."""
    grid = math.isqrt(decoded.alphas.shape[1])
    return decoded.alphas.reshape(-1, grid, grid).numpy()


def save_attention_figure(image: np.ndarray, words: Sequence[str], grids: np.ndarray, path: Path) -> int:
    """Write a PNG: the photo, then one panel per word with its attention overlaid. Returns the panel count."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display needed
    import matplotlib.pyplot as plt

    from utils import atomic_path

    rgb = image.transpose(1, 2, 0)
    panels = len(words) + 1
    cols = min(5, panels)
    rows = math.ceil(panels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    axes.flat[0].imshow(rgb)
    axes.flat[0].set_title("photo", fontsize=11)
    for ax, word, grid in zip(axes.flat[1:], words, grids):
        ax.imshow(rgb)
        ax.imshow(smooth_attention(grid, rgb.shape[0]), cmap="gray", alpha=0.65, vmin=0, vmax=1)
        ax.set_title(word, fontsize=11)
    fig.suptitle(" ".join(words), fontsize=11)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)
    return panels


def save_attention_gif(image: np.ndarray, words: Sequence[str], grids: np.ndarray, path: Path) -> int:
    """Write an animated GIF with one frame per word (photo darkened where not attended). Returns frames."""
    from utils import atomic_path

    rgb = image.transpose(1, 2, 0).astype(np.float64)
    frames = []
    for i, grid in enumerate(grids[: len(words)]):
        heat = smooth_attention(grid, rgb.shape[0])[..., None]
        frame = Image.fromarray((rgb * (0.25 + 0.75 * heat)).astype(np.uint8))
        draw = ImageDraw.Draw(frame)
        text = " ".join(words[: i + 1])
        draw.rectangle((0, frame.height - 16, frame.width, frame.height), fill=(0, 0, 0))
        draw.text((4, frame.height - 14), text, fill=(255, 255, 255))
        # Fix: Pillow's GIF writer silently merges a frame identical to the previous one into it, so a GIF
        # lost frames (and the returned count was wrong) whenever two steps looked alike, e.g. a repeated
        # word once the growing caption is clipped at the image's edge. A "word i/n" counter in the top
        # right corner keeps every frame distinct.
        counter = f"{i + 1}/{len(words)}"
        x = frame.width - 3 - draw.textlength(counter)
        draw.rectangle((x - 2, 0, frame.width, 13), fill=(0, 0, 0))
        draw.text((x, 1), counter, fill=(255, 255, 255))
        frames.append(frame)
    with atomic_path(path) as tmp:
        iio.imwrite(tmp, np.stack([np.asarray(f) for f in frames]), extension=".gif", duration=700, loop=0)
    return len(frames)


# ---------------------------------------------------------------------------------------------- captioning
def caption_images(paths: Sequence[Path], checkpoint: Path, beam_size: int = 3, batch_size: int = 16,
                   max_len: int = 50, length_penalty: float = 0.5, device: str = "auto",
                   word_map_path: Path | None = None):  # fmt: skip
    """Yield ``(path, words, decoded, image)`` per usable image, or ``(path, CamEyeError, None, None)``."""
    dev = select_device(device)
    encoder, decoder, word_map, cfg = load_captioner(checkpoint, dev)
    if word_map_path is not None:
        given = validate_word_map(read_json(word_map_path, "word map"))
        if given != word_map:
            raise CamEyeError(f"{word_map_path} does not match the word map of {checkpoint}")
    rev = reverse_word_map(word_map)
    preprocess = Preprocess(cfg.backbone, cfg.input_size)
    for start in range(0, len(paths), batch_size):
        batch, images = [], []
        for path in paths[start : start + batch_size]:
            try:
                images.append(read_image(path, cfg.image_size))
                batch.append(path)
            except CamEyeError as err:
                yield path, err, None, None
        if not batch:
            continue
        with torch.no_grad():
            x = preprocess(torch.from_numpy(np.stack(images))).to(dev)
            decoded = decoder.beam_search(encoder(x), beam_size, max_len, length_penalty)
        for path, image, d in zip(batch, images, decoded):
            yield path, [rev[i] for i in d.tokens], d, image


def output_name(path: Path, used: set[str]) -> str:
    """A figure file stem for ``path`` that no earlier image of this run has taken."""
    stem, n = path.stem, 1
    while stem in used:
        n += 1
        stem = f"{path.stem}_{n}"
    used.add(stem)
    return stem


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Caption images and save per-word attention figures.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("images", nargs="+", type=Path, help="image files and/or folders of images")
    add_decoding_arguments(p)
    p.add_argument("--word-map", type=Path, default=None, help="optional word map JSON that must match the model's")
    p.add_argument("--batch-size", type=positive_int, default=16, help="images captioned together")
    p.add_argument("--out-dir", type=Path, default=Path("outputs"), help="folder for the attention figures")
    p.add_argument("--no-figures", dest="figures", action="store_false", help="only print the captions")
    p.add_argument("--gif", action="store_true", help="also write an animated GIF per image")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    keep_freed_memory()
    failed = 0
    with cli_errors():
        paths = collect_images(args.images)
        used: set[str] = set()
        results = caption_images(paths, args.checkpoint, args.beam_size, args.batch_size, args.max_len,
                                 args.length_penalty, args.device, args.word_map)  # fmt: skip
        for path, words, decoded, image in results:
            if isinstance(words, CamEyeError):
                print(f"error: {words}", file=sys.stderr)
                failed += 1
                continue
            print(f"{path}: {' '.join(words)}", flush=True)
            if args.figures and words:
                stem = output_name(path, used)
                grids = attention_grids(decoded)
                save_attention_figure(image, words, grids, args.out_dir / f"{stem}_attention.png")
                if args.gif:
                    save_attention_gif(image, words, grids, args.out_dir / f"{stem}_attention.gif")
    return 2 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
