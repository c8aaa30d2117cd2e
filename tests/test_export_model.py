"""export_model.py: small inference checkpoints that caption exactly like the training checkpoint."""

from __future__ import annotations

import pytest
import torch
from _tiny_model import one_torch_thread
from _tiny_model import tiny_model as build_tiny_model

from captioner import caption_images
from checkpoint import export_checkpoint, load_captioner
from export_model import main
from models import Preprocess


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return build_tiny_model(tmp_path_factory)


def _captions(checkpoint, images):
    with one_torch_thread():
        return [(words, d.alphas) for _, words, d, _ in caption_images(images, checkpoint)]


def test_export_keeps_captions_and_drops_training_state(tiny_model, tmp_path):
    images = sorted(tiny_model.images.glob("*.png"))[:4]
    out = tmp_path / "model.pt"
    exported = export_checkpoint(tiny_model.checkpoint, out)
    ckpt = torch.load(out, map_location="cpu", weights_only=True)
    assert "optimizers" not in ckpt and "rng" not in ckpt and ckpt["encoder_partial"] is True
    assert ckpt["encoder"] == {}  # frozen encoder: rebuilt from the package weights on load
    assert out.stat().st_size < tiny_model.checkpoint.stat().st_size
    assert exported["word_map"] == tiny_model.word_map
    for (w1, a1), (w2, a2) in zip(_captions(tiny_model.checkpoint, images), _captions(out, images)):
        assert w1 == w2
        torch.testing.assert_close(a1, a2)


def test_half_precision_export_loads_as_float32(tiny_model, tmp_path):
    out = tmp_path / "half.pt"
    export_checkpoint(tiny_model.checkpoint, out, half=True)
    raw = torch.load(out, map_location="cpu", weights_only=True)
    assert all(v.dtype == torch.float16 for v in raw["decoder"].values() if v.is_floating_point())
    _, decoder, _, _ = load_captioner(out)
    assert all(p.dtype == torch.float32 for p in decoder.parameters())


def test_averaging_a_checkpoint_with_itself_changes_nothing_and_with_others_takes_the_mean(tiny_model, tmp_path):
    ref = export_checkpoint(tiny_model.checkpoint, tmp_path / "a.pt")
    same = export_checkpoint(tiny_model.checkpoint, tmp_path / "b.pt", average=[tiny_model.checkpoint])
    for k, v in ref["decoder"].items():
        torch.testing.assert_close(same["decoder"][k], v)
    other = torch.load(tiny_model.checkpoint, map_location="cpu", weights_only=True)
    other["decoder"] = {k: v * 3 if v.is_floating_point() else v for k, v in other["decoder"].items()}
    torch.save(other, tmp_path / "tripled.pt")
    mean = export_checkpoint(tiny_model.checkpoint, tmp_path / "c.pt", average=[tmp_path / "tripled.pt"])
    for k, v in ref["decoder"].items():
        if v.is_floating_point():
            torch.testing.assert_close(mean["decoder"][k], v * 2)


def test_exporting_an_exported_checkpoint_is_a_one_line_error(tiny_model, tmp_path, capsys):
    export_checkpoint(tiny_model.checkpoint, tmp_path / "once.pt")
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "once.pt"), str(tmp_path / "twice.pt")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "already an inference checkpoint" in err[0]
    assert not (tmp_path / "twice.pt").exists()


def test_export_keeps_encoder_stages_fine_tuned_earlier_in_the_run(tiny_model, tmp_path):
    """Issue 19, bug 2: a run that fine-tuned its encoder and then continued frozen has fine_tune_stages 0 in
    its config; its export must still carry the fine-tuned weights, so that it encodes like best.pt."""
    ckpt = torch.load(tiny_model.checkpoint, map_location="cpu", weights_only=True)
    assert ckpt["config"]["fine_tune_stages"] == 0
    torch.manual_seed(0)
    for key in ("net._conv_head.weight", "net._bn1.weight", "net._bn1.running_mean"):
        ckpt["encoder"][key] = ckpt["encoder"][key] + 0.1 * torch.randn_like(ckpt["encoder"][key])
    trained = tmp_path / "fine_tuned_then_frozen.pt"
    torch.save(ckpt, trained)
    out = tmp_path / "model.pt"
    export_checkpoint(trained, out)
    exported = torch.load(out, map_location="cpu", weights_only=True)
    assert {"net._conv_head.weight", "net._bn1.weight", "net._bn1.running_mean"} <= set(exported["encoder"])
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    features = []
    for path in (trained, out):
        encoder, _, _, cfg = load_captioner(path, precision="float32")
        with torch.no_grad():
            features.append(encoder(Preprocess(cfg.backbone, cfg.input_size)(images)))
    torch.testing.assert_close(features[1], features[0])
