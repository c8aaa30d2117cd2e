"""Tests for images.py: what preparation, caption.py and the web page share when they read a photo (colour
profiles, files that are not regular files). The decoding of odd and broken images is tested through
create_input_files in test_create_input_files.py."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

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
