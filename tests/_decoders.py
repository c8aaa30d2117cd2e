"""Small decoders, captions and decoding calls shared by the model, decoding and fused-path tests."""

from __future__ import annotations

import torch

import fused
from decoding import DecodeConfig, Decoded, beam_search
from models import END_ID, PAD_ID, START_ID, DecoderWithAttention, ModelConfig


def tiny_cfg(vocab_size: int = 12, **kw) -> ModelConfig:
    """A small decoder configuration (no dropout unless given)."""
    base = dict(vocab_size=vocab_size, embed_dim=16, attention_dim=16, decoder_dim=24, dropout=0.0)
    base.update(kw)
    return ModelConfig(**base)


def make_captions(lengths: list[int], vocab_size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoded captions <start> w... <end> <pad>... with the given total lengths (incl. <start>, <end>)."""
    g = torch.Generator().manual_seed(seed)
    caps = torch.full((len(lengths), max(lengths)), PAD_ID, dtype=torch.long)
    for i, n in enumerate(lengths):
        caps[i, 0] = START_ID
        caps[i, 1 : n - 1] = torch.randint(4, vocab_size, (n - 2,), generator=g)
        caps[i, n - 1] = END_ID
    return caps, torch.tensor(lengths)


def random_decoder(seed: int = 9) -> DecoderWithAttention:
    """A random decoder with sharpened outputs and a state-dependent <end>: clear decisions (no near-ties
    between batched and single decoding) and, for the default seed, captions of very different lengths."""
    torch.manual_seed(seed)
    dec = DecoderWithAttention(tiny_cfg(), encoder_dim=8).eval()
    with torch.no_grad():
        dec.fc.weight.mul_(2)
        dec.fc.weight[END_ID] *= 3
        dec.fc.bias[END_ID] = 1.0
    return dec


def features(n: int, seed: int = 1) -> torch.Tensor:
    """n random annotation-vector sets of 5 regions x 8 channels."""
    torch.manual_seed(seed)
    return 2 * torch.randn(n, 5, 8)


def search(
    dec: DecoderWithAttention,
    enc: torch.Tensor,
    repeat_words: torch.Tensor | None = None,
    word_bonus: torch.Tensor | None = None,
    **options,
) -> list[Decoded]:
    """beam_search with ``options`` over a plain search: length penalty 1, no repeat blocking (bigram blocking
    when ``repeat_words`` is given), so that each test states what it turns on."""
    base = {
        "length_penalty": 1.0,
        "block_trigrams": False,
        "block_bigrams": repeat_words is not None,
        "block_doubled": False,
    }
    return beam_search(dec, enc, DecodeConfig(**{**base, **options}), repeat_words, word_bonus)


def teacher(dec: DecoderWithAttention, is_fused: bool, *args, compiled: bool = False):
    """Teacher forcing through the fused path (fused.teacher_forcing) or the plain loop (the decoder itself)."""
    return fused.teacher_forcing(dec, *args, compiled=compiled) if is_fused else dec(*args)
