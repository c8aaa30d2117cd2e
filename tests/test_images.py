"""Tests for images.py: what preparation, caption.py and the web page share when they read a photo (colour
profiles, files that are not regular files). The decoding of odd and broken images is tested through
create_input_files in test_create_input_files.py."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageCms

import create_input_files
import images
from utils import CamEyeError

ROOT = Path(__file__).resolve().parents[1]


def test_images_is_a_module_not_a_script_and_loads_no_preparation_machinery():
    """Issue 19: inference reads photos without importing the preparation script, its pool or HDF5."""
    code = "import sys, images\nprint(sorted({'create_input_files', 'h5py', 'torch', 'tqdm'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


# ------------------------------------------------------------------------------------- not regular files
@contextlib.contextmanager
def fifo_released_after(path, seconds=3.0):
    """A FIFO at ``path``; a reader blocked opening it is let through (it reads an empty file) after ``seconds``,
    so code that opens it fails the test instead of hanging it."""
    os.mkfifo(path)
    done = threading.Event()

    def release():
        if not done.wait(seconds):
            with open(path, "wb"):  # blocks until a reader opens the FIFO: one is waiting
                pass

    thread = threading.Thread(target=release, daemon=True)
    thread.start()
    try:
        yield path
    finally:
        done.set()
        with contextlib.suppress(OSError):  # a writer still waiting for a reader is let go
            os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK))
        thread.join(5)


@contextlib.contextmanager
def special_file(kind, folder):
    """A path that is not a regular file, of ``kind``."""
    if kind == "FIFO":
        with fifo_released_after(folder / "pipe.jpg") as path:
            yield path
    elif kind == "folder":
        (path := folder / "folder.jpg").mkdir()
        yield path
    elif kind == "socket":
        short = Path(tempfile.mkdtemp(dir="/tmp"))  # a socket's path must be under 108 bytes
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(str(short / "s.jpg"))
            yield short / "s.jpg"
        shutil.rmtree(short)
    else:
        yield Path("/dev/null")


SPECIAL_KINDS = {
    "FIFO": "a FIFO (named pipe)",
    "folder": "a folder",
    "socket": "a socket",
    "character device": "a character device",
}


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs, sockets and /dev/null are POSIX")
@pytest.mark.parametrize("kind", list(SPECIAL_KINDS))
def test_a_file_that_is_not_regular_is_refused_in_one_line_without_waiting(tmp_path, kind):
    """Issue 21: a FIFO listed as a photo made preparation wait forever for a writer; a device or socket is no
    photo either. Refused before it is opened, with what it is, by the one check caption.py and preparation
    share."""
    with special_file(kind, tmp_path) as path:
        start = time.monotonic()
        with pytest.raises(CamEyeError) as info:
            images.read_image(path, 16)
        assert str(info.value) == f"{path}: not a regular file ({SPECIAL_KINDS[kind]})"
        assert time.monotonic() - start < 1.0


# ------------------------------------------------------------------------------------------ colour profiles
def _s15(value):
    return struct.pack(">i", round(value * 65536))  # ICC s15Fixed16Number


def _xyz(x, y, z):
    return b"XYZ " + bytes(4) + _s15(x) + _s15(y) + _s15(z)


def icc_profile(space, name, tags):
    """The bytes of an ICC v2 display profile of colour space ``space`` (b"RGB " or b"GRAY") holding a
    description, a D50 white point and ``tags`` ([(signature, body)])."""
    name = name.encode() + b"\0"
    tags = [
        (b"desc", b"desc" + bytes(4) + struct.pack(">I", len(name)) + name + bytes(4 + 4 + 2 + 1 + 67)),
        (b"cprt", b"text" + bytes(4) + b"public domain\0"),
        (b"wtpt", _xyz(0.9642, 1.0, 0.82491)),
        *tags,
    ]
    table, data, start = b"", b"", 128 + 4 + 12 * len(tags)
    for signature, body in tags:
        body += bytes(-len(body) % 4)
        table += signature + struct.pack(">II", start + len(data), len(body))
        data += body
    header = (
        struct.pack(">I", start + len(data))
        + b"none"
        + bytes([2, 0x10, 0, 0])
        + b"mntr"
        + space
        + b"XYZ "
        + bytes(12)
        + b"acsp"
        + bytes(28)
        + _xyz(0.9642, 1.0, 0.82491)[8:]
        + bytes(4)
        + bytes(44)
    )  # fmt: skip  (signature "acsp", then platform, flags, device, intent: none; D50 illuminant)
    return header + struct.pack(">I", len(tags)) + table + data


def _gamma(value):
    return b"curv" + bytes(4) + struct.pack(">IH", 1, round(value * 256)) + bytes(2)


def adobe_rgb_profile():
    """An Adobe RGB (1998) profile, built from the published colorants.

    Adobe's own profile file is not redistributable and Pillow's ImageCms can build only sRGB, Lab and XYZ
    profiles, so it is written tag by tag: the colorants (Bradford-adapted to D50, as ICC requires) and one
    gamma 563/256 curve per channel, which is all a matrix/TRC profile holds. LittleCMS converts Adobe RGB
    (60, 200, 60) with it to sRGB (0, 201, 37), the value the issue quotes.
    """
    gamma = _gamma(563 / 256)
    colorants = [(b"rXYZ", (0.60974, 0.31111, 0.01947)), (b"gXYZ", (0.20528, 0.62567, 0.06087)),
                 (b"bXYZ", (0.14919, 0.06322, 0.74457))]  # fmt: skip
    tags = [(sig, _xyz(*value)) for sig, value in colorants] + [(b"rTRC", gamma), (b"gTRC", gamma), (b"bTRC", gamma)]
    return icc_profile(b"RGB ", "Adobe RGB (1998) colorants, for tests", tags)


def grey_profile(gamma=1.8):
    """A grey profile of gamma 1.8 (old Mac grey, darker than sRGB's curve for the same value)."""
    return icc_profile(b"GRAY", f"Grey gamma {gamma}, for tests", [(b"kTRC", _gamma(gamma))])


def srgb_profile():
    """The sRGB profile LittleCMS builds (what many cameras and editors embed, under other names)."""
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def tagged(path, colour, icc, fmt, size=(24, 24)):
    options = {"icc_profile": icc} if icc else {}
    if fmt == "JPEG":
        options.update(quality=100, subsampling=0)
    Image.new("RGB", size, colour).save(path, fmt, **options)
    return path


def centre(image):
    """The colour at the middle of a 3 x S x S image."""
    return tuple(int(v) for v in image[:, image.shape[1] // 2, image.shape[2] // 2])


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "TIFF"])
def test_an_adobe_rgb_photo_is_converted_to_srgb(tmp_path, fmt):
    """Issue 21: an Adobe RGB photo's values were taken as sRGB: (60, 200, 60) stayed a duller green than the
    photo's (0, 201, 37) in sRGB, the colour space of the model's training photos and of the web page."""
    if fmt == "WEBP":
        Image.new("RGB", (24, 24), (60, 200, 60)).save(path := tmp_path / "a.webp", lossless=True,
                                                         icc_profile=adobe_rgb_profile())  # fmt: skip
    else:
        path = tagged(tmp_path / f"a.{fmt.lower()}", (60, 200, 60), adobe_rgb_profile(), fmt)
    for got in (images.load_image(path, 16), images.read_image(path, 16)):
        np.testing.assert_allclose(centre(got), (0, 201, 37), atol=1, err_msg=fmt)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_photos_without_a_profile_or_with_an_srgb_one_keep_their_exact_pixels(tmp_path, fmt, monkeypatch):
    """sRGB in, sRGB out: a photo tagged sRGB (whatever its profile is called) is left exactly as decoded, and a
    JPEG still takes the fast simplejpeg path; an Adobe RGB JPEG does not (its pixels must be converted)."""
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 52, 3), dtype=np.uint8))
    plain, srgb, adobe = (tmp_path / f"{name}.{fmt.lower()}" for name in ("plain", "srgb", "adobe"))
    photo.save(plain, fmt)
    photo.save(srgb, fmt, icc_profile=srgb_profile())
    photo.save(adobe, fmt, icc_profile=adobe_rgb_profile())
    calls = []
    original = images.simplejpeg.decode_jpeg
    monkeypatch.setattr(images.simplejpeg, "decode_jpeg", lambda *a, **k: calls.append(1) or original(*a, **k))
    expected = images.decode_image(plain, 16)
    np.testing.assert_array_equal(images.decode_image(srgb, 16), expected)
    if fmt == "JPEG":
        assert len(calls) == 2
    assert not np.array_equal(images.decode_image(adobe, 16), expected)
    assert len(calls) == (2 if fmt == "JPEG" else 0)


def test_an_unreadable_profile_is_ignored_not_fatal(tmp_path):
    """A broken embedded profile leaves the pixels as they are rather than losing the photo."""
    path = tagged(tmp_path / "a.png", (60, 200, 60), b"not an ICC profile" * 10, "PNG")
    assert centre(images.load_image(path, 16)) == (60, 200, 60)


def test_a_grey_photo_with_a_grey_profile_is_converted_and_preparation_sees_what_inference_sees(tmp_path):
    """A grey profile's curve is applied too (100 in gamma 1.8 is 119 in sRGB), and the worker that prepares a
    dataset decodes an Adobe RGB photo to the same pixels as caption.py and the web page (load_image)."""
    Image.new("L", (20, 20), 100).save(grey := tmp_path / "grey.jpg", icc_profile=grey_profile())
    np.testing.assert_allclose(centre(images.load_image(grey, 16)), (119, 119, 119), atol=1)
    adobe = tagged(tmp_path / "a.png", (60, 200, 60), adobe_rgb_profile(), "PNG")
    [(prepared, reason)] = create_input_files._load_jobs(16, [(str(adobe), None)])
    assert reason == "" and centre(prepared) == centre(images.load_image(adobe, 16))
