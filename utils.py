"""Small helpers shared by the CamEye scripts: atomic writes, seeding, word maps and one-line CLI errors.

Everything here is deliberately boring. The one rule it enforces is that a file that looks complete *is*
complete: every write goes to a temporary file in the destination folder and is renamed into place only
after it was flushed, so an interrupted run never leaves a truncated checkpoint, JSON or HDF5 file behind.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import gc
import io
import json
import os
import random
import re
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np

# torch is imported where it is used: create_input_files' parent process never needs it (its workers do), and
# importing it costs 1.5-2.5 s of start-up here plus 0.6 s of interpreter shutdown.
if TYPE_CHECKING:
    import h5py
    import torch

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIAL_TOKENS = (PAD, START, END, UNK)  # ids 0, 1, 2, 3 in every word map


# Words that carry no content of their own: a caption ending in one is cut off (SCST's known failure), and a
# bigram ending in one ("in a") may repeat in a caption where one ending in a content word may not.
FUNCTION_WORDS = frozenset("a an the of with in on at to and or for from by his her their its is are into".split())


def _read_umask() -> int:
    """The process umask, read once at import (setting it is process-wide, so it is not done per write)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


class CamEyeError(Exception):
    """An error caused by the user's input (a bad file, option or checkpoint), reported in one line."""


class Terminated(KeyboardInterrupt):
    """Raised in the main thread when the process receives SIGTERM (how SLURM, Kubernetes and ``kill`` stop
    jobs), once :func:`handle_sigterm` is installed. A subclass of KeyboardInterrupt, so every ``finally``
    block and every handler of Ctrl-C runs for it too: temporary files are removed, checkpoints written."""


def fail(message: str) -> NoReturn:
    """Print ``error: message`` to stderr and exit with status 2, without a traceback."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


@contextlib.contextmanager
def cli_errors() -> Iterator[None]:
    """Turn :class:`CamEyeError` (bad input) into a one-line message and exit status 2.

    Output that the terminal's encoding cannot show (an emoji in a file name on a cp1252 console, as Windows
    writes redirected output) is escaped (\\U0001f600) instead of stopping the program with UnicodeEncodeError.
    """
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    try:
        yield
    except CamEyeError as exc:
        fail(str(exc))
    except Terminated:
        print("terminated (SIGTERM)", file=sys.stderr)
        raise SystemExit(143) from None
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except MemoryError:
        fail("out of memory: lower --batch-size (or --workers)")
    except RuntimeError as exc:  # torch.OutOfMemoryError (CUDA) and the CPU allocator's failure
        torch = sys.modules.get("torch")  # a RuntimeError without torch loaded is not torch's
        if (torch and isinstance(exc, torch.OutOfMemoryError)) or "can't allocate memory" in str(exc):
            fail(f"out of memory ({str(exc).splitlines()[0][:120]}): lower --batch-size")
        raise


_SIGTERM_OWNER = [0]  # the PID that installed handle_sigterm (a list, so the handler reads it without a global)


def _raise_terminated(signum, frame) -> None:
    if os.getpid() != _SIGTERM_OWNER[0]:
        # A forked child (pool or DataLoader worker) inherited the handler: die as SIGTERM would have made it;
        # the parent cleans up.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        return
    raise Terminated()


def handle_sigterm() -> None:
    """Turn SIGTERM into a :class:`Terminated` exception in the main thread (command-line entry points only).

    Without this, SIGTERM kills Python without running ``finally`` blocks, leaving temporary files behind.
    Forked children that inherit the handler keep SIGTERM's default action instead.
    """
    _SIGTERM_OWNER[0] = os.getpid()
    signal.signal(signal.SIGTERM, _raise_terminated)


def ignore_signals_in_worker() -> None:
    """Pool-worker initialiser: leave SIGINT/SIGTERM handling to the parent, which stops the pool.

    Ctrl-C and ``kill -TERM -PGID`` reach every process of the group; a worker that raised KeyboardInterrupt
    mid-task would print a traceback (and BrokenPipe errors as the parent closes the pipes). The parent
    terminates its workers itself, so they ignore SIGINT and keep SIGTERM's default (a silent exit).
    On Linux a worker also dies with its parent (PR_SET_PDEATHSIG): a parent killed by SIGKILL would otherwise
    leave it to find the result pipe broken and print a BrokenPipeError traceback.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            pr_set_pdeathsig = 1  # from linux/prctl.h
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


# --------------------------------------------------------------------------------------------------- writes
# Temporary files are named ".<target>.<host>-pid<PID>.<random>.tmp": the owner's host and PID let a later run
# remove what a killed run (SIGKILL, power loss) left behind without touching the files of a run that is still
# going, also on a folder that other machines (a cluster's shared disk) or containers write to: only this
# host's temporaries are judged, by whether their PID is alive here.
_HOST = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:40] or "host"
_TEMPORARY = re.compile(r"^\.(?P<target>.+)\.(?P<host>[A-Za-z0-9_-]+)-pid(?P<pid>\d+)\.[^.]+\.tmp$")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def remove_stale_temporaries(folder: str | Path, target: str | None = None) -> list[Path]:
    """Delete temporary files of :func:`atomic_path` in ``folder`` whose owning process is gone.

    Only files named for ``target`` when it is given. Returns the removed paths.
    """
    removed = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            m = _TEMPORARY.match(entry.name)
            ours = m and m["host"] == _HOST and (target is None or m["target"] == target)
            if ours and not _process_alive(int(m["pid"])):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
    return removed


def mount_point(path: str | Path) -> Path:
    """The mount point of the file system holding ``path`` (or its nearest existing parent)."""
    p = Path(path).resolve()
    while not p.exists():
        p = p.parent
    while not os.path.ismount(p):
        p = p.parent
    return p


def is_disk_full(exc: BaseException) -> bool:
    """True for the OS's "no space left" (and quota) errors, also when h5py re-raises them as text."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc).lower()
    return "no space left" in text or "disk quota exceeded" in text


@contextlib.contextmanager
def disk_full_errors(path: str | Path) -> Iterator[None]:
    """Turn a full disk while writing ``path`` into one line: "no space left on DEVICE while writing FILE"."""
    try:
        yield
    except (OSError, RuntimeError) as exc:  # torch.save reports a full disk as RuntimeError
        if is_disk_full(exc):
            raise CamEyeError(f"no space left on {mount_point(path)} while writing {path}") from None
        raise


def check_free_space(folder: str | Path, needed_bytes: int, what: str) -> None:
    """Refuse to start a long job whose output (``needed_bytes``, estimated) would not fit in ``folder``."""
    free = shutil.disk_usage(mount_point(folder)).free
    if needed_bytes > free:
        raise CamEyeError(
            f"{what} needs about {_size(needed_bytes)} but only {_size(free)} is free "
            f"on {mount_point(folder)}: free some space or choose another folder"
        )


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


_CLEANED: set[tuple[int, str]] = set()  # (process, folder) pairs whose stale temporaries were removed


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    The temporary file lives in the same folder so the final ``os.replace`` is an atomic rename on the same
    file system. On any exception (SIGTERM too, with :func:`handle_sigterm`) the temporary file is removed and
    ``path`` is left untouched; a full disk becomes a one-line :class:`CamEyeError`. The first write into a
    folder (per process) removes the temporaries that killed processes of this host left there.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = (os.getpid(), str(path.parent.resolve()))
    if folder not in _CLEANED:  # once per folder and process: a scan per write would be quadratic in files
        remove_stale_temporaries(path.parent)
        _CLEANED.add(folder)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_HOST}-pid{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; the result should look like open()'s
    try:
        with disk_full_errors(path):
            yield tmp_path
            os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def new_hdf5(tmp: str | Path, **kwargs: Any) -> h5py.File:
    """``h5py.File(tmp, "w", **kwargs)`` for an :func:`atomic_path` temporary, without truncating it.

    The temporary exists, empty. h5py's "w" opens it with O_TRUNC, and ext4 (``auto_da_alloc``, its guard for
    files rewritten by truncation) then writes the whole file out inside ``close()``: 0.45-0.7 s blocked for
    Flickr8k's 1.2 GB train.hdf5. The empty file is removed and made afresh instead, with "x" (O_EXCL: nothing
    that appeared under the name in between is followed or overwritten); the kernel writes it back in its own
    time. Raises ``FileExistsError`` if the name was taken in between.
    """
    import h5py  # here: most tools that import utils never write HDF5

    os.unlink(tmp)
    return h5py.File(tmp, "x", **kwargs)


def write_json(obj: Any, path: str | Path) -> None:
    """Write ``obj`` as JSON atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1)
            f.flush()
            os.fsync(f.fileno())


def save_torch(obj: Any, path: str | Path) -> None:
    """``torch.save`` atomically and durably (used for checkpoints).

    The checkpoint is serialised in memory first: torch's zip writer turns a full disk into an opaque
    "unexpected pos" RuntimeError, while a plain write raises the OS's "no space left", which
    :func:`atomic_path` reports in one line.
    """
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())


def read_json(path: str | Path, what: str = "JSON file") -> Any:
    """Read a JSON file, turning a missing or malformed file into a one-line :class:`CamEyeError`."""
    path = Path(path)
    if not path.is_file():
        raise CamEyeError(f"{what} not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CamEyeError(f"{what} {path} is not valid JSON: {exc}") from None


# ---------------------------------------------------------------------------------------------- randomness
def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and PyTorch (all devices) so a run can be repeated."""
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def get_rng_state() -> dict[str, Any]:
    """All RNG states as tensors and plain lists, so they survive ``torch.load(weights_only=True)``."""
    import torch

    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": list(random.getstate()[1]),
        "python_pos": random.getstate()[2],
        "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        # NumPy's legacy generator caches the second of each pair of normal draws; without it the first
        # np.random.randn() after a restore would differ from the one the saved run would have drawn.
        "numpy_gauss": [int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the states saved by :func:`get_rng_state`."""
    import torch

    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    has_gauss, cached_gauss = state.get("numpy_gauss", (0, 0.0))  # absent in states saved before the fix
    np.random.set_state(
        ("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], int(has_gauss), float(cached_gauss))
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------- word maps
def validate_word_map(word_map: Any) -> dict[str, int]:
    """Check that ``word_map`` maps words to the ids 0..V-1 with the special tokens at 0..3."""
    if not isinstance(word_map, dict) or not word_map:
        raise CamEyeError("word map must be a non-empty JSON object of word -> id")
    # bool is a subclass of int: JSON true/false must not pass as the ids 1/0.
    ints = all(isinstance(v, int) and not isinstance(v, bool) for v in word_map.values())
    ids = sorted(word_map.values()) if ints else None
    if ids != list(range(len(word_map))) or not all(isinstance(k, str) for k in word_map):
        raise CamEyeError("word map ids must be the integers 0..V-1, one per word")
    for i, tok in enumerate(SPECIAL_TOKENS):
        if word_map.get(tok) != i:
            raise CamEyeError(f"word map must map {tok} to {i}")
    return word_map


def decode_caption(ids: Sequence[int], rev_word_map: Sequence[str]) -> list[str]:
    """Turn word ids into words, stopping at ``<end>`` and dropping ``<start>``/``<pad>``."""
    words = []
    for i in ids:
        i = int(i)
        if i == 2:  # <end>
            break
        if i in (0, 1):  # <pad>, <start>
            continue
        words.append(rev_word_map[i])
    return words


def reverse_word_map(word_map: dict[str, int]) -> list[str]:
    """The list ``id -> word`` for a validated word map."""
    rev = [""] * len(word_map)
    for w, i in word_map.items():
        rev[i] = w
    return rev


def select_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else the CPU; anything else is passed to ``torch.device``."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise CamEyeError(f"unknown device {name!r}: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CamEyeError("--device cuda was asked for but CUDA is not available on this machine")
    return device


def freeze_imported_objects() -> None:
    """Hide everything made so far (modules, torch's operator tables) from Python's cyclic garbage collector.

    Importing torch and torchvision leaves 330,000 objects that live until exit; every full collection walks
    them, and so do the collections at interpreter exit: 0.55 -> 0.25 s of caption.py's process wall time on
    this 2-core machine. It also keeps forked DataLoader workers from copying memory pages only to update
    those objects' GC headers, the use ``gc.freeze`` documents. Called in the scripts' ``__main__`` blocks,
    after their imports: a test calling ``main()`` in-process must not freeze its own objects (and garbage).
    """
    gc.freeze()


def keep_freed_memory() -> bool:
    """Let glibc's malloc keep freed memory for reuse (Linux); returns whether it was set.

    By default glibc serves big blocks with fresh mmaps and gives freed memory back to the kernel, so a CNN
    that allocates tens of MB per layer pays for page faults and zeroing on every image, more time in the
    kernel than in PyTorch (docs/benchmarks.md has the figures). This is what PyTorch's CPU tuning
    guide gets by swapping in jemalloc or tcmalloc, set from inside the process for our command-line tools.
    The price: each malloc arena of the process (and of forked DataLoader workers) may hold up to 1 GB of
    freed memory instead of returning it, so only command-line entry points call this, never a library call.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
        # 32 MB is the largest mmap threshold glibc accepts; a fixed one also stops it adapting downwards.
        return bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))
    except (OSError, AttributeError):  # not glibc (e.g. musl): leave the allocator alone
        return False


# ------------------------------------------------------------------------------------------- command lines
DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "checkpoints" / "flickr8k" / "cameye-flickr8k.pt"


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (argparse turns the error into a one-line usage message)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")  # scheme://, as in https://, s3://, file:///


def local_path(text: str) -> Path:
    """argparse type for a file or folder on this machine: ``Path(text)``, refusing a URL and an empty text.

    Judged on the text as typed: ``Path`` folds "https://host/x.jpg" into "https:/host/x.jpg", which then
    reads as a missing local file. Raises ``argparse.ArgumentTypeError``, which argparse prints as one usage
    error naming the argument: "argument --checkpoint: https://host/m.pt: URLs are not read: download the
    file first".
    """
    if _URL.match(text):
        raise argparse.ArgumentTypeError(f"{text}: URLs are not read: download the file first")
    if not text:
        raise argparse.ArgumentTypeError("an empty path: give a file or folder")
    return Path(text)


def output_folder(path: str | Path, what: str, create: bool = True) -> Path:
    """``path`` as a folder that can be written in, made (with its parents) when ``create``; returns it.

    ``create=False`` only checks, for a tool that should leave nothing behind when it fails before writing
    (the folder is then made by :func:`atomic_path`). ``what`` names the option in the one-line
    :class:`CamEyeError` raised when the folder cannot be used: "--out must be a folder, but X is a file";
    "--out X/sub: cannot make this folder: X is a file"; "...: no permission to write in P"; or the OS's reason
    (a read-only file system, a full disk).
    """
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            kind = "a file" if path.is_file() else "not a folder"
            raise CamEyeError(f"{what} must be a folder, but {path} is {kind}")
        if not os.access(path, os.W_OK | os.X_OK):
            raise CamEyeError(f"{what} {path}: no permission to write in it")
        return path
    parent = path.parent
    while not parent.exists() and parent != parent.parent:  # exists() is False below a file, too
        parent = parent.parent
    problem = None
    if not parent.is_dir():
        problem = f"{parent} is {'a file' if parent.is_file() else 'not a folder'}"
    elif not os.access(parent, os.W_OK | os.X_OK):
        problem = f"no permission to write in {parent}"
    elif create:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except PermissionError:
            problem = f"no permission to write in {parent}"
        except OSError as exc:  # a dangling link in the way, a read-only file system, a full disk
            problem = (exc.strerror or str(exc)).lower()
    if problem:
        raise CamEyeError(f"{what} {path}: cannot make this folder: {problem}")
    return path
