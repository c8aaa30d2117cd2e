"""How time and memory grow with the dataset: preparation, feature caching and one training epoch.

    python benchmarks/bench_scale.py [--sizes 1000 4000 16000] [--image-size 128] [--workdir DIR] [--keep]

For each size N it generates a synthetic dataset (synthetic.py, not timed), then runs as subprocesses, each
timed (wall clock) and watched for peak memory:

1. ``create_input_files.py`` (``--workers`` decoders);
2. ``train.py --epochs 1`` with an empty feature cache: it encodes the train and val images once, then trains one
   epoch and validates (``--val-images`` images);
3. the same again with the cache in place: the epoch on features read into memory (``--feature-memory-gb``
   large); the time of feature caching is 2 minus 3, less the difference of their epochs' own times;
4. the same with ``--feature-memory-gb 0``: the lazy path, features read from the HDF5 file per item, as for
   a cache larger than the in-memory limit (4 GiB by default: COCO's 118k images at 256 px are 19 GB).

Peak memory is the largest sum over the process and its children (pool workers, DataLoader workers) of the
proportional set size (PSS: shared pages split between the processes that share them; RSS where PSS is not
available), sampled every 0.2 s from /proc (Linux); in brackets, the peak RSS of the largest single process
(wait4's ru_maxrss, shared pages counted in full).
Epoch speed is train.py's own captions/s (the training loop only) from metrics.jsonl. The table ends with the
time per 1000 images of each step (constant if time grows linearly) and the lazy path's speed relative to the
in-memory one.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from synthetic import generate_dataset  # noqa: E402
from utils import positive_int  # noqa: E402


# A small decoder: the benchmark is about how cost grows with N, not about model quality.
def model_options(dim: int) -> list[str]:
    """A decoder of width ``dim`` (embedding and attention) and 2 x ``dim`` (LSTM): the scale is the point here."""
    return ["--embed-dim", str(dim), "--attention-dim", str(dim), "--decoder-dim", str(2 * dim), "--dropout", "0.1"]


def _memory_of(pid: int) -> int:
    """Bytes of PSS (else RSS) of one process; 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("Pss:"))
    except (OSError, StopIteration):
        pass
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return 0


def tree_memory(pid: int) -> int:
    """Memory (bytes) of ``pid`` and all its descendants, from /proc."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        total += _memory_of(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    stack.extend(int(c) for c in f.read().split())
        except OSError:
            continue
    return total


@dataclass
class Run:
    seconds: float
    peak_bytes: int  # process tree, sampled (0 without /proc)
    main_peak_bytes: int  # main process, from wait4


def run_measured(cmd: list[str], log: Path) -> Run:
    """Run ``cmd`` (output to ``log``), timing it and sampling its memory; raises if it fails."""
    peak = 0
    done = threading.Event()
    with open(log, "w") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)

        def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, tree_memory(proc.pid))
                done.wait(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)  # not proc.wait(): wait4 also gives the child's peak RSS
        seconds = time.perf_counter() - start
        done.set()
        sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-2000:]
        raise SystemExit(f"failed (status {proc.returncode}): {' '.join(cmd)}\n{tail}")
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, kB on Linux
    return Run(seconds, peak, usage.ru_maxrss * scale)


def epoch_stats(run_dir: Path) -> dict:
    """The first line of train.py's metrics.jsonl (train_seconds, captions_per_second, ...)."""
    with open(run_dir / "metrics.jsonl") as f:
        return json.loads(f.readline())


def bench_size(n: int, args: argparse.Namespace, work: Path) -> dict:
    """All measurements for one dataset size."""
    source = work / f"synthetic_{n}"
    start = time.perf_counter()
    json_path = generate_dataset(source, num_images=n, image_size=args.image_size, seed=0)
    print(f"N={n}: generated the synthetic images in {time.perf_counter() - start:.1f} s", flush=True)
    data = work / f"prepared_{n}"
    py = sys.executable
    prepare = [py, "create_input_files.py", str(json_path), "--out", str(data), "--min-word-freq", "1"]
    prepare += ["--image-size", str(args.image_size), "--workers", str(args.workers)]
    prep = run_measured(prepare, work / f"prepare_{n}.log")
    shutil.rmtree(data / "features", ignore_errors=True)  # caching is measured from an empty cache

    def train(name: str, memory_gb: float) -> tuple[Run, dict]:
        run_dir = work / f"run_{n}_{name}"
        cmd = [py, "train.py", "--data", str(data), "--out", str(run_dir), "--overwrite", "--epochs", "1"]
        cmd += ["--batch-size", str(args.batch_size), "--val-images", str(args.val_images), "--no-tensorboard"]
        cmd += ["--feature-memory-gb", str(memory_gb), "--device", "cpu", *model_options(args.dim)]
        run = run_measured(cmd, work / f"train_{n}_{name}.log")
        return run, epoch_stats(run_dir)

    first, first_stats = train("cache", args.memory_gb)
    in_memory, mem_stats = train("memory", args.memory_gb)
    lazy, lazy_stats = train("lazy", 0.0)
    cache_bytes = sum(p.stat().st_size for p in (data / "features").rglob("*.hdf5"))
    return {
        "n": n,
        "prepare": prep,
        "prepared_bytes": sum(p.stat().st_size for p in data.glob("*.hdf5")),
        # The two runs differ by the caching; their epochs' own times are subtracted too, since on a busy
        # machine the same epoch can take twice as long in one run as in the other.
        "cache_seconds": first.seconds
        - in_memory.seconds
        - (first_stats["train_seconds"] - mem_stats["train_seconds"]),
        "cache_run": first,
        "cache_bytes": cache_bytes,
        "memory": in_memory,
        "memory_epoch": mem_stats,
        "lazy": lazy,
        "lazy_epoch": lazy_stats,
    }


def mb(x: int) -> str:
    return f"{x / 2**20:,.0f}" if x else "n/a"


def print_table(results: list[dict]) -> None:
    print()
    print(
        "| N | prepare s | prepare peak MB (largest process) | images MB | caching s | caching run peak MB | cache MB "
        "| epoch s, in memory | captions/s | peak MB | epoch s, lazy | captions/s | peak MB | lazy / in memory |"
    )
    print("|---" * 14 + "|")
    for r in results:
        m, z, prep = r["memory_epoch"], r["lazy_epoch"], r["prepare"]
        print(
            f"| {r['n']:,} | {prep.seconds:.1f} | {mb(prep.peak_bytes)} ({mb(prep.main_peak_bytes)}) "
            f"| {mb(r['prepared_bytes'])} | {r['cache_seconds']:.1f} | {mb(r['cache_run'].peak_bytes)} "
            f"| {mb(r['cache_bytes'])} | {m['train_seconds']:.1f} | {m['captions_per_second']:.0f} "
            f"| {mb(r['memory'].peak_bytes)} | {z['train_seconds']:.1f} | {z['captions_per_second']:.0f} "
            f"| {mb(r['lazy'].peak_bytes)} | {z['captions_per_second'] / m['captions_per_second']:.2f} |"
        )
    print()
    print("seconds per 1000 images (constant when time grows linearly):")
    print("| N | prepare | feature caching | epoch, in memory | epoch, lazy |")
    print("|---|---|---|---|---|")
    for r in results:
        k = r["n"] / 1000
        print(
            f"| {r['n']:,} | {r['prepare'].seconds / k:.2f} | {r['cache_seconds'] / k:.2f} "
            f"| {r['memory_epoch']['train_seconds'] / k:.2f} | {r['lazy_epoch']['train_seconds'] / k:.2f} |"
        )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--sizes", type=positive_int, nargs="+", default=[1000, 4000, 16000], help="dataset sizes (images)")
    p.add_argument("--image-size", type=positive_int, default=128, help="synthetic and prepared image side (px)")
    p.add_argument("--workers", type=positive_int, default=2, help="create_input_files.py --workers")
    p.add_argument("--batch-size", type=positive_int, default=32, help="train.py --batch-size")
    p.add_argument("--dim", type=positive_int, default=128, help="decoder width (LSTM: twice this)")
    p.add_argument("--val-images", type=positive_int, default=100, help="train.py --val-images")
    p.add_argument("--memory-gb", type=float, default=4.0, help="train.py --feature-memory-gb of the in-memory runs")
    p.add_argument(
        "--workdir", type=Path, default=None, help="where datasets and runs go (default: a temporary folder)"
    )
    p.add_argument("--keep", action="store_true", help="keep the work folder (always kept with --workdir)")
    args = p.parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="cameye_bench_scale_"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"work folder {work}; load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs", flush=True)
    try:
        results = []
        for n in args.sizes:
            results.append(bench_size(n, args, work))
            print_table(results)  # after each size, so a long run shows its progress
    finally:
        if args.workdir is None and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
