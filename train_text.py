"""Teach a captioner the everyday world from caption text: a grown vocabulary and an object-aware language model.

    python train_text.py ../shared/data/coco-captions-text/captions.json ../shared/data/flickr8k \\
        --out runs/text

Reads caption text (a COCO ``captions_*.json``, e.g. COCO 2017's ``captions_val2017.json`` from the COCO
annotations archive; a Flickr8k folder; a Karpathy JSON), grows the captioner's vocabulary by the text's words
(vocabulary.py: each new word transferred from the known word most like it) and trains the language model of
language.py on the text, each caption told the COCO objects its image's captions name. Photos are never
opened: a COCO file's captions all count as text, while from a Flickr8k folder or Karpathy JSON only the
training split's captions are read (their val and test photos are for evaluation).

Writes ``OUT/model.pt``, the captioner's checkpoint with the grown word map and decoder, and beside it
``OUT/model.text.pt``, the language model (checkpoint.text_model_path): caption.py, eval.py and app.py load the
pair like any model file (copy both). ``OUT/last.pt`` is written after each epoch (``--resume`` continues from
it). Written atomically; Ctrl-C leaves the last finished epoch.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from captions import ImageRecord, read_source
from checkpoint import load_checkpoint_file, text_model_file, text_model_path
from cli import HelpFormatter, add_options, float_between, int_between, opt, options_from_args
from language import ObjectLanguageModel, TextModelConfig, caption_categories, training_presence, usual_names
from utils import DEFAULT_CHECKPOINT, CamEyeError, cli_errors, local_path, save_torch, seed_everything
from vocabulary import extend_decoder_state, extend_word_map, transfer_sources, word_vectors


@dataclass(frozen=True)
class TextTrainConfig:
    """Every option of train_text.py, its default and its help, once."""

    min_count: int = opt(5, "a text word seen at least this often joins the vocabulary", type=int_between(1))
    max_words: int = opt(30, "captions are cut to this many words for the language model", type=int_between(2, 100))
    epochs: int = opt(8, "passes over the text", type=int_between(1, 1000))
    batch_size: int = opt(128, "captions per step", type=int_between(1, 65536))
    lr: float = opt(2e-3, "Adam's learning rate", type=float_between(0.0, 1.0, closed_high=True))
    embed_dim: int = opt(256, "the language model's word vectors", type=int_between(1, 4096))
    hidden_dim: int = opt(512, "the language model's LSTM units", type=int_between(1, 4096))
    dropout: float = opt(0.3, "dropout in the language model", type=float_between(0.0, 1.0, closed_high=False))
    held_out: float = opt(0.02, "share of images whose captions measure perplexity (not trained on)",
                          type=float_between(0.0, 0.5))  # fmt: skip
    seed: int = opt(0, "random seed (captions' order, simulated detections, weights)", type=int)
    half: bool = opt(
        True, "store the weights of model.pt and model.text.pt as float16 (smaller; cast back to float32 on load)"
    )


INFERENCE_KEYS = ("format", "version", "config", "word_map", "decoder", "encoder", "encoder_partial", "epoch",
                  "history", "train_config", "averaged_with")  # fmt: skip


def read_text(sources: Sequence[Path]) -> list[ImageRecord]:
    """The images whose captions count as text (see the module docstring), from each source in turn."""
    records = []
    for path in sources:
        kind, found = read_source([path], None, unnamed_split="train")
        records += [r for r in found if kind == "coco" or r.split == "train"]
    if not records:
        raise CamEyeError("no captions found in the text sources")
    return records


def encode(records: Sequence[ImageRecord], word_map: dict[str, int], max_words: int):
    """Every caption as ids (<start> words <end>, cut to ``max_words`` words), with its own COCO categories and
    the categories only its image's other captions name."""
    unk = word_map["<unk>"]
    examples = []
    for r in records:
        named = [caption_categories(t) for t in r.tokens]
        everything = set().union(*named) if named else set()
        for tokens, own in zip(r.tokens, named):
            if tokens:
                ids = [1, *(word_map.get(w, unk) for w in tokens[:max_words]), 2]
                examples.append((ids, own, everything - own))
    return examples


def batches(examples, batch_size: int, rng: np.random.Generator, shuffle: bool):
    """Padded (inputs, targets, object scores): N x T, N x T (0 = padding), N x 80."""
    order = rng.permutation(len(examples)) if shuffle else np.arange(len(examples))
    for start in range(0, len(order), batch_size):
        chosen = [examples[i] for i in order[start : start + batch_size]]
        length = max(len(ids) for ids, _, _ in chosen) - 1
        words = torch.zeros(len(chosen), length + 1, dtype=torch.long)
        for row, (ids, _, _) in enumerate(chosen):
            words[row, : len(ids)] = torch.tensor(ids)
        objects = torch.from_numpy(np.stack([training_presence(own, others, rng) for _, own, others in chosen]))
        yield words[:, :-1], words[:, 1:], objects


def perplexity(model: ObjectLanguageModel, examples, batch_size: int, seed: int) -> float:
    """exp(mean cross-entropy per word) over ``examples`` (same simulated detections on every call)."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for inputs, targets, objects in batches(examples, batch_size, np.random.default_rng(seed), shuffle=False):
            logits = model(inputs, objects)
            total += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=0, reduction="sum").item()
            count += int((targets != 0).sum())
    model.train()
    return math.exp(total / max(count, 1))


def grown_captioner(base: dict, records: Sequence[ImageRecord], min_count: int) -> tuple[dict, dict]:
    """The base checkpoint with its word map grown by the text's words and its decoder by their transferred
    rows (vocabulary.py), and a summary of what was added."""
    sentences = [t for r in records for t in r.tokens]
    word_map = extend_word_map(base["word_map"], sentences, min_count)
    known = len(base["word_map"])
    sources = transfer_sources(word_map, known, word_vectors(sentences, word_map))
    # an inference checkpoint (export_model.py's keys): a training checkpoint's optimiser states fit the old words
    grown = {k: base[k] for k in INFERENCE_KEYS if k in base}
    grown["word_map"] = word_map
    grown["config"] = {**base["config"], "vocab_size": len(word_map)}
    grown["decoder"] = extend_decoder_state(base["decoder"], sources)
    names = sorted(word_map, key=word_map.get)
    summary = {"known_words": known, "new_words": len(word_map) - known,
               "transferred_from": {names[n]: names[s] for n, s in sources.items()}}  # fmt: skip
    return grown, summary


def train_text(sources: Sequence[Path], base_path: Path, out: Path, cfg: TextTrainConfig, resume: bool) -> Path:
    """Grow the captioner at ``base_path`` and train its language model on ``sources``; returns OUT/model.pt."""
    out.mkdir(parents=True, exist_ok=True)
    records = read_text(sources)
    base = load_checkpoint_file(base_path)
    grown, summary = grown_captioner(base, records, cfg.min_count)
    word_map = grown["word_map"]
    print(f"{sum(len(r.tokens) for r in records):,} captions of {len(records):,} images; vocabulary "
          f"{summary['known_words']:,} + {summary['new_words']:,} words from the text")  # fmt: skip
    rng = np.random.default_rng(cfg.seed)
    held = rng.random(len(records)) < cfg.held_out  # whole images held out, so no caption's siblings train
    train = encode([r for r, h in zip(records, held) if not h], word_map, cfg.max_words)
    val = encode([r for r, h in zip(records, held) if h], word_map, cfg.max_words)
    seed_everything(cfg.seed)
    mcfg = TextModelConfig(len(word_map), cfg.embed_dim, cfg.hidden_dim, dropout=cfg.dropout)
    model = ObjectLanguageModel(mcfg)
    optimiser = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    state = {"epoch": 0, "best": math.inf, "history": [], "best_weights": None}
    last = out / "last.pt"
    if resume:
        try:
            saved = torch.load(last, map_location="cpu", weights_only=True) if last.is_file() else None
        except Exception as exc:  # a half-written or foreign file: torch says why in many ways
            raise CamEyeError(f"{last} cannot be resumed from ({type(exc).__name__})") from None
        same = {**asdict(cfg), "epochs": None}  # more epochs may be asked for; nothing else may change
        if (
            saved is None
            or saved.get("word_map") != word_map
            or {**saved.get("text_config", {}), "epochs": None} != same
        ):
            raise CamEyeError(f"nothing to resume in {out} with these sources and options (other than --epochs)")
        model.load_state_dict(saved["model"])
        optimiser.load_state_dict(saved["optimiser"])
        state = saved["state"]
    for epoch in range(state["epoch"], cfg.epochs):
        rng = np.random.default_rng([cfg.seed, epoch])
        for group in optimiser.param_groups:  # halve the rate for the last third of the epochs
            group["lr"] = cfg.lr * (0.5 if epoch >= 2 * cfg.epochs // 3 else 1.0)
        started, steps = time.monotonic(), math.ceil(len(train) / cfg.batch_size)
        bar = tqdm(batches(train, cfg.batch_size, rng, shuffle=True), total=steps, desc=f"epoch {epoch + 1}")
        for inputs, targets, objects in bar:
            logits = model(inputs, objects)  # N x T x V
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=0)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            optimiser.step()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        ppl = perplexity(model, val, cfg.batch_size, cfg.seed) if val else math.nan
        state["history"].append({"epoch": epoch + 1, "val_perplexity": ppl, "seconds": time.monotonic() - started})
        print(f"epoch {epoch + 1}: held-out perplexity {ppl:.2f} ({time.monotonic() - started:.0f} s)")
        if not ppl >= state["best"]:  # NaN (nothing held out): the last epoch is the best
            state["best"], state["best_weights"] = ppl, {k: v.clone() for k, v in model.state_dict().items()}
        state["epoch"] = epoch + 1
        save_torch({"model": model.state_dict(), "optimiser": optimiser.state_dict(), "state": state,
                    "word_map": word_map, "text_config": asdict(cfg)}, last)  # fmt: skip
    dtype = torch.float16 if cfg.half else torch.float32
    grown["decoder"] = {k: v.to(dtype) if v.is_floating_point() else v for k, v in grown["decoder"].items()}
    model.load_state_dict(state["best_weights"])
    model.object_names = usual_names(t for r in records for t in r.tokens)
    save_torch(text_model_file(model, word_map, cfg.half), text_model_path(out / "model.pt"))
    grown["text_training"] = {"sources": [str(s) for s in sources], "config": asdict(cfg), "history": state["history"],
                              "vocabulary": summary}  # fmt: skip
    save_torch(grown, out / "model.pt")
    return out / "model.pt"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=HelpFormatter)  # fmt: skip
    p.add_argument("sources", type=local_path, nargs="+", help="caption text: COCO captions_*.json, Flickr8k folder, "
                   "Karpathy JSON")  # fmt: skip
    p.add_argument("--checkpoint", type=local_path, default=DEFAULT_CHECKPOINT, help="the captioner to grow")
    p.add_argument("--out", type=local_path, required=True, help="folder for model.pt and last.pt")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt (same sources and options)")
    add_options(p, TextTrainConfig)
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    with cli_errors():
        path = train_text(args.sources, args.checkpoint, args.out, options_from_args(TextTrainConfig, args),
                          args.resume)  # fmt: skip
        print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    sys.exit(main())
