"""Tests for detector.py: the TF.js graph reader and interpreter, the CenterNet decode, the encoder-frame box
mapping, the weights' set-up, and the rebuilt detector on photos with known objects (issue 20)."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import detector
from detector import (
    LABELS,
    Detector,
    DetectorUnavailable,
    GraphModule,
    boxes_to_grid,
    boxes_to_square,
    decode,
    load_graph,
)
from utils import CamEyeError


def _s(text: str) -> dict:
    return {"s": base64.b64encode(text.encode()).decode()}


def _write_graph(folder: Path, nodes: list[dict], weights: dict[str, np.ndarray]) -> Path:
    """A TF.js graph model as the converter writes it: float weights stored float16, int32 as they are."""
    specs, chunks = [], []
    for name, w in weights.items():
        if w.dtype == np.int32:
            specs.append({"name": name, "shape": list(w.shape), "dtype": "int32"})
            chunks.append(w.astype("<i4").tobytes())
        else:
            quant = {"dtype": "float16", "original_dtype": "float32"}
            specs.append({"name": name, "shape": list(w.shape), "dtype": "float32", "quantization": quant})
            chunks.append(w.astype("<f2").tobytes())
    nodes = [*nodes, *({"name": n, "op": "Const"} for n in weights)]
    doc = {
        "format": "graph-model",
        "modelTopology": {"node": nodes},
        "weightsManifest": [{"paths": ["model.bin"], "weights": specs}],
        "signature": {"outputs": {"out": {"name": "out"}}},
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.bin").write_bytes(b"".join(chunks))
    (folder / "model.json").write_text(json.dumps(doc))
    return folder / "model.json"


def _conv_graph(folder: Path, kernel: np.ndarray, op: str = "_FusedConv2D", stride: int = 2) -> Path:
    """x (1 x H x W x C) -> one SAME convolution with a zero bias -> out."""
    out_channels = kernel.shape[3] * (kernel.shape[2] if "Depthwise" in op else 1)
    conv = {
        "name": "out",
        "op": op,
        "input": ["x", "w", "b"],
        "attr": {
            "strides": {"list": {"i": ["1", str(stride), str(stride), "1"]}},
            "padding": _s("SAME"),
            "fused_ops": {"list": {"s": [_s("BiasAdd")["s"]]}},
            "num_args": {"i": "1"},
        },
    }
    weights = {"w": kernel.astype(np.float32), "b": np.zeros(out_channels, np.float32)}
    return _write_graph(folder, [{"name": "x", "op": "Placeholder"}, conv], weights)


# ------------------------------------------------------------------------------------------ reading the file
def test_a_malformed_or_truncated_graph_is_refused_in_one_line(tmp_path: Path) -> None:
    path = _conv_graph(tmp_path / "ok", np.ones((3, 3, 2, 4)))
    load_graph(path)  # the well-formed one loads

    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "model.json").write_text(path.read_text()[:500])
    (cut / "model.bin").write_bytes((path.parent / "model.bin").read_bytes())
    bin_short = _conv_graph(tmp_path / "short", np.ones((3, 3, 2, 4)))
    bin_short.with_suffix(".bin").write_bytes(bin_short.with_suffix(".bin").read_bytes()[:-2])
    bin_long = _conv_graph(tmp_path / "long", np.ones((3, 3, 2, 4)))
    bin_long.with_suffix(".bin").write_bytes(bin_long.with_suffix(".bin").read_bytes() + b"\0\0")
    doc = json.loads(path.read_text())

    def manifest(paths: list[str], spec: dict) -> dict:
        return {"weightsManifest": [{"paths": paths, "weights": [spec]}]}

    bad = {
        "escape": manifest(["../model.bin"], doc["weightsManifest"][0]["weights"][0]),
        "shape": manifest(["model.bin"], {"name": "w", "shape": [-1], "dtype": "float32"}),
        "dtype": manifest(["model.bin"], {"name": "w", "shape": [1], "dtype": "string"}),
        "nodes": {"modelTopology": {"node": "x"}},
    }
    nan = _conv_graph(tmp_path / "nan", np.full((3, 3, 2, 4), np.nan))
    cases = {"cut": cut / "model.json", "short": bin_short, "long": bin_long, "nan": nan}
    for name, change in bad.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.bin").write_bytes((path.parent / "model.bin").read_bytes())
        (tmp_path / name / "model.json").write_text(json.dumps({**doc, **change}))
        cases[name] = tmp_path / name / "model.json"
    for name, case in cases.items():
        with pytest.raises(CamEyeError) as err:
            load_graph(case)
        assert "\n" not in str(err.value) and str(case) in str(err.value), name
    assert "truncated" in str(pytest.raises(CamEyeError, load_graph, bin_short).value)
    assert "too many" in str(pytest.raises(CamEyeError, load_graph, bin_long).value)


def test_the_interpreter_refuses_a_graph_it_cannot_run_in_one_line(tmp_path: Path) -> None:
    x = {"name": "x", "op": "Placeholder"}
    cases = {
        "Softplus": [x, {"name": "out", "op": "Softplus", "input": ["x"]}],  # an op it does not know
        "2 inputs": [x, {"name": "out", "op": "Relu", "input": ["x", "x"]}],
        "reads y": [x, {"name": "out", "op": "Relu", "input": ["y"]}],
        "keep_dims": [x, {"name": "out", "op": "Mean", "input": ["x", "x"], "attr": {"keep_dims": "yes"}}],
    }
    for i, (message, nodes) in enumerate(cases.items()):
        graph = load_graph(_write_graph(tmp_path / str(i), nodes, {}))
        with pytest.raises(CamEyeError, match=message) as err:
            GraphModule(graph)
        assert "\n" not in str(err.value)
    graph = load_graph(_conv_graph(tmp_path / "conv", np.ones((3, 3, 1, 1))))
    graph.nodes[1].attr["padding"] = {"s": "not base64!"}
    with pytest.raises(CamEyeError, match="malformed attribute padding"):
        GraphModule(graph)


# ------------------------------------------------------------------------------------ the ops, as TF has them
def test_same_padding_at_stride_2_pads_after_as_tf_does(tmp_path: Path) -> None:
    """TF's SAME on a 6 x 6 input, 3 x 3 kernel, stride 2: 1 pixel of padding, all of it bottom/right. A kernel
    whose only tap is the top-left one then reads x[2i, 2j] (torch's symmetric padding would read x[2i-1, 2j-1])."""
    kernel = np.zeros((3, 3, 1, 1))
    kernel[0, 0, 0, 0] = 1
    x = torch.arange(36, dtype=torch.float32).reshape(1, 6, 6, 1)
    out = GraphModule(load_graph(_conv_graph(tmp_path / "a", kernel)))(x)["out"]
    assert out.shape == (1, 3, 3, 1)
    assert torch.equal(out[0, :, :, 0], x[0, ::2, ::2, 0])
    kernel = np.zeros((3, 3, 1, 1))
    kernel[2, 2, 0, 0] = 1  # the bottom-right tap: x[2i + 2, 2j + 2], the padding beyond the last row
    out = GraphModule(load_graph(_conv_graph(tmp_path / "b", kernel)))(x)["out"]
    assert torch.equal(out[0, :2, :2, 0], x[0, 2::2, 2::2, 0]) and (out[0, 2, :, 0] == 0).all()


def test_depthwise_channels_come_out_in_tfs_order(tmp_path: Path) -> None:
    """TF's depthwise filter is kh x kw x C x M with output channel c * M + m."""
    kernel = np.array([[[[1.0, 2.0], [3.0, 4.0]]]])  # 1 x 1 x C=2 x M=2
    x = torch.tensor([[[[10.0, 100.0]]]])  # 1 x 1 x 1 x 2
    graph = load_graph(_conv_graph(tmp_path, kernel, "FusedDepthwiseConv2dNative", stride=1))
    assert GraphModule(graph)(x)["out"].flatten().tolist() == [10.0, 20.0, 300.0, 400.0]


def test_resize_bilinear_samples_as_keras_upsampling_does() -> None:
    """Neither aligned corners nor half-pixel centres: output i samples input i / 2, the last column repeats."""
    x = torch.tensor([0.0, 2.0]).reshape(1, 1, 2, 1)
    out = detector._resize_bilinear(x, (1, 4), align_corners=False, half_pixel=False)
    assert out.flatten().tolist() == [0.0, 1.0, 2.0, 2.0]


def test_decode_reads_a_peak_and_its_box_sizes() -> None:
    heatmap = torch.zeros(1, 8, 8, 3)
    heatmap[0, 2, 5, 1] = 0.9  # row 2, column 5, class 1
    heatmap[0, 2, 4, 1] = 0.5  # a neighbour: not a peak
    heatmap[0, 6, 1, 0] = 0.4
    sizes = torch.zeros(1, 8, 8, 4)
    sizes[0, 2, 5] = torch.tensor([3.0, 1.0, 2.0, 4.0])  # left, top, right, bottom, input pixels
    scores, classes, boxes = decode(heatmap, sizes, stride=4.0, k=3)
    assert scores[0].tolist() == pytest.approx([0.9, 0.4, 0.0])
    assert classes[0, :2].tolist() == [1, 0]
    assert boxes[0, 0].tolist() == [20 - 3, 8 - 1, 20 + 2, 8 + 4]  # corner point (4 * 5, 4 * 2)


# ------------------------------------------------------------------------------------- the encoder's frame
def test_boxes_map_into_the_square_frame_and_its_grid() -> None:
    """A 640 x 480 photo squashed to 256 x 256: x scales by 0.4, y by 8 / 15; an 8 x 8 grid has 32 px cells."""
    square = boxes_to_square([[64, 48, 320, 240]], (640, 480), 256)
    assert square.tolist() == [pytest.approx([25.6, 25.6, 128.0, 128.0])]
    cells = boxes_to_grid(square, 256, (8, 8))
    assert cells.shape == (1, 8, 8)
    expected = np.zeros(8)
    expected[0], expected[1:4] = 0.2, 1.0  # 25.6..32 of the first cell, then three whole cells
    np.testing.assert_allclose(cells[0], np.outer(expected, expected))
    assert boxes_to_grid(np.zeros((0, 4)), 256, (8, 8)).shape == (0, 8, 8)


# ------------------------------------------------------------------------------------------------- set-up
def test_without_weights_or_npm_the_detector_says_it_is_unavailable(tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(DetectorUnavailable, match="detector.py fetch"):
        Detector.load(tmp_path)
    monkeypatch.setattr(detector.shutil, "which", lambda name: None)
    with pytest.raises(DetectorUnavailable, match="npm not found"):
        detector.fetch(tmp_path)


# --------------------------------------------------------------------------------- the detector, for real
@pytest.fixture(scope="module")
def centernet() -> Detector:
    try:
        return Detector.load()
    except DetectorUnavailable as exc:
        pytest.skip(f"the detector's weights are absent ({exc})")


def _photo(name: str) -> np.ndarray:
    import imageio.v3 as iio
    import skimage.data

    return iio.imread(os.path.join(os.path.dirname(skimage.data.__file__), name))[..., :3]


def test_a_changed_weight_file_is_refused(centernet: Detector, tmp_path: Path) -> None:
    for name in ("centernet.json", "centernet.bin", "LICENSE"):
        (tmp_path / name).write_bytes((detector.DEFAULT_DIR / name).read_bytes())
    (tmp_path / "centernet.bin").write_bytes((tmp_path / "centernet.bin").read_bytes()[:-1] + b"\1")
    with pytest.raises(CamEyeError, match="differs from the pinned"):
        Detector.load(tmp_path)


@pytest.mark.parametrize(
    ("name", "label", "inside"),
    [
        ("coffee.png", "cup", (290, 140)),  # the cup's middle, (x, y) in the photo's pixels
        ("motorcycle_left.png", "motorcycle", (370, 250)),
        ("astronaut.png", "person", (200, 250)),
        # CenterNet calls Chelsea the cat a dog (0.48; "cat" scores 0.20): its top find is that animal.
        ("chelsea.png", "dog", (250, 150)),
    ],
)
def test_the_detector_finds_the_known_object(centernet: Detector, name: str, label: str, inside: tuple) -> None:
    torch.set_num_threads(1)
    image = _photo(name)
    found = centernet.detect(image, min_score=0.3)
    assert found and found[0].label == label and found[0].score >= 0.4
    x0, y0, x1, y1 = found[0].box
    assert x0 < inside[0] < x1 and y0 < inside[1] < y1
    assert 0 <= x0 and 0 <= y0 and x1 <= image.shape[1] and y1 <= image.shape[0]
    presence = centernet.presence(image)
    assert presence.shape == (len(LABELS),) and LABELS[int(presence.argmax())] == label


def test_the_detector_refuses_what_is_not_an_rgb_photo(centernet: Detector) -> None:
    for bad in (np.zeros((10, 10), np.uint8), np.zeros((10, 10, 3), np.float32), np.zeros((0, 10, 3), np.uint8)):
        with pytest.raises(CamEyeError, match="photo"):
            centernet.detect(bad)
