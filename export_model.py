"""Turn a training checkpoint into a small inference checkpoint (what ships in checkpoints/).

    python export_model.py runs/flickr8k/best.pt checkpoints/flickr8k/cameye-flickr8k.pt --half

Keeps the model config, word map, decoder weights and only the encoder weights that training changed (none
for a frozen encoder: those are rebuilt from the backbone's pretrained weights named in the config). Drops
optimiser, scheduler and RNG states. ``--half`` stores weights as float16 (they are cast back to float32
on load), halving the file; check the metrics still hold with eval.py before shipping it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from models import ModelConfig, build_captioner, load_checkpoint_file
from utils import CamEyeError, cli_errors, save_torch


def average_weights(ckpt: dict, others: Sequence[Path]) -> None:
    """Replace ``ckpt``'s weights by their mean with those of ``others`` (same model, word map and config).

    Averaging the last few epochs' weights is a cheap ensemble that often scores a little better than any
    single epoch; measure it on the validation split before shipping it.
    """
    for path in others:
        other = load_checkpoint_file(path)
        if other["config"] != ckpt["config"] or other["word_map"] != ckpt["word_map"]:
            raise CamEyeError(f"{path} is not the same model as the checkpoint it should be averaged with")
        for part in ("decoder", "encoder"):
            for k, v in ckpt[part].items():
                if v.is_floating_point():
                    v.add_(other[part][k])
    for part in ("decoder", "encoder"):
        for v in ckpt[part].values():
            if v.is_floating_point():
                v.div_(len(others) + 1)


def export_checkpoint(src: Path, dst: Path, half: bool = False, average: Sequence[Path] = ()) -> dict:
    """Write the inference checkpoint of ``src`` (optionally averaged with ``average``) to ``dst`` atomically."""
    ckpt = load_checkpoint_file(src)
    if ckpt.get("encoder_partial") or "optimizers" not in ckpt:
        raise CamEyeError(f"{src} is already an inference checkpoint: export a training checkpoint (best.pt)")
    if average:
        average_weights(ckpt, average)
    cfg = ModelConfig.from_dict(ckpt["config"])
    encoder, _ = build_captioner(ModelConfig.from_dict({**ckpt["config"], "encoder_weights": "none"}))
    encoder.load_state_dict(ckpt["encoder"])
    dtype = torch.float16 if half else torch.float32

    def cast(state: dict) -> dict:
        return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}

    partial = cfg.encoder_weights in ("package", "torchvision")  # weights the loader can rebuild by name
    out = {
        "format": ckpt["format"],
        "version": ckpt["version"],
        "config": ckpt["config"],
        "word_map": ckpt["word_map"],
        "decoder": cast(ckpt["decoder"]),
        "encoder": cast(encoder.trainable_state_dict() if partial else ckpt["encoder"]),
        "encoder_partial": partial,
        "epoch": ckpt["epoch"],
        "history": ckpt["history"],
        "train_config": ckpt.get("train_config", {}),
        "averaged_with": [str(p) for p in average],
    }
    save_torch(out, dst)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", type=Path, help="training checkpoint (best.pt / last.pt)")
    p.add_argument("dst", type=Path, help="inference checkpoint to write")
    p.add_argument("--half", action="store_true", help="store weights as float16")
    p.add_argument("--average", type=Path, nargs="*", default=[], help="other checkpoints of the same run to average")
    args = p.parse_args(argv)
    with cli_errors():
        export_checkpoint(args.src, args.dst, args.half, args.average)
        print(f"wrote {args.dst} ({args.dst.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    sys.exit(main())
