"""Shared fixtures: a small synthetic dataset run through create_input_files.py once per test session."""

from __future__ import annotations

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
