"""Precision and recall of the object detector (detector.py) against COCO instance boxes, and its CPU time.

    python benchmarks/detector_pr.py --data /path/to/coco-dev80 [--thresholds 0.3 0.5] [--threads 1]

``--data`` is a folder with ``images/`` (named by COCO image id) and ``instances.json``. Two levels, each per
category and overall (micro: every decision counts once):

* presence: per photo and category, "the detector names it" (a detection scoring >= the threshold) against
  "the photo has a box of it";
* boxes: detections matched greedily, best score first, to an unmatched box of their category with IoU >= 0.5
  (COCO's crowd boxes count as ordinary boxes here).

Also the issue's headline figure: in how many photos the top-scoring non-person detection names a category
that the photo has. Milliseconds per photo time :meth:`Detector.detect` (resize, network, decode, NMS) after
one warm-up photo, with ``--threads`` torch threads; the CPU's model name is printed with them.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detector import DEFAULT_DIR, LABELS, Detector, box_iou  # noqa: E402
from eval import read_instances  # noqa: E402
from images import decode_image  # noqa: E402
from utils import CamEyeError, cli_errors  # noqa: E402

FULL_RESOLUTION = 2**30  # decode_image's target side: large, so a JPEG is never decoded at a reduced scale


def cpu_name() -> str:
    """The CPU's model name as ``lscpu`` reports it (else Python's guess)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown CPU"


def match_boxes(found: list[tuple[float, list[float]]], truth: list[list[float]], iou: float) -> int:
    """True positives among ``found`` ((score, box) of one category, best first) against ``truth`` boxes."""
    if not found or not truth:
        return 0
    overlaps = box_iou(torch.tensor([b for _, b in found]), torch.tensor(truth))
    used: set[int] = set()
    hits = 0
    for i in range(len(found)):
        free = [(float(overlaps[i, j]), j) for j in range(len(truth)) if j not in used]
        best = max(free, default=(0.0, -1))
        if best[0] >= iou:
            used.add(best[1])
            hits += 1
    return hits


def ratio(a: int, b: int) -> str:
    return f"{a / b:.2f}" if b else "  - "


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="folder with images/ and instances.json")
    p.add_argument("--weights", type=Path, default=DEFAULT_DIR, help="the detector's folder")
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.3, 0.5], help="score thresholds")
    p.add_argument("--iou", type=float, default=0.5, help="IoU for a box to count as found")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--limit", type=int, default=0, help="only the first N photos (0: all)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    with cli_errors():
        photos = sorted((args.data / "images").glob("*.jpg"))[: args.limit or None]
        if not photos:
            raise CamEyeError(f"no photos in {args.data / 'images'}")
        truths = read_instances(args.data / "instances.json", [q.stem for q in photos], "data")
        detector = Detector.load(args.weights)
        lowest = min(args.thresholds)
        results, times = [], []
        detector.detect(decode_image(photos[0], FULL_RESOLUTION), lowest)  # warm-up
        for path in photos:
            image = decode_image(path, FULL_RESOLUTION)
            start = time.perf_counter()
            results.append(detector.detect(image, lowest))
            times.append(time.perf_counter() - start)

    print(f"{len(photos)} photos of {args.data}; {cpu_name()}, {args.threads} torch thread(s)")
    print(f"CPU time per photo (detect: resize + network + decode): median {1000 * statistics.median(times):.0f} ms, "
          f"min {1000 * min(times):.0f} ms, max {1000 * max(times):.0f} ms")  # fmt: skip
    n_boxes = sum(len(b) for t in truths for b in t["boxes"].values())
    print(f"{n_boxes} boxes; presence = per photo and category; boxes = IoU >= {args.iou}\n")
    for t in args.thresholds:
        counts = {c: [0, 0, 0, 0, 0, 0] for c in LABELS}  # presence tp, fp, fn; boxes tp, found, truth
        top_right = top_n = 0
        for found, truth in zip(results, truths):
            kept = [d for d in found if d.score >= t]
            named = {d.label for d in kept}
            for c in named | set(truth["boxes"]):
                k = counts[c]
                k[0] += c in named and c in truth["boxes"]
                k[1] += c in named and c not in truth["boxes"]
                k[2] += c not in named
                same = [(d.score, list(d.box)) for d in kept if d.label == c]
                k[3] += match_boxes(same, truth["boxes"].get(c, []), args.iou)
                k[4] += len(same)
                k[5] += len(truth["boxes"].get(c, []))
            others = [d for d in kept if d.label != "person"]
            if others:
                top_n += 1
                top_right += others[0].label in truth["boxes"]
        total = [sum(k[i] for k in counts.values()) for i in range(6)]
        print(f"score >= {t}: top non-person detection is a true category in {top_right} of {top_n} photos "
              f"(of {len(photos)})")  # fmt: skip
        print(f"{'category':<16} {'photos':>6} {'P':>5} {'R':>5}   {'boxes':>5} {'found':>5} {'P':>5} {'R':>5}")
        rows = sorted((c for c, k in counts.items() if k[5] or k[4]), key=lambda c: -counts[c][5])
        for c in [*rows, "all"]:
            k = total if c == "all" else counts[c]
            has = k[0] + k[2]
            print(f"{c:<16} {has:>6} {ratio(k[0], k[0] + k[1]):>5} {ratio(k[0], has):>5}   "
                  f"{k[5]:>5} {k[4]:>5} {ratio(k[3], k[4]):>5} {ratio(k[3], k[5]):>5}")  # fmt: skip
        print()


if __name__ == "__main__":
    main()
