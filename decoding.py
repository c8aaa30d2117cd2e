"""Decoding: turning a trained decoder and annotation vectors into captions.

One :class:`DecodeConfig` holds every decoding default; caption.py, eval.py, the web page, the Python API
(``captioner.Captioner``) and train.py's validation all decode through :func:`beam_search` with it, and the
command-line options of caption.py, eval.py and app.py are made from its fields (:func:`cli.add_options`).

:func:`beam_search` decodes a batch of images at once (greedy decoding is ``beam_size=1``), with the repeat
blocking of :func:`block_repeated_trigrams` and :func:`block_repeated_bigrams`; :func:`decode_loader` runs it
over a DataLoader. The teacher-forcing and sampling loops of the model itself are in models.py.

``DecodeConfig.ground`` names the objects a COCO detector sees (grounding.py, issue 20): beam search takes a
:class:`WordHook` that may move probability between words at each step, and every :class:`Decoded` says per
word whether it came from that outside knowledge (``outside``) or from the decoder alone.
"""

from __future__ import annotations

import argparse
import functools
import math
from collections.abc import Iterable
from dataclasses import dataclass, field, fields, replace
from typing import Protocol

import torch
import torch.nn.functional as F
from tqdm import tqdm

from cli import add_options, float_between, opt
from models import END_ID, PAD_ID, START_ID, DecoderWithAttention, mask_non_words
from utils import DEFAULT_CHECKPOINT, FUNCTION_WORDS, SPECIAL_TOKENS, local_path, positive_int

GROUND_MODES = ("off", "swap", "slot")  # DecodeConfig.ground; grounding.py implements them


@dataclass(frozen=True)
class DecodeConfig:
    """How captions are searched for: the one place where every decoding default is written."""

    beam_size: int = opt(3, "beams per image (1 = greedy decoding)", type=positive_int)
    # Rank finished beams by score / length**P. 0 favours short captions (raw log-probability); 0.5 was best on
    # Flickr8k val (README, Evaluation).
    length_penalty: float = opt(0.5, "rank finished beams by log-probability / length**P (0 = raw log-probability)")
    max_len: int = opt(50, "longest caption, in words", type=positive_int)
    # Against "a man riding a bike with a man riding a bike" (a hard block; Paulus et al., 2018, for summaries).
    block_trigrams: bool = opt(True, "forbid a beam to repeat a word trigram it already contains")
    # Against "a man is riding a motorcycle on a motorcycle": no trigram repeats, but "a motorcycle" is a repeated
    # bigram ending in a content word. Bigrams ending in a function word ("in a") may repeat.
    block_bigrams: bool = opt(True, "forbid a beam to repeat a bigram ending in a content word ('a bike ... a bike')")
    # Against "a a tree" and "a soccer soccer game" (a word said twice in a row is never right in a caption).
    block_doubled: bool = opt(True, "forbid a word right after itself ('a a', 'soccer soccer')")
    min_len: int = 1  # <end> is not allowed before this many words (1: never an empty caption)
    allow_unk: bool = False  # whether <unk> may be emitted
    n_best: int = 1  # each result's ``alternatives``: the image's n_best best finished beams (1..beam_size)
    # Issue 20: name what the COCO detector sees (grounding.py; docs/grounding.md has the measurements).
    ground: str = opt(
        "slot",
        "name the objects a COCO detector sees (caption.py marks its words with *): 'swap' replaces the first object "
        "word the detector does not see by its top find (the baseline); 'slot' fills the decoder's object word, "
        "as it is searched for, with the detection its attention falls on; 'off' the decoder's own words alone",
        choices=GROUND_MODES,
    )
    ground_min_score: float = 0.3  # a detection at least this confident names an object (docs/detector.md)
    # "slot" only: a category the detector scores below this counts as absent and the decoder's words for it
    # are refilled; between this and ground_min_score the decoder's own word stands. 0.2 against 0.3: one more
    # hallucinating caption of coco-dev80's first 40, Flickr8k val CIDEr +2.3 (docs/grounding.md).
    ground_absent_score: float = 0.2
    # "slot" only: a photo with no find of ground_min_score is named by its best find of at least this (None: not)
    ground_fallback_score: float | None = 0.2
    # "slot" only: a word whose ImageNet classes the encoder's own classifier (object_prior.py) gives at least
    # this probability is not refilled, detector or not (the detector takes Flickr8k's dogs for horses and cows);
    # 0 = not asked. 0.3: Flickr8k val CIDEr +1.4 to +1.9 over none, coco-dev80's first 40 unchanged.
    ground_keep_classifier: float = 0.3
    # "slot" only: how much the model file's everyday-caption language model (language.py; train_text.py) weighs
    # beside the captioner: log p = log_softmax(log p_captioner + text_weight x log p_text). A model file without
    # one (trained before issue 20) ignores it.
    text_weight: float = opt(
        1.0,
        "with --ground slot: weight of the model file's everyday-caption language model beside the captioner's own "
        "words (0 = not used; models without one ignore it)",
        type=float_between(0.0, 10.0),
    )


@dataclass
class Decoded:
    """One decoded caption: word ids (no <start>/<end>), its log-probability score, attention per word."""

    tokens: list[int]
    score: float
    alphas: torch.Tensor  # len(tokens) x P
    normalised_score: float = float("nan")  # score / length**length_penalty: what beams are ranked by
    # The image's best beams (DecodeConfig.n_best), best first; the first is this caption itself.
    alternatives: list[Decoded] = field(default_factory=list)
    # Per word: True where the word came from outside knowledge (the object detector: DecodeConfig.ground),
    # not from the decoder alone. Empty means all the decoder's own.
    outside: list[bool] = field(default_factory=list)


class WordHook(Protocol):
    """Changes the next-word distribution of beam search from knowledge outside the decoder (grounding.py).

    Called at every step with the live beams' next-word log-probabilities ``logp`` (rows x V), their attention
    ``alpha`` (rows x P), the input image of each row ``image`` (rows, indices into the batch), the words so far
    ``seqs`` (rows x steps) and whether each came from outside (``outside``, rows x steps bool). Returns the new
    log-probabilities and, per row and word, whether choosing that word now is outside knowledge (rows x V).
    """

    def __call__(
        self, logp: torch.Tensor, alpha: torch.Tensor, image: torch.Tensor, seqs: torch.Tensor, outside: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


def content_word_mask(word_map: dict[str, int]) -> torch.Tensor:
    """Bool mask over the vocabulary (V, by word id): True for content words, False for the special tokens and
    utils.FUNCTION_WORDS; the words a repeated bigram may not end in (``DecodeConfig.block_bigrams``)."""
    mask = torch.zeros(max(word_map.values()) + 1, dtype=torch.bool)
    for word, i in word_map.items():
        mask[i] = word not in FUNCTION_WORDS and word not in SPECIAL_TOKENS
    return mask


# Inference mode rather than no_grad: no version counters or view tracking on its many small tensors.
@torch.inference_mode()
def beam_search(
    decoder: DecoderWithAttention,
    encoder_out: torch.Tensor,
    cfg: DecodeConfig = DecodeConfig(),
    content_words: torch.Tensor | None = None,
    word_bonus: torch.Tensor | None = None,
    hook: WordHook | None = None,
) -> list[Decoded]:
    """Beam search for a batch of images at once: the N*k beams advance together.

    Every image keeps ``cfg.beam_size`` beams ranked by summed log-probability. A beam that emits <end> is
    finished: it keeps its slot and score and only extends with free <pad>s, so later beams must beat it
    (the common tutorial shrinks the beam instead). At the end each image's best beam is chosen by
    score / length**length_penalty (length counts <end>), preferring finished beams; if none finished within
    ``max_len`` steps, the best unfinished beam is returned, so there is always a caption. ``<pad>``,
    ``<start>`` (and ``<unk>`` unless allowed) are never emitted: a beam with no real word left ends instead.
    With ``beam_size=1`` this is exactly greedy decoding.

    Args:
        encoder_out: N x P x C annotation vectors.
        content_words: V bools (:func:`content_word_mask`), needed when ``cfg.block_bigrams``.
        word_bonus: N x V, added to each image's next-word log-probabilities until the beam has used the word
            (e.g. object_prior.ObjectPrior's bonuses: a bonus that stayed would invite "a bird in a bird").
        hook: changes each step's next-word log-probabilities before the bonus and the repeat blocking
            (grounding.SlotHook: the detector's objects); what it marks as outside knowledge is recorded per
            word in each result's ``outside``.
    Returns:
        N :class:`Decoded` captions, in input order.
    Raises:
        ValueError: if ``cfg.n_best`` is not in 1..beam_size, or bigram blocking has no ``content_words``.
    """
    n, p, _ = encoder_out.shape
    k, device = cfg.beam_size, encoder_out.device
    if not 1 <= cfg.n_best <= k:
        raise ValueError(f"n_best must be in 1..beam_size ({k}), got {cfg.n_best}")
    if cfg.block_bigrams and content_words is None:
        raise ValueError("block_bigrams needs content_words (see content_word_mask)")
    if n == 0:
        return []
    repeat_words = content_words.to(device) if cfg.block_bigrams else None  # moved once, not every step
    # Beams never change image (a beam's successors stay in its image's k rows), so the images are not
    # repeated per beam: projection and context read each image once.
    projected = decoder.attention.project(encoder_out)  # N x P x A
    beams = _Beams.start(decoder.init_state(encoder_out), k, p)
    scores = torch.zeros(n, k, device=device)  # N x k
    scores[:, 1:] = float("-inf")  # all beams start identical: expand only the first
    images = torch.arange(n, device=device)  # the input image of each image still being searched
    results: dict[int, Decoded] = {}  # input image -> its caption, filled as images become final
    for step in range(cfg.max_len):
        m = images.numel()
        z, alpha = decoder.attend(beams.h, encoder_out, projected)  # m*k x C, m*k x P
        # Finished beams only extend with a free <pad>, so the LSTM and classifier skip them. (Until a beam
        # finishes, every row is live: the gathers and scatters are skipped.)
        live = (~beams.finished).nonzero().squeeze(1) if beams.finished.any() else None  # None: all live
        pick = functools.partial(_rows, index=live)
        h, c, out = decoder.advance(decoder.embedding(pick(beams.words)), pick(beams.h), pick(beams.c), pick(z))
        beams.h, beams.c = (h, c) if live is None else (beams.h.index_copy(0, live, h), beams.c.index_copy(0, live, c))
        logits, marked = F.log_softmax(decoder.fc(out), dim=1), None  # live rows x V
        if hook is not None:
            logits, marked = hook(logits, pick(alpha), pick(images.repeat_interleave(k)), pick(beams.seqs),
                                  pick(beams.outside))  # fmt: skip
        bonus = pick(word_bonus.repeat_interleave(k, dim=0)) if word_bonus is not None else None
        logits = _allowed_next_words(logits, pick(beams.seqs), step, cfg, repeat_words, bonus)
        logp = logits if live is None else _with_finished_rows(logits, live, m * k)  # m*k x V
        scores, src, words = _top_k(scores, logp)  # m x k; m*k source rows and their next words
        outside = torch.zeros_like(words, dtype=torch.bool)
        if marked is not None:  # marked is per live row: the chosen word of a live source row
            outside = (marked if live is None else _with_finished_marks(marked, live, m * k))[src, words]
        beams = beams.take(src).extend(words, alpha[src], outside)
        # An image whose k beams have all ended is final. Its rows already skip the LSTM (all finished); once
        # half the batch is final those images leave it, so attention stops reading them too. (Leaving at
        # once is slower: every exit copies the remaining images' annotation vectors.)
        done = beams.finished.view(m, k).all(dim=1)  # m
        n_done = int(done.sum())
        if n_done == m:
            break
        if 2 * n_done >= m:
            results.update(
                zip(images[done].tolist(), best_beams(scores[done], beams.take(done.repeat_interleave(k)), cfg))
            )
            images, encoder_out, projected, scores = (t[~done] for t in (images, encoder_out, projected, scores))
            word_bonus = word_bonus[~done] if word_bonus is not None else None
            beams = beams.take((~done).repeat_interleave(k))
    # The rest: final images, and any still searching after max_len steps (their best beam, finished or not).
    results.update(zip(images.tolist(), best_beams(scores, beams, cfg)))
    return [results[i] for i in range(n)]


@dataclass
class _Beams:
    """The rows of a batched beam search, image i owning rows i*k .. i*k+k-1: each beam's LSTM state (rows x D),
    last word (rows), words so far (rows x steps), attention (rows x steps x P), which words came from outside
    knowledge (rows x steps), whether it has ended (rows) and its length with <end> (rows)."""

    h: torch.Tensor
    c: torch.Tensor
    words: torch.Tensor
    seqs: torch.Tensor
    alphas: torch.Tensor
    outside: torch.Tensor
    finished: torch.Tensor
    lengths: torch.Tensor

    @classmethod
    def start(cls, state: tuple[torch.Tensor, torch.Tensor], k: int, p: int) -> _Beams:
        """k beams per image from each image's initial (h, c), N x D each, all at <start>."""
        h, c = (s.repeat_interleave(k, dim=0) for s in state)  # N*k x D each
        rows, device = h.size(0), h.device
        return cls(
            h, c, torch.full((rows,), START_ID, dtype=torch.long, device=device),
            torch.zeros(rows, 0, dtype=torch.long, device=device), torch.zeros(rows, 0, p, device=device),
            torch.zeros(rows, 0, dtype=torch.bool, device=device), torch.zeros(rows, dtype=torch.bool, device=device),
            torch.zeros(rows, device=device),
        )  # fmt: skip

    def take(self, index: torch.Tensor) -> _Beams:
        """The rows ``index`` selects (indices or a bool mask), in that order."""
        return _Beams(*(getattr(self, f.name)[index] for f in fields(self)))

    def extend(self, words: torch.Tensor, alpha: torch.Tensor, outside: torch.Tensor) -> _Beams:
        """Each row continued by its next word (rows), that step's attention (rows x P) and outside mark."""
        return _Beams(
            self.h, self.c, words, torch.cat([self.seqs, words.unsqueeze(1)], dim=1),
            torch.cat([self.alphas, alpha.unsqueeze(1)], dim=1), torch.cat([self.outside, outside.unsqueeze(1)], dim=1),
            self.finished | (words == END_ID), self.lengths + (~self.finished).float(),
        )  # fmt: skip


def _top_k(scores: torch.Tensor, logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each image's k best continuations among its k beams' (``scores``, m x k) next words (``logp``, m*k x V):
    their scores (m x k), the beam each continues (m*k rows) and its next word (m*k)."""
    (m, k), vocab = scores.shape, logp.size(1)
    scores, flat = (scores.view(-1, 1) + logp).view(m, k * vocab).topk(k, dim=1)  # m x k each
    src = (torch.arange(0, m * k, k, device=logp.device).unsqueeze(1) + flat // vocab).view(-1)  # m*k
    words = (flat % vocab).view(-1)  # m*k
    # A beam chosen at -inf had no allowed word left (a vocabulary smaller than the beam): it ends here instead
    # of emitting a masked token, and its -inf score keeps it from ever being chosen.
    return scores, src, torch.where(torch.isinf(scores.view(-1)) & (words != PAD_ID), END_ID, words)


def _allowed_next_words(
    logp: torch.Tensor,
    seqs: torch.Tensor,
    step: int,
    cfg: DecodeConfig,
    repeat_words: torch.Tensor | None,
    bonus: torch.Tensor | None,
) -> torch.Tensor:
    """The live beams' next-word log-probabilities (rows x V) with the bonus added and every word that the
    configuration forbids after ``seqs`` (rows x steps) set to -inf."""
    if bonus is not None:  # each word's bonus counts until the beam has said the word once
        unsaid = torch.ones_like(logp).scatter_(1, seqs, 0.0) if seqs.size(1) else 1.0
        logp = logp + bonus * unsaid
    logp = mask_non_words(logp, cfg.allow_unk)
    if cfg.block_doubled and seqs.size(1):
        logp.scatter_(1, seqs[:, -1:], float("-inf"))
    if cfg.block_trigrams and seqs.size(1) >= 3:
        block_repeated_trigrams(logp, seqs)
    if repeat_words is not None and seqs.size(1) >= 2:
        block_repeated_bigrams(logp, seqs, repeat_words)
    if step < cfg.min_len:
        end = logp[:, END_ID].clone()
        logp[:, END_ID] = float("-inf")  # an empty caption says nothing about the photo
        stuck = torch.isinf(logp).all(dim=1)  # ... unless the vocabulary has no real word: it ends (empty)
        logp[stuck, END_ID] = end[stuck]
    return logp


def _with_finished_rows(logp: torch.Tensor, live: torch.Tensor, rows: int) -> torch.Tensor:
    """All ``rows`` beams' next-word scores (rows x V) from the live ones' (``logp``, at rows ``live``): a
    finished beam's only continuation is a free <pad>."""
    full = logp.new_full((rows, logp.size(1)), float("-inf"))
    full[:, PAD_ID] = 0.0
    full[live] = logp
    return full


def _with_finished_marks(marked: torch.Tensor, live: torch.Tensor, rows: int) -> torch.Tensor:
    """All ``rows`` beams' outside-knowledge marks (rows x V) from the live ones' (a finished beam's <pad>: False)."""
    full = marked.new_zeros((rows, marked.size(1)))
    full[live] = marked
    return full


def block_repeated_trigrams(logp: torch.Tensor, seqs: torch.Tensor) -> None:
    """Set to -inf, in place, each word that would complete a trigram its row's sequence already holds.

    ``logp``: rows x V next-word scores; ``seqs``: rows x L words so far. The next trigram is
    (seq[-2], seq[-1], w): every earlier position where (seq[i], seq[i+1]) equals (seq[-2], seq[-1])
    blocks w = seq[i+2].
    """
    last = seqs[:, -2:]  # rows x 2
    match = (seqs[:, :-2] == last[:, :1]) & (seqs[:, 1:-1] == last[:, 1:])  # rows x L-2
    blocked = torch.where(match, seqs[:, 2:], PAD_ID)  # <pad> is never allowed anyway
    logp.scatter_(1, blocked, float("-inf"))


def block_repeated_bigrams(logp: torch.Tensor, seqs: torch.Tensor, repeat_words: torch.Tensor) -> None:
    """Set to -inf, in place, each word w of ``repeat_words`` (bool, V) that would complete a bigram
    (seq[-1], w) its row's sequence already holds. ``logp``: rows x V; ``seqs``: rows x L words so far."""
    following = seqs[:, 1:]  # rows x L-1
    match = (seqs[:, :-1] == seqs[:, -1:]) & repeat_words[following]  # rows x L-1
    logp.scatter_(1, torch.where(match, following, PAD_ID), float("-inf"))


def best_beams(scores: torch.Tensor, beams: _Beams, cfg: DecodeConfig) -> list[Decoded]:
    """The best beam of each of m images, from its k beams' scores (m x k) and the m*k ``beams`` (image i owning
    beams i*k .. i*k+k-1); with ``cfg.n_best`` > 1 each also lists the image's best finished beams (at least the
    best beam) in ``alternatives``."""
    lengths, finished, seqs, alphas, outside = beams.lengths, beams.finished, beams.seqs, beams.alphas, beams.outside
    m, k = scores.shape
    normalised = scores.view(-1) / lengths.clamp(min=1) ** cfg.length_penalty  # m*k
    # A finished beam beats any unfinished one; among equals, the better normalised score wins.
    rank = torch.where(finished, normalised, normalised - 1e9).view(m, k)
    order = torch.arange(0, m * k, k, device=scores.device).unsqueeze(1) + rank.argsort(dim=1, descending=True)
    order, finished_list, flat_scores = order.tolist(), finished.tolist(), scores.view(-1).tolist()
    norm_list = normalised.tolist()
    outside_list = outside.tolist()
    results = []
    for beams in order:
        picked = []
        for j, b in enumerate(beams[: cfg.n_best]):
            if j > 0 and not (finished_list[b] and math.isfinite(flat_scores[b])):
                break  # alternatives are real, finished captions only
            ids = seqs[b].tolist()
            length = ids.index(END_ID) if END_ID in ids else len(ids)
            marks = outside_list[b][:length]
            picked.append(Decoded(ids[:length], flat_scores[b], alphas[b, :length].cpu(), norm_list[b], outside=marks))
        results.append(replace(picked[0], alternatives=picked))
    return results


def _rows(t: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """t[index], or t itself for ``index`` None (all rows)."""
    return t if index is None else t[index]


@torch.no_grad()
def decode_loader(
    encoder: torch.nn.Module | None,
    decoder: DecoderWithAttention,
    batches: Iterable,
    device: torch.device,
    cfg: DecodeConfig,
    content_words: torch.Tensor | None,
    prior=None,
    progress: bool = False,
    grounder=None,
    findings: dict | None = None,
) -> tuple[list[Decoded], list, list[int]]:
    """Caption every item of an eval-mode loader of (images, references, indices) batches, or of cached
    features when ``encoder`` is None.

    ``prior`` (object_prior.ObjectPrior) adds its per-image bonuses on object words to beam search. With
    ``cfg.ground`` other than "off" and a ``grounder`` (grounding.Grounder), it decodes instead, naming the
    objects in ``findings`` (dataset index -> that image's detections, grounding.Grounder.find); without a
    grounder the decoder's own words are searched for.
    Returns the decoded captions, each image's references and the dataset indices, in loader order.
    """
    decoder.eval()
    if encoder is not None:
        encoder.eval()
    predictions, references, indices = [], [], []
    for images, refs, index in tqdm(batches, desc="decoding", unit="batch", disable=not progress):
        images = images.to(device)
        feats = encoder(images) if encoder is not None else images
        bonus = prior.bonus(feats) if prior is not None else None
        if cfg.ground != "off" and grounder is not None:
            found = [findings[int(i)] for i in index]  # type: ignore[index]
            predictions += grounder.search(decoder, feats, cfg, content_words, bonus, found)
        else:
            predictions += beam_search(decoder, feats, cfg, content_words, bonus)
        references += refs
        indices += index
    return predictions, references, indices


def add_decoding_arguments(p: argparse.ArgumentParser) -> None:
    """The options caption.py, eval.py and app.py share: which model, how to search (every field of
    :class:`DecodeConfig`), where to run."""
    p.add_argument(
        "--checkpoint",
        type=local_path,
        default=DEFAULT_CHECKPOINT,
        help="CamEye checkpoint (.pt)",
    )
    add_options(p, DecodeConfig)
    p.add_argument(
        "--precision",
        choices=["auto", "float32", "bfloat16"],
        default="float32",
        help="the encoder's precision (the decoder always runs in float32). float32 gives the same captions on "
        "every CPU; bfloat16 runs the encoder on the bfloat16 matrix units of recent CPUs (AMX) and GPUs, faster "
        "but with captions that can differ by machine; 'auto' picks bfloat16 where AMX or a CUDA GPU has them",
    )
    p.add_argument(
        "--object-prior",
        type=float,
        default=0.0,
        help="add STRENGTH x p to the log-probability of object words whose ImageNet classes the encoder's own "
        "classifier sees with probability p (0 = off; EfficientNet-Lite encoders; see object_prior.py)",
    )
    p.add_argument("--device", default="auto", help="'auto' (CUDA when available), 'cpu', 'cuda', ...")
    p.add_argument(
        "--encoder-weights",
        default=None,
        help="ImageNet weights for a checkpoint that holds only its fine-tuned encoder stages (a ResNet's): "
        "a local state-dict file, or 'torchvision' to download (never taken from the checkpoint itself)",
    )
