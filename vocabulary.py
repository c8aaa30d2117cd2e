"""A vocabulary for the everyday world: the captioner's word map grown by the words of caption text (issue 20).

The shipped decoder knows Flickr8k's 2,538 words and cannot say "giraffe", "broccoli" or "sink". Captions of
everyday photos, as text (``../shared/data/coco-captions-text``), hold those words but no photos, so the decoder
cannot learn from them which pixels a new word goes with. It gets each new word by *transfer* instead, as DCC
does (Hendricks et al., CVPR 2016, "direct transfer"): a new word takes the embedding and output weights of the
known word most like it in the text (:func:`word_vectors`: words are alike when the words around them are
alike; "giraffe" ~ "elephant", "sink" ~ "toilet"), with its output bias lowered by ``log(share)``
(:data:`TRANSFER_SHARE`) so that on its own the decoder still prefers the word it was trained on. What decides
between the two is knowledge from outside the decoder: the detector's slots (grounding.py) and the
language model trained on the text (language.py). Old word ids never change, so a decoder extended this way
gives every old word the same logit as before.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.linalg import svds

from metrics import coco_mentions
from utils import FUNCTION_WORDS, SPECIAL_TOKENS

# A transferred word's output bias is its source word's plus log(TRANSFER_SHARE): before renormalisation it
# gets this share of the source word's probability. Small, so that with outside knowledge off the decoder
# says what it said before; outside knowledge (slots, the text model) lifts it where it belongs.
TRANSFER_SHARE = 0.1


def extend_word_map(word_map: dict[str, int], sentences: Iterable[Sequence[str]], min_count: int) -> dict[str, int]:
    """``word_map`` followed by the words of ``sentences`` seen at least ``min_count`` times that it lacks,
    most frequent first (ties alphabetical). Old ids are unchanged."""
    counts = Counter(w for s in sentences for w in s)
    new = sorted((w for w, n in counts.items() if n >= min_count and w not in word_map), key=lambda w: (-counts[w], w))
    return {**word_map, **{w: len(word_map) + i for i, w in enumerate(new)}}


def word_vectors(sentences: Iterable[Sequence[str]], word_map: dict[str, int], dim: int = 100,
                 window: int = 2) -> np.ndarray:  # fmt: skip
    """V x dim unit word vectors from co-occurrence in ``sentences``: positive pointwise mutual information of
    the words within ``window`` of each other, reduced by a truncated SVD (Levy and Goldberg, 2014). Rows of
    words never seen are 0."""
    rows, cols = [], []
    for s in sentences:
        ids = [word_map[w] for w in s if w in word_map]
        for i, a in enumerate(ids):
            for b in ids[max(0, i - window) : i]:
                rows += [a, b]
                cols += [b, a]
    v = len(word_map)
    counts = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(v, v)).tocsr()
    counts.sum_duplicates()
    total = counts.sum()
    word = np.asarray(counts.sum(axis=1)).ravel()
    context = np.asarray(counts.sum(axis=0)).ravel() ** 0.75  # context smoothing (Levy et al., 2015)
    context /= context.sum()
    coo = counts.tocoo()
    pmi = np.log(coo.data * 1.0 / total) - np.log(word[coo.row] / total) - np.log(context[coo.col])
    keep = pmi > 0
    ppmi = coo_matrix((pmi[keep], (coo.row[keep], coo.col[keep])), shape=(v, v)).tocsr()
    u, sigma, _ = svds(ppmi, k=min(dim, v - 2), random_state=0)
    vectors = u * np.sqrt(sigma)  # V x dim
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.where(norms > 0, vectors / np.maximum(norms, 1e-12), 0.0)


def transfer_sources(word_map: dict[str, int], known: int, vectors: np.ndarray) -> dict[int, int]:
    """For each new word id (>= ``known``), the known word id (< ``known``) it takes its weights from: the most
    alike by ``vectors`` among known words of the same kind. A word naming a COCO object takes an object
    word's weights ("zebra" -> "horse"), any other word a content word's; function words and the special tokens
    are never sources. A new word with no vector (never in the text) takes <unk>'s."""
    words = sorted(word_map, key=word_map.get)
    is_object = np.array([bool(coco_mentions([w])) for w in words])
    content = np.array([w not in FUNCTION_WORDS and w not in SPECIAL_TOKENS for w in words])
    sources = {}
    for new in range(known, len(words)):
        allowed = np.zeros(len(words), dtype=bool)
        allowed[:known] = content[:known] & (is_object[:known] == is_object[new])
        if not np.any(vectors[new]) or not allowed.any():
            sources[new] = word_map["<unk>"]
            continue
        similarity = np.where(allowed, vectors @ vectors[new], -np.inf)
        sources[new] = int(np.argmax(similarity))
    return sources


def extend_decoder_state(state: dict[str, torch.Tensor], sources: dict[int, int]) -> dict[str, torch.Tensor]:
    """The decoder's state dict with one more row per new word (id order) in its word-sized tensors: the
    embedding (V x E), the output weights (V x ...) and bias (V), copied from each word's source, the bias
    lowered by log(:data:`TRANSFER_SHARE`)."""
    index = torch.tensor([sources[i] for i in sorted(sources)], dtype=torch.long)
    out = dict(state)
    for key in ("embedding.weight", "fc.weight", "fc.bias"):
        rows = state[key][index].clone()
        if key == "fc.bias":
            rows += math.log(TRANSFER_SHARE)
        out[key] = torch.cat([state[key], rows.to(state[key].dtype)])
    return out
