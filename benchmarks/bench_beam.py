"""Beam search speed: batches of images at once versus the same search one image at a time.

    python benchmarks/bench_beam.py                       # shipped model, 128 varied views of bundled photos
    python benchmarks/bench_beam.py --photos ../shared/data/flickr8k/Flicker8k_Dataset --images 256

Decodes the same encoder features both ways (beam 3, batches of 64, length penalty 0.5 as eval.py) and
prints images/s and the speed-up. The encoder's cost is the same either way and is left out, so the numbers
isolate the decoder's search. Each image's caption must come out identical both ways.

The images must differ: captions of different lengths are what a real split has, and a batch runs until its
longest caption ends. Without ``--photos`` they are crops and mirror images of the photos bundled with
scikit-image (the ``make demo`` photos), so no data is needed. Without a checkpoint, a randomly initialised
decoder decodes random features (every caption then runs to --max-len).

Timings on a small shared virtual CPU drift by 20-40% within minutes, so each repeat times both ways back to
back and the median speed-up is reported. Run on an idle machine: two torch processes on two cores slow
each other 5-10x.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from captioner import collect_images, read_image  # noqa: E402
from checkpoint import load_captioner  # noqa: E402
from decoding import DecodeConfig, beam_search  # noqa: E402
from models import DecoderWithAttention, ModelConfig, Preprocess  # noqa: E402
from utils import DEFAULT_CHECKPOINT, keep_freed_memory  # noqa: E402

DEMO_PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png", "motorcycle_left.png", "camera.png", "rocket.jpg")


def bundled_views(n: int, size: int, seed: int = 0) -> np.ndarray:
    """``n`` distinct uint8 3 x size x size views (seeded crops of 50-100% of the side, half of them
    mirrored) of the photos bundled with scikit-image."""
    import skimage.data

    folder = Path(skimage.data.__file__).parent
    photos = [Image.open(folder / name).convert("RGB") for name in DEMO_PHOTOS]
    rng = np.random.default_rng(seed)
    views = []
    for i in range(n):
        photo = photos[i % len(photos)]
        w, h = photo.size
        side = int(min(w, h) * rng.uniform(0.5, 1.0))
        x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
        view = photo.crop((x, y, x + side, y + side)).resize((size, size), Image.BICUBIC)
        if rng.random() < 0.5:
            view = view.transpose(Image.FLIP_LEFT_RIGHT)
        views.append(np.asarray(view).transpose(2, 0, 1))
    return np.stack(views)


def encode(encoder, cfg: ModelConfig, images: np.ndarray, device: torch.device, batch_size: int = 32) -> torch.Tensor:
    preprocess = Preprocess(cfg.backbone, cfg.input_size)
    with torch.no_grad():
        return torch.cat(
            [
                encoder(preprocess(torch.from_numpy(images[i : i + batch_size])).to(device))
                for i in range(0, len(images), batch_size)
            ]
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT, help="model to decode with")
    p.add_argument("--photos", type=Path, help="folder of photos to use (default: views of bundled photos)")
    p.add_argument("--images", type=int, default=128, help="images decoded each way")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch of the batched run")
    p.add_argument("--beam-size", type=int, default=3, help="beams per image")
    p.add_argument("--max-len", type=int, default=50, help="longest caption")
    p.add_argument("--length-penalty", type=float, default=0.5, help="as eval.py's --length-penalty")
    p.add_argument("--repeats", type=int, default=3, help="timed runs each way; the median speed-up is reported")
    p.add_argument("--device", default="cpu", help="'cpu', 'cuda', 'cuda:1', ...")
    args = p.parse_args()
    device = torch.device(args.device)
    keep_freed_memory()  # as eval.py and caption.py do
    torch.manual_seed(0)
    if args.checkpoint.is_file():
        encoder, decoder, _, cfg = load_captioner(args.checkpoint, device)
        if args.photos:
            paths = collect_images([args.photos])[: args.images]
            images = np.stack([read_image(path, cfg.image_size) for path in paths])
            source = f"{len(paths)} photos of {args.photos}"
        else:
            images = bundled_views(args.images, cfg.image_size)
            source = f"{args.images} views of scikit-image's photos"
        feats = encode(encoder, cfg, images, device)
        source = f"{args.checkpoint.name} on {source}"
    else:
        decoder = DecoderWithAttention(ModelConfig(vocab_size=2600), 1280).eval().to(device)
        feats = torch.randn(args.images, 100, 1280, device=device).abs()
        source = f"random decoder on {args.images} random feature maps (no checkpoint found)"
    n, b = len(feats), args.batch_size

    # Without repeat blocking (the random decoder has no word map), as in the earlier figures.
    search_cfg = DecodeConfig(args.beam_size, args.length_penalty, args.max_len, False, False)

    def search(x: torch.Tensor):
        return beam_search(decoder, x, search_cfg)

    search(feats[:2])  # warm-up
    rates = []  # (batched, one at a time) images/s per repeat, timed back to back so they see the same machine
    for _ in range(args.repeats):
        t = time.perf_counter()
        batched = [d for i in range(0, n, b) for d in search(feats[i : i + b])]
        t_batched = time.perf_counter() - t
        t = time.perf_counter()
        single = [search(feats[i : i + 1])[0] for i in range(n)]
        rates.append((n / t_batched, n / (time.perf_counter() - t)))
    same = sum(x.tokens == y.tokens for x, y in zip(batched, single))
    lengths = [len(d.tokens) for d in batched]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"{source}; beam {args.beam_size}, length penalty {args.length_penalty}, {where}")
    print(f"caption lengths {min(lengths)}-{max(lengths)} words, mean {np.mean(lengths):.1f}")
    for i, (rb, rs) in enumerate(rates, 1):
        print(f"run {i}: batched ({b} at once) {rb:6.1f} images/s, one at a time {rs:5.1f} images/s: {rb / rs:.1f}x")
    ratio = float(np.median([rb / rs for rb, rs in rates]))
    print(f"median speed-up: {ratio:.1f}x; identical captions: {same}/{n}")


if __name__ == "__main__":
    main()
