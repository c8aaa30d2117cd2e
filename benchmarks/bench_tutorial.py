"""CamEye at the common tutorial's settings: the figures behind issue 10's comparison table, rerunnable.

    python benchmarks/bench_tutorial.py [--flickr8k ../shared/data/flickr8k] [--repeats 3] [--skip prepare]

The tutorial (sgrvinod/a-PyTorch-Tutorial-to-Image-Captioning) trains with a frozen ResNet-101 at 256 px, its
8 x 8 grid pooled up to 14 x 14 (196 regions of 2048 channels), 32 captions per batch, and evaluates with beam
search one image at a time. This script measures CamEye at those settings and prints each figure beside the
tutorial's as measured on a 2-core machine of the same CPU family (TUTORIAL_RUNS below, each naming where it
came from; not measured by this script, since the tutorial is not part of this project). Each measure is timed
``--repeats`` times and min and median are printed; the ratio uses the median. Run it on an idle machine.

1. prepare: ``create_input_files.py`` on Flickr8k (8,000 captioned photos), ``--workers 2``, wall time of the
   process (skipped with a note when the folder is absent); each run's output is removed before the next.
2. encode: the frozen ResNet-101 filling the feature cache, images/s (``--precision``: auto = bfloat16
   where the CPU has bfloat16 matrix units), as ``train.py`` caches the 6,000 train + 1,000 val images once.
3. decoder: full training steps (forward, backward, clipping, Adam) on cached 14 x 14 x 2048 features,
   6 images x 5 captions = 30 captions a step (CamEye batches images with all their captions; the tutorial's
   32 captions come from 32 images), fused path, float32 and bfloat16 autocast, and bfloat16 with
   ``--compile``'s attention kernels (compile time printed apart). The epoch rows are PROJECTIONS: an epoch of
   30,000 captions at the timed steps' speed, without data loading, cache reads or validation (the tutorial's
   figure is a real epoch of its train.py). Epoch 1 = the cache (7,000 images) + one epoch; epochs 2+ = one
   epoch (the tutorial encodes every epoch). A real epoch: ``train.py`` on the prepared Flickr8k.
4. fine-tune: the same step with ResNet-101's last three stages (the tutorial's ``fine_tune``: layers 2-4)
   training on 256 px images, captions/s.
5. eval: beam search of 3 with ResNet-101 encoding included, batches of 32 images, images/s. Weights are
   random, so captions are stopped at ``--caption-len`` words (11: Flickr8k's mean), every beam running that
   long: a trained model's beams end on their own, at about that length.

Weights are random throughout (``weights="none"``): speed does not depend on them, and nothing is downloaded.
"""

from __future__ import annotations

import argparse
import functools
import math
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from bench_train import cpu_counters, make_batch, report_steal  # noqa: E402

from backbones import resolve_precision  # noqa: E402
from decoding import DecodeConfig, beam_search  # noqa: E402
from fused import FastDropout, FusedTeacherForcing, adam  # noqa: E402
from models import DecoderWithAttention, Encoder, ModelConfig, caption_loss  # noqa: E402
from utils import keep_freed_memory  # noqa: E402

# The tutorial, measured beside CamEye on 2-core machines of each CPU family: seconds to prepare 8,000 images,
# minutes per frozen-encoder epoch (a real epoch of its train.py; the same for every epoch: it encodes images every
# step), captions/s fine-tuning layers 2-4, and images/s of beam-3 evaluation one image at a time. Each ratio
# below uses the figures of this machine's CPU family (the first entry where none matches).
TUTORIAL_RUNS = {
    # Issue 10's machine: its CPU and date were not recorded with the figures (the README's figures then came from
    # an Intel machine with AMX); used for CPUs that are not AMD.
    "Intel (issue 10's machine)": {"prepare_s": 12.8, "epoch_min": 94.0, "finetune_cps": 2.2, "eval_ips": 5.0},
    # Reported in issue 21 (epoch 126-128 min; fine-tuning not measured).
    "AMD EPYC, 2 cores, AVX-512 BF16, no AMX (issue 21)": {
        "prepare_s": 13.8, "epoch_min": 127.0, "finetune_cps": float("nan"), "eval_ips": 2.95,
    },
}  # fmt: skip


def cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo; else platform.processor())."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def tutorial_figures(cpu: str) -> tuple[str, dict[str, float]]:
    """The TUTORIAL_RUNS entry of ``cpu``'s family: (its label, its figures)."""
    family = "AMD" if "AMD" in cpu else "Intel"
    label = next((k for k in TUTORIAL_RUNS if k.startswith(family)), next(iter(TUTORIAL_RUNS)))
    return label, TUTORIAL_RUNS[label]


EPOCH_CAPTIONS, CACHED_IMAGES = 30_000, 7_000
GRID, CHANNELS, SIZE, VOCAB = 14, 2048, 256, 2600


def timed(fn: Callable[[], object], repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn`` (after one untimed warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def row(name: str, unit: str, values: list[float], tutorial: float, higher_is_better: bool) -> None:
    """One table line: min and median of ``values``, the tutorial's figure and the median's ratio to it."""
    median = statistics.median(values)
    best = max(values) if higher_is_better else min(values)
    ratio = median / tutorial if higher_is_better else tutorial / median
    theirs = "-" if math.isnan(tutorial) else f"{tutorial:.2f}"
    times = "" if math.isnan(tutorial) else f"{ratio:.1f}x"
    print(f"{name:44} {best:9.2f} {median:9.2f} {unit:11} {theirs:>9} {times:>8}")


def batch(images: int, per_image: int):
    """Random 14 x 14 x 2048 features and captions of 10-21 words, ``per_image`` per image."""
    return make_batch(images, per_image, GRID, VOCAB, channels=CHANNELS)


def measure_prepare(flickr8k: Path, repeats: int) -> list[float] | None:
    if not (flickr8k / "Flickr8k.token.txt").is_file():
        print(f"prepare: skipped ({flickr8k} not found; pass --flickr8k)")
        return None
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeats):
            cmd = [sys.executable, str(ROOT / "create_input_files.py"), str(flickr8k), "--out", f"{tmp}/{i}"]
            start = time.perf_counter()
            subprocess.run([*cmd, "--workers", "2"], check=True, capture_output=True)
            times.append(time.perf_counter() - start)
            # Each run leaves 1.6 GB in the page cache for the kernel to write back: removed before the next run,
            # which would otherwise pay for it (as a user's next command would, once, not every time).
            shutil.rmtree(f"{tmp}/{i}")
    return times


def train_step(decoder, opt, data, low: bool, encoder=None, images=None) -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=low):
        feats = encoder(images) if encoder is not None else data[0]
        logits, targets, alphas = decoder(feats, *data[1:])
        loss, _ = caption_loss(logits.float(), targets, alphas.float(), 0.01, 0.0)
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(decoder.parameters(), 5.0)
    opt.step()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--flickr8k", type=Path, default=ROOT.parent / "shared/data/flickr8k", help="Flickr8k folder")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of every measure")
    p.add_argument("--precision", default="auto", choices=["auto", "float32", "bfloat16"], help="encoder's")
    p.add_argument("--caption-len", type=int, default=11, help="words per beam in the eval measure")
    p.add_argument("--no-compile", action="store_true", help="skip the --compile decoder row (no C++ compiler)")
    p.add_argument("--skip", nargs="*", default=[], choices=["prepare", "encode", "decoder", "finetune", "eval"])
    args = p.parse_args()
    keep_freed_memory()
    torch.manual_seed(0)
    precision = resolve_precision(args.precision, "cpu")
    cpu = cpu_name()
    label, TUTORIAL = tutorial_figures(cpu)  # noqa: N806 (a table, read as one)
    print(f"{cpu}, {torch.get_num_threads()} threads; encoder precision {precision}; {args.repeats} repeats; "
          f"tutorial figures: {label} (not measured by this run)\n")  # fmt: skip
    counters = cpu_counters()
    print(f"{'measure':44} {'best':>9} {'median':>9} {'unit':11} {'tutorial':>9} {'ratio':>8}")
    if "prepare" not in args.skip and (times := measure_prepare(args.flickr8k, args.repeats)):
        row("prepare Flickr8k, 2 workers", "s", times, TUTORIAL["prepare_s"], False)

    cfg = ModelConfig(vocab_size=VOCAB, backbone="resnet101", encoder_weights="none", grid_size=GRID)
    encoder = Encoder("resnet101", weights="none", grid_size=GRID).fold_batch_norm()  # as the cache and eval.py
    encoder.precision = precision
    images = torch.randn(32, 3, SIZE, SIZE)
    encode_ips = None
    if "encode" not in args.skip or "decoder" not in args.skip:
        with torch.inference_mode():
            encode_ips = [32 / t for t in timed(lambda: encoder(images), args.repeats)]
        row(f"encode ResNet-101 {SIZE} px ({precision})", "img/s", encode_ips, float("nan"), True)

    decoder = DecoderWithAttention(cfg, CHANNELS).train()
    decoder.dropout = FastDropout(cfg.dropout)  # as train.py
    teacher = FusedTeacherForcing(decoder)  # train.py's default path
    opt = adam(list(decoder.parameters()), 4e-4, "cpu")  # as train.py
    if "decoder" not in args.skip:
        data = batch(6, 5)
        captions = data[1].shape[0]
        cache_min = CACHED_IMAGES / statistics.median(encode_ips) / 60
        modes = [(False, False), (True, False)] + ([] if args.no_compile else [(True, True)])
        for low, compiled in modes:
            if compiled:
                start = time.perf_counter()
                teacher.compile_kernels("cpu", torch.bfloat16)
                print(f"  (compiling the attention kernels: {time.perf_counter() - start:.0f} s, not timed)")
            teacher.compiled = compiled
            step = functools.partial(train_step, teacher, opt, data, low)
            step()  # warm-up
            cps = [captions / t for t in timed(step, args.repeats * 3)]
            name = ("bfloat16" if low else "float32") + (" compiled" if compiled else "")
            row(f"decoder training ({name})", "captions/s", cps, float("nan"), True)
            epoch = [EPOCH_CAPTIONS / c / 60 for c in cps]
            row(f"  projected frozen epoch 2+ ({name})", "min", epoch, TUTORIAL["epoch_min"], False)
            row(f"  projected epoch 1, with cache ({name})", "min", [m + cache_min for m in epoch],
                TUTORIAL["epoch_min"], False)  # fmt: skip
        teacher.compiled = False  # fine-tuning below is measured as train.py runs it by default

    if "finetune" not in args.skip:
        tuned = Encoder("resnet101", weights="none", fine_tune_stages=3, grid_size=GRID).train()
        params = [*decoder.parameters(), *(q for q in tuned.parameters() if q.requires_grad)]
        opt2 = adam(params, 1e-4, "cpu")
        data = batch(6, 5)
        pixels = torch.randn(6, 3, SIZE, SIZE)
        cps = [30 / t for t in timed(lambda: train_step(teacher, opt2, data, False, tuned, pixels), args.repeats)]
        row("fine-tune ResNet-101 stages 2-4 (float32)", "captions/s", cps, TUTORIAL["finetune_cps"], True)

    if "eval" not in args.skip:
        decoder.eval()

        def evaluate() -> None:
            with torch.inference_mode():
                feats = encoder(images)
                # The tutorial's beam search has no repeat blocking; every caption runs caption_len words.
                cfg = DecodeConfig(3, 0.5, args.caption_len, False, False, min_len=args.caption_len)
                beam_search(decoder, feats, cfg)

        ips = [32 / t for t in timed(evaluate, args.repeats)]
        row(f"eval beam 3, encoder included ({precision})", "img/s", ips, TUTORIAL["eval_ips"], True)
    report_steal(counters)


if __name__ == "__main__":
    main()
