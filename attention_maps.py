"""Attention maps drawn for people: each word's attention grid smoothed over the photo, as in the paper's
figures (the coarse grid is upsampled smoothly, a Gaussian pyramid expansion, not as blocky squares).

Used by caption.py (figures and GIFs) and the web page (app.py), so both draw the same thing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw

from decoding import Decoded
from utils import atomic_path

if TYPE_CHECKING:
    from matplotlib.figure import Figure

OVERLAY_ALPHA = 0.65  # opacity of the attention map over the photo in figures and the web page


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
        # Pillow's GIF writer merges a frame identical to the previous one into it (two steps can look alike,
        # e.g. a repeated word once the growing caption is clipped at the edge): the counter keeps them apart.
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
