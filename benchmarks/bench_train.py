"""Decoder training throughput on cached features, and how much of the machine's matmul speed it uses.

    python benchmarks/bench_train.py [--grid 10] [--vocab 2600] [--batch-images 32] [--steps 10]

Prints captions/s of full training steps (forward, backward, clipping, Adam) of the default decoder on
random "cached" features shaped like EfficientNet-Lite0's (P x 1280, five captions per image), the FLOPs of
one step (counted by torch.utils.flop_counter), the achieved FLOP/s, and the machine's dense float32 matmul
FLOP/s measured here, so the ratio says how close the training loop gets to the hardware.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import DecoderWithAttention, ModelConfig  # noqa: E402
from train import caption_loss  # noqa: E402
from utils import keep_freed_memory  # noqa: E402


def matmul_flops(n: int = 2048, repeats: int = 10) -> float:
    """Measured dense float32 matmul FLOP/s (n x n x n, best of ``repeats``)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def make_batch(images: int, per_image: int, grid: int, vocab: int, seed: int = 0):
    """Random features and captions with Flickr8k-like lengths (mean ~12 words)."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(images, grid * grid, 1280, generator=g).abs()
    lengths = torch.randint(8, 20, (images * per_image,), generator=g) + 2
    captions = torch.randint(4, vocab, (images * per_image, int(lengths.max())), generator=g)
    captions[:, 0] = 1
    image_index = torch.arange(images).repeat_interleave(per_image)
    return feats, captions, lengths, image_index


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--grid", type=int, default=10, help="feature grid side (10 = Lite0 at 320 px)")
    p.add_argument("--vocab", type=int, default=2600, help="vocabulary size (Flickr8k at min freq 5: ~2.6k)")
    p.add_argument("--batch-images", type=int, default=32, help="images per step (5 captions each)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (after 2 warm-up steps)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = p.parse_args()
    keep_freed_memory()  # as train.py does
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    decoder = DecoderWithAttention(ModelConfig(vocab_size=args.vocab), 1280)
    opt = torch.optim.Adam(decoder.parameters(), lr=4e-4)
    batch = make_batch(args.batch_images, 5, args.grid, args.vocab)

    def step() -> None:
        logits, targets, alphas = decoder(*batch)
        loss, _ = caption_loss(logits, targets, alphas, 0.01, 0.1)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(decoder.parameters(), 5.0)
        opt.step()

    decoder.train()
    for _ in range(2):
        step()
    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    t = time.perf_counter()
    for _ in range(args.steps):
        step()
    seconds = (time.perf_counter() - t) / args.steps
    captions = batch[1].shape[0]
    peak = matmul_flops()
    print(f"threads: {torch.get_num_threads()}, grid {args.grid}x{args.grid}, vocab {args.vocab}, "
          f"{args.batch_images} images x 5 captions per step")  # fmt: skip
    print(f"decoder training: {captions / seconds:.1f} captions/s ({seconds * 1000:.0f} ms/step)")
    print(f"step FLOPs (fwd+bwd, counted): {flops / 1e9:.2f} GFLOP -> {flops / seconds / 1e9:.1f} GFLOP/s achieved")
    print(f"dense float32 matmul on this machine: {peak / 1e9:.1f} GFLOP/s")
    print(f"share of matmul FLOP/s achieved: {flops / seconds / peak:.1%}")


if __name__ == "__main__":
    main()
