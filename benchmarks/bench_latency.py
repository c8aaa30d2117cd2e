"""How long one photo takes: the whole ``caption.py`` process, and captioning alone once the model is loaded.

    python benchmarks/bench_latency.py [--photo PHOTO] [--checkpoint CKPT] [--runs 20]

1. process: wall time of ``caption.py PHOTO --no-figures`` as a new process (Python start-up, imports, loading
   the checkpoint and the encoder's weights, one caption), ``--processes`` times; min and median.
2. after load: reading, encoding and beam search (3, length penalty 0.5, trigram blocking, as caption.py) of
   the one photo, ``--runs`` times after a warm-up, in float32 and bfloat16 encoder precision; min and median
   in milliseconds. bfloat16 is fast only where the CPU or GPU has bfloat16 matrix units.
3. after load, grounded: the same with ``--ground`` (default "slot"): the COCO detector on the photo too
   (grounding.py; issue 20's budget is 150 ms), in the precision ``auto`` picks.

The default photo is scikit-image's astronaut (an installed package: nothing is downloaded).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backbones import bfloat16_is_fast  # noqa: E402
from captioner import Captioner  # noqa: E402
from decoding import DecodeConfig  # noqa: E402
from utils import DEFAULT_CHECKPOINT, keep_freed_memory  # noqa: E402


def default_photo() -> Path:
    import skimage.data

    return Path(skimage.data.__file__).parent / "astronaut.png"


def caption_once(captioner: Captioner, photo: Path, cfg: DecodeConfig = DecodeConfig()) -> list[str]:
    """Read, encode and beam-search one photo as caption.py does (its defaults: decoding.DecodeConfig)."""
    decoded = captioner.decode([captioner.read(photo)], cfg)
    return captioner.words(decoded[0], marked=True)


def cpu_name() -> str:
    """The CPU's model name (lscpu), for the record."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown CPU"
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")


def summary(seconds: list[float], unit: float = 1.0, suffix: str = "s") -> str:
    return f"min {min(seconds) * unit:7.1f} {suffix}, median {statistics.median(seconds) * unit:7.1f} {suffix}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--photo", type=Path, default=None, help="photo to caption (default: scikit-image's astronaut)")
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT, help="model")
    p.add_argument("--runs", type=int, default=20, help="timed captions after load, per precision")
    p.add_argument("--processes", type=int, default=3, help="timed caption.py processes")
    p.add_argument("--ground", default="slot", help="DecodeConfig.ground of the grounded timing ('off': none)")
    args = p.parse_args()
    photo = args.photo or default_photo()
    keep_freed_memory()
    cmd = [sys.executable, str(ROOT / "caption.py"), str(photo), "--no-figures", "--checkpoint", str(args.checkpoint)]
    walls = []
    for _ in range(args.processes):
        start = time.perf_counter()
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()
        walls.append(time.perf_counter() - start)
    print(f"{cpu_name()}, {torch.get_num_threads()} threads; bfloat16 matrix units: {bfloat16_is_fast('cpu')}")
    print(f"caption.py process ({out}): {summary(walls)}")
    for precision in ("float32", "bfloat16"):
        captioner = Captioner.load(args.checkpoint, "cpu", precision=precision)
        words = caption_once(captioner, photo)
        times = []
        for _ in range(args.runs):
            start = time.perf_counter()
            caption_once(captioner, photo)
            times.append(time.perf_counter() - start)
        print(f"after load, {precision:8}: {summary(times, 1000, 'ms')}  ({' '.join(words)})")
    if args.ground != "off":
        precision = "bfloat16" if bfloat16_is_fast("cpu") else "float32"  # what caption.py's "auto" picks
        captioner = Captioner.load(args.checkpoint, "cpu", precision=precision)
        cfg = DecodeConfig(ground=args.ground)
        words = caption_once(captioner, photo, cfg)  # also loads the detector
        times = []
        for _ in range(args.runs):
            start = time.perf_counter()
            caption_once(captioner, photo, cfg)
            times.append(time.perf_counter() - start)
        print(
            f"after load, --ground {args.ground} ({precision}, detector included): {summary(times, 1000, 'ms')}  "
            f"({' '.join(words)})"
        )


if __name__ == "__main__":
    main()
