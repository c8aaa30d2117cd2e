"""PyTorch datasets over the files made by ``create_input_files.py`` (and the feature cache of ``train.py``).

Each item is one *image* with everything needed about it:

* ``mode="train"``: ``(image, captions, lengths)``, i.e. the image and its C encoded captions (C x (L+2)) and
  their lengths; the collate function flattens them to one row per caption plus an ``image_index`` so the
  model runs the image-side work once per image, not once per caption;
* ``mode="eval"``: ``(image, references, index)``, where ``references`` is every caption of the image as a
  list of words (not the word map's ids, so <unk> never matches a real word in BLEU).

The HDF5 file is opened lazily, on first use in each process, because an open h5py handle cannot be shared
across the fork of DataLoader workers (``num_workers > 0``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from utils import CamEyeError


class _LazyH5:
    """Mixin: ``self.h5`` opens ``self.path`` read-only on first access in the current process."""

    path: Path
    _h5: h5py.File | None = None
    _h5_pid: int | None = None

    @property
    def h5(self) -> h5py.File:
        # DataLoader workers are forked, not unpickled, so __getstate__ alone would not stop a worker from reusing
        # a handle the parent opened (e.g. for dataset.references()): each process opens its own.
        if self._h5 is None or self._h5_pid != os.getpid():
            self._h5, self._h5_pid = h5py.File(self.path, "r"), os.getpid()
        return self._h5

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_h5"] = None  # each worker opens its own handle
        return state


def open_split(path: str | Path) -> h5py.File:
    """Open a split file made by create_input_files.py, or fail with one line saying what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise CamEyeError(f"{path} not found: run create_input_files.py first")
    try:
        h5 = h5py.File(path, "r")
    except OSError:
        raise CamEyeError(f"{path} is not an HDF5 file (interrupted or foreign?)") from None
    for key in ("images", "captions", "caplens", "references", "reference_offsets"):
        if key not in h5:
            h5.close()
            raise CamEyeError(f"{path} has no '{key}': not made by create_input_files.py")
    return h5


def check_split_has_images(
    path: str | Path, advice: str = "check create_input_files.py's warnings and the image folder"
) -> int:
    """The number of images in a split file; a one-line :class:`CamEyeError` if it has none (or is unusable),
    ending with ``advice``.

    Run before any work, so a run that needs the split fails at once rather than after an epoch.
    """
    with open_split(path) as h5:
        n = int(h5["images"].shape[0])
    if n == 0:
        raise CamEyeError(
            f"{Path(path).name} has no images: {path} (create_input_files.py found none for this split); {advice}"
        )
    return n


class CaptionDataset(_LazyH5, Dataset):
    """Images (uint8 in the file) with their captions, normalised by ``transform`` for the encoder."""

    def __init__(self, path: str | Path, mode: str = "train", transform: Callable | None = None) -> None:
        if mode not in ("train", "eval"):
            raise ValueError("mode must be 'train' or 'eval'")
        self.path, self.mode, self.transform = Path(path), mode, transform
        with open_split(self.path) as h5:
            self.num_images = h5["images"].shape[0]
            self.captions_per_image = int(h5.attrs["captions_per_image"])
            self.image_ids = [s.decode() if isinstance(s, bytes) else s for s in h5["image_ids"][:]]
            # Captions are small (COCO: ~125 MB); keeping them in memory avoids an HDF5 read per item.
            self.captions = h5["captions"][:].astype(np.int64)
            self.caplens = h5["caplens"][:].astype(np.int64)

    def __len__(self) -> int:
        return self.num_images

    def load_image(self, i: int) -> torch.Tensor:
        image = torch.from_numpy(self.h5["images"][i])
        return self.transform(image) if self.transform is not None else image

    def __getitem__(self, i: int) -> tuple:
        image = self.load_image(i)
        if self.mode == "eval":
            return image, self.references(i), i
        c = self.captions_per_image
        return (
            image,
            torch.from_numpy(self.captions[i * c : (i + 1) * c]),
            torch.from_numpy(self.caplens[i * c : (i + 1) * c]),
        )

    def references(self, i: int, raw: bool = False) -> list:
        """All captions of image ``i``: word lists, or the original sentences with ``raw=True``."""
        a, b = self.h5["reference_offsets"][i : i + 2]
        rows = self.h5["references_raw" if raw else "references"][a:b]
        texts = [r.decode() if isinstance(r, bytes) else r for r in rows]
        return texts if raw else [t.split() for t in texts]

    def objects(self, i: int) -> dict | None:
        """Object boxes and caption-word links of image ``i`` (synthetic data only), else ``None``."""
        import json

        return json.loads(self.h5["objects"][i]) if "objects" in self.h5 else None


class FeatureDataset(CaptionDataset):
    """Like :class:`CaptionDataset`, but items carry cached encoder features (P x C) instead of images.

    The cache (written by ``train.py``) holds float16 features for the split's images in the same order. It
    is read into memory when it fits under ``max_memory_bytes`` (Flickr8k's train split is ~1 GB), else read
    lazily per item.
    """

    def __init__(
        self, split_path: str | Path, features_path: str | Path, mode: str = "train", max_memory_bytes: int = 4 << 30
    ) -> None:
        super().__init__(split_path, mode)
        self.features_path = Path(features_path)
        with h5py.File(self.features_path, "r") as f:
            feats = f["features"]
            if feats.shape[0] != self.num_images:
                raise CamEyeError(f"{self.features_path} has {feats.shape[0]} images, expected {self.num_images}")
            self.grid = tuple(int(x) for x in f.attrs["grid"])
            size = feats.size * feats.dtype.itemsize
            self.memory = torch.from_numpy(feats[:]) if size <= max_memory_bytes else None
        self._features: h5py.File | None = None
        self._features_pid: int | None = None

    def load_image(self, i: int) -> torch.Tensor:
        if self.memory is not None:
            return self.memory[i].float()
        if self._features is None or self._features_pid != os.getpid():  # same fix as _LazyH5.h5
            self._features, self._features_pid = h5py.File(self.features_path, "r"), os.getpid()
        return torch.from_numpy(self._features["features"][i]).float()

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_features"] = None
        return state


def collate_train(batch: list[tuple]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack images; flatten captions to one row each, trimmed to the longest, with their image index."""
    images = torch.stack([b[0] for b in batch])
    lengths = torch.cat([b[2] for b in batch])
    captions = torch.cat([b[1] for b in batch])[:, : int(lengths.max())]
    image_index = torch.arange(len(batch)).repeat_interleave(torch.tensor([len(b[2]) for b in batch]))
    return images, captions, lengths, image_index


def collate_eval(batch: list[tuple]) -> tuple[torch.Tensor, list[list[list[str]]], list[int]]:
    """Stack images; keep each image's references and index as lists."""
    return torch.stack([b[0] for b in batch]), [b[1] for b in batch], [b[2] for b in batch]
