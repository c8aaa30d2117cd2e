"""Attention maps drawn for people: each word's attention grid smoothed over the photo, as in the paper's
figures (the coarse grid is upsampled smoothly, a Gaussian pyramid expansion, not as blocky squares).

Used by caption.py (figures and GIFs) and the web page (app.py), so both draw the same thing. A word's map is
drawn as a layer laid over the photo (:func:`attention_layer`, RGBA), in one of two renderings:

* ``"contour"`` (the default): the photo stays as it is where the model looked; a line marks where the
  attention falls to half its peak, and the rest of the photo is dimmed the further it is from that. Nothing is
  painted over the attended part, so its detail stays readable.
* ``"heatmap"``: a colour map (matplotlib's perceptually uniform *inferno*, dark = less, yellow = more) whose
  opacity grows with the attention, so the photo shows through where it did not look; read with a legend.

The old rendering washed the attended area toward white at 65% opacity, which kept only 35% of the photo's
detail exactly where the reader wants to look (docs/page.md has the measurement).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from decoding import Decoded
from utils import atomic_path

if TYPE_CHECKING:
    from matplotlib.figure import Figure

RENDERINGS = ("contour", "heatmap")
CONTOUR_LEVEL = 0.5  # the line is drawn where the attention is this fraction of the word's peak
CONTOUR_DIM = 0.6  # how much the photo is dimmed far from the line (0: not at all, 1: black)
HEATMAP_ALPHA = 0.7  # opacity of the colour map at the peak (it falls to 0 where there is no attention)
HEATMAP_COLORMAP = "inferno"
DISPLAY_SIDE = 512  # longest side, in pixels, of the photo the attention is drawn over
EXIF_ORIENTATION = 0x0112
FIGURE_PANEL_INCHES = 3.2  # a panel's width: at FIGURE_DPI, 5 panels make a 1,600 px wide figure for a slide
FIGURE_DPI = 100
FIGURE_COLUMNS = 5


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


def photo_shape(path: Path, side: int = DISPLAY_SIDE) -> tuple[int, int]:
    """(height, width) to show the photo at: its own aspect ratio (after EXIF rotation), longest side ``side``."""
    with Image.open(path) as im:
        w, h = im.size
        if im.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8):  # rotated a quarter turn
            w, h = h, w
    scale = side / max(w, h, 1)
    return max(1, round(h * scale)), max(1, round(w * scale))


def stretch_photo(square: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The model's view of a photo (3 x S x S or S x S x 3 uint8, squashed to a square) stretched back to the
    photo's own ``(height, width)``, as H x W x 3 uint8: the photo as people see it, with every attention map
    lining up with it exactly (each map is stretched the same way)."""
    rgb = square.transpose(1, 2, 0) if square.shape[0] == 3 and square.shape[2] != 3 else square
    h, w = shape
    return np.asarray(Image.fromarray(rgb).resize((w, h), Image.Resampling.BICUBIC))


def word_heat(grid: np.ndarray, shape: tuple[int, int], side: int | None = None) -> np.ndarray:
    """One word's attention (grid x grid) as an H x W map in [0, 1]: smoothed on a ``side`` x ``side`` square (the
    model's view; default max(H, W)) as in the figures, then stretched to the photo's own shape."""
    from skimage.transform import resize

    h, w = shape
    heat = smooth_attention(grid, side or max(h, w))
    return heat if heat.shape == (h, w) else resize(heat, (h, w), order=1)


def colormap_table(name: str = HEATMAP_COLORMAP) -> np.ndarray:
    """The heat map's colours: 256 x 3 uint8, from no attention (row 0) to the peak (row 255)."""
    from matplotlib import colormaps

    return np.rint(colormaps[name](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.uint8)


def contour_line(inside: np.ndarray, width: int) -> np.ndarray:
    """The pixels within ``width`` of the border of the boolean region ``inside`` (on both sides of it)."""
    from scipy.ndimage import binary_dilation, binary_erosion

    if not inside.any() or inside.all():
        return np.zeros_like(inside)
    half = max(1, width // 2)
    return binary_dilation(inside, iterations=half) & ~binary_erosion(inside, iterations=half, border_value=1)


def attention_layer(heat: np.ndarray, rendering: str = "contour") -> np.ndarray:
    """The layer drawn over the photo for one word's attention map (H x W in [0, 1], :func:`word_heat`): an
    H x W x 4 uint8 RGBA image, composited over the photo by :func:`composite` (or by a browser, identically)."""
    h, w = heat.shape
    layer = np.zeros((h, w, 4), dtype=np.uint8)
    if rendering == "contour":
        # Dimmed in proportion to how far below the line the attention is; untouched inside the line.
        layer[..., 3] = np.rint(255 * CONTOUR_DIM * (1 - np.clip(heat / CONTOUR_LEVEL, 0, 1)))
        line_width = max(2, round(max(h, w) / 170))  # 3 px on the page's 512 px photo
        outer = contour_line(heat >= CONTOUR_LEVEL, line_width + 2)  # a dark edge: the line shows on white too
        layer[outer] = (0, 0, 0, 200)
        layer[contour_line(heat >= CONTOUR_LEVEL, line_width)] = (255, 255, 255, 255)
    elif rendering == "heatmap":
        index = np.clip(np.rint(heat * 255), 0, 255).astype(np.intp)
        layer[..., :3] = colormap_table()[index]
        layer[..., 3] = np.rint(255 * HEATMAP_ALPHA * heat)
    else:
        raise ValueError(f"rendering must be one of {RENDERINGS}, got {rendering!r}")
    return layer


def composite(photo: np.ndarray, layer: np.ndarray) -> np.ndarray:
    """``layer`` (H x W x 4 RGBA) drawn over ``photo`` (H x W x 3), as H x W x 3 uint8 ("source over")."""
    alpha = layer[..., 3:4].astype(np.float64) / 255
    blend = (1 - alpha) * photo.astype(np.float64) + alpha * layer[..., :3]
    return np.clip(np.rint(blend), 0, 255).astype(np.uint8)


def attention_overlay(photo: np.ndarray, grid: np.ndarray, side: int | None = None, rendering: str = "contour"
                      ) -> np.ndarray:  # fmt: skip
    """One word's attention (grid x grid) drawn over the photo (H x W x 3 uint8), as H x W x 3 uint8.

    The model saw the photo squashed to a square, so the map is smoothed on a ``side`` x ``side`` square
    (as in the figures; default max(H, W)) and then stretched to the photo's own shape.
    """
    return composite(photo, attention_layer(word_heat(grid, photo.shape[:2], side), rendering))


def attention_grids(decoded: Decoded) -> np.ndarray:
    """Each word's attention as a square grid: words x grid x grid."""
    grid = math.isqrt(decoded.alphas.shape[1])
    return decoded.alphas.reshape(-1, grid, grid).numpy()


def figure_layout(panels: int, aspect: float) -> tuple[int, int, float, float]:
    """(columns, rows, width, height in inches) of the attention figure for ``panels`` panels of photos
    ``aspect`` = width / height: up to five panels a row, each :data:`FIGURE_PANEL_INCHES` wide at the photo's
    own shape, with room for a title above each panel, the caption above all and a legend below."""
    cols = min(FIGURE_COLUMNS, panels)
    rows = math.ceil(panels / cols)
    panel_height = FIGURE_PANEL_INCHES / aspect + 0.45  # the panel's title
    return cols, rows, FIGURE_PANEL_INCHES * cols, panel_height * rows + 1.1  # caption and legend


def attention_figure(image: np.ndarray, words: Sequence[str], grids: np.ndarray, photo: np.ndarray | None = None,
                     rendering: str = "contour") -> Figure:  # fmt: skip
    """The photo, then one panel per word with its attention (words x grid x grid) drawn as the page draws it.

    ``image`` is the model's input (3 x S x S uint8, the photo squashed to a square); ``photo`` the photo at its
    own aspect ratio (H x W x 3 uint8, e.g. :func:`stretch_photo` of ``image`` to :func:`photo_shape`), which the
    panels show; without it they show ``image``. Titles never overlap (constrained layout, one row of panel
    titles per row of panels) and the type is sized for a slide.

    Built with matplotlib's object API (no pyplot): pyplot's global figure registry is not thread-safe, and
    the web page draws figures from several threads. matplotlib is imported here, not at start-up: it
    costs about 0.3 s, and ``--no-figures`` runs never need it.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    shown = image.transpose(1, 2, 0) if photo is None else photo
    h, w = shown.shape[:2]
    cols, rows, width, height = figure_layout(len(words) + 1, w / h)
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    axes.flat[0].imshow(shown)
    axes.flat[0].set_title("photo", fontsize=14)
    side = image.shape[1]
    for i, (ax, word, grid) in enumerate(zip(axes.flat[1:], words, grids), start=1):
        ax.imshow(attention_overlay(shown, grid, side, rendering))
        ax.set_title(f"{word} ({i}/{len(words)})", fontsize=14)
    fig.suptitle(" ".join(words), fontsize=18)
    legend = {
        "contour": "inside the white line: where the model looked while writing the word "
        f"(the line is at {CONTOUR_LEVEL:.0%} of the word's peak attention; the rest is dimmed)",
        "heatmap": f"colour: the word's attention, from none (photo) to its peak (yellow; {HEATMAP_COLORMAP})",
    }[rendering]
    fig.supxlabel(legend, fontsize=12)
    return fig


def save_attention_figure(image: np.ndarray, words: Sequence[str], grids: np.ndarray, path: Path,
                          photo: np.ndarray | None = None, rendering: str = "contour") -> int:  # fmt: skip
    """Write :func:`attention_figure` as a PNG (:data:`FIGURE_DPI`: 320 px a panel). Returns the panel count."""
    fig = attention_figure(image, words, grids, photo, rendering)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=FIGURE_DPI)
    return len(words) + 1


def figure_pixels(panels: int, aspect: float = 1.0) -> tuple[int, int]:
    """Pixel size (width, height) of :func:`save_attention_figure`'s PNG for ``panels`` panels."""
    _, _, width, height = figure_layout(panels, aspect)
    return round(width * FIGURE_DPI), round(height * FIGURE_DPI)


def attention_gif_frames(image: np.ndarray, words: Sequence[str], grids: np.ndarray) -> list[np.ndarray]:
    """One S x S x 3 uint8 frame per word: the photo (3 x S x S) with the word's attention drawn as in the
    figure (contour), the caption so far along the bottom and a "word i/n" counter in the top right corner."""
    from PIL import ImageDraw

    rgb = image.transpose(1, 2, 0)
    frames = []
    for i, grid in enumerate(grids[: len(words)]):
        frame = Image.fromarray(attention_overlay(rgb, grid))
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
