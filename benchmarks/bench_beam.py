"""Beam search speed: a batch of images at once versus the same search one image at a time.

    python benchmarks/bench_beam.py [--checkpoint PATH] [--images 64] [--beam-size 3]

Decodes the same encoder features both ways and prints images/s and the speed-up. The encoder's cost is
the same either way and is left out, so the numbers isolate the decoder's search. With a checkpoint (the
shipped model by default, if present) the features come from real photos bundled with scikit-image and the
captions have natural lengths; without one, a randomly initialised decoder decodes to --max-len.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from caption import DEFAULT_CHECKPOINT  # noqa: E402
from models import DecoderWithAttention, ModelConfig, Preprocess, load_captioner  # noqa: E402


def photo_features(encoder, cfg: ModelConfig, n: int) -> torch.Tensor:
    """Encoder features of scikit-image's bundled photos, repeated to ``n`` images."""
    from skimage import data
    from skimage.transform import resize

    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    arrays = [(resize(p, (cfg.image_size, cfg.image_size)) * 255).astype(np.uint8).transpose(2, 0, 1) for p in photos]
    with torch.no_grad():
        feats = encoder(Preprocess(cfg.backbone, cfg.input_size)(torch.from_numpy(np.stack(arrays))))
    return feats.repeat((n + len(photos) - 1) // len(photos), 1, 1)[:n]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT, help="model to decode with")
    p.add_argument("--images", type=int, default=64, help="images decoded (batch size of the batched run)")
    p.add_argument("--beam-size", type=int, default=3, help="beams per image")
    p.add_argument("--max-len", type=int, default=50, help="longest caption")
    args = p.parse_args()
    torch.manual_seed(0)
    if args.checkpoint.is_file():
        encoder, decoder, _, cfg = load_captioner(args.checkpoint)
        feats = photo_features(encoder, cfg, args.images)
        source = f"{args.checkpoint.name} on scikit-image photos"
    else:
        decoder = DecoderWithAttention(ModelConfig(vocab_size=2600), 1280).eval()
        feats = torch.randn(args.images, 100, 1280).abs()
        source = "random decoder on random features (no checkpoint found)"
    decoder.beam_search(feats[:2], args.beam_size, args.max_len)  # warm-up
    t = time.perf_counter()
    batched = decoder.beam_search(feats, args.beam_size, args.max_len)
    t_batched = time.perf_counter() - t
    t = time.perf_counter()
    single = [decoder.beam_search(feats[i : i + 1], args.beam_size, args.max_len)[0] for i in range(len(feats))]
    t_single = time.perf_counter() - t
    same = sum(a.tokens == b.tokens for a, b in zip(batched, single))
    words = np.mean([len(d.tokens) for d in batched])
    print(f"{source}; beam {args.beam_size}, {args.images} images, mean caption length {words:.1f} words")
    print(f"batched ({args.images} at once): {args.images / t_batched:.1f} images/s")
    print(f"one image at a time:        {args.images / t_single:.1f} images/s")
    print(f"speed-up: {t_single / t_batched:.1f}x; identical captions: {same}/{args.images}")


if __name__ == "__main__":
    main()
