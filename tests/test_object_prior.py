"""Tests for object_prior.py: the encoder's ImageNet classifier as a prior on object words (issue 11, lever 6)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _decoders import search

from models import END_ID, DecoderWithAttention, Encoder, ModelConfig, Preprocess
from object_prior import ObjectPrior
from utils import SPECIAL_TOKENS, CamEyeError

WORDS = [*SPECIAL_TOKENS, "a", "dog", "cat", "cats", "cup", "bus", "on"]
WORD_MAP = {w: i for i, w in enumerate(WORDS)}


def _square(image: np.ndarray, size: int = 320) -> torch.Tensor:
    h, w, _ = image.shape
    s = min(h, w)
    crop = image[(h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]
    return Preprocess("efficientnet_lite0", size)(torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1))


def test_the_prior_sees_the_cat_and_the_cup_in_real_photos() -> None:
    import skimage.data as skimage_data

    torch.set_num_threads(1)
    encoder = Encoder("efficientnet_lite0", "package").eval()
    prior = ObjectPrior("efficientnet_lite0", WORD_MAP, strength=2.0)
    with torch.no_grad():
        feats = encoder(torch.stack([_square(skimage_data.chelsea()), _square(skimage_data.coffee())]))
    bonus = prior.bonus(feats)
    assert bonus.shape == (2, len(WORDS))
    cat, dog, cup = WORD_MAP["cat"], WORD_MAP["dog"], WORD_MAP["cup"]
    assert bonus[0, cat] > 1.0 and bonus[0, cat] == bonus[0, WORD_MAP["cats"]]  # plural forms share it
    assert bonus[0, dog] < 0.2 and bonus[1, cup] > 0.8 and bonus[1, cat] < 0.2  # measured: cat 1.22, cup 0.92
    assert (bonus[:, : len(SPECIAL_TOKENS)] == 0).all() and (bonus >= 0).all() and (bonus <= 2.0).all()


def test_a_bonus_changes_the_word_beam_search_picks() -> None:
    """A decoder that says "dog" (p 0.5) over "cat" (p 0.3): a bonus of 1 nat on "cat" makes it say "cat",
    since log 0.3 + 1 > log 0.5 (and the rest of the caption, ending at once, is the same)."""
    dec = DecoderWithAttention(
        ModelConfig(vocab_size=len(WORDS), embed_dim=8, attention_dim=8, decoder_dim=8, dropout=0.0), 8
    ).eval()
    probs = torch.full((len(WORDS),), 1e-6)
    probs[WORD_MAP["dog"]], probs[WORD_MAP["cat"]], probs[END_ID] = 0.5, 0.3, 0.2
    with torch.no_grad():
        dec.fc.weight.zero_()
        dec.fc.bias.copy_(probs.log())
    feats = torch.randn(2, 4, 8)
    plain = search(dec, feats, beam_size=1, max_len=1, length_penalty=0.0)
    bonus = torch.zeros(2, len(WORDS))
    bonus[1, WORD_MAP["cat"]] = 1.0
    biased = search(dec, feats, beam_size=1, max_len=1, length_penalty=0.0, word_bonus=bonus)
    assert [d.tokens for d in plain] == [[WORD_MAP["dog"]]] * 2
    assert [d.tokens for d in biased] == [[WORD_MAP["dog"]], [WORD_MAP["cat"]]]
    assert biased[1].score == pytest.approx(math.log(0.3) + 1.0, abs=1e-4)


def test_the_prior_needs_an_efficientnet() -> None:
    with pytest.raises(CamEyeError, match="EfficientNet-Lite"):
        ObjectPrior("resnet50", WORD_MAP, 1.0)
