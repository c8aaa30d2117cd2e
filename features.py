"""The feature cache: with a frozen encoder every image is encoded once, and the decoder trains from its
annotation vectors stored as float16 HDF5 in ``<data>/features/``, which is what makes training practical on
a CPU. A cache is used only if it was computed from the same split file by an encoder with the very same
weights (:func:`weights_fingerprint`) at the same precision; otherwise it is computed again.
"""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from datasets import CaptionDataset, collate_eval
from models import Encoder, ModelConfig, Preprocess
from utils import CamEyeError, atomic_path, new_hdf5


def features_path(cfg: ModelConfig, data: Path, split: str, precision: str) -> Path:
    """Where the cached features of ``split`` for this encoder configuration and precision ("float32" or
    "bfloat16", as resolved by models.resolve_precision) live."""
    weights = (
        cfg.encoder_weights
        if cfg.encoder_weights in ("package", "torchvision", "none")
        else "file-" + Path(cfg.encoder_weights).stem
    )
    low = "-bf16" if precision == "bfloat16" else ""
    return data / "features" / f"{split}-{cfg.backbone}-{weights}-in{cfg.input_size}-grid{cfg.grid_size}{low}.hdf5"


def source_fingerprint(split_file: Path) -> str:
    """Identifies the images a cache was computed from: the split file by path, size and mtime.

    Re-running create_input_files.py (e.g. at another --image-size) changes it, so a stale cache is rebuilt
    instead of silently reused.
    """
    stat = split_file.stat()
    return f"{split_file.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"


def weights_fingerprint(module: torch.nn.Module) -> str:
    """SHA-256 of every tensor of ``module``'s state dict (names, dtypes, shapes and bytes): which encoder a
    cache was computed by. Names alone ("package", a file name) do not say it: a run that starts from
    fine-tuned weights (--init-from, or --resume after fine-tuning) has other weights under the same name."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{t.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def cache_is_current(split_file: Path, cache: Path, precision: str, encoder: str) -> bool:
    """True when ``cache`` exists and was computed from ``split_file`` as it is now, by the encoder whose
    :func:`weights_fingerprint` is ``encoder``, in ``precision``."""
    if not cache.is_file():
        return False
    try:
        with h5py.File(cache, "r") as f:
            return (
                f.attrs.get("source") == source_fingerprint(split_file)
                and f.attrs.get("encoder") == encoder
                and f.attrs.get("precision", "float32") == precision
            )
    except OSError:
        return False


@torch.no_grad()
def cache_features(
    encoder: Encoder,
    cfg: ModelConfig,
    split_file: Path,
    out: Path,
    device: torch.device,
    workers: int = 2,
    fingerprint: str | None = None,
) -> None:
    """Encode every image of a split once and store float16 features N x P x C (atomically), recording the
    encoder's ``fingerprint`` (:func:`weights_fingerprint`; computed here when not given).

    The encoder is frozen here, so a copy with its batch norms folded into the convolutions does the work
    (:meth:`Encoder.fold_batch_norm`, the same function up to rounding); ``encoder`` itself is unchanged.
    """
    # Small batches stay in the CPU's caches (docs/benchmarks.md).
    batch_size = 8 if device.type == "cpu" else 64
    dataset = CaptionDataset(split_file, "eval", Preprocess(cfg.backbone, cfg.input_size))
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate_eval)
    fingerprint = fingerprint or weights_fingerprint(encoder)
    encoder = copy.deepcopy(encoder).fold_batch_norm()
    with atomic_path(out) as tmp, new_hdf5(tmp) as f:
        feats = None
        for images, _, index in tqdm(loader, desc=f"encoding {split_file.stem}", unit="batch"):
            fmap = encoder.feature_map(images.to(device))
            x = fmap.flatten(2).transpose(1, 2).half().cpu()
            if not torch.isfinite(x).all():
                peak = float(fmap.abs().max())
                raise CamEyeError(
                    f"the encoder's features are not finite in float16 (largest |value| {peak:.3g}; float16 holds "
                    "65504): its weights are probably wrong (--encoder-weights none?); nothing was cached"
                )
            x = x.numpy()
            if feats is None:
                shape = (len(dataset), x.shape[1], x.shape[2])
                feats = f.create_dataset("features", shape, np.float16, chunks=(1, *shape[1:]))
                f.attrs["grid"] = list(fmap.shape[2:])
                f.attrs["source"] = source_fingerprint(split_file)
                f.attrs["encoder"] = fingerprint
                f.attrs["precision"] = encoder.precision
            feats[index[0] : index[0] + len(index)] = x
