"""Turn a captioning dataset (images + captions) into the HDF5 + JSON files that training reads.

Input formats, detected from the source path(s):

* Karpathy's split JSON ``dataset_{coco,flickr8k,flickr30k}.json`` (also the synthetic set's JSON), with the
  image folder given by ``--images``; COCO's ``restval`` images go to the training split;
* Flickr8k's original distribution: a folder with ``Flickr8k.token.txt``, ``Flickr_8k.{train,dev,test}Images.txt``
  and the images in ``Flicker8k_Dataset/``;
* COCO's own caption files ``captions_{train,val}{2014,2017}.json``: train files go to train; the images of a
  val file are split in two halves (by image id) into val and test, since COCO has no public test captions. A
  file whose name says neither (e.g. a small development set's ``captions.json``) needs ``--split``.

An evaluation-only set (no training images, e.g. one COCO val file) is prepared with the word map of the
model that will be scored on it (``--word-map``); every image then goes to one split, ``test`` by default.

Output, in ``--out``: ``word_map.json`` (``<pad>``=0, ``<start>``=1, ``<end>``=2, ``<unk>``=3, then the words of
the training captions seen at least ``--min-word-freq`` times, most frequent first; or a copy of ``--word-map``)
and one ``{split}.hdf5`` per split (an empty split is written with 0 images and a warning) holding

* ``images``: uint8, N x 3 x S x S (RGB, squashed to S x S like the common tutorial, so nothing is cropped away);
* ``captions``: int32, N*C x (L+2) encoded ``<start> words <end> <pad>...``, C = ``--captions-per-image``;
  caption k of image i is row i*C + k; ``caplens``: their lengths including ``<start>`` and ``<end>``;
* ``references`` (all captions of each image, as space-joined tokens), ``references_raw`` (the original
  sentences) and ``reference_offsets`` (image i owns rows offsets[i]:offsets[i+1]), for evaluation;
* ``image_ids`` and ``filenames``; ``objects`` (per-image JSON) when the source has object boxes.

Text: captions are NFC-normalised and case-folded; words are runs of letters (any script), digits and combining
marks; apostrophes inside words are removed (``dog's``, ``girl’s`` -> ``dogs``, ``girls``); everything else
separates words. Karpathy's ``tokens`` are kept as given but pass through the same rule.

Images are decoded (images.py: orientation, colour profiles to sRGB) and resized in worker processes. A file
that cannot be read (or is no regular file, e.g. a FIFO) is reported and skipped along with its captions, so
captions never shift onto the wrong image. An image or caption listed twice is used once, with a warning.
Everything is written under temporary names (removed on errors, Ctrl-C and SIGTERM; a killed run's are removed
by the next run) and renamed only when every split is complete; nothing is written when no training image could
be read.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import mmap
import multiprocessing
import multiprocessing.connection
import os
import random
import shutil
import signal
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeoutError
from concurrent.futures import wait as wait_for_futures
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, NoReturn

import h5py
import numpy as np
from tqdm import tqdm

from captions import SPLITS, ImageRecord, drop_duplicates, keep_real_captions, read_source
from cli import HelpFormatter
from images import (
    UNUSABLE_IMAGE_ERRORS,
    decode_image,
    image_problem,
    resize_images,
)
from utils import (
    SPECIAL_TOKENS,
    CamEyeError,
    Terminated,
    atomic_path,
    check_free_space,
    cli_errors,
    disk_full_errors,
    handle_sigterm,
    ignore_signals_in_worker,
    local_path,
    new_hdf5,
    output_folder,
    positive_int,
    read_json,
    validate_word_map,
)


# ----------------------------------------------------------------------------------------- captions
def caption_pool(record: ImageRecord, max_len: int) -> list[list[str]]:
    """The captions an image's encoded captions are drawn from (and the vocabulary is counted on).

    Those of at most ``max_len`` words; an image with none of those uses all its captions cut to ``max_len``.
    """
    fits = [t for t in record.tokens if 0 < len(t) <= max_len]
    return fits or [t[:max_len] for t in record.tokens if t]


def build_word_map(records: Iterable[ImageRecord], min_word_freq: int, max_len: int) -> dict[str, int]:
    """Word map from the *training* captions only (the common tutorial also counts val/test words).

    Words are counted in exactly the captions that can be encoded (:func:`caption_pool`: truncated ones
    included), so no encoded training caption holds a word that was never counted.
    """
    freq: Counter[str] = Counter()
    for r in records:
        if r.split == "train":
            for toks in caption_pool(r, max_len):
                freq.update(toks)
    words = sorted(
        (w for w, c in freq.items() if c >= min_word_freq and w not in SPECIAL_TOKENS), key=lambda w: (-freq[w], w)
    )
    return {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *words])}


def sample_captions(record: ImageRecord, per_image: int, max_len: int, seed: int) -> list[list[str]]:
    """Choose ``per_image`` captions from :func:`caption_pool`, topping up by repetition if too few.

    The RNG is seeded from (seed, image id), so an image's choice does not depend on which other images
    were skipped; a caption longer than ``max_len`` is only used (truncated) when the image has no other.
    """
    rng = random.Random(f"{seed}:{record.image_id}")
    pool = caption_pool(record, max_len)
    if len(pool) >= per_image:
        return rng.sample(pool, per_image)
    return pool + rng.choices(pool, k=per_image - len(pool))


def encode_caption(tokens: Sequence[str], word_map: dict[str, int], max_len: int) -> list[int]:
    """``<start> w1 .. wn <end>`` padded with ``<pad>`` to ``max_len + 2`` ids."""
    unk = word_map["<unk>"]
    ids = [word_map["<start>"], *(word_map.get(w, unk) for w in tokens), word_map["<end>"]]
    return ids + [word_map["<pad>"]] * (max_len + 2 - len(ids))


# ------------------------------------------------------------------------------------------- images
def _decode_job(path: str, size: int) -> tuple[np.ndarray | None, str]:
    """An image decoded (H x W x 3) or ``None`` with the reason it could not be used."""
    try:
        return decode_image(path, size), ""
    except UNUSABLE_IMAGE_ERRORS as exc:
        return None, image_problem(path, exc)


# A worker's view of the parent's shared image slots (set by _start_worker; None: send images back by pipe).
_worker_slots: np.ndarray | None = None


def _load_jobs(size: int, jobs: list[tuple[str, int | None]]) -> list[tuple[np.ndarray | int | None, str]]:
    """Worker entry point for a few images at once (see :meth:`ImageDecoder.__call__`): each job's image
    (3 x size x size) is written into its shared slot (and the slot number returned) when it has one, else
    returned itself; ``(None, reason)`` for a file that could not be used.

    Images of one shape (most of a dataset's) are resized together, in one call of the resize kernel.
    """
    decoded = [_decode_job(path, size) for path, _ in jobs]
    results: list[tuple[np.ndarray | int | None, str]] = [(None, reason) for _, reason in decoded]
    same_shape: dict[tuple[int, ...], list[int]] = {}
    for k, (rgb, _) in enumerate(decoded):
        if rgb is not None:
            same_shape.setdefault(rgb.shape, []).append(k)
    for ks in same_shape.values():
        batch = np.stack([decoded[k][0] for k in ks]) if len(ks) > 1 else decoded[ks[0]][0][None]
        # numpy turns the kernel's channels-last output into channels-first in 0.6x of torch's copy_ time.
        for k, image in zip(ks, resize_images(batch, size).numpy()):
            slot = jobs[k][1]
            if slot is not None and _worker_slots is not None:
                _worker_slots[slot] = image
                results[k] = (slot, "")
            else:
                results[k] = (np.ascontiguousarray(image), "")
    return results


IMAGES_PER_TASK = 8
SLOTS_PER_WORKER = 4 * IMAGES_PER_TASK  # images a worker may decode ahead of the writer


# ------------------------------------------------------------------------------------------- writing
@dataclass
class Options:
    """What ``create_input_files`` should make (mirrors the command-line options)."""

    out: Path
    captions_per_image: int = 5
    min_word_freq: int = 5
    max_len: int = 50
    image_size: int = 256
    workers: int = 2
    seed: int = 0
    word_map: Path | None = None  # use this word map (and allow a set without training images)
    split: str | None = None  # put every image into this split
    start_method: str | None = None  # multiprocessing start method for the workers; None: the platform's default


def estimate_output_bytes(records: Sequence[ImageRecord], opt: Options) -> int:
    """Bytes the output files will take: N x 3 x S x S image bytes plus the captions and references."""
    per_image = 3 * opt.image_size**2 + opt.captions_per_image * (opt.max_len + 3) * 4
    # References are stored twice (tokens and raw text) as variable-length strings, ~16 bytes of heap index each.
    text = sum(len(raw.encode()) * 2 + 32 for r in records for raw in r.raw)
    return len(records) * per_image + text + (1 << 20)  # + HDF5 metadata and the word map


@contextlib.contextmanager
def _hdf5_for_writing(path: Path) -> Iterator[h5py.File]:
    """An HDF5 file open for writing that is closed cleanly even when a write failed (e.g. a full disk).

    Without a chunk cache, every write reaches the disk at once, so a full disk fails the write that caused it
    rather than ``close()``; a file whose close failed would otherwise be closed again when the interpreter
    exits, which segfaulted (exit 139).
    """
    h5 = new_hdf5(path, rdcc_nbytes=0)
    try:
        yield h5
    except BaseException:
        for _ in range(2):  # the first close may fail flushing metadata; the second releases the file
            with contextlib.suppress(Exception):
                h5.close()
        raise
    try:
        h5.close()
    except Exception:
        with contextlib.suppress(Exception):
            h5.close()
        raise


def write_split(
    h5_path: Path,
    split: str,
    records: list[ImageRecord],
    word_map: dict[str, int],
    opt: Options,
    decode: ImageDecoder,
) -> tuple[int, list[tuple[str, str]]]:
    """Write one split's HDF5 file; returns the number of images kept and the (file, reason) of skips."""
    n, s, c, width = len(records), opt.image_size, opt.captions_per_image, opt.max_len + 2
    skipped: list[tuple[str, str]] = []
    kept: list[ImageRecord] = []
    # Captions are collected in memory (COCO's 566k training captions: 118 MB) and written once at the end.
    captions = np.zeros((n * c, width), np.int32)
    caplens = np.zeros(n * c, np.int32)
    with _hdf5_for_writing(h5_path) as h5:
        h5.attrs.update(captions_per_image=c, max_len=opt.max_len, image_size=s, seed=opt.seed)
        images = h5.create_dataset("images", (n, 3, s, s), np.uint8, maxshape=(None, 3, s, s), chunks=(1, 3, s, s))
        results = decode((str(r.path) for r in records), s)
        for record, (array, reason) in tqdm(zip(records, results), total=n, desc=split, unit="img"):
            if array is None:
                skipped.append((str(record.path), reason))
                tqdm.write(f"skipped {record.path}: {reason}")
                continue
            i = len(kept)
            # One image is one uncompressed chunk, so its bytes are the chunk: written as they are, straight
            # from the worker's shared slot. h5py's dataset assignment (batched 32 images at a time) copied
            # each image twice and cost the writer more CPU than a worker spends decoding the image.
            if array.shape != (3, s, s) or array.dtype != np.uint8:  # raw bytes: h5py checks nothing here
                raise ValueError(f"{record.path}: decoded to {array.dtype} {array.shape}, expected uint8 (3, {s}, {s})")
            images.id.write_direct_chunk((i, 0, 0, 0), np.ascontiguousarray(array))
            chosen = sample_captions(record, c, opt.max_len, opt.seed)
            captions[i * c : (i + 1) * c] = [encode_caption(t, word_map, opt.max_len) for t in chosen]
            caplens[i * c : (i + 1) * c] = [len(t) + 2 for t in chosen]
            kept.append(record)
        images.resize(len(kept), axis=0)
        h5.create_dataset("captions", data=captions[: len(kept) * c])
        h5.create_dataset("caplens", data=caplens[: len(kept) * c])
        _write_references(h5, kept)
    return len(kept), skipped


def _write_references(h5: h5py.File, kept: list[ImageRecord]) -> None:
    """All captions of each kept image (for BLEU and the COCO metrics), ids, file names and boxes."""
    text = h5py.string_dtype()
    offsets = np.cumsum([0] + [len(r.tokens) for r in kept]).astype(np.int64)
    h5.create_dataset("reference_offsets", data=offsets)
    h5.create_dataset("references", data=[" ".join(t) for r in kept for t in r.tokens], dtype=text)
    h5.create_dataset("references_raw", data=[c for r in kept for c in r.raw], dtype=text)
    h5.create_dataset("image_ids", data=[r.image_id for r in kept], dtype=text)
    h5.create_dataset("filenames", data=[r.path.name for r in kept], dtype=text)
    if kept and all(r.objects is not None for r in kept):
        h5.create_dataset("objects", data=[json.dumps(r.objects) for r in kept], dtype=text)


STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


@contextlib.contextmanager
def _stop_signals_blocked() -> Iterator[None]:
    """Block Ctrl-C and SIGTERM in this thread (and threads and processes started here); they arrive after."""
    if not hasattr(signal, "pthread_sigmask"):  # Windows
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _start_worker(slots: np.ndarray | None = None) -> None:
    """Pool initialiser: leave Ctrl-C and SIGTERM to the parent (utils), then unblock them (see ImageDecoder);
    keep the shared image slots, if any."""
    global _worker_slots  # the worker process's own copy of the module: set once, at its start
    _worker_slots = slots
    ignore_signals_in_worker()
    # One thread each: the workers already use the cores; and GNU OpenMP's pool does not survive fork.
    import torch

    torch.set_num_threads(1)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


class ImageDecoder:
    """Decodes and resizes images in ``workers`` processes, in order (in this process for 1 worker).

    ``start_method`` None is "fork" on Linux (where Python 3.14 made "forkserver" the default) and the
    platform's default elsewhere ("spawn" on Windows and macOS, which have no safe fork). Workers ignore Ctrl-C
    and die quietly on SIGTERM: the parent stops them. A context manager: the workers are shut down on success
    and killed at once on an exception (an interruption).

    With fork and a known ``size``, workers write images into slots of an anonymous shared memory map made
    before they start, and send back only the slot's number. Sending each image (196 KB at 256 px) through
    the pool's pipe made workers wait whenever the parent held the GIL to write HDF5: preparing Flickr8k took
    twice as long. The map has no name, so nothing is left behind when the processes die, even by SIGKILL.

    The pool is ``concurrent.futures``' rather than ``multiprocessing.Pool``: the latter's worker-handler thread
    wakes whenever a result is waiting in the pipe and spins until the result thread has read it, which on 2
    cores took 1.1 s of the parent's GIL while preparing Flickr8k (8,000 images).
    """

    def __init__(self, workers: int, start_method: str | None = None, size: int | None = None) -> None:
        self.pool: ProcessPoolExecutor | None = None
        self.slots: np.ndarray | None = None
        self.count = min(workers, 61) if sys.platform == "win32" else workers  # the most the pool takes there
        self.workers: list[multiprocessing.process.BaseProcess] = []
        self._before: set[multiprocessing.process.BaseProcess] = set()
        self._unfinished: list[Future] = []  # tasks left running by a consumer that stopped early
        if workers <= 1:
            return
        if start_method is None and sys.platform.startswith("linux"):
            start_method = "fork"  # the shared slots need it; this process has no other thread yet
        self._before = set(multiprocessing.active_children())
        context = multiprocessing.get_context(start_method)
        forked = context.get_start_method() == "fork"
        if self.count > 2 and forked:
            # Forked after torch's import, workers share its pages; importing it themselves costs each about
            # 0.3 GB. For the default 2 workers that import overlaps with reading the captions and is worth it
            # (docs/benchmarks.md); for more, memory comes first.
            import torch  # noqa: F401
        if size and forked:
            count = SLOTS_PER_WORKER * self.count
            shared = mmap.mmap(-1, count * 3 * size * size)
            self.slots = np.frombuffer(shared, np.uint8).reshape(count, 3, size, size)
        try:
            self.pool = ProcessPoolExecutor(self.count, context, initializer=_start_worker, initargs=(self.slots,))
            # Forked workers all start with the first task: now, while this process has no other thread (tqdm's
            # monitor comes later), since forking a process with threads may deadlock it.
            self._submit(os.getpid)
        except BaseException:
            self._stop()  # e.g. the second fork failed: the first worker must not outlive us
            raise

    def _submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        # Workers start here (spawned ones one per task, while too few), with Ctrl-C and SIGTERM blocked: a
        # worker forked before its initializer ran would otherwise raise the parent's Terminated, with a
        # traceback; signals go to the main thread, which stops the pool.
        try:
            with _stop_signals_blocked():
                future = self.pool.submit(fn, *args)
        except BrokenProcessPool:  # a worker died since the last result
            self._raise_for_dead_worker()
        if len(self.workers) < self.count:
            self.workers = self._started_workers()
        return future

    def _started_workers(self) -> list[multiprocessing.process.BaseProcess]:
        return [p for p in multiprocessing.active_children() if p not in self._before]

    def __enter__(self) -> ImageDecoder:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if self.pool is None:
            return
        if exc_type is None:
            self.pool.shutdown()
            return
        self._stop()  # now, not after the queue: a worker may be busy with a huge image

    def _stop(self) -> None:
        """Kill the workers and let the pool go, once its manager thread has wound it down."""
        self.workers = self._started_workers()
        manager = getattr(self.pool, "_executor_manager_thread", None)  # shutdown forgets it (private: hence getattr)
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
        for p in self.workers:
            p.kill()
        _exit_codes(self.workers, every=True)
        # A worker killed while it wrote a result (images go through the pipe without shared slots) leaves the
        # pool's thread waiting for the rest of it, and Python's exit waits for that thread: closing this
        # process's copy of the pipe's write end (a private attribute, hence the care) ends the wait.
        writer = getattr(getattr(self.pool, "_result_queue", None), "_writer", None)
        if writer is not None:
            writer.close()
        # With its workers dead the manager thread closes the pool's pipes. Left running, it can do so while
        # Python's exit writes to its wake-up pipe (concurrent.futures checks that the pipe is open, then
        # writes, without a lock): "Exception ignored ... Bad file descriptor" after our one-line error. So it
        # is waited for here (milliseconds; bounded, should a pipe ever block it).
        if manager is not None:
            manager.join(timeout=10)

    def __call__(self, paths: Iterable[str], size: int) -> Iterator[tuple[np.ndarray | None, str]]:
        """``(image, "")`` or ``(None, reason)`` for each path, as :func:`_load_jobs`. An image may be a view of
        a shared slot: it is valid until the next item is asked for (copy it to keep it)."""
        slots = self.slots if self.slots is not None and self.slots.shape[1:] == (3, size, size) else None
        # Jobs i and i + len(slots) share a slot. Tasks go out in order, at most len(slots) images at once,
        # and the next one only once the oldest has been used: its slots are then free.
        per_task = min(IMAGES_PER_TASK, len(slots)) if slots is not None else IMAGES_PER_TASK
        in_flight = len(slots) // per_task if slots is not None else SLOTS_PER_WORKER * self.count // per_task
        numbered = enumerate(paths)

        def next_task() -> list[tuple[str, int | None]]:
            return [(path, i % len(slots) if slots is not None else None) for i, path in islice(numbered, per_task)]

        if self.pool is None:
            while task := next_task():
                yield from _load_jobs(size, task)
            return
        wait_for_futures(self._unfinished)  # an earlier call's tasks may still be writing into the slots
        pending: deque[Future] = deque()
        try:
            for task in iter(next_task, []):
                pending.append(self._submit(_load_jobs, size, task))
                if len(pending) == in_flight:
                    break
            while pending:
                for image, reason in self._result(pending[0]):
                    yield (slots[image] if isinstance(image, int) else image), reason
                pending.popleft()
                if task := next_task():
                    pending.append(self._submit(_load_jobs, size, task))
        finally:  # the consumer stopped early (or failed): what has not started never will
            self._unfinished = [f for f in pending if not f.cancel()]

    def _result(self, future: Future) -> list[tuple[np.ndarray | int | None, str]]:
        """The task's images; raises if a worker died."""
        while True:
            try:
                return future.result(timeout=1.0)
            except BrokenProcessPool:
                self._raise_for_dead_worker()
            except FutureTimeoutError:
                # A worker killed while it wrote a result leaves its future pending forever: look at them.
                if any(p.exitcode is not None for p in self.workers):
                    self._raise_for_dead_worker()

    def _raise_for_dead_worker(self) -> NoReturn:
        """Terminated if the workers died of SIGTERM, else a one-line CamEyeError with the exit status.

        SIGTERM sent to the whole process group (SLURM, Kubernetes) kills the workers; the parent's own
        Terminated can be lost when Python runs its handler inside a finalizer, so the workers' death says it.
        The pool sends SIGTERM to the workers left when one dies, so a death by anything else comes first.
        """
        codes = _exit_codes(self.workers)
        died = next((c for c in codes if c not in (None, -signal.SIGTERM)), None)
        if died is None and -signal.SIGTERM in codes:
            raise Terminated() from None
        if died == 0:  # its initializer failed: the worker printed why
            raise CamEyeError("an image-decoding worker process failed to start (see above)") from None
        status = "unknown" if died is None else died
        raise CamEyeError(
            f"an image-decoding worker process died (exit status {status}; out of memory?): try fewer --workers"
        ) from None


def _exit_codes(
    processes: list[multiprocessing.process.BaseProcess], every: bool = False, timeout: float = 5.0
) -> list[int | None]:
    """The exit codes of ``processes`` (None: still running) once one of them (``every``: all) has ended.

    An ended process may not be reaped yet, or be being reaped by the pool's thread, whose ``waitpid`` makes
    ours fail until it has stored the status in the shared Process object: so the codes are waited for.
    """
    if not processes:
        return []
    deadline = time.monotonic() + timeout
    ended = multiprocessing.connection.wait([p.sentinel for p in processes], timeout=timeout)
    awaited = processes if every else [p for p in processes if p.sentinel in ended]
    while any(p.exitcode is None for p in awaited) and time.monotonic() < deadline:
        time.sleep(0.01)
    return [p.exitcode for p in processes]


@contextlib.contextmanager
def _deferred_signals() -> Iterator[Callable[[], None]]:
    """Yield ``hold``: once called, Ctrl-C and SIGTERM wait until the block has ended, then take effect.

    The renames that publish a prepared dataset must not be split by a signal (a new test.hdf5 beside an
    old word map). Python runs signal handlers in the main thread only, so elsewhere this does nothing.
    """
    pending: list[int] = []
    saved: dict[int, Any] = {}

    def hold() -> None:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                saved[sig] = signal.signal(sig, lambda signum, frame: pending.append(signum))

    try:
        yield hold
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
        if pending:
            signal.raise_signal(pending[0])


def load_word_map(path: Path) -> dict[str, int]:
    """A word map given with ``--word-map``, checked; one line naming the file when it is not usable."""
    try:
        word_map = validate_word_map(read_json(path, "word map"))
    except CamEyeError as exc:
        raise CamEyeError(f"{path}: {exc}" if str(path) not in str(exc) else str(exc)) from None
    if len(word_map) == len(SPECIAL_TOKENS):
        raise CamEyeError(f"{path}: the word map has no words besides {', '.join(SPECIAL_TOKENS)}")
    return word_map


def assign_splits(records: list[ImageRecord], opt: Options) -> bool:
    """Apply ``--split`` and the evaluation-only rule in place; returns whether the set is evaluation-only.

    ``--split`` puts every image into that split. Without it, a source with no training image and a given
    word map is an evaluation-only set and goes whole to test. No training image without a word map is a
    one-line error: there would be nothing to build the vocabulary from.
    """
    if opt.split is not None:
        target = opt.split
    elif opt.word_map is not None and not any(r.split == "train" for r in records):
        target = "test"
    else:
        target = None
    for r in records:
        r.split = target or r.split
    eval_only = not any(r.split == "train" for r in records)
    if eval_only and opt.word_map is None:
        raise CamEyeError(
            "no training images: a training set needs some; to prepare a set for evaluation only, "
            "give the trained model's word map with --word-map"
        )
    return eval_only


def check_vocabulary(word_map: dict[str, int], records: Sequence[ImageRecord], opt: Options) -> None:
    """Refuse a vocabulary of special tokens only: the model could learn nothing but <unk>."""
    if len(word_map) > len(SPECIAL_TOKENS):
        return
    n = sum(len(caption_pool(r, opt.max_len)) for r in records if r.split == "train")
    raise CamEyeError(
        f"no word occurs {opt.min_word_freq} or more times in the {n} training captions, so the vocabulary "
        f"would be empty: lower --min-word-freq (now {opt.min_word_freq})"
    )


def _failed_reading(split: str, skipped: list[tuple[str, str]], out: Path) -> CamEyeError:
    example = f" (e.g. {skipped[0][0]}: {skipped[0][1]})" if skipped else ""
    return CamEyeError(
        f"none of the {len(skipped)} {split} images could be read{example}; nothing was written to {out} "
        "(is --images the right folder?)"
    )


def create_input_files(sources: Sequence[Path], image_folder: Path | None, opt: Options) -> dict[str, int]:
    """Read ``sources``, then write the word map and one HDF5 file per split atomically.

    Returns the number of images written per split. Raises CamEyeError (one line, nothing written) when the
    source is unusable, no training image (evaluation-only: no image) could be read, the vocabulary is empty or
    the output would not fit on the disk.
    """
    output_folder(opt.out, "--out", create=False)  # made when the files are written, not for a failed run
    # The workers start first: each imports torch (1.5-2.5 s) while this process reads the captions.
    with ImageDecoder(opt.workers, opt.start_method, opt.image_size) as decode:
        return _prepare(sources, image_folder, opt, decode)


def _prepare(sources: Sequence[Path], image_folder: Path | None, opt: Options, decode: ImageDecoder) -> dict[str, int]:
    """The work of :func:`create_input_files`, with its image decoder started."""
    given_map = load_word_map(opt.word_map) if opt.word_map is not None else None
    unnamed_split = opt.split or ("test" if given_map is not None else None)
    name, records = read_source(sources, image_folder, unnamed_split)
    where = f"{sources[0]}" + (f" (and {len(sources) - 1} more)" if len(sources) > 1 else "")
    records = keep_real_captions(drop_duplicates(records, where))  # an image without captions teaches nothing
    if not records:
        raise CamEyeError(f"{sources[0]}: no images with captions found")
    eval_only = assign_splits(records, opt)
    word_map = given_map or build_word_map(records, opt.min_word_freq, opt.max_len)
    check_vocabulary(word_map, records, opt)
    what = "evaluation-only set" if eval_only else f"vocabulary of {len(word_map)} words"
    print(f"{name}: {len(records)} images with captions, {what}")
    check_free_space(opt.out, estimate_output_bytes(records, opt), f"preparing {len(records)} images")
    counts: dict[str, int] = {}
    all_skipped: list[tuple[str, str]] = []
    # Renames happen in reverse order of entering, so the word map (entered first) is renamed last, with signals
    # held until all are done.
    with (
        _deferred_signals() as hold_signals,
        atomic_path(opt.out / "word_map.json") as word_map_tmp,
        atomic_path(opt.out / "train.hdf5") as train_tmp,
        atomic_path(opt.out / "val.hdf5") as val_tmp,
        atomic_path(opt.out / "test.hdf5") as test_tmp,
    ):
        for split, tmp in zip(SPLITS, (train_tmp, val_tmp, test_tmp)):
            split_records = [r for r in records if r.split == split]
            with disk_full_errors(opt.out / f"{split}.hdf5"):  # name this file, not the last one entered
                counts[split], skipped = write_split(tmp, split, split_records, word_map, opt, decode)
            all_skipped += skipped
            if split_records and not counts[split] and (split == "train" or eval_only):
                raise _failed_reading(split, skipped, opt.out)
        if given_map is not None:
            shutil.copyfile(opt.word_map, word_map_tmp)
        else:
            with open(word_map_tmp, "w", encoding="utf-8") as f:
                json.dump(word_map, f, indent=1)
        hold_signals()
    summary = ", ".join(f"{k} {v}" for k, v in counts.items())
    print(f"wrote {opt.out}: {summary} images; skipped {len(all_skipped)} unreadable file(s)")
    if eval_only:
        print(f"evaluation-only set: word map copied from {opt.word_map}")
    else:
        for split in ("val", "test"):
            if not counts[split]:
                print(f"warning: the {split} split is empty: {split}.hdf5 has no images", file=sys.stderr)
    return counts


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Prepare a captioning dataset (Karpathy JSON, Flickr8k folder or COCO annotations) "
        "as HDF5 images + encoded captions + a word map.",
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "sources",
        nargs="+",
        type=local_path,
        help="Karpathy dataset_*.json, a Flickr8k folder (with Flickr8k.token.txt), "
        "or one or more COCO captions_*.json files",
    )
    p.add_argument(
        "--images", type=local_path, default=None, help="image folder for JSON sources (default: the JSON's folder)"
    )
    p.add_argument("--out", type=local_path, required=True, help="output folder for {split}.hdf5 and word_map.json")
    p.add_argument("--captions-per-image", type=positive_int, default=5, help="captions kept per training image")
    p.add_argument(
        "--min-word-freq",
        type=positive_int,
        default=5,
        help="rarer training words become <unk> (ignored with --word-map)",
    )
    p.add_argument(
        "--max-len",
        type=positive_int,
        default=50,
        help="longest caption in words: longer captions are left out when the image has a shorter one, "
        "and cut to this length when it has none (all captions stay in the references)",
    )
    p.add_argument(
        "--image-size",
        type=positive_int,
        default=256,
        help="images are resized to this square size (the images take N x 3 x S x S bytes on disk)",
    )
    p.add_argument(
        "--workers",
        type=positive_int,
        default=2,
        help="processes that decode and resize images (2: each imports torch, 0.3 GB apiece, while this process "
        "reads the captions; more: they share this process's import)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for choosing captions per image")
    p.add_argument(
        "--word-map",
        type=local_path,
        default=None,
        help="use this word map (e.g. a trained model's word_map.json) instead of building one; it is copied to "
        "--out. A source without training images is then an evaluation-only set, all in one split (test "
        "unless --split says otherwise)",
    )
    p.add_argument(
        "--split",
        choices=SPLITS,
        default=None,
        help="put every image into this split; without it the source's own splits are used (COCO files by "
        "name: train -> train, val -> halved into val and test), or test for an evaluation-only set",
    )
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    handle_sigterm()
    opt = Options(
        out=args.out,
        captions_per_image=args.captions_per_image,
        min_word_freq=args.min_word_freq,
        max_len=args.max_len,
        image_size=args.image_size,
        workers=args.workers,
        seed=args.seed,
        word_map=args.word_map,
        split=args.split,
    )
    with cli_errors():
        try:
            create_input_files(args.sources, args.images, opt)
        except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM as Terminated
            how, status = ("terminated (SIGTERM)", 143) if isinstance(exc, Terminated) else ("interrupted", 130)
            print(f"{how} while preparing {opt.out}: nothing was half-written there; run again", file=sys.stderr)
            raise SystemExit(status) from None


if __name__ == "__main__":
    sys.exit(main())
