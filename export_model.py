"""Turn a training checkpoint into a small inference checkpoint (what ships in checkpoints/).

    python export_model.py runs/flickr8k/best.pt checkpoints/flickr8k/cameye-flickr8k.pt --half

Keeps the model config, word map, decoder weights and only the encoder weights that training changed (none
for an encoder that was never fine-tuned: those are rebuilt from the backbone's offline pretrained weights),
see checkpoint.export_checkpoint. Drops optimiser, scheduler and RNG states. ``--half`` stores weights as
float16 (they are cast back to float32 on load), halving the file; check the metrics still hold with eval.py
before shipping it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from checkpoint import export_checkpoint
from cli import HelpFormatter
from utils import cli_errors, local_path


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("src", type=local_path, help="training checkpoint (best.pt / last.pt)")
    p.add_argument("dst", type=local_path, help="inference checkpoint to write")
    p.add_argument("--half", action="store_true", help="store weights as float16")
    p.add_argument(
        "--average", type=local_path, nargs="*", default=[], help="other checkpoints of the same run to average"
    )
    args = p.parse_args(argv)
    with cli_errors():
        export_checkpoint(args.src, args.dst, args.half, args.average)
        print(f"wrote {args.dst} ({args.dst.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    sys.exit(main())
