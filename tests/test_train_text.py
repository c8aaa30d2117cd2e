"""train_text.py: a captioner grown by caption text, and its grown vocabulary through preparation, training and
checkpoints (issue 20)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from _tiny_model import one_torch_thread, tiny_model

import train
import train_text
from captioner import Captioner
from checkpoint import load_captioner, load_checkpoint_file, load_language_model, text_model_path
from create_input_files import Options, create_input_files
from decoding import DecodeConfig
from models import ModelConfig
from utils import read_json, save_torch, write_json

REPO = Path(__file__).resolve().parents[1]
NEW_WORDS = ("giraffe", "zebra", "meadow")


def write_text(path: Path, known: list[str]) -> Path:
    """A COCO captions file (no photos) whose captions use the model's words and three new ones."""
    images, annotations = [], []
    for i in range(24):
        images.append({"id": i, "file_name": f"{i}.jpg", "width": 10, "height": 10})
        animal, word = NEW_WORDS[i % 2], known[i % len(known)]
        for k, text in enumerate((f"A {animal} in a {NEW_WORDS[2]} near a {word}.", f"the {animal} and a {word}")):
            annotations.append({"image_id": i, "id": 100 * i + k, "caption": text})
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    return path


@pytest.fixture(scope="module")
def grown(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """The tiny model grown by train_text.py's main() for two epochs (one, then a resumed second)."""
    tiny = tiny_model(tmp_path_factory)
    root = tmp_path_factory.mktemp("grown")
    known = [w for w in tiny.word_map if not w.startswith("<")][:6]
    text = write_text(root / "captions.json", known)
    args = [str(text), "--checkpoint", str(tiny.checkpoint), "--out", str(root / "run"), "--min-count", "2",
            "--embed-dim", "8", "--hidden-dim", "16", "--held-out", "0.2", "--batch-size", "8"]  # fmt: skip
    with one_torch_thread():
        train_text.main([*args, "--epochs", "1"])
        train_text.main([*args, "--epochs", "2", "--resume"])
    return SimpleNamespace(tiny=tiny, model=root / "run" / "model.pt", root=root, args=args)


def test_grown_model_says_the_new_words_and_keeps_the_old_ids(grown):
    encoder, decoder, word_map, cfg = load_captioner(grown.model)
    old = grown.tiny.word_map
    assert all(word_map[w] == i for w, i in old.items())
    assert set(NEW_WORDS) <= set(word_map) and all(word_map[w] >= len(old) for w in NEW_WORDS)
    assert decoder.fc.out_features == decoder.embedding.num_embeddings == len(word_map) == cfg.vocab_size
    lm = load_language_model(grown.model, word_map)
    assert lm is not None and lm.cfg.vocab_size == len(word_map)
    history = load_checkpoint_file(grown.model)["text_training"]["history"]
    assert [h["epoch"] for h in history] == [1, 2]  # the resumed run went on from epoch 1


def test_grown_model_captions_with_and_without_outside_knowledge(grown):
    captioner = Captioner.load(grown.model, "cpu")
    image = captioner.read(next(grown.tiny.images.glob("*.png")))
    for cfg in (DecodeConfig(ground="off"), DecodeConfig(ground="off", text_weight=0.0)):
        (decoded,) = captioner.decode([image], cfg)
        assert decoded.tokens and all(0 <= t < len(captioner.word_map) for t in decoded.tokens)


def test_grown_vocabulary_round_trips_through_preparation_and_training(grown, tmp_path):
    _, _, word_map, _ = load_captioner(grown.model)
    write_json(word_map, tmp_path / "word_map.json")
    data = tmp_path / "prepared"
    opts = Options(out=data, min_word_freq=1, image_size=64, workers=1, word_map=tmp_path / "word_map.json")
    create_input_files([grown.tiny.source], None, opts)
    assert read_json(data / "word_map.json") == word_map
    mcfg = ModelConfig(vocab_size=0, embed_dim=32, attention_dim=32, decoder_dim=32, dropout=0.0)
    run = dict(epochs=1, batch_size=8, workers=0, tensorboard=False, val_images=4, max_decode_len=10)
    tcfg = train.TrainConfig(data=str(data), out=str(tmp_path / "run"), init_from=str(grown.model), **run)
    with one_torch_thread():
        train.train(mcfg, tcfg)
    ckpt = load_checkpoint_file(tmp_path / "run" / "last.pt")
    assert ckpt["word_map"] == word_map
    assert ckpt["decoder"]["fc.weight"].shape[0] == len(word_map)
    _, decoder, loaded_map, _ = load_captioner(tmp_path / "run" / "last.pt")
    assert loaded_map == word_map and decoder.embedding.num_embeddings == len(word_map)


def test_a_broken_language_model_is_refused_in_one_line(grown, tmp_path):
    part = torch.load(text_model_path(grown.model), weights_only=True)
    for name, change in (
        ("nan", lambda lm: lm["weights"].__setitem__("fc.bias", torch.full_like(lm["weights"]["fc.bias"], torch.nan))),
        ("vocab", lambda lm: lm["config"].__setitem__("vocab_size", lm["config"]["vocab_size"] + 1)),
        ("field", lambda lm: lm["config"].__setitem__("layers", 3)),
        ("word map", lambda lm: lm.__setitem__("word_map_sha256", "0" * 64)),
    ):
        broken = {**part, "config": dict(part["config"]), "weights": dict(part["weights"])}
        change(broken)
        shutil.copy(grown.model, tmp_path / f"{name}.pt")  # the model file, with its broken language model beside it
        save_torch(broken, text_model_path(tmp_path / f"{name}.pt"))
        result = subprocess.run([sys.executable, str(REPO / "caption.py"), str(next(grown.tiny.images.glob("*.png"))),
                                 "--checkpoint", str(tmp_path / f"{name}.pt"), "--no-figures"],
                                capture_output=True, text=True)  # fmt: skip
        assert result.returncode == 2, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "language model" in result.stderr


def test_bad_text_and_bad_resume_fail_in_one_line(grown, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2, 3]")
    for args in ([str(bad), "--out", str(tmp_path / "o")], [*grown.args, "--out", str(tmp_path / "o"), "--resume"]):
        result = subprocess.run([sys.executable, str(REPO / "train_text.py"), *args], capture_output=True, text=True)
        assert result.returncode == 2, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
