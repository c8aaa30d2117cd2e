"""Reading photos for CamEye: decoding any common image file to RGB and resizing it to the model's square.

Preparation (create_input_files.py, in its decoding workers), captioning (caption.py) and the web page (app.py)
all read photos through :func:`load_image`, so a photo becomes the same pixels for training and for inference.
Nothing here starts processes or imports torch before a resize needs it.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import stat
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np
import simplejpeg
from PIL import ExifTags, Image, ImageCms, ImageOps, UnidentifiedImageError, features

from utils import CamEyeError

if TYPE_CHECKING:
    import torch


class NotARegularFile(OSError):
    """A path that names a folder, FIFO, socket or device rather than a file; ``str()`` says which."""


_SPECIAL_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def _refuse_special(mode: int) -> None:
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _SPECIAL_KINDS if test(mode)), "a special file")
        raise NotARegularFile(f"not a regular file ({kind})")


def open_regular_file(path: str | Path) -> BinaryIO:
    """``open(path, "rb")`` for a regular file only; raises ``FileNotFoundError``, :class:`NotARegularFile` or
    another ``OSError``.

    Opening a FIFO for reading waits until some process opens it for writing, which may be never (a dataset
    listing one hung preparation); opening a device may have effects of its own. So the path is looked at
    first, opened without waiting (O_NONBLOCK), and looked at again through the open file, in case it was
    replaced in between.
    """
    _refuse_special(os.stat(path).st_mode)
    no_wait = getattr(os, "O_NONBLOCK", 0)
    fd = os.open(path, os.O_RDONLY | no_wait | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_BINARY", 0))
    try:
        _refuse_special(os.fstat(fd).st_mode)
        if no_wait:
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


# What decoding an unusable file raises: a missing, special, empty, foreign, truncated or corrupt file, or one
# over Pillow's decompression-bomb limits.
UNUSABLE_IMAGE_ERRORS = (
    OSError,
    ValueError,
    SyntaxError,
    Image.DecompressionBombError,
    Image.DecompressionBombWarning,
)


def image_problem(path: str | Path, exc: BaseException) -> str:
    """Why ``path`` could not be used, in a few words, for one of :data:`UNUSABLE_IMAGE_ERRORS` that
    :func:`decode_image` raised on it: "file not found", "not a regular file (a FIFO (named pipe))",
    "empty file", "not an image (or an unsupported format)" or "unreadable image (TYPE: details)"."""
    if isinstance(exc, FileNotFoundError):
        return "file not found"
    if isinstance(exc, NotARegularFile):
        return str(exc)
    if isinstance(exc, UnidentifiedImageError):
        with contextlib.suppress(OSError):
            if os.stat(path).st_size == 0:
                return "empty file"
        return "not an image (or an unsupported format)"
    return f"unreadable image ({type(exc).__name__}: {exc})"


def read_image(path: str | Path, size: int) -> np.ndarray:
    """:func:`load_image`, or a one-line :class:`CamEyeError` "PATH: reason" (:func:`image_problem`)."""
    try:
        return load_image(path, size)
    except UNUSABLE_IMAGE_ERRORS as exc:
        raise CamEyeError(f"{path}: {image_problem(path, exc)}") from None


def decode_image(path: str | Path, size: int) -> np.ndarray:
    """Decode any common image as RGB uint8, H x W x 3, on its way to ``size`` x ``size``; raises one of
    :data:`UNUSABLE_IMAGE_ERRORS` if unusable (``FileNotFoundError``, :class:`NotARegularFile`,
    ``UnidentifiedImageError``, ...).

    Handles EXIF orientation, grayscale, palette, CMYK, alpha (composited on white, how viewers show it),
    16-bit images (scaled down to 8 bits rather than clipped, which would turn them white) and embedded colour
    profiles (converted to sRGB, :func:`_srgb_transform`).

    A JPEG at least four times the target side is decoded at a reduced DCT scale (PIL's draft mode) to no less
    than twice the target side, as ``Image.thumbnail`` does: a 12-megapixel phone photo then decodes several
    times faster, and the final resize still has a 2x margin to antialias over. Any other upright RGB or grey
    JPEG (most of every captioning dataset) is decoded by simplejpeg: the same libjpeg-turbo decode as PIL's,
    pixel for pixel, straight into a numpy array, in 0.6x of PIL's time (PIL decodes into its own 4-byte
    pixels and copies them out).
    """
    with open_regular_file(path) as f, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(f) as im:  # reads the header only
            icc = im.info.get("icc_profile") or None  # later conversions drop it from im.info
            if _decodes_as_plain_jpeg(im, size):
                f.seek(0)
                with contextlib.suppress(ValueError):  # a file libjpeg only warns about: PIL's decode decides
                    return simplejpeg.decode_jpeg(f.read(), colorspace="RGB", fastdct=False, fastupsample=False)
            if im.format == "JPEG":
                im.draft(im.mode, (2 * size, 2 * size))
            im.load()
            # in_place: without it exif_transpose copies every image, even one with nothing to turn.
            ImageOps.exif_transpose(im, in_place=True)
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        peak = arr.max() if arr.size else 0.0
        scale = 1.0 if peak <= 255 else (257.0 if peak <= 65535 else peak / 255.0)
        if im.mode.startswith("I;16"):
            # An I;16 image is 16-bit whatever its content: guessing from the peak would make a dark one
            # (all values <= 255, e.g. 200/65535) bright (200/255) instead of nearly black.
            scale = 257.0
        im = Image.fromarray(np.clip(arr / scale, 0, 255).astype(np.uint8), mode="L")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, rgba)
    if icc and im.mode in ("L", "CMYK") and (transform := _srgb_transform(icc, im.mode)):
        im = transform.apply(im)  # grey or CMYK profile -> sRGB
    if im.mode != "RGB":
        im = im.convert("RGB")
    if icc and (transform := _srgb_transform(icc, "RGB")):
        im = transform.apply(im)
    return np.array(im)


# A 9 x 9 x 9 grid of colours (and 9 greys) a profile's conversion must leave alone for it to count as sRGB.
_LEVELS = np.linspace(0, 255, 9).round().astype(np.uint8)
_PROBES = {
    "RGB": np.stack(np.meshgrid(_LEVELS, _LEVELS, _LEVELS, indexing="ij"), axis=-1).reshape(1, -1, 3),
    "L": _LEVELS[None, :],
}


@functools.lru_cache(maxsize=32)
def _srgb_transform(icc: bytes, mode: str) -> ImageCms.ImageCmsTransform | None:
    """The conversion from the embedded profile ``icc`` to sRGB for an image of ``mode`` ("RGB", "L" or
    "CMYK"; the result is "RGB"), or None when there is nothing to convert.

    None for a profile that is sRGB already, whatever it is called (camera JPEGs embed "sRGB IEC61966-2.1",
    editors their own variants): one whose conversion moves no colour of a coarse grid by more than a grey
    level, so such photos keep exactly the pixels they decode to. None also for a profile of another colour
    space than the image's (a grey profile on a photo that compositing made RGB) and one LittleCMS cannot
    read: the photo's values are then used as they are, as they were before profiles were read. Cached: a
    dataset's photos share a handful of profiles, and building a conversion costs milliseconds.
    """
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        space = {"RGB": "RGB", "GRAY": "L", "CMYK": "CMYK"}.get(profile.profile.xcolor_space.strip())
        if space != mode:
            return None
        transform = ImageCms.buildTransform(profile, _srgb_profile(), mode, "RGB", ImageCms.Intent.PERCEPTUAL)
        if mode in _PROBES:
            probe = _PROBES[mode]
            converted = np.asarray(transform.apply(Image.fromarray(probe)), dtype=np.int16)
            expected = probe[..., None] if mode == "L" else probe
            if np.abs(converted - expected).max() <= 1:
                return None
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
        return None
    return transform


@functools.cache
def _srgb_profile() -> ImageCms.ImageCmsProfile:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


# simplejpeg bundles libjpeg-turbo; a Pillow built on IJG's libjpeg would decode (upsample) differently.
_PIL_HAS_LIBJPEG_TURBO = bool(features.check_feature("libjpeg_turbo"))


def _decodes_as_plain_jpeg(im: Image.Image, size: int) -> bool:
    """Whether ``im`` (opened, not loaded) is a JPEG that simplejpeg decodes exactly as PIL would, with nothing
    left to do: YCbCr, RGB or grey (not CMYK), upright (no EXIF or XMP orientation to apply), not large enough
    for draft mode and without a colour profile other than sRGB."""
    if not _PIL_HAS_LIBJPEG_TURBO or im.format != "JPEG" or im.mode not in ("RGB", "L"):
        return False
    if min(im.width, im.height) >= 4 * size:  # draft mode would decode it at a reduced scale
        return False
    if (icc := im.info.get("icc_profile")) and _srgb_transform(icc, im.mode) is not None:
        return False  # its colours must be converted
    return im.getexif().get(ExifTags.Base.Orientation, 1) == 1


def load_image(path: str | Path, size: int) -> np.ndarray:
    """Any common image as RGB uint8, 3 x size x size (:func:`decode_image`, then :func:`resize_uint8`)."""
    return resize_uint8(decode_image(path, size), size)


def resize_images(rgb: np.ndarray, size: int) -> torch.Tensor:
    """N x H x W x 3 uint8 -> N x 3 x size x size uint8 (channels-last memory), bicubic with antialiasing: PIL's
    BICUBIC filter (a = -0.5), up and down, by torch's uint8 kernel.

    The same output as ``PIL.Image.resize`` up to a grey level of rounding at a few pixels, in about a quarter
    of its time; images of one shape resized in one call take about half the time each of one by one.
    """
    import torch  # here: the parent of the decoding workers never needs it (see ImageDecoder)
    import torch.nn.functional as F

    x = torch.from_numpy(rgb).permute(0, 3, 1, 2)  # channels last: the layout the uint8 kernel is fastest on
    if x.shape[2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bicubic", antialias=True)


def resize_uint8(rgb: np.ndarray, size: int) -> np.ndarray:
    """H x W x 3 uint8 -> 3 x size x size uint8, as :func:`resize_images`."""
    return np.ascontiguousarray(resize_images(rgb[None], size)[0].numpy())
