"""detector.py against the package's own runtime: the same CenterNet graph run by TensorFlow.js in Node.

    npm install --prefix data/tfjs-check @tensorflow/tfjs-core@4.22.0 @tensorflow/tfjs-converter@4.22.0 \\
        @tensorflow/tfjs-backend-cpu@4.22.0
    python benchmarks/detector_runtime_check.py PHOTO [PHOTO ...] [--tfjs data/tfjs-check/node_modules]

Each photo is squashed to the network's 512 x 512 input once (:meth:`Detector.prepare`), and that one float32
tensor goes to both runtimes, so only the graph's execution is compared: TF.js 4.22.0's cpu backend (what
``@vladmandic/human`` 3.3.6 runs on, in plain JavaScript: no native TensorFlow) via
``benchmarks/detector_tfjs.js``, and detector.py's :class:`GraphModule`. Printed per photo: the largest
absolute difference of the heatmap (``tower_0/keypoints``, 1 x 128 x 128 x 80, in 0..1), of the box sizes
(``tower_0/wh``, input pixels) and of the graph's 1 x 100 x 6 detections, and whether the 100 detections
name the same classes in the same order. Also detector.py's own decode (:func:`decode`) against its run of
the graph's decode nodes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from detector import DEFAULT_DIR, DETECTIONS, HEATMAP, INPUT_SIZE, SIZES, Detector, decode  # noqa: E402
from images import decode_image  # noqa: E402
from utils import CamEyeError, cli_errors  # noqa: E402

SHAPES = {"keypoints": (1, 128, 128, 80), "wh": (1, 128, 128, 4), "detections": (1, 100, 6)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("photos", nargs="+", type=Path)
    p.add_argument("--weights", type=Path, default=DEFAULT_DIR, help="the detector's folder")
    p.add_argument("--tfjs", type=Path, default=ROOT / "data" / "tfjs-check" / "node_modules",
                   help="node_modules holding @tensorflow/tfjs-core, -converter and -backend-cpu")  # fmt: skip
    args = p.parse_args()
    torch.set_num_threads(1)
    with cli_errors():
        node = shutil.which("node")
        if node is None:
            raise CamEyeError("node not found: the check runs TensorFlow.js in Node.js")
        if not (args.tfjs / "@tensorflow" / "tfjs-converter").is_dir():
            raise CamEyeError(f"no TensorFlow.js in {args.tfjs}: install it as this script's help says")
        detector = Detector.load(args.weights)
        with tempfile.TemporaryDirectory() as tmp:
            inputs = []
            for i, photo in enumerate(args.photos):
                x = detector.prepare(decode_image(photo, 2**30))
                assert x.shape == (1, INPUT_SIZE, INPUT_SIZE, 3)
                inputs.append(Path(tmp) / f"photo{i}.f32")
                x.numpy().astype("<f4").tofile(inputs[-1])
            env = {**os.environ, "NODE_PATH": str(args.tfjs.resolve())}
            script = str(ROOT / "benchmarks" / "detector_tfjs.js")
            run = subprocess.run([node, script, str(args.weights), *map(str, inputs)], env=env, text=True,
                                 capture_output=True)  # fmt: skip
            if run.returncode != 0:
                raise CamEyeError(f"TensorFlow.js failed: {(run.stderr.strip().splitlines() or ['?'])[-1]}")
            for photo, line in zip(args.photos, run.stdout.strip().splitlines()):
                print(f"{photo.name}: TensorFlow.js {line}")
            worst = {k: 0.0 for k in SHAPES}
            for photo, path in zip(args.photos, inputs):
                x = torch.from_numpy(np.fromfile(path, dtype="<f4").reshape(1, INPUT_SIZE, INPUT_SIZE, 3))
                with torch.inference_mode():
                    ours = detector.graph(x, (HEATMAP, SIZES, DETECTIONS))
                theirs = {k: np.fromfile(path.with_suffix(f".{k}.f32"), "<f4").reshape(s) for k, s in SHAPES.items()}
                diffs = {}
                for key, name in (("keypoints", HEATMAP), ("wh", SIZES), ("detections", DETECTIONS)):
                    diffs[key] = float(np.abs(ours[name].numpy() - theirs[key]).max())
                    worst[key] = max(worst[key], diffs[key])
                same_classes = bool((ours[DETECTIONS][0, :, 5].numpy() == theirs["detections"][0, :, 5]).all())
                scores, classes, boxes = decode(ours[HEATMAP], ours[SIZES], INPUT_SIZE / ours[HEATMAP].shape[2])
                own = torch.cat([boxes[0], scores[0, :, None], classes[0, :, None].float()], dim=1)
                self_diff = float((own - ours[DETECTIONS][0]).abs().max())
                print(f"{photo.name}: max |torch - tfjs| heatmap {diffs['keypoints']:.2e}, sizes {diffs['wh']:.2e} px, "
                      f"detections {diffs['detections']:.2e} (same 100 classes in order: {same_classes}); "
                      f"decode() vs the graph's decode {self_diff:.1e}")  # fmt: skip
            print(f"largest over {len(inputs)} photos: heatmap {worst['keypoints']:.2e}, sizes {worst['wh']:.2e} px, "
                  f"detections {worst['detections']:.2e}")  # fmt: skip


if __name__ == "__main__":
    main()
