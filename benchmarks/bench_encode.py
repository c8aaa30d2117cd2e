"""Encoder throughput (images/s) in float32 and under bfloat16 autocast, per backbone and input size.

    python benchmarks/bench_encode.py [--backbones efficientnet_lite0 resnet101] [--sizes 320 256] [--batch 32]

Each (backbone, size, precision) encodes ``--batch`` random images ``--repeats`` times, interleaved with the
others so that a busy machine slows all of them alike; min and median images/s are printed. Weights are random
(``weights="none"``): speed does not depend on their values, and nothing is downloaded. bfloat16 is fast only
on hardware with bfloat16 matrix units (AMX or AVX-512 BF16 on CPUs, Ampere or later GPUs):
``models.bfloat16_is_fast`` says whether this machine has them.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backbones import bfloat16_is_fast  # noqa: E402
from models import Encoder  # noqa: E402
from utils import keep_freed_memory  # noqa: E402


def time_encoder(encoder: Encoder, images: torch.Tensor) -> float:
    """Seconds to encode ``images`` once (after the caller's warm-up)."""
    start = time.perf_counter()
    with torch.inference_mode():
        encoder(images)
    if images.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbones", nargs="+", default=["efficientnet_lite0", "efficientnet_lite2", "resnet101"])
    p.add_argument("--sizes", type=int, nargs="+", default=[320, 256], help="input sides (px) to try")
    p.add_argument("--batch", type=int, default=32, help="images per timed pass")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per setting, interleaved")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = p.parse_args()
    keep_freed_memory()  # as train.py, eval.py and caption.py do: without it large activations are fresh mmaps
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"device {device}, {torch.get_num_threads()} threads, bfloat16 matrix units: {bfloat16_is_fast(device)}")
    settings = [(b, s, prec) for b in args.backbones for s in args.sizes for prec in ("float32", "bfloat16")]
    encoders = {}
    for b in args.backbones:
        encoders[b] = Encoder(b, weights="none").fold_batch_norm().to(device)  # as eval.py and the cache
    images = {s: torch.randn(args.batch, 3, s, s, device=device) for s in args.sizes}
    times: dict[tuple, list[float]] = {k: [] for k in settings}
    for b, s, prec in settings:  # warm-up: first-call allocations and oneDNN kernel selection
        encoders[b].precision = prec
        time_encoder(encoders[b], images[s][:4])
    for _ in range(args.repeats):
        for b, s, prec in settings:
            encoders[b].precision = prec
            times[(b, s, prec)].append(time_encoder(encoders[b], images[s]))
    print(f"{'backbone':20} {'px':>4} {'precision':9} {'img/s min':>9} {'median':>7} {'bf16 speed-up':>13}")
    for b, s, prec in settings:
        speeds = [args.batch / t for t in times[(b, s, prec)]]
        ratio = statistics.median(times[(b, s, "float32")]) / statistics.median(times[(b, s, prec)])
        print(f"{b:20} {s:4d} {prec:9} {min(speeds):9.1f} {statistics.median(speeds):7.1f} {ratio:12.2f}x")


if __name__ == "__main__":
    main()
