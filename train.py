"""Train a Show, Attend and Tell captioner with teacher forcing and doubly stochastic attention.

    python train.py --data data/flickr8k --out checkpoints/flickr8k           # CUDA if present, else CPU
    torchrun --nproc_per_node 4 train.py --data data/coco --out checkpoints/coco   # several GPUs (DDP)

With a frozen encoder (the default) every image is encoded once and the features are cached in
``<data>/features/`` as float16 HDF5; the decoder then trains from the cache, which is what makes training
practical on a CPU. With ``--fine-tune-stages N`` the last N encoder stages train too and images are read.

Each epoch: train on every caption once, decode the validation images as eval.py does (decoding.DecodeConfig;
``--val-beam-size 1`` for greedy) and score them (``--select-on``: CIDEr-D or BLEU-4); the learning rates decay
when the score stops improving and training stops early after ``--early-stop`` epochs without improvement.
``last.pt`` is written every epoch and ``best.pt`` when the score improves, atomically; both load with
``torch.load(weights_only=True)``. ``--resume`` continues from ``last.pt`` exactly as if the run had not stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import MISSING, asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

try:
    import fcntl  # POSIX: the run-folder lock; elsewhere (Windows) runs are not locked
except ImportError:  # pragma: no cover
    fcntl = None

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from backbones import resolve_precision
from checkpoint import load_checkpoint_file, training_checkpoint
from cli import (
    HelpFormatter,
    add_options,
    float_between,
    int_between,
    opt,
    option_fields,
    options_from_args,
    positive_float,
)
from datasets import CaptionDataset, FeatureDataset, check_split_has_images, collate_eval, collate_train, open_split
from decoding import DecodeConfig, content_word_mask, decode_loader
from features import cache_features, cache_is_current, features_path, weights_fingerprint
from fused import FastDropout, FusedTeacherForcing, adam
from metrics import CiderD, cider_d_corpus, image_truth, nltk_bleu
from models import Encoder, ModelConfig, Preprocess, build_captioner, caption_loss
from scst import scst_objective
from utils import (
    FUNCTION_WORDS,
    CamEyeError,
    Terminated,
    atomic_path,
    check_free_space,
    cli_errors,
    freeze_imported_objects,
    get_rng_state,
    handle_sigterm,
    keep_freed_memory,
    local_path,
    mount_point,
    non_negative_int,
    output_folder,
    positive_int,
    read_json,
    reverse_word_map,
    save_torch,
    seed_everything,
    select_device,
    set_rng_state,
    validate_word_map,
)

_DATA, _OPT, _SCST, _MACHINE = (
    "data and output",
    "optimisation",
    "self-critical sequence training (after cross-entropy)",
    "machine",
)


@dataclass
class TrainConfig:
    """Training hyper-parameters and paths (the model's shape lives in :class:`models.ModelConfig`). Each field
    is also train.py's command-line option of the same name (cli.add_options), with this help and default."""

    data: str = opt(
        MISSING, "folder made by create_input_files.py (train/val .hdf5, word_map.json)", _DATA, type=local_path,
        required=True,
    )  # fmt: skip
    out: str = opt(
        "checkpoints/run", "folder for last.pt, best.pt, metrics.jsonl, tensorboard/", _DATA, type=local_path
    )
    resume: bool = opt(
        False,
        "continue from OUT/last.pt exactly where it stopped (mid-epoch too), with the run's saved options; options "
        "given again override them (with a note); --fine-tune-stages may change (the encoder then gets a fresh "
        "optimiser), the model's shape may not",
        _DATA,
    )
    overwrite: bool = opt(False, "start again in an OUT that holds an earlier run (deletes its files)", _DATA)
    checkpoint_minutes: float = opt(
        10.0, "also write OUT/last.pt inside an epoch this often, so a kill loses at most this much (0 = every step)",
        _DATA, type=float_between(0),
    )  # fmt: skip
    log_every: int = opt(10, "append every N-th step's loss to OUT/steps.jsonl", _DATA, type=positive_int)
    keep_epochs: bool = opt(
        False, "also keep each epoch's checkpoint as OUT/epochN.pt (N from 0), e.g. to average the last few with "
        "export_model.py --average", _DATA,
    )  # fmt: skip
    feature_memory_gb: float = opt(
        4.0, "read the feature cache into memory up to this size, else read it from disk per item", _DATA,
        type=float_between(0),
    )  # fmt: skip
    cache_features: bool = opt(True, "with a frozen encoder, encode every image once and train from the cache", _DATA)
    embeddings: str = opt(
        "", "initialise word embeddings from a GloVe-format text file (words not in it stay random)", "model"
    )
    epochs: int = opt(20, "maximum number of epochs", _OPT, type=positive_int)
    batch_size: int = opt(32, "images per step, each with all its captions (5 per image: 160 captions)", _OPT,
                          type=positive_int)  # fmt: skip
    decoder_lr: float = opt(4e-4, "Adam learning rate of the decoder", _OPT, type=positive_float)
    encoder_lr: float = opt(1e-4, "Adam learning rate of fine-tuned encoder stages", _OPT, type=positive_float)
    # Weight of the doubly stochastic regulariser (eq. 14). Reduction: summed over pixels, averaged over captions
    # (the paper's lambda * sum_i (1 - sum_t alpha_ti)^2). The common tutorial averages over pixels with
    # alpha_c = 1, i.e. 1/P of ours; 0.01 is about that strength for an 8 x 8 grid.
    alpha_c: float = opt(0.01, "weight of the doubly stochastic attention regulariser", _OPT, type=float_between(0))
    grad_clip: float = opt(5.0, "clip the gradient norm to this value", _OPT, type=positive_float)
    label_smoothing: float = opt(
        0.0, "label smoothing of the cross-entropy", _OPT, type=float_between(0, 1, closed_high=False)
    )
    lr_decay: float = opt(
        0.5, "learning-rate factor when the validation score plateaus", _OPT, type=float_between(1e-12, 1, False)
    )
    lr_patience: int = opt(1, "decay once the score has not improved for more than N epochs", _OPT,
                           type=non_negative_int)  # fmt: skip
    lr_drop_epochs: tuple[int, ...] = opt(
        (), "also multiply the learning rates by --lr-decay at the start of these epochs (0-based)", _OPT
    )
    early_stop: int = opt(4, "epochs without improvement before stopping", _OPT, type=positive_int)
    select_on: str = opt(
        "cider", "validation score that selects best.pt and drives the plateau rule and early stopping", _OPT,
        choices=["cider", "bleu4"],
    )  # fmt: skip
    # Model selection decodes as eval.py does (DecodeConfig: beam search with repeat blocking), so that the
    # epoch kept is the best by the numbers that are reported; 1 = greedy (faster, the common tutorial's way).
    val_beam_size: int = opt(DecodeConfig.beam_size, "beam size of validation decoding (1 = greedy)", _OPT,
                             type=positive_int)  # fmt: skip
    val_images: int = opt(0, "validate on the first N images only (0 = all)", _OPT, type=non_negative_int)
    max_decode_len: int = opt(DecodeConfig.max_len, "longest caption decoded at validation", _OPT, type=positive_int)
    init_from: str = opt(
        "", "start a new run from this training checkpoint's weights (e.g. a cross-entropy run's best.pt)", _SCST
    )
    scst: bool = opt(
        False, "optimise CIDEr-D with self-critical REINFORCE (Rennie et al. 2017) instead of cross-entropy; use "
        "with --init-from and a small --decoder-lr such as 2e-5", _SCST,
    )  # fmt: skip
    scst_samples: int = opt(5, "captions drawn per image (each one's baseline is the rest)", _SCST, type=int_between(2))
    scst_max_len: int = opt(16, "longest drawn caption, in words", _SCST, type=positive_int)
    scst_hallucination_penalty: float = opt(
        0.0, "subtract LAMBDA from a drawn caption's CIDEr-D reward (1.0 = CIDEr 100) for each COCO object it names "
        "that the image's references do not (CHAIR against the references); 0 = CIDEr-D alone", _SCST,
        type=float_between(0), metavar="LAMBDA",
    )  # fmt: skip
    device: str = opt("auto", "'auto' (CUDA when available), 'cpu', 'cuda', 'cuda:1', ...", _MACHINE)
    amp: bool = opt(False, "mixed precision (float16 on CUDA, bfloat16 on CPU)", _MACHINE)
    compile: bool = opt(
        False, "run the fused path's attention energies (the memory-bound part of a step) in torch.compile'd "
        "kernels: faster, same results within rounding; needs a C++ compiler (CPU) or Triton (CUDA) and compiles "
        "for about a minute on first use (cached on disk); a resumed run keeps its setting unless given", _MACHINE,
    )  # fmt: skip
    fused: bool = opt(
        True, "teacher forcing through the plain step-by-step loop, the reference the default fused path is tested "
        "against (same results within rounding; slower)", _MACHINE, flags=("--plain-loop",), action="store_false",
    )  # fmt: skip
    encoder_precision: str = opt(
        "auto", "precision of the frozen encoder filling the feature cache ('auto': bfloat16 on CUDA GPUs and on "
        "CPUs with AMX tiles, where it is faster; float32 elsewhere); a cache of each precision is kept apart",
        _MACHINE, choices=["auto", "float32", "bfloat16"],
    )  # fmt: skip
    workers: int = opt(2, "DataLoader worker processes when reading images", _MACHINE, type=non_negative_int)
    seed: int = opt(0, "random seed (weights, data order, dropout)", _MACHINE, type=int_between(0, 2**32 - 1))
    tensorboard: bool = opt(True, "write TensorBoard events to OUT/tensorboard", _MACHINE)


def load_word_vectors(path: Path, word_map: dict[str, int], init: torch.Tensor) -> int:
    """Fill rows of ``init`` (V x E) with the vectors of ``path`` (GloVe text format) for words in the map.

    Words without a vector keep their random initialisation. Returns how many words were found; the filled
    matrix is written back into ``init`` (the caller passes the decoder's embedding weights).
    """
    if not path.is_file():
        raise CamEyeError(f"embeddings file not found: {path}")
    found = 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            word, *values = line.rstrip().split(" ")
            if word not in word_map:
                continue
            if len(values) != init.shape[1]:
                raise CamEyeError(f"{path}:{n}: {len(values)} values, but --embed-dim is {init.shape[1]}")
            try:
                init[word_map[word]] = torch.tensor([float(v) for v in values])
            except ValueError:
                raise CamEyeError(f"{path}:{n}: not a word followed by numbers") from None
            found += 1
    return found


# -------------------------------------------------------------------------------------------------- loss
# ------------------------------------------------------------------------------------------------- setup
def setup_distributed(device_name: str) -> tuple[int, int, int, torch.device]:
    """Join the process group when started by torchrun; returns (rank, local rank, world size, device)."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        return 0, 0, 1, select_device(device_name)
    use_cuda = torch.cuda.is_available() and device_name != "cpu"
    # Rank 0 alone builds the feature cache and validates while the others wait at a collective: allow hours,
    # not the default 10 (NCCL) / 30 (gloo) minutes, or a large dataset's cache would kill the waiting ranks.
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(hours=6))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    return dist.get_rank(), local_rank, dist.get_world_size(), device


class EpochSampler(Sampler[int]):
    """This rank's share of one epoch's shuffled image order, from a given position on.

    The order depends only on (seed, epoch), so a run resumed in the middle of an epoch sees exactly the images
    it had not trained on yet (``set_epoch(epoch, start)``). Under DDP the permutation is padded to a multiple of
    the world size (repeating its first images, as DistributedSampler does) and rank r takes every world-th item.
    """

    def __init__(self, num_images: int, seed: int, world: int = 1, rank: int = 0) -> None:
        self.num_images, self.seed, self.world, self.rank = num_images, seed, world, rank
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def shard(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        order = torch.randperm(self.num_images, generator=g).tolist()
        padded = order + order[: (-len(order)) % self.world]
        return padded[self.rank :: self.world]

    def __iter__(self) -> Iterator[int]:
        return iter(self.shard()[self.start :])

    def full_length(self) -> int:
        """Images in this rank's shard of a whole epoch."""
        return -(-self.num_images // self.world)

    def __len__(self) -> int:
        return max(0, self.full_length() - self.start)


def make_loaders(mcfg: ModelConfig, tcfg: TrainConfig, use_cache: bool, world: int, rank: int):
    """Training loader (images or cached features, sharded under DDP) and validation loader."""
    data = Path(tcfg.data)
    if use_cache:
        memory = int(tcfg.feature_memory_gb * (1 << 30))
        train_set = FeatureDataset(
            data / "train.hdf5", features_path(mcfg, data, "train", tcfg.encoder_precision), "train", memory
        )
        val_set = FeatureDataset(
            data / "val.hdf5", features_path(mcfg, data, "val", tcfg.encoder_precision), "eval", memory
        )
        workers = 0  # features are in memory: worker processes would only add copying
    else:
        pre = Preprocess(mcfg.backbone, mcfg.input_size)
        train_set = CaptionDataset(data / "train.hdf5", "train", pre)
        val_set = CaptionDataset(data / "val.hdf5", "eval", pre)
        workers = tcfg.workers
    if tcfg.val_images:
        val_set = torch.utils.data.Subset(val_set, range(min(tcfg.val_images, len(val_set))))
    train_loader = DataLoader(
        train_set,
        tcfg.batch_size,
        sampler=EpochSampler(len(train_set), tcfg.seed, world, rank),
        num_workers=workers,
        collate_fn=collate_train,
        generator=torch.Generator(),  # worker seeds come from here, never from the global RNG (dropout's)
        persistent_workers=workers > 0,
        drop_last=False,
    )
    val_loader = DataLoader(val_set, 100, num_workers=workers, collate_fn=collate_eval)
    return train_loader, val_loader


# ---------------------------------------------------------------------------------------- stop and resume
class TrainingStopped(Exception):
    """Training stopped on SIGTERM/SIGINT after writing a checkpoint at the current step."""

    def __init__(self, message: str, signal_name: str) -> None:
        super().__init__(message)
        self.exit_status = 143 if signal_name == "SIGTERM" else 130


@dataclass
class EpochProgress:
    """How far this rank is through an epoch, with the running sums of its metrics (saved mid-epoch)."""

    epoch: int = 0
    position: int = 0  # images of this rank's shard trained on
    world: int = 1  # processes sharing the epoch (the shard, and so the position, depends on it)
    step: int = 0  # optimiser steps taken
    seconds: float = 0.0
    sums: dict[str, float] = dataclasses.field(default_factory=dict)  # the objective's running sums

    def add(self, stats: dict[str, float]) -> None:
        for k, v in stats.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)

    def mean(self, key: str, weight: str) -> float:
        return self.sums.get(key, 0.0) / max(self.sums.get(weight, 0.0), 1.0)


class RunControl:
    """Decides, at every step and on every rank alike, whether to stop (a signal), save (a timer) or fail.

    SIGTERM (SLURM, Kubernetes, ``kill``) and SIGINT (Ctrl-C) only set a flag while training runs: the step
    under way finishes, a checkpoint is written at it, and training stops with one line. Outside the loop
    (building the feature cache) they raise at once, and atomic writes leave nothing half-written; a second
    Ctrl-C also raises at once. Under torchrun the flags are all-reduced each step, so every rank stops or
    saves at the same step even when the signal reached them at different moments.
    """

    def __init__(self, world: int, checkpoint_minutes: float, device: torch.device) -> None:
        self.world, self.device = world, device
        self.interval = checkpoint_minutes * 60.0
        self.last_save = time.monotonic()
        self.signal_name: str | None = None  # the signal that stops the run (this rank's or another's)
        self.signalled = False  # whether this process itself received one
        self.deferring = False
        self._previous: dict[int, Any] = {}

    def _on_signal(self, signum: int, frame) -> None:
        if not self.deferring or self.signalled:
            raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()
        self.signalled = True
        self.signal_name = signal.Signals(signum).name

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._on_signal)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def poll(self, loss_is_finite: bool) -> tuple[bool, bool, bool]:
        """(stop, save, non-finite loss) for this step, agreed by all ranks."""
        flags = [self.signal_name is not None, time.monotonic() - self.last_save >= self.interval, not loss_is_finite]
        if self.world > 1:
            t = torch.tensor(flags, dtype=torch.float32, device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flags = [bool(x) for x in t.tolist()]
        if flags[0] and self.signal_name is None:
            self.signal_name = "SIGTERM"  # another rank got it
        return flags[0], flags[1], flags[2]

    def saved(self) -> None:
        self.last_save = time.monotonic()


# -------------------------------------------------------------------------------------------------- loop
Objective = Callable[[tuple], tuple[torch.Tensor, dict[str, float], int]]


def cross_entropy_objective(encoder, decoder, tcfg: TrainConfig, device, use_cache: bool) -> Objective:
    """Teacher forcing: cross-entropy over the words plus the doubly stochastic regulariser (:func:`caption_loss`).

    The returned function maps a training batch to (loss, sums to accumulate, images in the batch).
    """

    def objective(batch: tuple) -> tuple[torch.Tensor, dict[str, float], int]:
        images, captions, lengths, image_index = (t.to(device, non_blocking=True) for t in batch)
        feats = images if use_cache else encoder(images)
        logits, targets, alphas = decoder(feats, captions, lengths, image_index)
        loss, ce = caption_loss(logits.float(), targets, alphas.float(), tcfg.alpha_c, tcfg.label_smoothing)
        n = targets.numel()
        sums = {"loss": loss.item() * n, "ce": ce.item() * n, "words": n, "captions": captions.size(0)}
        return loss, sums, images.size(0)

    return objective


def train_one_epoch(
    encoder,
    decoder,
    loader,
    optimizers,
    scaler,
    tcfg: TrainConfig,
    device,
    progress: EpochProgress,
    use_cache: bool,
    control: RunControl | None = None,
    save: Callable[[EpochProgress], None] | None = None,
    writer=None,
    step_log: Path | None = None,
    show_progress: bool = True,
    objective: Objective | None = None,
) -> dict[str, float]:
    """Train on the rest of epoch ``progress.epoch`` from ``progress.position``; returns the epoch's metrics.

    ``objective`` (default: cross-entropy) turns a batch into a loss. ``save(progress)`` writes a checkpoint at
    the current step when ``control`` says so (its timer, or a signal: then :class:`TrainingStopped` is raised
    after saving). A non-finite loss stops training with a one-line :class:`CamEyeError` before it can reach
    the weights. Every ``tcfg.log_every`` steps the loss is appended to ``step_log`` (JSON lines: epoch,
    step, loss).
    """
    objective = objective or cross_entropy_objective(encoder, decoder, tcfg, device, use_cache)
    decoder.train()
    encoder.train(not use_cache)
    loader.sampler.set_epoch(progress.epoch, progress.position)
    loader.generator.manual_seed(tcfg.seed * 100003 + progress.epoch)
    low = amp_dtype(device)
    start = time.perf_counter() - progress.seconds
    params = [p for optimizer in optimizers for g in optimizer.param_groups for p in g["params"]]
    steps_per_epoch = math.ceil(loader.sampler.full_length() / tcfg.batch_size)  # for TensorBoard's step axis
    bar = tqdm(
        loader,
        desc=f"epoch {progress.epoch}",
        unit="batch",
        initial=progress.step,
        total=progress.step + len(loader),
        disable=not show_progress,
    )
    for batch in bar:
        with torch.autocast(device.type, dtype=low, enabled=tcfg.amp):
            loss, sums, images = objective(batch)
        stop, save_due, bad = control.poll(bool(torch.isfinite(loss))) if control else (False, False, False)
        if bad:
            raise CamEyeError(
                f"the loss became {loss.item()} at epoch {progress.epoch} step {progress.step + 1}; stopped before "
                "it reached the weights (last.pt is from before): lower --decoder-lr, or check the data and "
                "--encoder-weights"
            )
        if not optimiser_step(loss, optimizers, scaler, params, tcfg.grad_clip):
            raise CamEyeError(
                f"non-finite gradients at epoch {progress.epoch} step {progress.step + 1}; stopped before they "
                "reached the weights: lower --decoder-lr or --grad-clip"
            )
        value = loss.item()
        progress.add(sums)
        progress.position += images
        progress.step += 1
        progress.seconds = time.perf_counter() - start
        bar.set_postfix(loss=f"{progress.mean('loss', 'words'):.3f}")
        log_step(progress, value, tcfg, step_log, writer, steps_per_epoch)
        if (stop or save_due) and save is not None:
            save(progress)
        if stop:
            raise TrainingStopped(f"stopped by {control.signal_name}", control.signal_name or "SIGTERM")
    return epoch_metrics(progress)


def epoch_metrics(progress: EpochProgress) -> dict[str, float]:
    """The finished epoch's training figures from its running sums (speed, loss, and what the objective adds)."""
    seconds = max(progress.seconds, 1e-9)
    metrics = {
        "train_loss": progress.mean("loss", "words"),
        "train_seconds": seconds,
        "captions_per_second": progress.sums.get("captions", 0.0) / seconds,
        # Test hook: captions this process trained on. Under DDP that is its shard only (about 1/world of the
        # split), so a test can see that the ranks split the epoch instead of each training on all of it.
        "train_captions": int(progress.sums.get("captions", 0)),
    }
    if "ce" in progress.sums:
        metrics["train_ce"] = progress.mean("ce", "words")
    if "reward" in progress.sums:
        metrics["train_reward"] = progress.mean("reward", "captions")
    if "hallucinated" in progress.sums:  # invented objects per drawn caption (counted when penalised)
        metrics["train_hallucinated"] = progress.mean("hallucinated", "captions")
    return metrics


def log_step(
    progress: EpochProgress, loss: float, tcfg: TrainConfig, step_log: Path | None, writer, steps: int
) -> None:
    """Append every ``tcfg.log_every``-th step's loss to ``step_log`` (JSON lines: epoch, step, loss) and every
    50th to TensorBoard's ``writer`` (steps counted across epochs of ``steps`` steps)."""
    if step_log is not None and progress.step % tcfg.log_every == 0:
        append_jsonl({"epoch": progress.epoch, "step": progress.step, "loss": loss}, step_log)
    if writer is not None and progress.step % 50 == 0:
        writer.add_scalar("train/loss_step", loss, progress.epoch * steps + progress.step)


def optimiser_step(loss: torch.Tensor, optimizers: list, scaler, params: list, grad_clip: float) -> bool:
    """Backpropagate ``loss``, clip the gradients' norm to ``grad_clip`` and step every optimiser (through the AMP
    gradient scaler). Returns False, having changed nothing, for non-finite gradients without a scaler (one
    with a scaler skips such steps by itself)."""
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    for optimizer in optimizers:
        scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    if not scaler.is_enabled() and not torch.isfinite(norm):
        return False
    for optimizer in optimizers:
        scaler.step(optimizer)
    scaler.update()
    return True


def validate(encoder, decoder, loader, tcfg: TrainConfig, device, use_cache: bool, rev_word_map) -> dict:
    """Scores of real decoding on the validation images: nltk BLEU-1..4 (the tutorial's way), CIDEr-D (x100,
    document frequencies from these references as in COCOEvalCap, on our tokens rather than the PTB
    tokenizer's), and what SCST can spoil: mean caption length, distinct words used, the share of captions
    ending in a function word."""
    # Model selection scores the decoder's own words (ground "off"): the detector and a text model are not part of
    # what is being trained, and validation must not need their weights.
    cfg = dataclasses.replace(DecodeConfig(), beam_size=tcfg.val_beam_size, max_len=tcfg.max_decode_len, ground="off")
    words = content_word_mask({w: i for i, w in enumerate(rev_word_map)})
    predictions, references, _ = decode_loader(None if use_cache else encoder, decoder, loader, device, cfg, words)
    hyps = [[rev_word_map[i] for i in p.tokens] for p in predictions]
    metrics = {f"val_{k}": v for k, v in nltk_bleu(references, hyps).items()}
    metrics["val_CIDEr"] = 100 * cider_d_corpus(references, hyps)[0]
    metrics["val_mean_length"] = float(np.mean([len(h) for h in hyps]))
    metrics["val_vocabulary"] = len({w for h in hyps for w in h})
    metrics["val_bad_endings"] = float(np.mean([bool(h) and h[-1] in FUNCTION_WORDS for h in hyps]))
    return metrics


def checkpoint_dict(
    mcfg, tcfg, word_map, encoder, decoder, optimizers, scheduler, scaler, epoch, history, state, progress=None
) -> dict:
    """Everything needed to resume or to caption (checkpoint.training_checkpoint).

    ``epoch`` is the last finished epoch (-1 before the first); ``progress`` (mid-epoch checkpoints only) says
    how far the next epoch got, with its running sums, so a resume continues at that very step.
    """
    training_state = {
        "optimizers": [optimizer.state_dict() for optimizer in optimizers],
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "epoch": epoch,
        "progress": asdict(progress) if progress is not None else None,
        "history": history,
        "best_score": state["best"],
        "select_on": tcfg.select_on,
        "epochs_since_improvement": state["since"],
        "rng": get_rng_state(),
    }
    return training_checkpoint(mcfg, tcfg, word_map, encoder, decoder, training_state)


RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl", "steps.jsonl")


def check_run_folder(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse, before any work, to start over an earlier run (unless ``overwrite``) or to resume nothing."""
    existing = [name for name in RUN_FILES if (out / name).exists()]
    if resume and not (out / "last.pt").is_file():
        raise CamEyeError(f"nothing to resume: {out / 'last.pt'} not found")
    if existing and not resume and not overwrite:
        raise CamEyeError(
            f"{out} already holds a training run ({', '.join(existing)}): pass --resume to continue it, "
            "--overwrite to start again, or choose another --out"
        )


def claim_run_folder(out: Path, resume: bool, overwrite: bool) -> Any:
    """Lock ``out`` for this run (released when the process ends, even by SIGKILL); with ``overwrite``, remove
    the earlier run's checkpoints and logs. A second run writing into the same folder at once is refused.
    Returns the open lock file; keep it open for the whole run.
    """
    output_folder(out, "--out")
    lock = open(out / "train.lock", "a+")  # noqa: SIM115 (held open for the run)
    if fcntl is not None:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.seek(0)
            owner = lock.read().strip() or "another process"
            lock.close()
            raise CamEyeError(
                f"{out} is in use by another training run ({owner}): wait for it or use another --out"
            ) from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()}\n")
        lock.flush()
    check_run_folder(out, resume, overwrite)  # again, now that no other run can change it
    if overwrite and not resume:
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
        for path in out.glob("epoch*.pt"):
            path.unlink()
        shutil.rmtree(out / "tensorboard", ignore_errors=True)
    return lock


# Options that may change when a run is resumed (opt(..., resumable=True)); every other model option is fixed by
# the checkpoint.
RESUMABLE_MODEL_OPTIONS = tuple(f.name for f in option_fields(ModelConfig) if f.metadata["resumable"])
DERIVED_MODEL_FIELDS = ("vocab_size", "image_size", "encoder_weights")


def resumed_configs(
    ckpt: dict, mcfg: ModelConfig, tcfg: TrainConfig, explicit: frozenset[str] | None
) -> tuple[ModelConfig, TrainConfig]:
    """The configuration a resumed run continues with: the saved one, except options given explicitly.

    ``explicit`` names the options the user gave (None: every field of ``mcfg``/``tcfg`` counts as given, as for
    a call from Python). Each override is printed as a note; a change of the model's shape is refused.
    """
    saved_m = ModelConfig.from_dict(ckpt["config"])
    saved_t = ckpt.get("train_config") or {}
    given = lambda name: explicit is None or name in explicit  # noqa: E731
    for f in dataclasses.fields(ModelConfig):
        new, old = getattr(mcfg, f.name), getattr(saved_m, f.name)
        if f.name in DERIVED_MODEL_FIELDS or not given(f.name) or new == old:
            continue
        if f.name not in RESUMABLE_MODEL_OPTIONS:
            raise CamEyeError(
                f"--{f.name.replace('_', '-')} cannot change when resuming (the run has {old!r}, asked {new!r}): "
                "start a new run in another --out"
            )
        print(f"note: --{f.name.replace('_', '-')} {new} overrides the run's {old}")
        setattr(saved_m, f.name, new)
    values = {}
    for f in dataclasses.fields(TrainConfig):
        new = getattr(tcfg, f.name)
        old = saved_t.get(f.name, new)
        old = tuple(old) if isinstance(new, tuple) else old
        if given(f.name) or f.name in ("resume", "overwrite", "out"):
            if new != old and f.name not in ("resume", "overwrite", "out", "data"):
                print(f"note: --{f.name.replace('_', '-')} {new} overrides the run's {old}")
            values[f.name] = new
        else:
            values[f.name] = old
    return saved_m, TrainConfig(**values)


def checkpoint_bytes(encoder: Encoder, decoder: torch.nn.Module) -> int:
    """Disk two checkpoints need (last.pt and best.pt: float32 weights plus Adam's two moments of trainables)."""
    params = [p for m in (decoder, encoder) for p in m.parameters()]
    return 2 * 4 * sum(p.numel() * (3 if p.requires_grad else 1) for p in params)


def feature_cache_bytes(mcfg: ModelConfig, out_dim: int, num_images: int) -> int:
    """Disk a float16 feature cache of ``num_images`` needs (grid estimated at stride 32 when native)."""
    grid = mcfg.grid_size or math.ceil((mcfg.input_size or mcfg.image_size) / 32)
    return num_images * grid * grid * out_dim * 2


def train(mcfg: ModelConfig, tcfg: TrainConfig, explicit: frozenset[str] | None = None) -> list[dict]:
    """Run (or resume) training; returns the per-epoch metrics history.

    Raises :class:`CamEyeError` for bad data, folders or checkpoints (one line), :class:`TrainingStopped` after a
    SIGTERM/SIGINT was handled by saving a checkpoint at the current step.
    """
    rank, _, world, device = setup_distributed(tcfg.device)
    data, out = Path(tcfg.data), Path(tcfg.out)
    word_map = validate_word_map(read_json(data / "word_map.json", "word map"))
    for split in ("train", "val"):
        check_split_has_images(data / f"{split}.hdf5")
    check_run_folder(out, tcfg.resume, tcfg.overwrite)
    with contextlib.ExitStack() as cleanup:
        if world > 1:
            cleanup.callback(dist.destroy_process_group)
        return _train(mcfg, tcfg, explicit, rank, world, device, word_map, cleanup)


@dataclass
class Run:
    """What one training run holds while it trains: its configs, models, optimisers and where it stands."""

    mcfg: ModelConfig
    tcfg: TrainConfig
    word_map: dict[str, int]
    rank: int
    world: int
    device: torch.device
    encoder: Encoder
    decoder: torch.nn.Module
    optimizers: list[torch.optim.Optimizer]
    scheduler: Any
    scaler: Any = None
    history: list[dict] = dataclasses.field(default_factory=list)
    state: dict = dataclasses.field(default_factory=lambda: {"best": -1.0, "since": 0})  # best score, epochs since
    progress: EpochProgress | None = None

    @property
    def out(self) -> Path:
        return Path(self.tcfg.out)

    def save(self, progress: EpochProgress | None, improved: bool = False) -> None:
        """Write last.pt (mid-epoch with ``progress``; at an epoch's end without), best.pt when ``improved``."""
        if self.rank != 0:
            return
        epoch_done = progress.epoch - 1 if progress is not None else self.history[-1]["epoch"] if self.history else -1
        ckpt_out = checkpoint_dict(
            self.mcfg, self.tcfg, self.word_map, self.encoder, self.decoder, self.optimizers, self.scheduler,
            self.scaler, epoch_done, self.history, self.state, progress,
        )  # fmt: skip
        if improved:
            save_torch(ckpt_out, self.out / "best.pt")
        if progress is None and self.tcfg.keep_epochs:
            save_torch(ckpt_out, self.out / f"epoch{epoch_done}.pt")
        save_torch(ckpt_out, self.out / "last.pt")


def _train(mcfg, tcfg, explicit, rank, world, device, word_map, cleanup: contextlib.ExitStack) -> list[dict]:
    """The body of :func:`train` once the process group and the data are checked."""
    ckpt, init, mcfg, tcfg, build_weights = _starting_point(mcfg, tcfg, explicit, word_map)
    data, out = Path(tcfg.data), Path(tcfg.out)
    mcfg.vocab_size = len(word_map)
    with open_split(data / "train.hdf5") as f:
        mcfg.image_size = int(f.attrs["image_size"])  # caption.py resizes new photos the same way
    tcfg = dataclasses.replace(tcfg, encoder_precision=resolve_precision(tcfg.encoder_precision, device))
    seed_everything(tcfg.seed)
    encoder, decoder, teacher = _build_models(mcfg, tcfg, device, word_map, ckpt, init, build_weights)
    use_cache = tcfg.cache_features and mcfg.fine_tune_stages == 0
    if rank == 0:
        cleanup.callback(claim_run_folder(out, tcfg.resume, tcfg.overwrite).close)
    _prepare_feature_cache(mcfg, tcfg, encoder, decoder, rank, world, device, use_cache)
    run = Run(mcfg, tcfg, word_map, rank, world, device, encoder, decoder, *_optimisers(mcfg, tcfg, encoder, decoder))
    run.progress = EpochProgress(epoch=0, world=world)
    if ckpt is not None:
        _resume(run, ckpt)
    if world > 1:
        # Same weights on every rank (built above or loaded), different dropout masks. After a resume only rank
        # 0's RNG state was saved, so the ranks are re-seeded from (seed, rank, where the run is): a resumed DDP
        # run is reproducible but not bit-identical to an uninterrupted one (a single process is).
        where = (tcfg.seed, rank, run.progress.epoch, run.progress.step)
        torch.manual_seed(tcfg.seed + rank if ckpt is None else hash(where))
    run.scaler = torch.amp.GradScaler(device.type, enabled=tcfg.amp and device.type == "cuda")
    if ckpt is not None and ckpt.get("scaler"):
        run.scaler.load_state_dict(ckpt["scaler"])  # the loss scale it had reached, so resume is exact under AMP
    return _run_epochs(run, teacher, use_cache)


def _starting_point(mcfg: ModelConfig, tcfg: TrainConfig, explicit, word_map: dict[str, int]):
    """Where a run starts: its own last.pt (``--resume``, with the saved configs), another run's weights
    (``--init-from``), or nothing. Returns (resume checkpoint, init checkpoint, mcfg, tcfg, the encoder weights
    to build with)."""
    data, out = Path(tcfg.data), Path(tcfg.out)
    ckpt, init, build_weights = None, None, mcfg.encoder_weights
    if tcfg.resume:
        ckpt = load_checkpoint_file(out / "last.pt")
        if ckpt["word_map"] != word_map:
            raise CamEyeError(f"{out / 'last.pt'} was trained with another word map than {data}")
        mcfg, tcfg = resumed_configs(ckpt, mcfg, tcfg, explicit)
        build_weights = mcfg.encoder_weights
    if tcfg.init_from and ckpt is None:
        init = load_checkpoint_file(tcfg.init_from)
        if init["word_map"] != word_map:
            raise CamEyeError(f"{tcfg.init_from} was trained with another word map than {data}")
        given_weights = mcfg.encoder_weights if explicit is None or "encoder_weights" in explicit else None
        mcfg = dataclasses.replace(
            ModelConfig.from_dict(init["config"]), fine_tune_stages=mcfg.fine_tune_stages, dropout=mcfg.dropout
        )
        # Never follow the checkpoint's own encoder_weights (a path or a download) unless it is the offline
        # package: a full checkpoint brings every encoder weight, a partial one needs them from the user.
        if init.get("encoder_partial", False) is not True:
            build_weights = "none"
        elif given_weights is not None or mcfg.encoder_weights == "package":
            build_weights = given_weights or "package"
        else:
            raise CamEyeError(f"{tcfg.init_from} holds only fine-tuned encoder stages: pass --encoder-weights")
    return ckpt, init, mcfg, tcfg, build_weights


def _build_models(mcfg, tcfg, device, word_map, ckpt, init, build_weights):
    """The encoder, the decoder and what teacher forcing runs through (the fused path or the decoder), with
    the weights the run starts from, on ``device``."""
    encoder, decoder = build_captioner(dataclasses.replace(mcfg, encoder_weights=build_weights))
    teacher = FusedTeacherForcing(decoder) if tcfg.fused else decoder
    decoder.dropout = FastDropout(mcfg.dropout)  # the same dropout, a faster mask on the CPU (either path)
    if tcfg.compile and tcfg.fused and not tcfg.scst:
        compile_attention(teacher, device, tcfg.amp)
    elif tcfg.compile:
        print("note: --compile speeds up cross-entropy's fused path only; --plain-loop and --scst runs do not use it")
    if tcfg.embeddings and ckpt is None:
        vectors = decoder.embedding.weight.detach().clone()
        found = load_word_vectors(Path(tcfg.embeddings), word_map, vectors)
        decoder.load_pretrained_embeddings(vectors)
        print(f"pretrained embeddings: {found} of {len(word_map)} words found in {tcfg.embeddings}")
    if init is not None:
        # An exported model (export_model.py) holds float16 weights and only the encoder tensors it changed;
        # the rest is the backbone's pretrained weights, which build_captioner has just loaded.
        partial = init.get("encoder_partial", False) is True
        try:
            encoder.load_state_dict({k: v.float() for k, v in init["encoder"].items()}, strict=not partial)
            decoder.load_state_dict({k: v.float() for k, v in init["decoder"].items()})
        except RuntimeError as exc:
            raise CamEyeError(f"{tcfg.init_from}: weights do not fit ({str(exc).splitlines()[0]})") from None
        print(f"weights from {tcfg.init_from} (epoch {init.get('epoch')})")
    if ckpt is not None:  # the run's own weights (the encoder's are the ones the feature cache must hold)
        encoder.load_state_dict(ckpt["encoder"])
        decoder.load_state_dict(ckpt["decoder"])
    check_grid_size(encoder, mcfg)
    return encoder.to(device), decoder.to(device), teacher


def _prepare_feature_cache(mcfg, tcfg, encoder, decoder, rank, world, device, use_cache: bool) -> None:
    """Check the disk has room for the checkpoints and the cache, then (rank 0) encode every split whose cache
    is missing or stale (features.cache_is_current)."""
    data, out = Path(tcfg.data), Path(tcfg.out)
    fingerprint = weights_fingerprint(encoder) if use_cache else ""
    path = {s: features_path(mcfg, data, s, tcfg.encoder_precision) for s in ("train", "val")}
    stale = [
        s
        for s in ("train", "val")
        if not cache_is_current(data / f"{s}.hdf5", path[s], tcfg.encoder_precision, fingerprint)
    ]
    if rank == 0:
        counts = {}
        for s in stale:
            with open_split(data / f"{s}.hdf5") as f:
                counts[s] = f["images"].shape[0]
        need = {out: checkpoint_bytes(encoder, decoder)}
        cached = sum(counts.values()) if use_cache else 0
        need[data] = need.get(data, 0) + feature_cache_bytes(mcfg, encoder.out_dim, cached)
        if mount_point(out) == mount_point(data):
            check_free_space(out, sum(need.values()), "training (checkpoints and feature cache)")
        else:
            check_free_space(out, need[out], "training's checkpoints")
            check_free_space(data, need[data], "the feature cache")
    if not use_cache:
        return
    # Encoding draws from the global RNG (the DataLoader's base seed): keep the RNG where it was, so that the seed
    # alone decides the run, whether or not its cache had to be built.
    rng = get_rng_state()
    for split in stale if rank == 0 else ():
        encoder.precision = tcfg.encoder_precision
        cache_features(encoder, mcfg, data / f"{split}.hdf5", path[split], device, tcfg.workers, fingerprint)
    set_rng_state(rng)
    if world > 1:
        dist.barrier()


def _optimisers(mcfg, tcfg, encoder, decoder):
    """Adam for the decoder (and the fine-tuned encoder stages), and the plateau scheduler on the decoder's."""
    device = next(decoder.parameters()).device
    decoder_opt = adam([p for p in decoder.parameters() if p.requires_grad], tcfg.decoder_lr, device)
    optimizers = [decoder_opt]
    if mcfg.fine_tune_stages:
        encoder_params = [p for p in encoder.parameters() if p.requires_grad]
        optimizers.append(adam(encoder_params, tcfg.encoder_lr, device))
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        decoder_opt, mode="max", factor=tcfg.lr_decay, patience=tcfg.lr_patience
    )
    return optimizers, scheduler


def _resume(run: Run, ckpt: dict) -> None:
    """Restore ``run`` from its last.pt: weights, optimisers, scheduler, RNG, history, best score and the step."""
    mcfg, tcfg, scheduler = run.mcfg, run.tcfg, run.scheduler
    progress = restore_checkpoint(ckpt, mcfg, tcfg, run.optimizers, scheduler)
    run.history = list(ckpt["history"])
    best = ckpt.get("best_score", ckpt.get("best_bleu4"))  # version-1 checkpoints selected on BLEU-4
    run.state = {"best": float(best), "since": int(ckpt["epochs_since_improvement"])}
    saved_t, saved_m = ckpt.get("train_config") or {}, ModelConfig.from_dict(ckpt["config"])
    # The plateau scheduler's state holds its own factor, patience and best score: follow the options.
    scheduler.factor, scheduler.patience = tcfg.lr_decay, tcfg.lr_patience
    if ckpt.get("select_on", "bleu4") != tcfg.select_on:
        run.state["best"] = -1.0  # scores of another metric do not compare: the next validation sets the bar
        scheduler.best = scheduler.mode_worse
    if saved_m.fine_tune_stages != mcfg.fine_tune_stages or saved_t.get("early_stop") != tcfg.early_stop:
        # A new stage (e.g. fine-tuning after an early-stopped decoder run) starts its own patience.
        run.state["since"], scheduler.num_bad_epochs = 0, 0
    check_mid_epoch_resume(ckpt, progress, tcfg, run.world)
    progress.world = run.world
    run.progress = progress
    where = f"epoch {progress.epoch} step {progress.step}" if progress.step else f"the start of epoch {progress.epoch}"
    print(f"resumed from {run.out / 'last.pt'} at {where}")
    if run.rank == 0:
        trim_jsonl(run.out / "metrics.jsonl", lambda r: r.get("epoch", -1) < progress.epoch)
        trim_jsonl(run.out / "steps.jsonl", lambda r: (r["epoch"], r["step"]) <= (progress.epoch, progress.step))


def _run_epochs(run: Run, teacher: torch.nn.Module, use_cache: bool) -> list[dict]:
    """Train and validate epoch after epoch until the last, an early stop or a signal (then saved and raised
    as :class:`TrainingStopped`). Returns the metrics history."""
    mcfg, tcfg, rank, world, device = run.mcfg, run.tcfg, run.rank, run.world, run.device
    train_decoder = DistributedDataParallel(teacher) if world > 1 else teacher
    train_encoder = DistributedDataParallel(run.encoder) if world > 1 and mcfg.fine_tune_stages else run.encoder
    train_loader, val_loader = make_loaders(mcfg, tcfg, use_cache, world, rank)
    writer = None
    if rank == 0 and tcfg.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run.out / "tensorboard"))
    rev_word_map = reverse_word_map(run.word_map)
    control = RunControl(world, tcfg.checkpoint_minutes, device)
    objective = None
    if tcfg.scst:
        objective, train_loader = scst_setup(
            train_loader.dataset, tcfg, run.decoder, device, rev_word_map, world, use_cache
        )

    def save(progress: EpochProgress | None, improved: bool = False) -> None:
        run.save(progress, improved)
        control.saved()

    control.install()
    try:
        for epoch in range(run.progress.epoch, tcfg.epochs):
            if run.state["since"] >= tcfg.early_stop:
                print(f"early stop: no {SCORE_KEYS[tcfg.select_on]} improvement in {run.state['since']} epochs")
                break
            if run.progress.epoch != epoch:
                run.progress = EpochProgress(epoch=epoch, world=world)
            if epoch in tcfg.lr_drop_epochs and run.progress.step == 0:
                for optimizer in run.optimizers:
                    for group in optimizer.param_groups:
                        group["lr"] *= tcfg.lr_decay
            control.deferring = True
            metrics = train_one_epoch(
                train_encoder, train_decoder, train_loader, run.optimizers, run.scaler, tcfg, device, run.progress,
                use_cache, control, save, writer, run.out / "steps.jsonl" if rank == 0 else None,
                show_progress=rank == 0, objective=objective,
            )  # fmt: skip
            if rank == 0:
                metrics.update(validate(run.encoder, run.decoder, val_loader, tcfg, device, use_cache, rev_word_map))
            _end_epoch(run, epoch, metrics, save, writer)
            if control.poll(True)[0]:  # a signal during validation: the epoch is saved, stop here
                raise TrainingStopped(f"stopped by {control.signal_name}", control.signal_name or "SIGTERM")
            control.deferring = False
    except TrainingStopped as stop:
        left = math.ceil(max(0, train_loader.sampler.full_length() - run.progress.position) / tcfg.batch_size)
        where = f"epoch {run.progress.epoch}, step {run.progress.step} of {run.progress.step + left}"
        raise TrainingStopped(
            f"{stop} at {where}: checkpoint saved to {run.out / 'last.pt'}; resume with the same command and --resume",
            control.signal_name or "SIGTERM",
        ) from None
    finally:
        control.deferring = False
        control.uninstall()
        if writer is not None:
            writer.close()
    return run.history


SCORE_KEYS = {"cider": "val_CIDEr", "bleu4": "val_BLEU-4"}  # --select-on -> the validation metric it selects on


def _end_epoch(run: Run, epoch: int, metrics: dict, save: Callable, writer) -> None:
    """After an epoch's validation: step the plateau rule, record the metrics, write best.pt / last.pt."""
    score = broadcast_float(metrics.get(SCORE_KEYS[run.tcfg.select_on], 0.0), run.world, run.device)
    run.scheduler.step(score)
    _sync_encoder_lr(run.optimizers, run.scheduler, run.tcfg)
    improved = score > run.state["best"]
    run.state = {"best": max(score, run.state["best"]), "since": 0 if improved else run.state["since"] + 1}
    metrics.update(epoch=epoch, decoder_lr=run.optimizers[0].param_groups[0]["lr"], best_score=run.state["best"])
    run.history.append(metrics)
    if run.rank == 0:  # the log line, then best.pt, then last.pt: a resume redoes whatever last.pt lacks
        append_jsonl(metrics, run.out / "metrics.jsonl")
    save(None, improved)
    if run.rank == 0:
        if writer is not None:
            for k, v in metrics.items():
                writer.add_scalar(k.replace("val_", "val/").replace("train_", "train/"), v, epoch)
            writer.flush()
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))


def check_grid_size(encoder: Encoder, mcfg: ModelConfig) -> None:
    """Refuse a --grid-size above the encoder's native grid: adaptive pooling would then repeat each feature
    vector (no detail is added) and multiply the cache and the attention's work."""
    if not mcfg.grid_size:
        return
    side = mcfg.input_size or mcfg.image_size
    with torch.device("meta"):
        native = copy.deepcopy(encoder.net).to("meta")
        grid = getattr(native, "extract_features", native)(torch.empty(1, 3, side, side)).shape[-1]
    if mcfg.grid_size > grid:
        raise CamEyeError(
            f"--grid-size {mcfg.grid_size} is larger than the encoder's native {grid} x {grid} grid for {side} px "
            "images: pooling up only repeats features; use --grid-size 0 (native) or a value up to "
            f"{grid}"
        )


def amp_dtype(device: torch.device) -> torch.dtype:
    """What --amp computes in: float16 on CUDA (with a gradient scaler), bfloat16 on the CPU."""
    return torch.float16 if device.type == "cuda" else torch.bfloat16


def compile_attention(teacher: FusedTeacherForcing, device: torch.device, amp: bool) -> None:
    """Compile the fused path's attention kernels before training starts, so that a missing compiler is a
    one-line error and compile time is reported apart (inductor caches the kernels on disk for later runs)."""
    dtype = amp_dtype(device) if amp else torch.float32
    start = time.perf_counter()
    print("compiling the attention kernels (--compile; cached for later runs) ...", flush=True)
    try:
        teacher.compile_kernels(device, dtype)
    except Exception as exc:  # inductor raises many types: no compiler, a broken toolchain, an unsupported device
        first = (str(exc).strip().splitlines() or [""])[0]
        raise CamEyeError(
            f"--compile failed ({type(exc).__name__}: {first}); it needs a working C++ compiler (CPU) or Triton "
            "(CUDA): train without --compile (resuming: --no-compile)"
        ) from None
    print(f"compiled in {time.perf_counter() - start:.0f} s", flush=True)


def scst_setup(train_set, tcfg: TrainConfig, decoder, device, rev_word_map, world: int, use_cache: bool):
    """The SCST objective and its loader: cached training features with their references, shuffled per epoch.

    ``train_set`` is the cross-entropy loader's FeatureDataset; an eval-mode view of it serves SCST, so the
    features are read into memory once. CIDEr-D's document frequencies come from every training image's
    references (as in ruotianluo's code).
    """
    if world > 1:
        raise CamEyeError("--scst runs in one process for now (not under torchrun)")
    if not use_cache:
        raise CamEyeError("--scst trains the decoder on cached features: use a frozen encoder (--fine-tune-stages 0)")
    dataset = copy.copy(train_set)  # shares the features in memory
    dataset.mode = "eval"  # items: (features, references as word lists, index)
    references = [dataset.references(i) for i in range(len(dataset))]
    scorer = CiderD([[[*ref, "<end>"] for ref in refs] for refs in references])
    # The COCO objects each image's references name, for --scst-hallucination-penalty (only built when used).
    truths = [image_truth((), map(" ".join, refs)) for refs in references] if tcfg.scst_hallucination_penalty else []
    loader = DataLoader(
        dataset,
        tcfg.batch_size,
        sampler=EpochSampler(len(dataset), tcfg.seed),
        collate_fn=collate_eval,
        generator=torch.Generator(),
    )
    objective = scst_objective(
        decoder, scorer, rev_word_map, device, tcfg.scst_samples, tcfg.scst_max_len, tcfg.scst_hallucination_penalty,
        truths,
    )  # fmt: skip
    return objective, loader


def check_mid_epoch_resume(ckpt: dict, progress: EpochProgress, tcfg: TrainConfig, world: int) -> None:
    """A resume inside an epoch must keep the epoch's image order: the same seed and number of processes."""
    if progress.step == 0:
        return
    saved_world = (ckpt.get("progress") or {}).get("world", 1)
    saved_seed = (ckpt.get("train_config") or {}).get("seed", tcfg.seed)
    if saved_world != world or saved_seed != tcfg.seed:
        raise CamEyeError(
            f"last.pt stopped inside epoch {progress.epoch} with {saved_world} process(es) and seed {saved_seed}: "
            "resume with the same to finish the epoch (its image order depends on them)"
        )


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """``optimizer.load_state_dict(state)`` keeping this machine's choice of fused kernel: a saved group's "fused"
    (None in files from before train.adam, or True from a machine that had the kernel) would otherwise replace
    it. It is set before loading because loading places Adam's step counters by it (on the parameters'
    device for the fused kernel, on the CPU otherwise)."""
    groups = [{**saved, "fused": own.get("fused")} for saved, own in zip(state["param_groups"], optimizer.param_groups)]
    optimizer.load_state_dict({**state, "param_groups": groups})


def restore_checkpoint(ckpt, mcfg, tcfg, optimizers, scheduler) -> EpochProgress:
    """Load optimisers, scheduler and RNG from ``ckpt`` (the weights came with the models: _build_models);
    returns where training continues.

    A resume may switch fine-tuning on, off or to other stages (the common two-stage recipe: train the decoder
    on a frozen encoder, then fine-tune): the encoder then gets a fresh optimiser, the decoder keeps its own.
    """
    saved_stages = ModelConfig.from_dict(ckpt["config"]).fine_tune_stages
    load_optimizer_state(optimizers[0], ckpt["optimizers"][0])
    if len(optimizers) > 1:
        if saved_stages == mcfg.fine_tune_stages and len(ckpt["optimizers"]) > 1:
            load_optimizer_state(optimizers[1], ckpt["optimizers"][1])
        else:
            print(f"note: fine-tuning the last {mcfg.fine_tune_stages} encoder stage(s) with a fresh optimiser")
    for group in optimizers[0].param_groups:  # an explicit --decoder-lr on resume takes effect
        if tcfg.decoder_lr != ckpt["train_config"].get("decoder_lr", tcfg.decoder_lr):
            group["lr"] = tcfg.decoder_lr
    scheduler.load_state_dict(ckpt["scheduler"])
    _sync_encoder_lr(optimizers, scheduler, tcfg)
    set_rng_state(ckpt["rng"])
    saved = ckpt.get("progress")
    if saved:
        return EpochProgress(**saved)
    return EpochProgress(epoch=int(ckpt["epoch"]) + 1)


def trim_jsonl(path: Path, keep: Callable[[dict], bool]) -> None:
    """Rewrite a JSON-lines log keeping the records ``keep`` accepts (a resumed run redoes the others)."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
        if keep(record):
            kept.append(line + "\n")
    if len(kept) != len(lines):
        with atomic_path(path) as tmp:
            tmp.write_text("".join(kept), encoding="utf-8")


def _sync_encoder_lr(optimizers, scheduler, tcfg: TrainConfig) -> None:
    """The plateau scheduler watches the decoder; decay the encoder's rate by the same factor."""
    if len(optimizers) > 1:
        factor = optimizers[0].param_groups[0]["lr"] / tcfg.decoder_lr
        for g in optimizers[1].param_groups:
            g["lr"] = tcfg.encoder_lr * factor


def broadcast_float(value: float, world: int, device: torch.device) -> float:
    """Rank 0's value on every rank (validation runs on rank 0 only), sent from the run's ``device`` (the one
    its process group's backend serves: NCCL for CUDA, gloo for the CPU, also on a machine with a GPU)."""
    if world == 1:
        return float(value)
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.broadcast(t, 0)
    return float(t.item())


def append_jsonl(record: dict, path: Path) -> None:
    """Append one JSON line (each line is written whole with a single write call)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


# --------------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    """train.py's command line: one option per field of :class:`TrainConfig` and :class:`models.ModelConfig`."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=HelpFormatter,
        allow_abbrev=False,  # explicit options override a resumed run's: they must be recognisable in argv
    )
    add_options(p, TrainConfig)
    add_options(p, ModelConfig)
    return p


def configs_from_args(args: argparse.Namespace) -> tuple[ModelConfig, TrainConfig]:
    """Split parsed arguments into the model and the training configuration."""
    weights = args.encoder_weights
    if weights is None:  # the backbone's own pretrained weights
        weights = "package" if args.backbone.startswith("efficientnet") else "torchvision"
    mcfg = options_from_args(ModelConfig, args, vocab_size=0, encoder_weights=weights)
    return mcfg, options_from_args(TrainConfig, args)


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject contradictory options with argparse's one-line error (each value's own range is its field's type)."""
    if args.resume and args.overwrite:
        p.error("--resume and --overwrite contradict each other")
    if args.scst and not (args.init_from or args.resume):
        # Self-critical training samples captions from the model itself: from random weights every sample is
        # noise, and the rewards teach nothing (Rennie et al. start from a cross-entropy model).
        p.error("--scst needs --init-from: a cross-entropy run's best.pt to start from (SCST from random weights "
                "does not learn)")  # fmt: skip


def explicit_options(parser: argparse.ArgumentParser, argv: Sequence[str]) -> frozenset[str]:
    """The destinations of the options written on the command line (abbreviations are disabled)."""
    flags = {s.split("=", 1)[0] for s in argv if s.startswith("--")}
    return frozenset(a.dest for a in parser._actions if flags & set(a.option_strings))


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    check_args(parser, args)
    mcfg, tcfg = configs_from_args(args)
    keep_freed_memory()
    handle_sigterm()
    with cli_errors():
        try:
            train(mcfg, tcfg, explicit_options(parser, argv))
        except TrainingStopped as stop:
            print(str(stop), file=sys.stderr)
            raise SystemExit(stop.exit_status) from None


if __name__ == "__main__":
    freeze_imported_objects()
    sys.exit(main())
