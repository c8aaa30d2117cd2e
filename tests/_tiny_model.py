"""A tiny CamEye model trained on a small synthetic dataset, built once per test session.

Shared by tests/test_eval.py and tests/test_caption.py (owned with them): :func:`tiny_model` trains it the
first time it is asked for and caches it for the session, so the two files pay for it once. The folders it
returns are read only for the tests: copy before changing anything.

The model is small (32-wide embedding, attention and LSTM) but trained hard enough (30 epochs at a high
learning rate, no dropout) to name objects, so attention correctness has words to score. Everything runs
on one torch thread: on a 2-core machine shared with other work, torch's default of one thread per core
made these tiny matrix products ~10x slower through oversubscription.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from create_input_files import Options, create_input_files
from models import ModelConfig
from synthetic import generate_dataset
from train import TrainConfig, train
from utils import read_json

NUM_IMAGES = 60  # 48 train, 6 val, 6 test
IMAGE_SIZE = 64
SPECIAL_TOKENS = {"<pad>", "<start>", "<end>", "<unk>"}

_cache: dict[str, SimpleNamespace] = {}


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run torch on one intra-op thread inside the block, then restore the caller's setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """The session's tiny model, as a namespace of

    * ``source``: the synthetic dataset's JSON; ``images``: its folder of 64 px PNGs;
    * ``data``: the prepared folder ({split}.hdf5, word_map.json); ``word_map``: that word map;
    * ``checkpoint``: the trained model (``last.pt``).
    """
    if "model" not in _cache:
        root = tmp_path_factory.mktemp("tiny_model")
        source = generate_dataset(root / "source", num_images=NUM_IMAGES, image_size=IMAGE_SIZE, seed=0)
        data = root / "prepared"
        create_input_files([source], None, Options(out=data, min_word_freq=1, image_size=IMAGE_SIZE, workers=1))
        out = root / "run"
        model_config = ModelConfig(vocab_size=0, embed_dim=32, attention_dim=32, decoder_dim=32, dropout=0.0)
        train_config = TrainConfig(
            data=str(data),
            out=str(out),
            epochs=30,
            batch_size=8,
            decoder_lr=1e-2,
            lr_patience=100,  # validation BLEU-4 of a model this young is noise: never decay ...
            early_stop=100,  # ... and never stop early on it
            val_images=10,
            max_decode_len=20,
            workers=0,
            tensorboard=False,
        )
        with one_torch_thread():
            train(model_config, train_config)
        checkpoint = out / "last.pt"
        assert checkpoint.is_file(), f"training did not write {checkpoint}"
        _cache["model"] = SimpleNamespace(
            source=Path(source),
            images=Path(source).parent / "images",
            data=data,
            checkpoint=checkpoint,
            word_map=read_json(data / "word_map.json"),
        )
    return _cache["model"]


@contextlib.contextmanager
def started_cli(script: str, commands: dict[str, list[str]], cwd: Path) -> Iterator[dict[str, subprocess.Popen]]:
    """Start ``python <script> ARGS`` for each named command side by side (each spends seconds importing torch)
    on one torch thread; yield the processes and kill any a failed test left running."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    repo = Path(__file__).resolve().parents[1]
    procs = {
        name: subprocess.Popen(
            [sys.executable, str(repo / script), *args],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, args in commands.items()
    }
    try:
        yield procs
    finally:
        for proc in procs.values():
            if proc.poll() is None:  # a test failed before collecting it
                proc.kill()
                proc.communicate()
