"""Measure decoding levers (beam size, length penalty) of a trained model on a split, from cached features.

    python benchmarks/sweep_decoding.py --checkpoint runs/f8k/best.pt --data data/flickr8k --split val \
        --beam-sizes 1 3 5 --length-penalties 0 0.5 1

Encodes the split once (or reuses train.py's feature cache for the same encoder settings), then decodes it
with every combination and prints nltk BLEU-4 and the COCO caption metrics for each. Tune on ``val``;
report ``test`` only for the chosen setting.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from checkpoint import load_captioner  # noqa: E402
from datasets import FeatureDataset, collate_eval  # noqa: E402
from decoding import DecodeConfig, content_word_mask, decode_loader  # noqa: E402
from eval import coco_id  # noqa: E402
from features import cache_features, cache_is_current, features_path, weights_fingerprint  # noqa: E402
from metrics import coco_metrics, java_available, nltk_bleu  # noqa: E402
from utils import reverse_word_map  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, required=True, help="trained CamEye checkpoint")
    p.add_argument("--data", type=Path, required=True, help="folder made by create_input_files.py")
    p.add_argument("--split", default="val", choices=["val", "test"], help="split to decode")
    p.add_argument("--beam-sizes", type=int, nargs="+", default=[1, 3, 5], help="beam sizes to try")
    p.add_argument("--length-penalties", type=float, nargs="+", default=[0.0, 0.5, 1.0], help="values to try")
    p.add_argument("--precision", default="auto", choices=["auto", "float32", "bfloat16"], help="the encoder's")
    args = p.parse_args()
    device = torch.device("cpu")
    encoder, decoder, word_map, cfg = load_captioner(args.checkpoint, device, precision=args.precision)
    cache = features_path(cfg, args.data, args.split, encoder.precision)
    if not cache_is_current(args.data / f"{args.split}.hdf5", cache, encoder.precision, weights_fingerprint(encoder)):
        cache_features(encoder, cfg, args.data / f"{args.split}.hdf5", cache, device)
    dataset = FeatureDataset(args.data / f"{args.split}.hdf5", cache, "eval")
    loader = DataLoader(dataset, batch_size=100, collate_fn=collate_eval)
    rev = reverse_word_map(word_map)
    print(f"{args.checkpoint} on {args.split} ({len(dataset)} images)")
    print("beam  lp   | nltk B4 | COCO B4  METEOR  ROUGE-L  CIDEr | words")
    for beam in args.beam_sizes:
        for lp in args.length_penalties:
            search = dataclasses.replace(DecodeConfig(), beam_size=beam, length_penalty=lp)
            preds, refs, idx = decode_loader(None, decoder, loader, device, search, content_word_mask(word_map))
            hyps = [[rev[i] for i in d.tokens] for d in preds]
            row = f"{beam:4d}  {lp:3.1f} | {nltk_bleu(refs, hyps)['BLEU-4'] * 100:7.2f} |"
            if java_available():
                ids = [coco_id(dataset.image_ids[i], i) for i in idx]
                raw = {c: dataset.references(i, raw=True) for c, i in zip(ids, idx)}
                m = coco_metrics(raw, {c: " ".join(h) for c, h in zip(ids, hyps)})
                b4, meteor, rouge, cider = (m[k] * 100 for k in ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr"))
                row += f" {b4:7.2f} {meteor:7.2f} {rouge:8.2f} {cider:6.1f} |"
            print(row + f" {sum(map(len, hyps)) / len(hyps):5.2f}", flush=True)


if __name__ == "__main__":
    main()
