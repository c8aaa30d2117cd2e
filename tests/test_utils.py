"""Tests for utils.py: atomic writes, JSON helpers, word maps, RNG state round trips, one-line CLI errors
and the allocator setting."""

from __future__ import annotations

import argparse
import errno
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import utils
from decoding import add_decoding_arguments
from utils import (
    DEFAULT_CHECKPOINT,
    SPECIAL_TOKENS,
    CamEyeError,
    atomic_path,
    cli_errors,
    decode_caption,
    fail,
    get_rng_state,
    non_negative_int,
    positive_int,
    read_json,
    reverse_word_map,
    save_torch,
    seed_everything,
    select_device,
    set_rng_state,
    validate_word_map,
    write_json,
)

ROOT = Path(__file__).resolve().parents[1]


def listing(folder):
    return sorted(p.name for p in folder.iterdir())


# ------------------------------------------------------------------------------------------------ writes
def test_atomic_path_replaces_the_file_on_success(tmp_path):
    target = tmp_path / "sub" / "file.bin"  # parent folders are created
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp != target
        tmp.write_bytes(b"new")
        assert not target.exists()  # nothing visible until the block completes
    assert target.read_bytes() == b"new"
    assert listing(target.parent) == ["file.bin"]


def test_atomic_path_leaves_the_old_file_and_no_temp_file_when_the_block_raises(tmp_path):
    target = tmp_path / "file.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half written")
            raise RuntimeError("boom")
    assert target.read_bytes() == b"old"
    assert listing(tmp_path) == ["file.bin"]


def test_atomic_path_cleans_up_when_nothing_existed(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(tmp_path / "new.json"):
            raise KeyboardInterrupt
    assert listing(tmp_path) == []


def test_write_json_read_json_round_trip(tmp_path):
    obj = {"<pad>": 0, "words": ["a", "é", "日本"], "nested": {"x": 1.5, "y": None, "z": True}}
    write_json(obj, tmp_path / "a.json")
    assert read_json(tmp_path / "a.json") == obj
    assert listing(tmp_path) == ["a.json"]
    write_json([1, 2], tmp_path / "a.json")  # overwrites
    assert read_json(tmp_path / "a.json") == [1, 2]


@pytest.mark.parametrize("content", [b'{"a": 1,', b"", b"\xff\xfe\x00\x01", b"{'single': 'quotes'}"])
def test_read_json_malformed_is_a_one_line_cameye_error(tmp_path, content):
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    with pytest.raises(CamEyeError, match="word map .* is not valid JSON") as info:
        read_json(path, "word map")
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_read_json_missing_file(tmp_path):
    with pytest.raises(CamEyeError, match="config not found: .*nope.json"):
        read_json(tmp_path / "nope.json", "config")


def test_save_torch_is_atomic(tmp_path):
    save_torch({"w": torch.arange(3)}, tmp_path / "ckpt.pt")
    assert torch.equal(torch.load(tmp_path / "ckpt.pt", weights_only=True)["w"], torch.arange(3))
    with pytest.raises(Exception):  # noqa: B017 - whatever pickling raises, the old checkpoint survives
        save_torch({"bad": lambda: None}, tmp_path / "ckpt.pt")
    assert torch.equal(torch.load(tmp_path / "ckpt.pt", weights_only=True)["w"], torch.arange(3))
    assert listing(tmp_path) == ["ckpt.pt"]


# ------------------------------------------------------------------------------------------- word maps
def good_map():
    return {"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": 3, "dog": 4, "cat": 5}


def test_validate_word_map_accepts_a_good_map():
    assert validate_word_map(good_map()) == good_map()
    assert validate_word_map(dict(zip(SPECIAL_TOKENS, range(4))))


@pytest.mark.parametrize(
    "word_map, message",
    [
        ([], "non-empty JSON object"),
        ({}, "non-empty JSON object"),
        ({**good_map(), "cat": 4}, "0..V-1"),  # duplicate id
        ({**good_map(), "cat": 7}, "0..V-1"),  # gap
        ({**good_map(), "cat": "5"}, "0..V-1"),  # string id
        ({**good_map(), "cat": 5.0}, "0..V-1"),  # float id
        ({**good_map(), "<pad>": False, "<start>": True}, "0..V-1"),  # JSON booleans are not ids
        ({**good_map(), 6: 6}, "0..V-1"),  # non-string word
        ({"<start>": 0, "<pad>": 1, "<end>": 2, "<unk>": 3}, "map <pad> to 0"),
        ({"<pad>": 0, "<start>": 1, "<end>": 2, "dog": 3}, "map <unk> to 3"),
    ],
    ids=[
        "list",
        "empty",
        "duplicate id",
        "gap",
        "string id",
        "float id",
        "bool ids",
        "int key",
        "swapped specials",
        "missing unk",
    ],
)
def test_validate_word_map_rejects_bad_maps(word_map, message):
    with pytest.raises(CamEyeError, match=message):
        validate_word_map(word_map)


def test_decode_and_reverse_word_map():
    rev = reverse_word_map(good_map())
    assert rev == ["<pad>", "<start>", "<end>", "<unk>", "dog", "cat"]
    assert decode_caption([1, 4, 3, 5, 2, 4, 0], rev) == ["dog", "<unk>", "cat"]
    assert decode_caption(torch.tensor([0, 1, 5, 0]), rev) == ["cat"]


# ---------------------------------------------------------------------------------------------- RNG
@pytest.fixture(autouse=True)
def keep_global_rng_state():
    """These tests reseed the global generators; put them back so other tests are unaffected."""
    saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    yield
    random.setstate(saved[0])
    np.random.set_state(saved[1])
    torch.set_rng_state(saved[2])


def draw():
    return (
        [random.random() for _ in range(3)] + [random.gauss(0, 1) for _ in range(3)],
        np.random.rand(3).tolist() + np.random.randn(3).tolist(),
        torch.rand(3).tolist() + torch.randn(3).tolist(),
    )


def advance_with_cached_gaussians():
    # An odd number of normal draws leaves a cached second value in Python's and NumPy's generators.
    random.gauss(0, 1)
    np.random.randn(1)
    torch.randn(1)


def test_rng_state_round_trip():
    seed_everything(123)
    advance_with_cached_gaussians()
    state = get_rng_state()
    expected = draw()
    advance_with_cached_gaussians()
    draw()
    set_rng_state(state)
    assert draw() == expected


def test_rng_state_survives_torch_save_and_weights_only_load(tmp_path):
    seed_everything(7)
    advance_with_cached_gaussians()
    save_torch({"rng": get_rng_state()}, tmp_path / "state.pt")
    expected = draw()
    seed_everything(99)
    set_rng_state(torch.load(tmp_path / "state.pt", weights_only=True)["rng"])
    assert draw() == expected


def test_seed_everything_repeats():
    seed_everything(5)
    first = draw()
    seed_everything(5)
    assert draw() == first


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_errors_turns_cameye_error_into_one_line_and_status_2(capsys):
    with pytest.raises(SystemExit) as info:
        with cli_errors():
            raise CamEyeError("the word map is broken")
    assert info.value.code == 2
    assert capsys.readouterr().err == "error: the word map is broken\n"
    with pytest.raises(SystemExit) as info:
        fail("plain failure")
    assert info.value.code == 2 and capsys.readouterr().err == "error: plain failure\n"
    with pytest.raises(ValueError):  # other errors are bugs: they keep their traceback
        with cli_errors():
            raise ValueError("a bug")


def test_select_device():
    assert select_device("cpu") == torch.device("cpu")
    assert select_device("auto").type in ("cpu", "cuda")
    with pytest.raises(CamEyeError, match="unknown device"):
        select_device("nonsense")
    if not torch.cuda.is_available():
        with pytest.raises(CamEyeError, match="CUDA is not available"):
            select_device("cuda")


# A fresh process allocates a 20 MB tensor (CNN activations are this size), frees it, and prints glibc's
# mallinfo2 before the free and after it: bytes in mmapped blocks (hblkhd) and in the reusable heap (arena).
_MALLINFO_SCRIPT = """
import ctypes, sys, torch
from utils import keep_freed_memory
try:
    libc = ctypes.CDLL("libc.so.6")
    mallinfo2 = libc.mallinfo2
except (OSError, AttributeError):
    sys.exit(print("unsupported: not glibc 2.33 or newer (no libc.so.6 with mallinfo2)"))
class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
mallinfo2.restype = Info
if sys.argv[1] == "keep" and not keep_freed_memory():
    sys.exit(print("unsupported: mallopt refused the settings"))
block = torch.ones(5 << 20)
held = mallinfo2()
del block
freed = mallinfo2()
print(held.hblkhd, held.arena, freed.arena)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="keep_freed_memory tunes glibc's malloc (Linux)")
def test_keep_freed_memory_serves_big_blocks_from_the_heap_and_keeps_them():
    def mallinfo(mode: str) -> list[int]:
        run = subprocess.run(
            [sys.executable, "-c", _MALLINFO_SCRIPT, mode], capture_output=True, text=True, cwd=ROOT, check=True
        )
        if run.stdout.startswith("unsupported"):
            pytest.skip(run.stdout.strip())
        return [int(v) for v in run.stdout.split()]

    mb20 = 20 << 20
    mmapped, _, _ = mallinfo("default")
    if mmapped < mb20:  # e.g. jemalloc preloaded, or MALLOC_MMAP_THRESHOLD_ set: nothing left to show
        pytest.skip("this process's allocator already serves 20 MB blocks from its heap")
    mmapped, heap_held, heap_after_free = mallinfo("keep")
    assert mmapped < mb20 and heap_held >= mb20, "the block must come from the heap"
    assert heap_after_free >= mb20, "freeing it must keep the memory for the next block"


def test_word_map_json_round_trip_is_valid(tmp_path):
    write_json(good_map(), tmp_path / "word_map.json")
    assert validate_word_map(read_json(tmp_path / "word_map.json")) == good_map()
    assert json.loads((tmp_path / "word_map.json").read_text()) == good_map()


# ------------------------------------------------------------------------------------------- command lines
def test_decoding_arguments_defaults_and_one_line_errors_for_bad_counts(capsys):
    parser = argparse.ArgumentParser(prog="tool")
    add_decoding_arguments(parser)
    args = parser.parse_args([])
    assert (args.checkpoint, args.beam_size, args.length_penalty, args.max_len, args.device) == (
        DEFAULT_CHECKPOINT,
        3,
        0.5,
        50,
        "auto",
    )
    assert parser.parse_args(["--beam-size", "1", "--max-len", "7"]).max_len == 7
    for bad in (["--beam-size", "0"], ["--max-len", "-2"], ["--beam-size", "two"]):
        with pytest.raises(SystemExit) as exc:
            parser.parse_args(bad)
        assert exc.value.code == 2
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert error.startswith(f"tool: error: argument {bad[0]}: "), error
    assert positive_int("4") == 4 and non_negative_int("0") == 0
    with pytest.raises(argparse.ArgumentTypeError, match="must be 0 or more"):
        non_negative_int("-1")


# ------------------------------------------------------------------------- temporaries, full disks, signals
def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_atomic_path_removes_temporaries_of_dead_processes_only(tmp_path: Path) -> None:
    """Issue 9: a killed run left full-size hidden temporaries that later runs never removed. The first write
    into a folder removes this host's temporaries whose process is gone; a live process's, and another
    machine's on a shared disk, stay."""
    host = utils._HOST
    stale = tmp_path / f".out.hdf5.{host}-pid{_dead_pid()}.abc123.tmp"
    live = tmp_path / f".out.hdf5.{host}-pid{os.getppid()}.def456.tmp"  # a process that is still running
    other = tmp_path / f".other.json.{host}-pid{_dead_pid()}.ghi789.tmp"  # another target of a dead run
    elsewhere = tmp_path / f".out.hdf5.otherhost-pid{_dead_pid()}.jkl012.tmp"  # another machine's (shared disk)
    for p in (stale, live, other, elsewhere):
        p.write_bytes(b"x" * 100)
    with utils.atomic_path(tmp_path / "out.hdf5") as tmp:
        assert f".{host}-pid{os.getpid()}." in tmp.name
        tmp.write_bytes(b"new")
    assert not stale.exists() and not other.exists() and live.exists() and elsewhere.exists()
    assert (tmp_path / "out.hdf5").read_bytes() == b"new"
    assert utils.remove_stale_temporaries(tmp_path) == []


def test_a_full_disk_inside_atomic_path_is_one_line_and_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "metrics.json"
    target.write_text("old")
    with pytest.raises(utils.CamEyeError) as info:
        with utils.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise OSError(errno.ENOSPC, "No space left on device")
    message = str(info.value)
    assert message == f"no space left on {utils.mount_point(tmp_path)} while writing {target}"
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_check_free_space_refuses_what_does_not_fit(tmp_path: Path) -> None:
    utils.check_free_space(tmp_path, 1, "a tiny file")
    with pytest.raises(utils.CamEyeError, match="needs about .* GB but only .* GB is free"):
        utils.check_free_space(tmp_path, 1 << 62, "a huge file")


@pytest.mark.parametrize(
    ("error", "status", "says"),
    [
        (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 43 GB"), 2, "--batch-size"),
        (MemoryError(), 2, "--batch-size"),
        (utils.Terminated(), 143, "terminated"),
        (KeyboardInterrupt(), 130, "interrupted"),
    ],
)
def test_cli_errors_turns_failures_into_one_line(error, status: int, says: str, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        with utils.cli_errors():
            raise error
    assert info.value.code == status
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and says in err, err


def test_sigterm_becomes_terminated_so_finally_blocks_run(tmp_path: Path) -> None:
    script = (
        "import os, signal, utils\n"
        "utils.handle_sigterm()\n"
        f"with utils.cli_errors(), utils.atomic_path({str(tmp_path / 'out.bin')!r}) as tmp:\n"
        "    tmp.write_bytes(b'x' * 1000)\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 143 and result.stderr == "terminated (SIGTERM)\n", result.stderr
    assert list(tmp_path.iterdir()) == []


def test_new_hdf5_writes_an_atomic_temporary_afresh(tmp_path: Path) -> None:
    """Issue 10: HDF5 files are made afresh at atomic_path's temporary (no O_TRUNC of the empty file, which
    made ext4 write 1.2 GB out inside close()); the result is renamed into place with open()'s permissions."""
    import h5py

    target = tmp_path / "train.hdf5"
    with utils.atomic_path(target) as tmp, utils.new_hdf5(tmp, rdcc_nbytes=0) as h5:
        h5.create_dataset("x", data=np.arange(5))
    with h5py.File(target, "r") as h5:
        assert h5["x"][()].tolist() == [0, 1, 2, 3, 4]
    assert target.stat().st_mode & 0o777 == 0o666 & ~utils._UMASK
    assert list(tmp_path.iterdir()) == [target]


def test_new_hdf5_does_not_follow_what_appeared_at_the_temporary_name(tmp_path: Path, monkeypatch) -> None:
    """Made with O_EXCL: a link put where the temporary was is refused, not followed to overwrite its target."""
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    tmp = tmp_path / ".out.hdf5.tmp"
    tmp.write_bytes(b"")
    unlink = os.unlink
    # The race, made certain: the link appears between the removal and the creation.
    monkeypatch.setattr(os, "unlink", lambda p: (unlink(p), Path(p).symlink_to(victim)))
    with pytest.raises(FileExistsError):
        utils.new_hdf5(tmp)
    assert victim.read_text() == "keep me"


# ------------------------------------------------------------------------------------------- paths given
@pytest.mark.parametrize("text", ["https://example.com/x.jpg", "http://a/b.pt", "s3://bucket/data", "file:///tmp/x"])
def test_local_path_refuses_urls_naming_them_as_typed(text):
    """Issue 21: `caption.py https://example.com/x.jpg` said "https:/example.com/x.jpg: file not found"
    (Path folds the double slash) and nothing about URLs."""
    with pytest.raises(argparse.ArgumentTypeError) as info:
        utils.local_path(text)
    assert str(info.value) == f"{text}: URLs are not read: download the file first"


def test_local_path_keeps_local_paths_and_refuses_an_empty_one():
    assert utils.local_path("data/a b:c.jpg") == Path("data/a b:c.jpg")
    assert utils.local_path("C:\\photos\\x.jpg") == Path("C:\\photos\\x.jpg")
    with pytest.raises(argparse.ArgumentTypeError, match="an empty path"):
        utils.local_path("")


def test_local_path_as_an_argparse_type_is_one_usage_error(capsys):
    p = argparse.ArgumentParser(prog="tool")
    p.add_argument("source", type=utils.local_path)
    with pytest.raises(SystemExit) as info:
        p.parse_args(["https://example.com/x.jpg"])
    assert info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "tool: error: argument source: https://example.com/x.jpg: URLs are not read: download the file first"
    )


# ------------------------------------------------------------------------------------------ output folders
def test_output_folder_made_or_checked(tmp_path):
    assert utils.output_folder(tmp_path / "a" / "b", "--out") == tmp_path / "a" / "b"
    assert (tmp_path / "a" / "b").is_dir()
    assert utils.output_folder(tmp_path / "c" / "d", "--out", create=False) == tmp_path / "c" / "d"
    assert not (tmp_path / "c").exists()  # checked only: nothing is made before the work starts


@pytest.mark.parametrize("create", [True, False], ids=["made", "checked"])
@pytest.mark.parametrize("case", ["a file", "a file as a parent", "a file as a grandparent"])
def test_output_folder_that_cannot_be_one_is_a_one_line_error(tmp_path, case, create):
    """Issue 21: `--out FILE/sub` was a NotADirectoryError traceback, `--out FILE` a FileExistsError one."""
    (tmp_path / "file").write_text("x")
    out = {"a file": "file", "a file as a parent": "file/sub", "a file as a grandparent": "file/sub/sub"}[case]
    with pytest.raises(CamEyeError) as info:
        utils.output_folder(tmp_path / out, "--out", create=create)
    if case == "a file":
        assert str(info.value) == f"--out must be a folder, but {tmp_path / 'file'} is a file"
    else:
        assert str(info.value) == f"--out {tmp_path / out}: cannot make this folder: {tmp_path / 'file'} is a file"


@pytest.mark.parametrize("create", [True, False], ids=["made", "checked"])
def test_output_folder_without_permission_is_a_one_line_error(tmp_path, monkeypatch, create):
    """Without write permission (faked: the tests may run as root, whom permissions do not stop)."""
    (tmp_path / "locked").mkdir()
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: Path(path) != tmp_path / "locked")

    def no_mkdir(path, mode=0o777, **kw):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(os, "mkdir", no_mkdir)
    with pytest.raises(CamEyeError) as info:
        utils.output_folder(tmp_path / "locked" / "out", "--out-dir", create=create)
    assert str(info.value) == (
        f"--out-dir {tmp_path / 'locked' / 'out'}: cannot make this folder: no permission to write in "
        f"{tmp_path / 'locked'}"
    )
    with pytest.raises(CamEyeError, match=f"--out-dir {tmp_path / 'locked'}: no permission to write in it"):
        utils.output_folder(tmp_path / "locked", "--out-dir", create=create)


def test_decoding_arguments_refuse_a_checkpoint_url(capsys):
    """caption.py, eval.py and app.py share --checkpoint: a URL is refused there, naming it as typed."""
    p = argparse.ArgumentParser(prog="tool")
    add_decoding_arguments(p)
    assert p.parse_args([]).checkpoint == DEFAULT_CHECKPOINT
    with pytest.raises(SystemExit):
        p.parse_args(["--checkpoint", "https://example.com/m.pt"])
    assert capsys.readouterr().err.splitlines()[-1] == (
        "tool: error: argument --checkpoint: https://example.com/m.pt: URLs are not read: download the file first"
    )
