"""Naming what is really there: the COCO detector's objects in the caption, at decoding time (issue 20).

The shipped Flickr8k model knows people and dogs; on everyday photos it names the wrong main object ("a brown dog
is sitting in the grass" for a coffee cup). The detector (detector.py, COCO's 80 categories) says what is there.
``DecodeConfig.ground`` chooses how its findings enter the caption:

* ``"swap"``, the baseline of issue 20: after beam search, the first word naming a COCO object (metrics.
  coco_mentions, CHAIR's synonyms) that the detector does not see at ``ground_min_score`` is replaced by the
  name of the detector's top non-person find. Cheap, and the rest of the sentence still describes the old
  object: "a bed is jumping on a bed".
* ``"slot"``: the decoder's object words are slots filled during the search, in the spirit of Neural Baby Talk
  (Lu et al., CVPR 2018) with soft attention. At every step, the probability the decoder gives to words naming
  COCO objects the detector does not see moves to the names of the detections, each detection's share in
  proportion to (attention inside its box) x (detector score) (:data:`SLOT_WEIGHTS`; a box-size factor is
  there to try): the word is chosen where the decoder was looking. Each detected object fills one slot, a
  plural slot ("dogs") takes the plural name ("horses"), and "a" before a vowel becomes "an" afterwards. The
  LSTM then goes on from the filled word, so the rest of the caption is written for a cup, and the search's own
  repeat blocking applies to it. With no confident detection nothing changes: the decoder's own word stands.

Every word chosen because of the detector is flagged in ``Decoded.outside`` (caption.py marks it with ``*``).

Detections are made on the image the captioner sees (S x S, squashed: ``Captioner.read``, or the prepared
HDF5), so boxes are already in the encoder's frame; :func:`detector.boxes_to_grid` puts them on its feature grid.
A category's name is its CHAIR name when the model's vocabulary has it, else the first synonym it has
(metrics_data.COCO_SYNONYMS; "dining table" -> "table"); the 21 categories the Flickr8k vocabulary cannot say
at all are never filled in (:meth:`ObjectWords.unsayable`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from backbones import LITE_RESOLUTION
from decoding import DecodeConfig, Decoded, beam_search
from detector import LABELS, Detection, Detector, boxes_to_grid
from language import ObjectLanguageModel, TextFusion, presence
from metrics import _plural, coco_mentions
from metrics_data import COCO_SYNONYMS
from models import DecoderWithAttention
from object_prior import ObjectPrior
from utils import reverse_word_map

PERSON = "person"
PLURAL_SYNONYMS = ("people", "children", "cattle", "oxen")  # plurals listed as names in metrics_data.COCO_SYNONYMS


@dataclass(frozen=True)
class SlotWeights:
    """How ``"slot"`` shares a slot among detections: attention_inside**inside x score**score x area**area.
    Exponents 1, 1, 1 are the product the issue names; 0 turns a factor off (all 0: equal shares)."""

    inside: float = 1.0
    score: float = 1.0
    area: float = 1.0


# Chosen on coco-dev80's first 40 photos (docs/grounding.md): every mix scored alike there (CIDEr 49.0-50.1,
# CHAIR-s 20.0, coverage 82.5); the box-size factor is left out because it pulls slots to big boxes (tables).
SLOT_WEIGHTS = SlotWeights(inside=1.0, score=1.0, area=0.0)


class ObjectWords:
    """The model's vocabulary seen as COCO object names.

    ``category[v]``: index into :data:`detector.LABELS` of the category word id ``v`` names on its own (-1:
    none), ``plural[v]``: whether it is a plural ("dogs"); ``names[c]`` / ``plurals[c]``: the word ids that
    name category ``c`` (one / several) when the detector puts it in a caption (empty: the vocabulary cannot
    say it; a missing plural falls back to the singular).
    """

    def __init__(self, word_map: dict[str, int], usual: dict[str, str] | None = None) -> None:
        self.word_map = word_map
        self.usual = usual or {}  # category -> its most used name in caption text (language.usual_names)
        self.vocabulary = reverse_word_map(word_map)
        self.category = torch.full((len(self.vocabulary),), -1, dtype=torch.long)
        self.plural = torch.zeros(len(self.vocabulary), dtype=torch.bool)
        # ("people" and "children" are synonyms of their own in CHAIR's list, but plural: "a group of people")
        singular = {name for names in COCO_SYNONYMS.values() for name in names} - set(PLURAL_SYNONYMS)
        for word, i in word_map.items():
            found = coco_mentions([word])
            if found and found[0][1] == 1:
                self.category[i] = LABELS.index(found[0][2])
                self.plural[i] = word not in singular
        self.names: list[tuple[int, ...]] = [self._name(c) for c in LABELS]
        self.plurals: list[tuple[int, ...]] = [self._plural_name(name) for name in self.names]

    def _plural_name(self, name: tuple[int, ...]) -> tuple[int, ...]:
        """The plural of a name ("cup" -> "cups", "teddy bear" -> "teddy bears") if the vocabulary has it."""
        if not name:
            return name
        last = _plural(self.vocabulary[name[-1]])
        return (*name[:-1], self.word_map[last]) if last in self.word_map else name

    def _name(self, category: str) -> tuple[int, ...]:
        """The name caption text uses most (``usual``) if the vocabulary can say it; else the category's own name
        if every word is in the vocabulary, else the first synonym that is, one word preferred (a two-word name
        is said as its two words)."""
        usual = self.usual.get(category, "").split()
        if usual and all(w in self.word_map for w in usual):
            return tuple(self.word_map[w] for w in usual)
        sayable = [s.split() for s in COCO_SYNONYMS[category] if all(w in self.word_map for w in s.split())]
        if category.split() in sayable:
            return tuple(self.word_map[w] for w in category.split())
        sayable.sort(key=len)  # stable: the synonym list's order among names of the same length
        return tuple(self.word_map[w] for w in sayable[0]) if sayable else ()

    def unsayable(self) -> list[str]:
        """The COCO categories the vocabulary has no name for."""
        return [c for c, name in zip(LABELS, self.names) if not name]


# ------------------------------------------------------------------------------------------------ the swap
def swap(decoded: Decoded, findings: Sequence[Detection], words: ObjectWords, min_score: float) -> Decoded:
    """Issue 20's baseline: the caption's first mention of a COCO object that no finding of at least
    ``min_score`` names is replaced by the name of the top non-person finding the vocabulary can say (the
    replaced words' attention rows stand for the new words). Unchanged where there is no such finding or
    mention. ``findings``: best first (detector.Detector.detect)."""
    seen = {f.label for f in findings if f.score >= min_score}
    top = next((f for f in findings if f.score >= min_score and f.label != PERSON and words.names[LABELS.index(
        f.label)]), None)  # fmt: skip
    if top is None:
        return decoded
    tokens = [words.vocabulary[i] for i in decoded.tokens]
    wrong = next(((s, e) for s, e, category in coco_mentions(tokens) if category not in seen), None)
    if wrong is None:
        return decoded
    start, end = wrong
    name = list(words.names[LABELS.index(top.label)])
    outside = decoded.outside or [False] * len(tokens)
    alphas = torch.cat([decoded.alphas[:start], decoded.alphas[start : start + 1].expand(len(name), -1),
                        decoded.alphas[end:]])  # fmt: skip
    return replace(
        decoded,
        tokens=decoded.tokens[:start] + name + decoded.tokens[end:],
        alphas=alphas,
        outside=outside[:start] + [True] * len(name) + outside[end:],
        alternatives=[],
    )


# ------------------------------------------------------------------------------------------- the slot hook
def confident_findings(found: Sequence[Detection], words: ObjectWords, min_score: float,
                       fallback_score: float | None = None) -> list[Detection]:  # fmt: skip
    """The findings (best first) that may name an object: those of at least ``min_score`` that the vocabulary
    can say; where there is none, the best one of at least ``fallback_score`` (a photo nearly always shows
    something, and the detector's best guess beats the decoder's Flickr8k default)."""
    sayable = [f for f in found if words.names[LABELS.index(f.label)]]
    confident = [f for f in sayable if f.score >= min_score]
    if confident or fallback_score is None:
        return confident
    return [f for f in sayable if f.score >= fallback_score][:1]


class SlotHook:
    """decoding.WordHook for ``"slot"``: each step, the probability of words naming objects the detector does
    not see goes to the names of its confident findings, shared by :data:`SLOT_WEIGHTS` with this step's
    attention; the second word of a two-word name ("teddy" -> "bear") follows its first.

    Built for a batch: ``findings[i]`` are image i's detections (boxes in the ``size`` x ``size`` frame the
    encoder saw), ``grid`` the encoder's feature grid (rows, cols), P = rows x cols attention cells. Findings
    of at least ``min_score`` fill slots; a category scoring below ``absent_score`` (default ``min_score``)
    is absent, and only the words of absent categories give up their probability, except the words ``kept``
    (N x V bool: another source, the encoder's ImageNet classifier, sees them).
    """

    def __init__(self, findings: Sequence[Sequence[Detection]], words: ObjectWords, size: int,
                 grid: tuple[int, int], min_score: float, weights: SlotWeights | None = None,
                 absent_score: float | None = None, kept: torch.Tensor | None = None,
                 device: torch.device | str = "cpu", fallback_score: float | None = None) -> None:  # fmt: skip
        n, vocab, cells = len(findings), len(words.vocabulary), grid[0] * grid[1]
        weights = weights or SLOT_WEIGHTS
        confident = [confident_findings(found, words, min_score, fallback_score) for found in findings]
        d = max((len(c) for c in confident), default=0) or 1
        self.absent = torch.zeros(n, vocab, dtype=torch.bool)  # N x V: object words of categories not seen
        self.cover = torch.zeros(n, d, cells)  # N x D x P: share of each grid cell inside each finding's box
        self.prior = torch.zeros(n, d)  # N x D: score**b x area**c (0 pads)
        self.first = torch.zeros(n, d, dtype=torch.long)  # N x D: first word of each finding's name
        self.first_plural = torch.zeros(n, d, dtype=torch.long)  # N x D: ... of its plural name
        self.label = torch.full((n, d), -2, dtype=torch.long)  # N x D: each finding's category (-2: padding)
        self.category, self.plural = words.category.to(device), words.plural.to(device)
        self.person = LABELS.index(PERSON)
        self.active = torch.tensor([bool(c) for c in confident], dtype=torch.bool, device=device)  # N
        self.second = torch.full((n, vocab), -1, dtype=torch.long)  # N x V: the word after a name's first word
        floor = min_score if absent_score is None else absent_score  # below it, an object counts as absent
        for i, (found, conf) in enumerate(zip(findings, confident)):
            if not conf:
                continue  # nothing confident: the decoder's own words stand
            seen = torch.tensor([LABELS.index(f.label) for f in found if f.score >= floor])
            self.absent[i] = (words.category >= 0) & ~torch.isin(words.category, seen)
            if kept is not None:
                self.absent[i] &= ~kept[i].cpu()
            boxes = np.array([f.box for f in conf])
            self.cover[i, : len(conf)] = torch.from_numpy(boxes_to_grid(boxes, size, grid).reshape(len(conf), cells))
            area = self.cover[i, : len(conf)].mean(dim=1)
            score = torch.tensor([f.score for f in conf])
            self.prior[i, : len(conf)] = score**weights.score * area**weights.area
            for j, f in reversed(list(enumerate(conf))):  # the best finding's name wins a shared first word
                c = LABELS.index(f.label)
                self.label[i, j] = c
                # (the singular written last: it keeps the second word where both names share their first)
                for name, first in ((words.plurals[c], self.first_plural), (words.names[c], self.first)):
                    first[i, j] = name[0]
                    if len(name) == 2:
                        self.second[i, name[0]] = name[1]
        self.inside_power = weights.inside
        self.absent, self.cover, self.prior = self.absent.to(device), self.cover.to(device), self.prior.to(device)
        self.first, self.second = self.first.to(device), self.second.to(device)
        self.first_plural, self.label = self.first_plural.to(device), self.label.to(device)

    def _said_before(self, seqs: torch.Tensor) -> torch.Tensor:
        """rows x V: the words naming a category other than person that each row's words (rows x steps) named."""
        said = self.category[seqs]  # rows x steps (-1: no object)
        said = said.masked_fill(said == self.person, -1)
        named = torch.zeros(seqs.size(0), len(LABELS) + 1, dtype=torch.bool, device=seqs.device)
        named.scatter_(1, said + 1, True)  # rows x (1 + 80); column 0: "no object", dropped below
        return named[:, 1:].index_select(1, self.category.clamp(min=0)) & (self.category >= 0)

    def __call__(
        self, logp: torch.Tensor, alpha: torch.Tensor, image: torch.Tensor, seqs: torch.Tensor, outside: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        p = logp.exp()  # rows x V
        absent = self.absent[image]  # rows x V
        if seqs.size(1):  # "a bench is sitting on a bench": where the detector saw something, an object is named once
            absent = absent | (self._said_before(seqs) & self.active[image].unsqueeze(1))
        # the mass of names of unseen objects, singular ("dog") and plural ("dogs") apart: rows x 1 each
        moved_plural = (p * (absent & self.plural)).sum(dim=1, keepdim=True)
        moved = (p * absent).sum(dim=1, keepdim=True) - moved_plural
        inside = torch.einsum("rp,rdp->rd", alpha, self.cover[image])  # rows x D: attention inside each box
        prior = self.prior[image]  # rows x D
        # Each object fills one slot: a finding whose category the beam has already named gets no more.
        label = self.label[image]  # rows x D
        if seqs.size(1):
            said = self.category[seqs]  # rows x steps
            prior = prior.masked_fill((said.unsqueeze(1) == label.unsqueeze(2)).any(dim=2), 0.0)
        share = inside.clamp(min=0.0) ** self.inside_power * prior
        total = share.sum(dim=1, keepdim=True)
        share = torch.where(total > 0, share, prior)  # attention on no box at all: by the detector alone
        total = share.sum(dim=1, keepdim=True)
        share = torch.where(total > 0, share / total.clamp(min=1e-30), torch.zeros_like(share))
        added = torch.zeros_like(p).scatter_add_(1, self.first[image], moved * share)  # rows x V
        added.scatter_add_(1, self.first_plural[image], moved_plural * share)
        own = p.masked_fill(absent, 0.0)
        new = (own + added).log()
        marked = added > own  # a word chosen mostly for the detector's sake
        if seqs.size(1):  # a two-word name's second word follows its first, when the first came from outside
            after = self.second[image].gather(1, seqs[:, -1:]).squeeze(1)  # rows
            forced = (after >= 0) & outside[:, -1]
            if forced.any():
                rows = forced.nonzero().squeeze(1)
                new[rows] = float("-inf")
                new[rows, after[rows]] = 0.0
                marked[rows] = False
                marked[rows, after[rows]] = True
        return new, marked


def agree_articles(decoded: Decoded, words: ObjectWords) -> Decoded:
    """The article agrees: "a" before a word from the detector that starts with a vowel becomes "an" ("an
    airplane"), "an" before one that does not becomes "a": the decoder chose its article for its own word.
    (By letter, which is right for every COCO name.) Unchanged where the vocabulary lacks "a" or "an"."""
    if not decoded.outside or not {"a", "an"} <= words.word_map.keys():
        return decoded
    tokens = list(decoded.tokens)
    a, an = words.word_map["a"], words.word_map["an"]
    for t in range(1, len(tokens)):
        if decoded.outside[t] and tokens[t - 1] in (a, an):
            tokens[t - 1] = an if words.vocabulary[tokens[t]][0] in "aeiou" else a
    return decoded if tokens == decoded.tokens else replace(decoded, tokens=tokens)


# ------------------------------------------------------------------------------------------------ together
def detection_floor(cfg: DecodeConfig) -> float:
    """The lowest detector score ``cfg``'s grounding looks at (what :meth:`Grounder.find` must keep)."""
    return min(cfg.ground_min_score, cfg.ground_absent_score, cfg.ground_fallback_score or 1.0)


class Grounder:
    """The detector and the vocabulary's object names, ready to ground captions (``DecodeConfig.ground``)."""

    def __init__(self, word_map: dict[str, int], detector: Detector | None = None, image_size: int = 256,
                 backbone: str | None = None, precision: str = "float32",
                 language_model: ObjectLanguageModel | None = None) -> None:  # fmt: skip
        self.words = ObjectWords(word_map, language_model.object_names if language_model is not None else None)
        self.language_model = language_model  # the model file's text-taught language model, if any (language.py)
        self.detector = detector if detector is not None else Detector.load()
        self.image_size = image_size
        # "bfloat16": the detector runs under CPU autocast, as the encoder does where the CPU has bfloat16 units:
        # 53 against 102 ms a photo here, and the same finds on coco-dev80's first 40 (docs/grounding.md).
        self.precision = precision
        self.backbone = backbone  # the encoder's, for its ImageNet classifier (DecodeConfig.ground_keep_classifier)
        self._classifier: ObjectPrior | None = None

    def kept_by_classifier(self, features: torch.Tensor, threshold: float) -> torch.Tensor | None:
        """N x V: words whose ImageNet classes the encoder's classifier gives at least ``threshold`` (summed
        probability; object_prior.py's table), from the annotation vectors (N x P x C); None when not asked
        (``threshold`` 0) or the encoder has no packaged classifier (not an EfficientNet-Lite)."""
        if threshold <= 0 or self.backbone not in LITE_RESOLUTION:
            return None
        if self._classifier is None:
            self._classifier = ObjectPrior(self.backbone, self.words.word_map, 1.0)
        return self._classifier.bonus(features) >= threshold

    def find(self, images: Sequence[np.ndarray], min_score: float = 0.3) -> list[list[Detection]]:
        """Detections (best first, boxes in the image's own S x S frame) of at least ``min_score`` in images as
        the captioner reads them (uint8 3 x S x S)."""
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.precision == "bfloat16"):
            return [self.detector.detect(np.ascontiguousarray(image.transpose(1, 2, 0)), min_score) for image in images]

    def search(
        self,
        decoder: DecoderWithAttention,
        features: torch.Tensor,
        cfg: DecodeConfig,
        content_words: torch.Tensor | None,
        bonus: torch.Tensor | None,
        findings: Sequence[Sequence[Detection]],
    ) -> list[Decoded]:
        """Beam search of ``features`` (N x P x C) grounded in ``findings`` (N lists) as ``cfg.ground`` says."""
        if cfg.ground == "slot":
            grid = int(round(features.shape[1] ** 0.5))
            kept = self.kept_by_classifier(features, cfg.ground_keep_classifier)
            hook = SlotHook(findings, self.words, self.image_size, (grid, grid), cfg.ground_min_score,
                            absent_score=cfg.ground_absent_score, kept=kept, device=features.device,
                            fallback_score=cfg.ground_fallback_score)  # fmt: skip
            if self.language_model is not None and cfg.text_weight > 0:
                named = [confident_findings(f, self.words, cfg.ground_min_score, cfg.ground_fallback_score)
                         for f in findings]  # fmt: skip
                objects = presence(named, 0.0).to(features.device)  # N x 80
                hook = TextFusion(self.language_model, objects, cfg.text_weight, hook)
            decoded = beam_search(decoder, features, cfg, content_words, bonus, hook)
            return [agree_articles(d, self.words) for d in decoded]
        decoded = beam_search(decoder, features, cfg, content_words, bonus)
        if cfg.ground == "swap":
            return [swap(d, found, self.words, cfg.ground_min_score) for d, found in zip(decoded, findings)]
        return decoded
