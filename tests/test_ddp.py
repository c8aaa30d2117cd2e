"""Multi-process training: ``torchrun --nproc_per_node 2 train.py`` on the CPU (gloo), end to end.

One module fixture prepares 40 synthetic images at 48 px (32 train, 4 val, 4 test) and runs train.py under
torchrun with two processes for two epochs; the tests then check what that run left behind: a clean exit, the
feature cache that rank 0 built while rank 1 waited at the barrier, checkpoints that load, one metrics line
per epoch (rank 0 writes, rank 1 does not), finite weights, and that the two ranks split every epoch between
them. The run takes about 15 s on a 2-core machine.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import h5py
import pytest
import torch

import create_input_files
import synthetic
import train
from checkpoint import load_captioner
from models import ModelConfig

REPO = Path(__file__).resolve().parents[1]
NUM_IMAGES = 40
IMAGE_SIZE = 48
EPOCHS = 2
WORLD = 2
BATCH_SIZE = 4
RUN_TIMEOUT_S = 150

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Keep this process's torch on one thread (the 2-core machine may be busy with other work)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ddp_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The prepared folder of 40 synthetic images (private to this module: the run adds features/ to it)."""
    root = tmp_path_factory.mktemp("ddp")
    json_path = synthetic.generate_dataset(root / "source", num_images=NUM_IMAGES, image_size=IMAGE_SIZE)
    options = create_input_files.Options(out=root / "prepared", min_word_freq=1, image_size=IMAGE_SIZE, workers=1)
    create_input_files.create_input_files([json_path], None, options)
    return options.out


def _torchrun_env() -> dict[str, str]:
    """This environment, minus anything an enclosing torchrun set, on one thread per process and CPU only.

    Hiding GPUs matters: under torchrun, train.py picks CUDA and NCCL whenever a GPU is visible (whatever
    --device says), and two ranks on one GPU would fail, so the test would depend on the machine.
    """
    inherited = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in inherited and not k.startswith("TORCHELASTIC_")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    return env


@pytest.fixture(scope="module")
def ddp_run(ddp_data: Path, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """Run train.py under torchrun with two processes; fail with its output unless it exits with status 0."""
    out = tmp_path_factory.mktemp("ddp_run") / "run"
    # `python -m torch.distributed.run` is the torchrun command, found through this interpreter.
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}"]
    command += [str(REPO / "train.py"), "--data", str(ddp_data), "--out", str(out), "--epochs", str(EPOCHS)]
    command += ["--batch-size", str(BATCH_SIZE), "--embed-dim", "16", "--attention-dim", "16", "--decoder-dim", "16"]
    command += ["--workers", "0", "--no-tensorboard", "--val-images", "6", "--device", "cpu", "--log-every", "1"]
    # A session of its own, so a hung run's workers die with torchrun instead of outliving the test.
    proc = subprocess.Popen(
        command,
        cwd=REPO,
        env=_torchrun_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish in {RUN_TIMEOUT_S} s; its output ended with:\n{output[-4000:]}")
    if proc.returncode != 0:
        pytest.fail(f"torchrun exited with status {proc.returncode}; its output ended with:\n{output[-4000:]}")
    return SimpleNamespace(data=ddp_data, out=out, output=output)


def _last(ddp_run: SimpleNamespace) -> dict:
    return torch.load(ddp_run.out / "last.pt", map_location="cpu", weights_only=True)


def test_ddp_run_writes_checkpoints_that_load(ddp_run: SimpleNamespace) -> None:
    for name in ("last.pt", "best.pt"):
        path = ddp_run.out / name
        assert path.is_file(), f"the 2-process run did not write {name}"
        encoder, decoder, word_map, cfg = load_captioner(path)
        assert cfg.decoder_dim == 16 and cfg.vocab_size == len(word_map)
    assert sorted(p.name for p in ddp_run.out.iterdir()) == [
        "best.pt",
        "last.pt",
        "metrics.jsonl",
        "steps.jsonl",
        "train.lock",
    ]
    ckpt = _last(ddp_run)
    assert ckpt["epoch"] == EPOCHS - 1
    # The unwrapped decoder is saved, not the DistributedDataParallel wrapper ("module." keys).
    assert not any(k.startswith("module.") for k in ckpt["decoder"])
    for key, value in ckpt["decoder"].items():
        assert torch.isfinite(value).all(), f"decoder weight {key} is not finite after DDP training"


def test_rank_zero_builds_the_feature_cache_once_while_rank_one_waits(ddp_run: SimpleNamespace) -> None:
    # Rank 1 only opens the cache after the barrier; a race would have crashed the run (checked by ddp_run).
    files = sorted(p.name for p in (ddp_run.data / "features").iterdir())
    assert len(files) == 2 and files[0].startswith("train-") and files[1].startswith("val-"), files


def test_only_rank_zero_logs_each_epoch_once(ddp_run: SimpleNamespace) -> None:
    history = _last(ddp_run)["history"]
    assert [h["epoch"] for h in history] == list(range(EPOCHS))
    lines = (ddp_run.out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == EPOCHS, f"metrics.jsonl has {len(lines)} lines for {EPOCHS} epochs (written twice?)"
    records = [json.loads(line) for line in lines]
    assert records == history
    for h in history:
        assert "val_BLEU-4" in h and h["train_seconds"] > 0 and math.isfinite(h["train_loss"])
    # The per-epoch summary line is printed by rank 0 only.
    printed = [line for line in ddp_run.output.splitlines() if "train_loss=" in line]
    assert len(printed) == EPOCHS, printed


def test_the_two_ranks_train_on_disjoint_halves_of_each_epoch(ddp_run: SimpleNamespace) -> None:
    with h5py.File(ddp_run.data / "train.hdf5", "r") as f:
        num_images = f["images"].shape[0]
        captions_per_image = int(f.attrs["captions_per_image"])
        assert f["captions"].shape[0] == num_images * captions_per_image
    # In the run: rank 0 (the one that logs) trained on half the images' captions per epoch, not on all.
    # DistributedSampler pads a split that does not divide evenly, hence the ceil.
    shard_captions = math.ceil(num_images / WORLD) * captions_per_image
    assert shard_captions < num_images * captions_per_image
    for h in _last(ddp_run)["history"]:
        assert h["train_captions"] == shard_captions, (h["train_captions"], num_images * captions_per_image)

    # And the halves are the two different ones: train.make_loaders, as the run called it, gives rank 0 and
    # rank 1 disjoint shards that together cover every training image, in every epoch.
    ckpt = _last(ddp_run)
    mcfg = ModelConfig.from_dict(ckpt["config"])
    tcfg = train.TrainConfig(**ckpt["train_config"])
    assert (tcfg.data, tcfg.batch_size, tcfg.workers) == (str(ddp_run.data), BATCH_SIZE, 0)
    loaders = [train.make_loaders(mcfg, tcfg, True, WORLD, rank)[0] for rank in range(WORLD)]
    for epoch in range(EPOCHS):
        shards = []
        for loader in loaders:
            loader.sampler.set_epoch(epoch)
            shards.append(list(loader.sampler))
        assert len(shards[0]) == len(shards[1]) == num_images // WORLD
        assert not set(shards[0]) & set(shards[1]), f"epoch {epoch}: the ranks share images"
        assert sorted(shards[0] + shards[1]) == list(range(num_images))
