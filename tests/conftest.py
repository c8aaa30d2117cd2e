"""Shared fixtures: a small synthetic dataset run through create_input_files.py once per test session, small
real disks (tmpfs) for the full-disk tests, and fake ``java`` executables for the metric-failure tests."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from create_input_files import Options, create_input_files
from synthetic import generate_dataset

SYNTHETIC_IMAGES = 60
SYNTHETIC_SIZE = 64


@pytest.fixture(scope="session")
def synthetic_prepared(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """60 synthetic images prepared at 64 px with --min-word-freq 1 (read only: copy before changing it).

    Attributes: ``json`` (the Karpathy-format source), ``out`` (folder with {split}.hdf5 and word_map.json),
    ``options`` (the :class:`Options` used) and ``counts`` (images written per split).
    """
    root = tmp_path_factory.mktemp("synthetic_prepared")
    json_path = generate_dataset(root / "source", num_images=SYNTHETIC_IMAGES, image_size=SYNTHETIC_SIZE, seed=0)
    options = Options(out=root / "prepared", min_word_freq=1, image_size=SYNTHETIC_SIZE, workers=1, seed=0)
    counts = create_input_files([json_path], None, options)
    return SimpleNamespace(json=Path(json_path), out=options.out, options=options, counts=counts)


@contextlib.contextmanager
def mounted_tmpfs(folder: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` (e.g. "2m") mounted at ``folder``; skips the test where mounting is not allowed
    (it needs Linux and root or CAP_SYS_ADMIN); always unmounted afterwards."""
    folder.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None or not sys.platform.startswith("linux"):
        pytest.skip("needs Linux mount(8) to make a small tmpfs")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MB disk that fills up at once."""
    with mounted_tmpfs(tmp_path / "disk", "2m") as disk:
        yield disk


def fake_java(folder: Path, script: str) -> Path:
    """A ``java`` shell script in ``folder`` (put it first on PATH); ``REAL_JAVA`` in it is the real one."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "java"
    path.write_text("#!/bin/sh\n" + script.replace("REAL_JAVA", shutil.which("java") or "false"), encoding="utf-8")
    path.chmod(0o755)
    return folder
