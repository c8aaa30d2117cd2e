"""Caption photos with a trained CamEye model and show, word by word, where it looked.

    python caption.py photo.jpg                      # the shipped Flickr8k model, beam search of 3
    python caption.py photos/ more.png --gif         # a folder and a file; also an animated GIF each
    python caption.py photo.jpg --checkpoint checkpoints/run/best.pt --beam-size 5

Prints one ``file: caption`` line per image (with ``--ground``, the words the object detector put in end in
``*``, in the figure titles too, and a legend line follows) and writes ``<out-dir>/<name>_attention.png``:
the photo, then one panel per generated word with that step's attention drawn over the photo. As in the paper's figures,
the coarse attention grid is upsampled smoothly (a Gaussian pyramid expansion), not as blocky squares.

Images are decoded like the training data (EXIF rotation, any colour mode, squashed to the training size)
and captioned in batches. A file that cannot be used is reported in one line and skipped; the exit status
is 2 if any input failed.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from attention_maps import attention_grids, photo_shape, save_attention_figure, save_attention_gif, stretch_photo
from captioner import OUTSIDE_LEGEND, Captioner, caption_images, collect_images
from cli import HelpFormatter, options_from_args
from decoding import DecodeConfig, add_decoding_arguments
from utils import (
    CamEyeError,
    cli_errors,
    freeze_imported_objects,
    keep_freed_memory,
    local_path,
    output_folder,
    positive_int,
)


def output_name(path: Path, used: set[str]) -> str:
    """A figure file stem for ``path`` that no earlier image of this run has taken."""
    stem, n = path.stem, 1
    while stem in used:
        n += 1
        stem = f"{path.stem}_{n}"
    used.add(stem)
    return stem


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Caption images and save per-word attention figures.", formatter_class=HelpFormatter
    )
    p.add_argument("images", nargs="+", type=local_path, help="image files and/or folders of images")
    add_decoding_arguments(p)
    p.add_argument(
        "--word-map", type=local_path, default=None, help="optional word map JSON that must match the model's"
    )
    p.add_argument("--batch-size", type=positive_int, default=16, help="images captioned together")
    p.add_argument("--out-dir", type=local_path, default=Path("outputs"), help="folder for the attention figures")
    p.add_argument("--no-figures", dest="figures", action="store_false", help="only print the captions")
    p.add_argument("--gif", action="store_true", help="also write an animated GIF per image")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    keep_freed_memory()
    failed = 0
    with cli_errors():
        if args.figures:
            output_folder(args.out_dir, "--out-dir", create=False)  # made by the first figure's atomic write
        paths = collect_images(args.images)
        captioner = Captioner.load(args.checkpoint, args.device, args.word_map, args.encoder_weights,
                                   args.precision, args.object_prior)  # fmt: skip
        used: set[str] = set()
        results = caption_images(paths, captioner, options_from_args(DecodeConfig, args), args.batch_size)
        any_outside = False
        for path, words, decoded, image in results:
            if isinstance(words, CamEyeError):
                print(f"error: {words}", file=sys.stderr)
                failed += 1
                continue
            words = captioner.words(decoded, marked=True)  # the detector's words marked (issue 20)
            any_outside |= any(decoded.outside)
            print(f"{path}: {' '.join(words)}", flush=True)
            if args.figures and words:
                stem = output_name(path, used)
                grids = attention_grids(decoded)
                photo = stretch_photo(image, photo_shape(path))  # at its own aspect ratio, as the page shows it
                save_attention_figure(image, words, grids, args.out_dir / f"{stem}_attention.png", photo)
                if args.gif:
                    save_attention_gif(image, words, grids, args.out_dir / f"{stem}_attention.gif")
        if any_outside:
            print(OUTSIDE_LEGEND)
    return 2 if failed else 0


if __name__ == "__main__":
    freeze_imported_objects()
    sys.exit(main())
