"""Evaluate a trained captioner on a split: caption every image with batched beam search, then score.

    python eval.py --checkpoint checkpoints/flickr8k/best.pt --data data/flickr8k --split test --beam-size 3

Reports, each labelled with how it was computed:

* BLEU-1..4 from nltk's ``corpus_bleu`` on word lists (the common tutorial's number);
* BLEU-1..4, METEOR, ROUGE-L and CIDEr from ``pycocoevalcap`` after its PTB tokenizer, against the original
  reference sentences (the numbers papers report; needs Java, skipped with a note without it);
* on data with object boxes (the synthetic set), attention correctness: for each generated word that names
  an object, the share of that step's attention inside the object's box, next to the uniform baseline.

Writes ``predictions_<split>.json`` (COCO results format), ``references_<split>.json`` (COCO caption
annotations, so any COCO tool can re-score the predictions) and ``metrics_<split>.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from datasets import CaptionDataset, collate_eval
from metrics import coco_metrics, java_available, mean_attention_correctness, nltk_bleu
from models import Decoded, Preprocess, load_captioner
from utils import (
    add_decoding_arguments,
    cli_errors,
    keep_freed_memory,
    non_negative_int,
    positive_int,
    reverse_word_map,
    select_device,
    write_json,
)


@torch.no_grad()
def decode_loader(
    encoder,
    decoder,
    loader: DataLoader,
    device: torch.device,
    beam_size: int = 3,
    max_len: int = 50,
    length_penalty: float = 1.0,
    progress: bool = False,
) -> tuple[list[Decoded], list, list[int]]:
    """Caption every item of an eval-mode loader (images, or cached features when ``encoder`` is None).

    Returns the decoded captions, each image's references and the dataset indices, in loader order.
    """
    decoder.eval()
    if encoder is not None:
        encoder.eval()
    predictions, references, indices = [], [], []
    for images, refs, index in tqdm(loader, desc="decoding", unit="batch", disable=not progress):
        images = images.to(device)
        feats = encoder(images) if encoder is not None else images
        predictions += decoder.beam_search(feats, beam_size, max_len, length_penalty)
        references += refs
        indices += index
    return predictions, references, indices


def object_word_records(tokens: Sequence[str], alphas: torch.Tensor, objects: dict):
    """(alpha grid, box, image size) for each generated word that names an object of the image.

    A noun phrase is [size] [colour] shape; it names the object with that colour and shape (unique within a
    synthetic image), and each of its words counts, as in the dataset's ``caption_objects``.
    """
    grid = math.isqrt(alphas.shape[1])
    size = (objects["width"], objects["height"])
    for t, word in enumerate(tokens):
        if t == 0 or not any(o["shape"] == word for o in objects["objects"]):
            continue
        colour = tokens[t - 1]
        match = [o for o in objects["objects"] if o["shape"] == word and o["colour"] == colour]
        if not match:
            continue  # a hallucinated object has no box to look at
        first = t - 2 if t >= 2 and tokens[t - 2] == match[0]["size"] else t - 1
        for s in range(first, t + 1):
            yield alphas[s].reshape(grid, grid).numpy(), match[0]["box"], size


def file_names(dataset: CaptionDataset) -> list[str]:
    """Each image's file name as create_input_files.py stored it (the image id in files made without names)."""
    # Fix: "file_name" in predictions_<split>.json and references_<split>.json used to be the image *id*
    # ("42" for COCO, Karpathy and synthetic data), not the file name; only Flickr8k, whose ids are file
    # names, came out right.
    if "filenames" not in dataset.h5:
        return list(dataset.image_ids)
    return [s.decode() if isinstance(s, bytes) else s for s in dataset.h5["filenames"][:]]


def json_safe(value):
    """``value`` with NaN and infinite floats replaced by None (JSON null), in nested dicts and lists."""
    # Fix: attention correctness is NaN when the model names no object, and json.dump wrote the bare token
    # NaN, which is not JSON: strict readers (jq, JavaScript, most non-Python tools) rejected the file.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def coco_id(image_id: str, index: int) -> int:
    """COCO tools want integer ids: COCO's own ids stay, others (Flickr file names) become the row index."""
    return int(image_id) if image_id.isdigit() else index


def evaluate(
    checkpoint: Path,
    data: Path,
    split: str,
    out: Path,
    beam_size: int = 3,
    length_penalty: float = 0.5,
    max_len: int = 50,
    batch_size: int = 64,
    device: str = "auto",
    max_images: int = 0,
    workers: int = 2,
    coco: bool = True,
) -> dict:
    """Decode ``split`` with the checkpoint's model, score it and write predictions and metrics."""
    dev = select_device(device)
    encoder, decoder, word_map, cfg = load_captioner(checkpoint, dev)
    dataset = CaptionDataset(data / f"{split}.hdf5", "eval", Preprocess(cfg.backbone, cfg.input_size))
    subset = Subset(dataset, range(min(max_images, len(dataset)))) if max_images else dataset
    loader = DataLoader(subset, batch_size=batch_size, num_workers=workers, collate_fn=collate_eval)
    preds, refs, indices = decode_loader(encoder, decoder, loader, dev, beam_size, max_len, length_penalty, True)
    rev = reverse_word_map(word_map)
    hyps = [[rev[i] for i in p.tokens] for p in preds]
    ids = [coco_id(dataset.image_ids[i], i) for i in indices]
    results = {
        "checkpoint": str(checkpoint),
        "split": split,
        "images": len(preds),
        "beam_size": beam_size,
        "length_penalty": length_penalty,
        "nltk_corpus_bleu": nltk_bleu(refs, hyps),
    }
    raw_refs = {cid: dataset.references(i, raw=True) for cid, i in zip(ids, indices)}
    predictions = {cid: " ".join(h) for cid, h in zip(ids, hyps)}
    if coco and java_available():
        results["coco_caption_metrics"] = coco_metrics(raw_refs, predictions)
    else:
        results["coco_caption_metrics_skipped"] = "no Java on this machine" if coco else "--no-coco"
    objects = [dataset.objects(i) for i in indices]
    if all(o is not None for o in objects):
        records = [r for h, p, o in zip(hyps, preds, objects) for r in object_word_records(h, p.alphas, o)]
        results["attention_correctness"] = mean_attention_correctness(records)
    out.mkdir(parents=True, exist_ok=True)
    names = file_names(dataset)
    write_json(
        [{"image_id": cid, "caption": predictions[cid], "file_name": names[i]} for cid, i in zip(ids, indices)],
        out / f"predictions_{split}.json",
    )
    write_json(references_as_coco(raw_refs, dataset, ids, indices), out / f"references_{split}.json")
    write_json(json_safe(results), out / f"metrics_{split}.json")  # NaN -> null: see json_safe
    return results


def references_as_coco(raw_refs: dict, dataset: CaptionDataset, ids: list[int], indices: list[int]) -> dict:
    """The references in COCO's caption-annotation format (readable by pycocotools' COCO class)."""
    names = file_names(dataset)  # fix: was dataset.image_ids[i] (see file_names)
    images = [{"id": cid, "file_name": names[i]} for cid, i in zip(ids, indices)]
    anns = [
        {"image_id": cid, "id": n, "caption": c}
        for n, (cid, c) in enumerate((cid, c) for cid in ids for c in raw_refs[cid])
    ]
    return {"info": {}, "licenses": [], "type": "captions", "images": images, "annotations": anns}


def format_results(results: dict) -> str:
    """A small human-readable table of ``results``."""
    lines = [f"{results['split']}: {results['images']} images, beam {results['beam_size']}"]
    pretty = {
        "nltk_corpus_bleu": "nltk corpus_bleu (word lists, tutorial's way)",
        "coco_caption_metrics": "pycocoevalcap (PTB tokenizer; the standard COCO caption metrics)",
    }
    for key, title in pretty.items():
        if key in results:
            scale = {k: 100 for k in results[key]}  # all x100, CIDEr included, as papers report
            lines.append(f"  {title}:")
            lines.append("    " + "  ".join(f"{k} {v * scale[k]:.1f}" for k, v in results[key].items()))
    if "coco_caption_metrics_skipped" in results:
        lines.append(f"  COCO caption metrics skipped: {results['coco_caption_metrics_skipped']}")
    if "attention_correctness" in results:
        a = results["attention_correctness"]
        lines.append(
            f"  attention correctness {a['attention_correctness']:.3f} vs uniform baseline "
            f"{a['uniform_baseline']:.3f} over {a['n_words']} object words"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Caption a prepared split with beam search and report BLEU, "
        "METEOR, ROUGE-L, CIDEr (and attention correctness on synthetic data).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data", type=Path, required=True, help="folder made by create_input_files.py")
    p.add_argument("--split", default="test", choices=["train", "val", "test"], help="which split to evaluate")
    p.add_argument("--out", type=Path, default=None, help="folder for predictions/metrics (default: --data/results)")
    add_decoding_arguments(p)
    p.add_argument("--batch-size", type=positive_int, default=64, help="images encoded and decoded together")
    p.add_argument("--max-images", type=non_negative_int, default=0, help="evaluate only the first N images (0 = all)")
    p.add_argument("--no-coco", dest="coco", action="store_false", help="skip the pycocoevalcap metrics (Java)")
    p.add_argument("--workers", type=non_negative_int, default=2, help="DataLoader worker processes")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    keep_freed_memory()
    with cli_errors():
        if not java_available() and args.coco:
            print("note: no Java found: METEOR, ROUGE-L, CIDEr and COCO BLEU are skipped", file=sys.stderr)
        results = evaluate(
            args.checkpoint,
            args.data,
            args.split,
            args.out or args.data / "results",
            args.beam_size,
            args.length_penalty,
            args.max_len,
            args.batch_size,
            args.device,
            args.max_images,
            args.workers,
            args.coco,
        )
        print(format_results(results))


if __name__ == "__main__":
    sys.exit(main())
