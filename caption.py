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
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, ImageDraw, UnidentifiedImageError

from create_input_files import load_image
from models import Decoded, DecoderWithAttention, Encoder, ModelConfig, Preprocess, content_word_mask, load_captioner
from utils import (
    CamEyeError,
    add_decoding_arguments,
    atomic_path,
    cli_errors,
    freeze_imported_objects,
    keep_freed_memory,
    positive_int,
    read_json,
    reverse_word_map,
    select_device,
    validate_word_map,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from object_prior import ObjectPrior

OVERLAY_ALPHA = 0.65  # opacity of the attention map over the photo in figures and the web page
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


def attention_overlay(photo: np.ndarray, grid: np.ndarray, side: int | None = None) -> np.ndarray:
    """One word's attention (grid x grid) laid over the photo (H x W x 3 uint8) as in the attention figure's
    panels (brighter = more attention), as H x W x 3 uint8.

    The model saw the photo squashed to a square, so the map is smoothed on a ``side`` x ``side`` square
    (:func:`smooth_attention`, as in the figures; default max(H, W)) and then stretched to the photo's own shape.
    """
    from skimage.transform import resize

    h, w = photo.shape[:2]
    heat = smooth_attention(grid, side or max(h, w))
    if heat.shape != (h, w):
        heat = resize(heat, (h, w), order=1)
    # What the figure's imshow(heat, cmap="gray", alpha=OVERLAY_ALPHA) over the photo composites to.
    blend = (1 - OVERLAY_ALPHA) * photo.astype(np.float64) + OVERLAY_ALPHA * 255 * heat[..., None]
    return np.clip(np.rint(blend), 0, 255).astype(np.uint8)


def attention_grids(decoded: Decoded) -> np.ndarray:
    """Each word's attention as a square grid: words x grid x grid."""
    grid = math.isqrt(decoded.alphas.shape[1])
    return decoded.alphas.reshape(-1, grid, grid).numpy()


def attention_figure(image: np.ndarray, words: Sequence[str], grids: np.ndarray) -> Figure:
    """The photo (3 x S x S uint8), then one panel per word with its attention (words x grid x grid) overlaid.

    Built with matplotlib's object API (no pyplot): pyplot's global figure registry is not thread-safe, and
    the web page draws figures from several threads. matplotlib is imported here, not at start-up: it
    costs about 0.3 s, and ``--no-figures`` runs never need it.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rgb = image.transpose(1, 2, 0)
    panels = len(words) + 1
    cols = min(5, panels)
    rows = math.ceil(panels / cols)
    fig = Figure(figsize=(2.4 * cols, 2.6 * rows))
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    axes.flat[0].imshow(rgb)
    axes.flat[0].set_title("photo", fontsize=11)
    for ax, word, grid in zip(axes.flat[1:], words, grids):
        ax.imshow(rgb)
        ax.imshow(smooth_attention(grid, rgb.shape[0]), cmap="gray", alpha=OVERLAY_ALPHA, vmin=0, vmax=1)
        ax.set_title(word, fontsize=11)
    fig.suptitle(" ".join(words), fontsize=11)
    fig.tight_layout()
    return fig


def save_attention_figure(image: np.ndarray, words: Sequence[str], grids: np.ndarray, path: Path) -> int:
    """Write :func:`attention_figure` as a PNG (80 dpi: 192 x 208 px a panel). Returns the panel count."""
    fig = attention_figure(image, words, grids)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    return len(words) + 1


def attention_gif_frames(image: np.ndarray, words: Sequence[str], grids: np.ndarray) -> list[np.ndarray]:
    """One S x S x 3 uint8 frame per word: the photo (3 x S x S) darkened where not attended, the caption so far
    along the bottom and a "word i/n" counter in the top right corner."""
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
        # word once the growing caption is clipped at the image's edge. The counter keeps every frame distinct.
        counter = f"{i + 1}/{len(words)}"
        x = frame.width - 3 - draw.textlength(counter)
        draw.rectangle((x - 2, 0, frame.width, 13), fill=(0, 0, 0))
        draw.text((x, 1), counter, fill=(255, 255, 255))
        frames.append(np.asarray(frame))
    return frames


def save_attention_gif(image: np.ndarray, words: Sequence[str], grids: np.ndarray, path: Path) -> int:
    """Write :func:`attention_gif_frames` as an animated GIF (0.7 s a frame, looping). Returns the frame count."""
    import imageio.v3 as iio  # only --gif runs need it

    frames = attention_gif_frames(image, words, grids)
    with atomic_path(path) as tmp:
        iio.imwrite(tmp, np.stack(frames), extension=".gif", duration=700, loop=0)
    return len(frames)


# ---------------------------------------------------------------------------------------------- captioning
@dataclass
class Captioner:
    """A CamEye model loaded once (:meth:`load`), ready to caption decoded images any number of times.

    caption.py's command line and the web page (app.py) both caption through it. :meth:`decode` holds a lock,
    so threads that share one captioner decode one batch at a time.
    """

    checkpoint: Path
    encoder: Encoder
    decoder: DecoderWithAttention
    word_map: dict[str, int]
    config: ModelConfig
    device: torch.device
    vocabulary: list[str] = field(init=False)  # word id -> word
    preprocess: Preprocess = field(init=False)
    prior: ObjectPrior | None = None  # word bonuses from the encoder's ImageNet classifier (see object_prior.py)
    content_words: torch.Tensor = field(init=False)  # V bools: words that may not end a repeated bigram
    _lock: threading.Lock = field(init=False, default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        self.vocabulary = reverse_word_map(self.word_map)
        self.content_words = content_word_mask(self.word_map)
        self.preprocess = Preprocess(self.config.backbone, self.config.input_size)

    @classmethod
    def load(cls, checkpoint: Path, device: str = "auto", word_map_path: Path | None = None,
             encoder_weights: str | None = None, precision: str = "float32",
             object_prior: float = 0.0) -> Captioner:  # fmt: skip
        """Load a checkpoint in eval mode on ``device``; one-line :class:`CamEyeError` if it cannot be used
        (or if ``word_map_path`` names a word map other than the model's). ``encoder_weights`` and
        ``precision`` (the encoder's): see ``models.load_captioner``; ``object_prior``: the strength of
        object_prior.ObjectPrior's word bonuses in beam search (0 = off)."""
        dev = select_device(device)
        encoder, decoder, word_map, cfg = load_captioner(checkpoint, dev, encoder_weights, precision)
        if word_map_path is not None:
            given = validate_word_map(read_json(word_map_path, "word map"))
            if given != word_map:
                raise CamEyeError(f"{word_map_path} does not match the word map of {checkpoint}")
        captioner = cls(Path(checkpoint), encoder, decoder, word_map, cfg, dev)
        if object_prior:
            from object_prior import ObjectPrior

            captioner.prior = ObjectPrior(cfg.backbone, word_map, object_prior)
        return captioner

    def read(self, path: Path) -> np.ndarray:
        """The image file decoded as the model expects it: uint8 3 x S x S (S = the model's image size)."""
        return read_image(path, self.config.image_size)

    def decode(self, images: Sequence[np.ndarray], beam_size: int = 3, max_len: int = 50, length_penalty: float = 0.5,
               n_best: int = 1, block_trigrams: bool = False,
               block_bigrams: bool = False) -> list[Decoded]:  # fmt: skip
        """Beam-search captions for images from :meth:`read` (each 3 x S x S uint8), in input order; each
        result's ``alternatives`` holds its ``n_best`` best beams (see ``DecoderWithAttention.beam_search``;
        ``block_bigrams`` blocks repeated bigrams that end in a content word)."""
        if not images:
            return []
        with self._lock, torch.inference_mode():  # a Captioner never trains: nothing made here needs autograd
            x = self.preprocess(torch.from_numpy(np.stack(images))).to(self.device)
            features = self.encoder(x)
            bonus = self.prior.bonus(features) if self.prior is not None else None
            return self.decoder.beam_search(
                features, beam_size, max_len, length_penalty, n_best=n_best, block_trigrams=block_trigrams,
                word_bonus=bonus, repeat_words=self.content_words if block_bigrams else None,
            )  # fmt: skip

    def words(self, decoded: Decoded) -> list[str]:
        """The caption's words."""
        return [self.vocabulary[i] for i in decoded.tokens]


def caption_images(
    paths: Sequence[Path], model: Captioner | Path, beam_size: int = 3, batch_size: int = 16, max_len: int = 50,
    length_penalty: float = 0.5, device: str = "auto", word_map_path: Path | None = None,
    block_trigrams: bool = False, block_bigrams: bool = False,
) -> Iterator[tuple[Path, list[str] | CamEyeError, Decoded | None, np.ndarray | None]]:  # fmt: skip
    """Yield ``(path, words, decoded, image)`` per usable image, or ``(path, CamEyeError, None, None)``.

    ``model`` is a loaded :class:`Captioner`, or a checkpoint to load on ``device`` (with ``word_map_path``).
    """
    captioner = model if isinstance(model, Captioner) else Captioner.load(model, device, word_map_path)
    for start in range(0, len(paths), batch_size):
        batch, images = [], []
        for path in paths[start : start + batch_size]:
            try:
                images.append(captioner.read(path))
                batch.append(path)
            except CamEyeError as err:
                yield path, err, None, None
        decoded = captioner.decode(
            images, beam_size, max_len, length_penalty, block_trigrams=block_trigrams, block_bigrams=block_bigrams
        )
        for path, image, d in zip(batch, images, decoded):
            yield path, captioner.words(d), d, image


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
        captioner = Captioner.load(args.checkpoint, args.device, args.word_map, args.encoder_weights,
                                   args.precision, args.object_prior)  # fmt: skip
        used: set[str] = set()
        results = caption_images(paths, captioner, args.beam_size, args.batch_size, args.max_len, args.length_penalty,
                                 block_trigrams=args.block_trigrams, block_bigrams=args.block_bigrams)  # fmt: skip
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
    freeze_imported_objects()
    sys.exit(main())
