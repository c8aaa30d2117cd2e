"""What everyday caption text teaches: a language model told which objects a photo holds (issue 20).

Flickr8k's decoder writes Flickr8k's sentences: "a cup* is sitting in the grass". Captions of everyday photos
are to be had only as text (COCO's captions without their photos, ``../shared/data/coco-captions-text``), so
they can teach words and sentences but never which pixels go with which word. :class:`ObjectLanguageModel`
learns p(y_t | y_<t, objects) from such text, where ``objects`` is an 80-vector of COCO category scores: at
training time the objects that the image's captions name (with a detector's misses and false finds
simulated: :func:`training_presence`), at captioning time the COCO detector's finds. It has never seen a photo;
it knows what is said around a pizza or a bus ("a plate of food with broccoli", "a bus parked on the side of
a street").

During beam search :class:`TextFusion` (a decoding.WordHook) combines it with the captioner, which alone sees
the photo and says where it looks: per step, log p(y) = log_softmax(log p_captioner(y) + weight x
log p_text(y)), a product of the two experts renormalised over the vocabulary ("shallow fusion", Gulcehre et
al., 2015; here with an object-conditioned language model, as in NOC's text-trained language model, Venugopalan
et al., 2017). The attention shown for each word stays the captioner's.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from detector import LABELS, Detection
from metrics import coco_mentions
from metrics_data import COCO_SYNONYMS

N_CATEGORIES = len(LABELS)  # 80 COCO categories, detector.LABELS' order
CATEGORY = {name: i for i, name in enumerate(LABELS)}


@dataclass(frozen=True)
class TextModelConfig:
    """The language model's sizes (a checkpoint stores them; checkpoint.py checks their ranges)."""

    vocab_size: int
    embed_dim: int = 256  # word vectors
    hidden_dim: int = 512  # LSTM units
    object_dim: int = 64  # the object vector's code, given at every step
    dropout: float = 0.3


class ObjectLanguageModel(nn.Module):
    """An LSTM language model over the captioner's word map, conditioned on COCO object scores.

    The 80 object scores set the LSTM's initial state (as the captioner's mean annotation vector sets its own)
    and, as a small code, join every step's input, so the model is reminded of the objects as the sentence
    goes on. Word ids are the captioner's (same word map), so its distribution adds to the captioner's.
    """

    def __init__(self, cfg: TextModelConfig, object_names: dict[str, str] | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        # category -> the name the text uses most (:func:`usual_names`): what a detected object is called
        self.object_names = dict(object_names or {})
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.embed_dim)
        self.object_code = nn.Linear(N_CATEGORIES, cfg.object_dim)
        self.init_h = nn.Linear(N_CATEGORIES, cfg.hidden_dim)
        self.init_c = nn.Linear(N_CATEGORIES, cfg.hidden_dim)
        self.lstm = nn.LSTM(cfg.embed_dim + cfg.object_dim, cfg.hidden_dim, batch_first=True)
        self.dropout = nn.Dropout(cfg.dropout)
        self.fc = nn.Linear(cfg.hidden_dim, cfg.vocab_size)

    def start(self, objects: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """The object code (N x O) and initial LSTM state ((1 x N x H) x 2) of object scores (N x 80)."""
        h = torch.tanh(self.init_h(objects)).unsqueeze(0)  # 1 x N x H
        c = self.init_c(objects).unsqueeze(0)  # 1 x N x H
        return torch.relu(self.object_code(objects)), (h, c)

    def forward(self, words: torch.Tensor, objects: torch.Tensor) -> torch.Tensor:
        """Next-word logits (N x T x V) for input words (N x T: <start> y_1 ... y_{T-1}) and scores (N x 80)."""
        code, state = self.start(objects)
        x = torch.cat([self.embedding(words), code.unsqueeze(1).expand(-1, words.size(1), -1)], dim=2)  # N x T x E+O
        out, _ = self.lstm(self.dropout(x), state)  # N x T x H
        return self.fc(self.dropout(out))  # N x T x V

    def read(
        self, words: torch.Tensor, code: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Read ``words`` (N x T) from ``state`` ((1 x N x H) x 2) with the object code (N x O): log p(next word)
        after the last one (N x V) and the state after them."""
        x = torch.cat([self.embedding(words), code.unsqueeze(1).expand(-1, words.size(1), -1)], dim=2)  # N x T x E+O
        out, state = self.lstm(x, state)  # N x T x H
        return F.log_softmax(self.fc(out[:, -1]), dim=1), state  # N x V

    def step(
        self, words: torch.Tensor, code: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """One step: log p(next word) (N x V) after ``words`` (N), with the object code (N x O) and state."""
        return self.read(words.unsqueeze(1), code, state)


# ------------------------------------------------------------------------------------------- objects
def usual_names(sentences: Iterable[Sequence[str]]) -> dict[str, str]:
    """Each COCO category's name as the text says it most often after "a" or "an", among its singular synonyms
    (CHAIR's list): "a table" for dining table, "a phone" for cell phone, "a suitcase" (not "luggage").
    Categories the text never names so are left out (grounding.ObjectWords then falls back on its own rule)."""
    counts: dict[str, Counter[str]] = {}
    for words in sentences:
        for start, end, category in coco_mentions(list(words)):
            if category == "person":  # "man" is said most, but a detector cannot tell a man from a woman or a child
                continue
            phrase = " ".join(words[start:end])
            # counted after "a"/"an" only: the name for one such object ("a suitcase", not "luggage")
            if phrase in COCO_SYNONYMS[category] and start > 0 and words[start - 1] in ("a", "an"):
                counts.setdefault(category, Counter())[phrase] += 1
    # most frequent first; ties go to the synonym list's order
    return {c: max(n, key=lambda p: (n[p], -COCO_SYNONYMS[c].index(p))) for c, n in sorted(counts.items())}


def caption_categories(words: Sequence[str]) -> set[int]:
    """The COCO categories (indices into detector.LABELS) a caption's words name (CHAIR's synonyms)."""
    return {CATEGORY[category] for _, _, category in coco_mentions(list(words))}


@dataclass(frozen=True)
class PresenceNoise:
    """How a caption's objects are turned into the scores a detector would give (:func:`training_presence`).

    The detector finds about 9 in 10 of the objects a caption names and fewer of the other objects in the photo
    (coco-dev80: precision 0.95 at score 0.3; docs/detector.md), and its scores run from 0.3 up.
    """

    keep_named: float = 0.85  # an object the caption itself names is found with this probability
    keep_other: float = 0.6  # an object only the image's other captions name
    false_find: float = 0.05  # chance of one extra category the captions do not name
    min_score: float = 0.3  # scores are drawn uniformly from [min_score, 1]


def training_presence(
    named: set[int], others: set[int], rng: np.random.Generator, noise: PresenceNoise = PresenceNoise()
) -> np.ndarray:
    """Detector-like scores (80, float32) for a training caption: ``named`` (the caption's own categories) and
    ``others`` (those only the same image's other captions name), each kept by chance, plus a false find."""
    scores = np.zeros(N_CATEGORIES, dtype=np.float32)
    for categories, keep in ((named, noise.keep_named), (others - named, noise.keep_other)):
        for c in sorted(categories):
            if rng.random() < keep:
                scores[c] = rng.uniform(noise.min_score, 1.0)
    if rng.random() < noise.false_find:
        scores[rng.integers(N_CATEGORIES)] = rng.uniform(noise.min_score, 1.0)
    return scores


def presence(findings: Iterable[Sequence[Detection]], min_score: float) -> torch.Tensor:
    """N x 80 object scores from each image's detections: a category's best score, 0 below ``min_score``."""
    rows = []
    for found in findings:
        row = torch.zeros(N_CATEGORIES)
        for f in found:
            if f.score >= min_score:
                row[CATEGORY[f.label]] = max(row[CATEGORY[f.label]].item(), f.score)
        rows.append(row)
    return torch.stack(rows) if rows else torch.zeros(0, N_CATEGORIES)


# -------------------------------------------------------------------------------------------- fusion
# A word counts as the text model's doing (decoding.Decoded.outside) when fusion made it this many times
# more likely than the captioner alone did.
OUTSIDE_RATIO = 4.0


class TextFusion:
    """decoding.WordHook: the captioner's next-word log-probabilities (after ``inner``, e.g. grounding.SlotHook)
    times the language model's to the power ``weight``, renormalised (see the module docstring).

    ``objects``: N x 80 scores of the batch's images (:func:`presence`). The language model reads each beam's
    words itself; its state follows the beams by their word prefixes (beam search reorders rows freely).
    """

    def __init__(self, model: ObjectLanguageModel, objects: torch.Tensor, weight: float, inner=None) -> None:
        self.model, self.weight, self.inner = model.eval(), weight, inner
        self.code, self.start_state = model.start(objects)  # N x O, (1 x N x H) x 2
        self.states: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def _text_logp(self, image: torch.Tensor, seqs: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """len(rows) x V: log p_text(next word | words so far) of the beams ``rows``. A beam whose words but the
        last were read before (kept by prefix) takes one step; any other reads its words from <start> (the text
        model is asked only where it speaks, so a beam's first question reads its whole prefix)."""
        found: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        parents = [r for r in rows if seqs.size(1) and (int(image[r]), *seqs[r, :-1].tolist()) in self.states]
        fresh = sorted(set(rows) - set(parents))
        for group, one_step in ((parents, True), (fresh, False)):
            if not group:
                continue
            index = torch.tensor(group, dtype=torch.long, device=image.device)
            images = image[index]
            if one_step:
                cached = [self.states[(int(image[r]), *seqs[r, :-1].tolist())] for r in group]
                state = (torch.stack([c[1] for c in cached], 1), torch.stack([c[2] for c in cached], 1))
                words = seqs[index, -1:]  # rows x 1
            else:
                state = (self.start_state[0][:, images], self.start_state[1][:, images])
                start = torch.full((len(group), 1), 1, dtype=torch.long, device=image.device)  # <start> is id 1
                words = torch.cat([start, seqs[index]], dim=1)  # rows x (steps + 1)
            logp, (h, c) = self.model.read(words, self.code[images], state)
            for k, r in enumerate(group):
                found[r] = self.states[(int(image[r]), *seqs[r].tolist())] = (logp[k], h[:, k], c[:, k])
        return torch.stack([found[r][0] for r in rows]) if rows else torch.zeros(0)

    def __call__(
        self, logp: torch.Tensor, alpha: torch.Tensor, image: torch.Tensor, seqs: torch.Tensor, outside: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        marked = torch.zeros_like(logp, dtype=torch.bool)
        if self.inner is not None:
            logp, marked = self.inner(logp, alpha, image, seqs, outside)
        # The text model speaks once outside knowledge has put a word in the beam (a slot filled with an object
        # the captioner did not say): it knows what is said around a giraffe, the captioner does not. Before
        # that, or where the captioner names what the detector sees (its own world: Flickr8k's people and
        # dogs), the captioner's words stand as they are (and the text model is not run).
        speaks = outside.any(dim=1) if outside.size(1) else logp.new_zeros(logp.size(0), dtype=torch.bool)  # rows
        text = torch.zeros_like(logp)  # rows x V
        rows = speaks.nonzero().squeeze(1).tolist()
        if rows:
            text[speaks] = self.weight * self._text_logp(image, seqs, rows)
        own = torch.log_softmax(logp, dim=1)  # rows x V: the captioner's (and slots') words, renormalised
        fused = torch.log_softmax(logp + text, dim=1)  # rows x V
        fused = torch.where(torch.isfinite(logp), fused, logp)  # a word the captioner or a hook forbids stays so
        # (against ``own``, not ``logp``: renormalising after a hook removed mass raises every word alike)
        return fused, marked | (fused - own > math.log(OUTSIDE_RATIO))
