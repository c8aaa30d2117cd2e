"""Tests for datasets.py over the synthetic set prepared once per session (see conftest.py)."""

from __future__ import annotations

import os

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from datasets import CaptionDataset, FeatureDataset, collate_eval, collate_train, open_split
from models import Preprocess
from utils import CamEyeError


@pytest.fixture(scope="module")
def split_files(synthetic_prepared):
    return {s: synthetic_prepared.out / f"{s}.hdf5" for s in ("train", "val", "test")}


@pytest.fixture(scope="module")
def train_file(split_files):
    with h5py.File(split_files["train"], "r") as h5:
        refs = [r.decode() for r in h5["references"][:]]
        return {
            "path": split_files["train"],
            "images": h5["images"][:],
            "captions": h5["captions"][:],
            "caplens": h5["caplens"][:],
            "offsets": h5["reference_offsets"][:],
            "references": refs,
            "references_raw": [r.decode() for r in h5["references_raw"][:]],
            "c": int(h5.attrs["captions_per_image"]),
        }


def references_of(data, i):
    a, b = data["offsets"][i : i + 2]
    return data["references"][a:b]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y)
        else:
            assert x == y


# ------------------------------------------------------------------------------------------- items
def test_train_mode_items_are_image_captions_lengths(train_file, synthetic_prepared):
    ds = CaptionDataset(train_file["path"], "train")
    c = train_file["c"]
    assert len(ds) == synthetic_prepared.counts["train"] == len(train_file["images"])
    assert ds.captions_per_image == c == 5
    for i in (0, 7, len(ds) - 1):
        image, captions, lengths = ds[i]
        assert image.dtype == torch.uint8 and image.shape == (3, 64, 64)
        assert np.array_equal(image.numpy(), train_file["images"][i])
        assert captions.dtype == torch.int64 and captions.shape == (c, 52)
        assert np.array_equal(captions.numpy(), train_file["captions"][i * c : (i + 1) * c])
        assert np.array_equal(lengths.numpy(), train_file["caplens"][i * c : (i + 1) * c])
        assert (captions[:, 0] == 1).all() and (captions[torch.arange(c), lengths - 1] == 2).all()


def test_eval_mode_items_are_image_references_index(train_file):
    ds = CaptionDataset(train_file["path"], "eval")
    for i in (0, 5, len(ds) - 1):
        image, references, index = ds[i]
        assert index == i
        assert np.array_equal(image.numpy(), train_file["images"][i])
        assert references == [r.split() for r in references_of(train_file, i)]
        assert all(isinstance(w, str) for ref in references for w in ref) and len(references) == 5
        a, b = train_file["offsets"][i : i + 2]
        assert ds.references(i, raw=True) == train_file["references_raw"][a:b]
    assert set(ds.objects(0)) >= {"objects", "caption_objects"}  # synthetic boxes are available


def test_bad_mode_is_rejected(train_file):
    with pytest.raises(ValueError, match="mode"):
        CaptionDataset(train_file["path"], "test")


@pytest.mark.parametrize(
    "backbone, input_size", [("resnet50", 0), ("resnet50", 32), ("efficientnet_lite0", 0)], ids=str
)
def test_transform_is_applied(train_file, backbone, input_size):
    transform = Preprocess(backbone, input_size)
    for mode in ("train", "eval"):
        image = CaptionDataset(train_file["path"], mode, transform)[3][0]
        raw = torch.from_numpy(train_file["images"][3])
        side = input_size or 64
        assert image.dtype == torch.float32 and image.shape == (3, side, side)
        assert torch.allclose(image, transform(raw))
        if backbone.startswith("efficientnet"):
            assert torch.allclose(image, (raw.float() - 127) / 128)
        elif not input_size:  # ImageNet mean/std normalisation
            mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1) * 255
            std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1) * 255
            assert torch.allclose(image, (raw.float() - mean) / std, atol=1e-5)


# ------------------------------------------------------------------------------------------- collate
def test_collate_train_maps_every_caption_to_its_image():
    def item(n, value, length):
        captions = torch.zeros(n, 10, dtype=torch.int64)
        captions[:, 0], captions[:, 1 : length - 1], captions[:, length - 1] = 1, value, 2
        return torch.full((3, 4, 4), value, dtype=torch.uint8), captions, torch.full((n,), length)

    batch = [item(2, 10, 3), item(3, 11, 5), item(1, 12, 4)]  # differing caption counts per image
    images, captions, lengths, image_index = collate_train(batch)
    assert images.shape == (3, 3, 4, 4)
    assert image_index.tolist() == [0, 0, 1, 1, 1, 2]
    assert captions.shape == (6, 5)  # trimmed to the longest caption
    assert lengths.tolist() == [3, 3, 5, 5, 5, 4]
    for row, i in enumerate(image_index.tolist()):
        assert captions[row, 1] == images[i, 0, 0, 0] == 10 + i


def test_collate_train_on_real_items(train_file):
    ds = CaptionDataset(train_file["path"], "train")
    batch = [ds[i] for i in (4, 1, 9)]
    images, captions, lengths, image_index = collate_train(batch)
    c = train_file["c"]
    assert image_index.tolist() == [0] * c + [1] * c + [2] * c
    assert captions.shape == (3 * c, int(lengths.max()))
    for row, i in enumerate(image_index.tolist()):
        assert torch.equal(captions[row], batch[i][1][row % c, : captions.shape[1]])
        assert lengths[row] == batch[i][2][row % c]


def test_collate_eval(train_file):
    ds = CaptionDataset(train_file["path"], "eval")
    images, references, indices = collate_eval([ds[2], ds[0]])
    assert images.shape == (2, 3, 64, 64) and indices == [2, 0]
    assert references == [ds.references(2), ds.references(0)]


# ---------------------------------------------------------------------------------------- DataLoader
@pytest.mark.parametrize("mode, collate", [("train", collate_train), ("eval", collate_eval)])
def test_dataloader_with_two_workers_gives_the_same_items(train_file, mode, collate):
    ds = CaptionDataset(train_file["path"], mode, Preprocess("resnet50"))
    serial = list(DataLoader(ds, batch_size=7, num_workers=0, collate_fn=collate))
    parallel = list(DataLoader(ds, batch_size=7, num_workers=2, collate_fn=collate))
    assert len(serial) == len(parallel) == -(-len(ds) // 7)
    for a, b in zip(serial, parallel):
        assert_batches_equal(a, b)


class _TaggedFile(h5py.File):
    """h5py.File that remembers which process opened it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.opened_in = os.getpid()


class _WhoOpened(CaptionDataset):
    def __getitem__(self, i):
        return os.getpid(), self.h5.opened_in


def test_each_worker_opens_its_own_hdf5_handle(train_file, monkeypatch):
    monkeypatch.setattr(h5py, "File", _TaggedFile)
    ds = _WhoOpened(train_file["path"], "eval")
    assert ds.references(0)  # the main process opens a handle before the workers start
    assert ds.h5.opened_in == os.getpid()
    seen = list(DataLoader(ds, batch_size=1, num_workers=2, collate_fn=lambda b: b[0]))
    worker_pids = {pid for pid, _ in seen}
    assert len(worker_pids) == 2 and os.getpid() not in worker_pids
    assert all(pid == opened_in for pid, opened_in in seen)  # never the handle inherited from the parent
    assert ds.references(1) and ds.h5.opened_in == os.getpid()  # and the parent's handle still works


# ---------------------------------------------------------------------------------------- features
def write_features(path, n, p=4, c=8, grid=(2, 2), seed=0):
    feats = np.random.default_rng(seed).standard_normal((n, p, c)).astype(np.float16)
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=feats)
        f.attrs["grid"] = grid
    return feats


@pytest.mark.parametrize("max_memory_bytes", [4 << 30, 0], ids=["in memory", "lazy"])
def test_feature_dataset_items(train_file, tmp_path, max_memory_bytes):
    n, c = len(train_file["images"]), train_file["c"]
    feats = write_features(tmp_path / "feats.h5", n)
    ds = FeatureDataset(train_file["path"], tmp_path / "feats.h5", "train", max_memory_bytes=max_memory_bytes)
    assert (ds.memory is None) == (max_memory_bytes == 0)
    assert ds.grid == (2, 2) and len(ds) == n
    for i in (0, n - 1):
        features, captions, lengths = ds[i]
        assert features.dtype == torch.float32 and features.shape == (4, 8)
        assert np.array_equal(features.numpy(), feats[i].astype(np.float32))
        assert np.array_equal(captions.numpy(), train_file["captions"][i * c : (i + 1) * c])
        assert np.array_equal(lengths.numpy(), train_file["caplens"][i * c : (i + 1) * c])
    features, references, index = FeatureDataset(
        train_file["path"], tmp_path / "feats.h5", "eval", max_memory_bytes=max_memory_bytes
    )[3]
    assert index == 3 and np.array_equal(features.numpy(), feats[3].astype(np.float32))
    assert references == [r.split() for r in references_of(train_file, 3)]
    serial = list(DataLoader(ds, batch_size=9, num_workers=0, collate_fn=collate_train))
    parallel = list(DataLoader(ds, batch_size=9, num_workers=2, collate_fn=collate_train))
    for a, b in zip(serial, parallel, strict=True):
        assert_batches_equal(a, b)


class _WhoOpenedFeatures(FeatureDataset):
    def __getitem__(self, i):
        self.load_image(i)
        return os.getpid(), self._features.opened_in


def test_each_worker_opens_its_own_lazy_feature_handle(train_file, tmp_path, monkeypatch):
    write_features(tmp_path / "feats.h5", len(train_file["images"]))
    monkeypatch.setattr(h5py, "File", _TaggedFile)
    ds = _WhoOpenedFeatures(train_file["path"], tmp_path / "feats.h5", max_memory_bytes=0)
    assert ds[0] == (os.getpid(), os.getpid())  # the parent opens the lazy features file first
    seen = list(DataLoader(ds, batch_size=1, num_workers=2, collate_fn=lambda b: b[0]))
    assert len({pid for pid, _ in seen}) == 2 and all(pid == opened_in for pid, opened_in in seen)


def test_feature_file_with_wrong_count_is_an_error(train_file, tmp_path):
    n = len(train_file["images"])
    write_features(tmp_path / "feats.h5", n + 1)
    with pytest.raises(CamEyeError, match=f"has {n + 1} images, expected {n}"):
        FeatureDataset(train_file["path"], tmp_path / "feats.h5")


# ------------------------------------------------------------------------------------------ bad files
def test_open_split_reports_bad_files(tmp_path, train_file):
    with pytest.raises(CamEyeError, match="not found: run create_input_files.py first"):
        open_split(tmp_path / "missing.hdf5")
    (tmp_path / "junk.hdf5").write_text("half a file")
    with pytest.raises(CamEyeError, match="is not an HDF5 file"):
        CaptionDataset(tmp_path / "junk.hdf5")
    with h5py.File(tmp_path / "partial.hdf5", "w") as f:
        f.create_dataset("images", data=train_file["images"][:2])
    with pytest.raises(CamEyeError, match="has no 'captions'"):
        CaptionDataset(tmp_path / "partial.hdf5")
    with open_split(train_file["path"]) as h5:
        assert h5["images"].shape[0] == len(train_file["images"])
