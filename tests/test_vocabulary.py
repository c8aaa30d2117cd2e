"""vocabulary.py: growing the word map from text and transferring weights to the new words."""

from __future__ import annotations

import math

import torch
from _decoders import features, tiny_cfg

from models import DecoderWithAttention
from vocabulary import TRANSFER_SHARE, extend_decoder_state, extend_word_map, transfer_sources, word_vectors

SPECIAL = {"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": 3}


def sentences() -> list[list[str]]:
    """Text where "giraffe" is said as "elephant" is, and "meadow" as "field"."""
    text = []
    for animal in ("elephant", "giraffe"):
        for verb in ("standing", "walking", "eating", "resting"):
            for place in ("field", "meadow"):
                text.append(f"a tall {animal} {verb} in a green {place} today".split())
    for thing in ("cat", "dog"):
        text += [f"a small {thing} sleeping on the bed".split()] * 3
    return text


def known_map() -> dict[str, int]:
    words = "a tall elephant standing walking eating resting in green field today small cat dog sleeping on the bed"
    return {**SPECIAL, **{w: 4 + i for i, w in enumerate(words.split())}}


def test_extend_word_map_keeps_old_ids_and_adds_frequent_words():
    old = known_map()
    grown = extend_word_map(old, sentences() + [["zebra"]], min_count=2)
    assert all(grown[w] == i for w, i in old.items())
    assert set(grown) - set(old) == {"giraffe", "meadow"}  # "zebra" once: below min_count
    assert sorted(grown.values()) == list(range(len(grown)))


def test_new_words_take_the_weights_of_the_known_word_said_alike():
    grown = extend_word_map(known_map(), sentences(), min_count=2)
    sources = transfer_sources(grown, len(known_map()), word_vectors(sentences(), grown, dim=8))
    assert sources[grown["giraffe"]] == grown["elephant"]  # an object word from an object word
    assert sources[grown["meadow"]] == grown["field"]  # any other word from a content word, never "a" or "in"


def test_a_grown_decoder_scores_old_words_as_before():
    torch.manual_seed(0)
    decoder = DecoderWithAttention(tiny_cfg(vocab_size=12), encoder_dim=8).eval()
    sources = {12: 5, 13: 7}
    state = extend_decoder_state(decoder.state_dict(), sources)
    grown = DecoderWithAttention(tiny_cfg(vocab_size=14), encoder_dim=8).eval()
    grown.load_state_dict(state)
    torch.testing.assert_close(grown.embedding.weight[12], decoder.embedding.weight[5])
    torch.testing.assert_close(grown.fc.weight[13], decoder.fc.weight[7])
    torch.testing.assert_close(grown.fc.bias[13], decoder.fc.bias[7] + math.log(TRANSFER_SHARE))
    enc = features(2)
    with torch.no_grad():
        h, c = decoder.init_state(enc)
        z, _ = decoder.attend(h, enc, decoder.attention.project(enc))
        words = torch.tensor([1, 1])
        _, _, out = decoder.advance(decoder.embedding(words), h, c, z)
        _, _, out_grown = grown.advance(grown.embedding(words), h, c, z)
        torch.testing.assert_close(grown.fc(out_grown)[:, :12], decoder.fc(out))  # same logits for old words
