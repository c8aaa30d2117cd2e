"""Decoder training throughput on cached features, and how much of the machine's matmul speed it uses.

    python benchmarks/bench_train.py [--grid 10] [--vocab 2600] [--batch-images 32] [--steps 5] [--repeats 3]
                                     [--modes "plain float32,fused bfloat16 compiled"] [--profile "fused bfloat16"]
                                     [--device cuda]

Prints captions/s of full training steps (forward, backward, clipping, Adam) of the default decoder on
random "cached" features shaped like EfficientNet-Lite0's (P x 1280, five captions per image), for the plain
step-by-step loop (models.DecoderWithAttention.forward) and the fused path (fused.py), each in float32
and under bfloat16 autocast (what ``train.py --amp`` does on a CPU), and the fused path with its attention
energies in torch.compile'd kernels (``train.py --compile``; compile time is printed apart, not timed).
Modes are timed back to back in each repeat and the median and best of the repeats are printed. Also the
FLOPs of one step (counted by torch.utils.flop_counter) and the machine's dense matmul FLOP/s in float32 and
bfloat16 measured here, so the ratios say how close the training loop gets to the hardware. ``--device cuda``
runs the same on a GPU (bfloat16 autocast there too; compiled modes need Triton).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fused import FastDropout, FusedTeacherForcing, adam  # noqa: E402
from models import DecoderWithAttention, ModelConfig, caption_loss  # noqa: E402
from utils import keep_freed_memory  # noqa: E402

# name: (fused path, bfloat16 autocast, compiled attention kernels)
MODES = {"plain float32": (False, False, False), "fused float32": (True, False, False),
         "plain bfloat16": (False, True, False), "fused bfloat16": (True, True, False),
         "fused float32 compiled": (True, False, True), "fused bfloat16 compiled": (True, True, True)}  # fmt: skip


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously; timings must include it)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_counters() -> list[int] | None:
    """Linux's whole-machine CPU time counters (/proc/stat: user, nice, system, idle, iowait, irq, softirq,
    steal, in ticks), or None elsewhere."""
    try:
        with open("/proc/stat") as f:
            return [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None


def report_steal(start: list[int] | None) -> None:
    """Print the share of CPU time the hypervisor gave other machines since ``start`` (cpu_counters()).

    On a shared virtual machine this "steal" slows every figure by about its share: the same code measured
    2x apart within an hour here. Same-run ratios stay comparable; absolute figures only when steal is ~0.
    """
    end = cpu_counters()
    if start is None or end is None or len(end) < 8:
        return
    delta = [b - a for a, b in zip(start, end)]
    if total := sum(delta):
        print(f"CPU time taken by the hypervisor (steal) while measuring: {delta[7] / total:.0%}")


def matmul_flops(dtype: torch.dtype, device: torch.device, n: int = 2048, repeats: int = 10) -> float:
    """Measured dense matmul FLOP/s (n x n x n, best of ``repeats``) in ``dtype`` on ``device``."""
    a, b = (torch.randn(n, n, dtype=dtype, device=device) for _ in range(2))
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        t = time.perf_counter()
        torch.mm(a, b)
        synchronize(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def make_batch(images: int, per_image: int, grid: int, vocab: int, seed: int = 0, channels: int = 1280):
    """Random features (images x grid^2 x channels) and captions with Flickr8k-like lengths (mean ~12 words)."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(images, grid * grid, channels, generator=g).abs()
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
    p.add_argument("--steps", type=int, default=5, help="timed steps per mode and repeat (after a warm-up step)")
    p.add_argument("--repeats", type=int, default=3, help="repeats of every mode, interleaved")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--profile", choices=list(MODES), default=None, help="also print where this mode's time goes")
    p.add_argument("--no-compile", action="store_true", help="skip the compiled modes (no C++ compiler here)")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated modes to time (default: all)")
    p.add_argument("--device", default="cpu", help="'cpu' or a CUDA device ('cuda', 'cuda:1'); bfloat16 on both")
    args = p.parse_args()
    device = torch.device(args.device)
    chosen = [m.strip() for m in args.modes.split(",")]
    if unknown := [m for m in chosen if m not in MODES]:
        p.error(f"unknown mode(s) {', '.join(unknown)}; choose from: {', '.join(MODES)}")
    args.no_compile = args.no_compile or not any(MODES[m][2] for m in chosen)
    modes = {k: v for k, v in MODES.items() if k in chosen and not (args.no_compile and v[2])}
    keep_freed_memory()  # as train.py does
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    counters = cpu_counters()
    decoder = DecoderWithAttention(ModelConfig(vocab_size=args.vocab), 1280).train().to(device)
    decoder.dropout = FastDropout(decoder.cfg.dropout)  # as train.py
    fused = FusedTeacherForcing(decoder)
    opt = adam(list(decoder.parameters()), 4e-4, device)  # as train.py
    feats, caps, lengths, index = make_batch(args.batch_images, 5, args.grid, args.vocab)
    batch = (feats.to(device), caps.to(device), lengths, index.to(device))  # lengths stay on the CPU (train.py)
    captions = caps.shape[0]

    def step(use_fused: bool, low: bool, compiled: bool) -> None:
        fused.compiled = compiled
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=low):
            logits, targets, alphas = (fused if use_fused else decoder)(*batch)
            loss, _ = caption_loss(logits.float(), targets, alphas.float(), 0.01, 0.1)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(decoder.parameters(), 5.0)
        opt.step()

    if not args.no_compile:
        start = time.perf_counter()
        for dtype in (torch.float32, torch.bfloat16):
            fused.compile_kernels(device, dtype)
        compile_seconds = time.perf_counter() - start
    for mode in modes.values():
        step(*mode)
    with FlopCounterMode(display=False) as counter:
        step(False, False, False)
    flops = counter.get_total_flops()
    speeds: dict[str, list[float]] = {name: [] for name in modes}
    for _ in range(args.repeats):
        for name, mode in modes.items():
            synchronize(device)
            t = time.perf_counter()
            for _ in range(args.steps):
                step(*mode)
            synchronize(device)
            speeds[name].append(captions * args.steps / (time.perf_counter() - t))
    peak32, peak16 = matmul_flops(torch.float32, device), matmul_flops(torch.bfloat16, device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"threads: {torch.get_num_threads()}"
    print(f"{where}, grid {args.grid}x{args.grid}, vocab {args.vocab}, "
          f"{args.batch_images} images x 5 captions per step, {args.repeats} repeats x {args.steps} steps")  # fmt: skip
    print(f"step FLOPs (fwd+bwd, counted): {flops / 1e9:.2f} GFLOP ({flops / captions / 1e6:.0f} MFLOP per caption)")
    print(f"dense matmul on this machine: {peak32 / 1e9:.0f} GFLOP/s float32, {peak16 / 1e9:.0f} GFLOP/s bfloat16")
    if not args.no_compile:
        print(f"compiling the attention kernels took {compile_seconds:.0f} s (once; not in the figures below)")
    for name, values in speeds.items():
        median = statistics.median(values)
        achieved = median * flops / captions
        print(f"{name:23s} median {median:6.1f} captions/s (best {max(values):6.1f}); "
              f"{achieved / peak32:6.1%} of float32 peak, {achieved / peak16:6.1%} of bfloat16 peak")  # fmt: skip
    report_steal(counters)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            for _ in range(args.steps):
                step(*MODES[args.profile])
        print(f"\nwhere the time of {args.steps} steps of {args.profile} goes (PyTorch operators, self time):")
        key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=15))


if __name__ == "__main__":
    main()
