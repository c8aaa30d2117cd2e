"""Caption and attention metrics for CamEye.

Three families of numbers live here, and they answer different questions:

* :func:`nltk_bleu` -- corpus BLEU-1..4 computed the way most PyTorch captioning tutorials do it (sgrvinod's
  "a-PyTorch-Tutorial-to-Image-Captioning"): ``nltk.translate.bleu_score.corpus_bleu`` on lists of words, no
  smoothing. It needs nothing but Python, so it is always available, which makes it the number to watch
  during training. It is *not* the number papers report.
* :func:`coco_metrics` -- the official MS-COCO caption metrics from ``pycocoevalcap`` (BLEU-1..4, METEOR,
  ROUGE-L, CIDEr), computed exactly as ``COCOEvalCap.evaluate`` does: both sides go through the Stanford
  PTB tokenizer first (lower-cased, punctuation removed). These are the numbers papers report. They need
  Java, and they cost a few seconds of JVM start-up per call, so they belong at the end of an evaluation,
  not in every validation step. COCO BLEU differs from nltk BLEU: the tokenisation differs, and the COCO
  brevity penalty uses the "closest" reference length with a tiny smoothing of its own.
* :func:`attention_in_box` and friends -- "attention correctness" on the synthetic dataset, whose images
  come with the bounding box of every object: when the decoder emits the word naming an object, how much
  of that step's attention lies inside the object's box? :func:`box_area_share` is the score a model that
  attends uniformly would get, the baseline that makes the first number meaningful.

BLEU-n in both families is *cumulative*: the geometric mean of the modified 1..n-gram precisions, times a
brevity penalty. All scores are fractions in 0..1 except CIDEr, which is usually between 0 and ~3 (it is
a TF-IDF weighted cosine similarity, scaled by 10).
"""

from __future__ import annotations

import contextlib
import io
import math
import re
import shutil
import threading
import warnings
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

__all__ = [
    "BLEU_WEIGHTS",
    "JavaNotFoundError",
    "attention_in_box",
    "box_area_share",
    "coco_metrics",
    "java_available",
    "mean_attention_correctness",
    "nltk_bleu",
]

Box = tuple[float, float, float, float]

# Cumulative BLEU weights: BLEU-n averages the log precisions of 1..n-grams with equal weight.
BLEU_WEIGHTS: dict[str, tuple[float, ...]] = {
    "BLEU-1": (1.0, 0.0, 0.0, 0.0),
    "BLEU-2": (0.5, 0.5, 0.0, 0.0),
    "BLEU-3": (1 / 3, 1 / 3, 1 / 3),
    "BLEU-4": (0.25, 0.25, 0.25, 0.25),
}


# ----------------------------------------------------------------------------------------------- nltk BLEU
def nltk_bleu(references: Sequence[Sequence[Sequence[str]]], hypotheses: Sequence[Sequence[str]]) -> dict[str, float]:
    """Corpus BLEU-1..4 of ``hypotheses`` against ``references``, as the common PyTorch tutorial computes it.

    ``references[i]`` is the list of reference captions of image ``i``, each a list of words;
    ``hypotheses[i]`` is the generated caption of the same image, a list of words. Strip the special
    tokens (``<start>``, ``<end>``, ``<pad>``) first: they are not words, and a shared ``<end>`` would count
    as a matched unigram.

    *Corpus* BLEU is not the mean of per-sentence BLEU: the clipped n-gram matches and the n-gram counts are
    summed over the whole corpus before dividing, and so are the hypothesis lengths ``c`` and the closest
    reference lengths ``r`` that set the brevity penalty ``BP = exp(1 - r / c)`` (1 when ``c > r``). Then
    ``BLEU-n = BP * (p_1 * ... * p_n) ** (1 / n)``.

    No smoothing is applied (as in the tutorial), so a corpus without a single matching 4-gram scores
    BLEU-4 ~ 0 (nltk uses the smallest float for the zero precision); nltk's warning about that is silenced
    because the value is the documented answer, not an accident.

    Returns ``{"BLEU-1": ..., "BLEU-4": ...}`` as fractions in 0..1. Raises ``ValueError`` on empty input,
    on a length mismatch, or on an image without references, and ``TypeError`` when a caption is a string
    instead of a list of words.
    """
    if len(hypotheses) == 0:
        raise ValueError("nltk_bleu needs at least one hypothesis; got an empty corpus")
    if len(references) != len(hypotheses):
        raise ValueError(
            f"nltk_bleu needs one list of references per hypothesis; "
            f"got {len(references)} reference lists for {len(hypotheses)} hypotheses"
        )
    for i, refs in enumerate(references):
        if len(refs) == 0:
            raise ValueError(f"nltk_bleu: image {i} has no reference captions")
        # A caption passed as a string instead of a word list would be scored character by character,
        # giving plausible-looking but meaningless numbers, so refuse it.
        if isinstance(refs, str) or any(isinstance(ref, str) for ref in refs):
            raise TypeError(f"nltk_bleu: references of image {i} must be lists of words, not strings")
    if any(isinstance(hyp, str) for hyp in hypotheses):
        raise TypeError("nltk_bleu: each hypothesis must be a list of words, not a string")

    # Imported here so that importing this module (e.g. only for the attention helpers) stays cheap.
    from nltk.translate.bleu_score import corpus_bleu

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"\s*The hypothesis contains 0 counts", UserWarning)
        # One call with the list of weights counts the n-grams once; the scores equal four separate calls.
        scores = corpus_bleu(references, hypotheses, weights=list(BLEU_WEIGHTS.values()))
    return {name: float(score) for name, score in zip(BLEU_WEIGHTS, scores, strict=True)}


# ------------------------------------------------------------------------------------------ COCO metrics
class JavaNotFoundError(RuntimeError):
    """Raised by :func:`coco_metrics` when no ``java`` executable is on ``PATH``."""


def java_available() -> bool:
    """True when a ``java`` executable is on ``PATH`` (pycocoevalcap's tokenizer and METEOR need one).

    Callers use it to report "METEOR/ROUGE/CIDEr/COCO BLEU skipped: no Java" and carry on with
    :func:`nltk_bleu` instead of crashing at the end of a long evaluation.
    """
    return shutil.which("java") is not None


# Characters that Java (or Python) may treat as line breaks. The PTB tokenizer is fed one caption per line
# and its output lines are matched back to images *by position*, so a stray line break inside a caption
# silently shifts every later caption onto the wrong image. COCOEvalCap only replaces "\n"; replacing the
# others by a space as well changes nothing for clean captions (whitespace only separates tokens).
_LINE_BREAKS = re.compile(r"[\r\n\v\f\x1c-\x1e\x85\u2028\u2029]")


def _close_meteor(meteor: object) -> None:
    """Stop METEOR's Java subprocess now instead of whenever the garbage collector runs ``Meteor.__del__``.

    This mirrors ``Meteor.__del__`` but does not take ``meteor.lock``: if ``compute_score`` raised half way,
    it never released that lock, and ``__del__`` would then block forever at interpreter exit. Swapping in a
    fresh lock lets the later ``__del__`` run (its close/kill/wait are harmless on a finished process).
    """
    process = meteor.meteor_p  # type: ignore[attr-defined]
    for stream in (process.stdin, process.stdout, process.stderr):
        with contextlib.suppress(OSError):
            stream.close()
    process.kill()
    process.wait()
    meteor.lock = threading.Lock()  # type: ignore[attr-defined]


def _tokenize(captions: Mapping[int | str, Sequence[str]], what: str) -> dict[int | str, list[str]]:
    """Run pycocoevalcap's PTB tokenizer on ``{id: [caption, ...]}``; check that every caption came back."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    # The tokenizer reads only the "caption" field of COCO annotation dicts, which is all we build.
    tokenizer_input = {
        key: [{"caption": _LINE_BREAKS.sub(" ", caption)} for caption in caps] for key, caps in captions.items()
    }
    tokenized = PTBTokenizer().tokenize(tokenizer_input)
    # If the JVM failed (no memory, broken install) its output is short, and the tokenizer's zip() quietly
    # drops the captions it has no line for; catch that here instead of as an assert deep in a scorer.
    if any(len(tokenized.get(key, [])) != len(caps) for key, caps in captions.items()):
        raise RuntimeError(f"the PTB tokenizer (Java) did not return every {what} caption; is Java working?")
    return tokenized


def coco_metrics(
    references: Mapping[int | str, Sequence[str]],
    predictions: Mapping[int | str, str],
    use_meteor: bool = True,
) -> dict[str, float]:
    """The MS-COCO caption metrics of ``predictions`` against ``references``, computed as COCOEvalCap does.

    ``references`` maps an image id to its reference captions (raw strings: any case, with punctuation);
    ``predictions`` maps the same ids to one generated caption each. Both sides are tokenised with
    pycocoevalcap's Stanford ``PTBTokenizer`` (lower-cased, punctuation dropped), then scored with
    ``Bleu(4)``, ``Meteor()``, ``Rouge()`` and ``Cider()`` -- the scorer list of ``COCOEvalCap.evaluate``
    minus SPICE, which would download Stanford CoreNLP.

    Returns ``{"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"}``; "METEOR" is left out
    when ``use_meteor`` is false (it is the slowest scorer: a JVM loading paraphrase tables). Things to know:

    * CIDEr's IDF is computed over the references of the images passed in, so it is only meaningful on a
      real test set. On one image every n-gram has IDF 0 and CIDEr is 0 whatever the caption.
    * The scorers print (BLEU prints ``{'testlen': ...}``); that Python output is swallowed. The Java
      tokenizer's one-line summary on stderr is not (it comes from a child process).
    * Java starts three times: the tokenizer twice (a fraction of a second each) and METEOR once (~8 s on
      a 2-core machine, loading its paraphrase tables, with a JVM heap of up to 2 GB). The METEOR JVM is
      stopped before the function returns.

    Raises ``ValueError`` when the two mappings do not cover the same image ids or an image has no
    references, ``TypeError`` when a prediction is not a single string, and (after those checks)
    ``JavaNotFoundError`` without Java.
    """
    if len(references) == 0:
        raise ValueError("coco_metrics needs at least one image; got empty references")
    if set(references) != set(predictions):
        missing = set(references) - set(predictions)
        extra = set(predictions) - set(references)
        raise ValueError(
            "coco_metrics needs exactly one prediction per reference image: "
            f"{len(missing)} image(s) without a prediction (e.g. {sorted(map(repr, missing))[:3]}), "
            f"{len(extra)} prediction(s) for unknown images (e.g. {sorted(map(repr, extra))[:3]})"
        )
    for key, caps in references.items():
        if isinstance(caps, str) or len(caps) == 0:
            raise ValueError(f"coco_metrics: references[{key!r}] must be a non-empty list of caption strings")
    for key, caption in predictions.items():
        if not isinstance(caption, str):
            raise TypeError(f"coco_metrics: predictions[{key!r}] must be one caption string")
    # Checked after the inputs, so that a caller's bug is reported the same way with or without Java.
    if not java_available():
        raise JavaNotFoundError("java is not on PATH: the COCO caption metrics (pycocoevalcap) need Java 8+")

    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge

    # Same shapes as COCOEvalCap: {id: [annotation, ...]} on both sides, one annotation per prediction.
    # Both dicts follow the order of ``references`` so per-image scores line up (the corpus scores do not
    # depend on the order).
    gts = _tokenize(references, "reference")
    res = _tokenize({key: [predictions[key]] for key in references}, "predicted")

    scorers: list[tuple[object, list[str]]] = [(Bleu(4), ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4"])]
    meteor = None
    if use_meteor:
        meteor = Meteor()  # starts its JVM right away
        scorers.append((meteor, ["METEOR"]))
    scorers += [(Rouge(), ["ROUGE-L"]), (Cider(), ["CIDEr"])]

    results: dict[str, float] = {}
    try:
        # The scorers print progress (BLEU's "{'testlen': ...}", "ratio: ..."); keep the caller's stdout
        # clean.
        with contextlib.redirect_stdout(io.StringIO()):
            for scorer, keys in scorers:
                try:
                    score, _per_image = scorer.compute_score(gts, res)  # type: ignore[attr-defined]
                except (BrokenPipeError, ValueError) as exc:
                    # METEOR talks to its JVM over pipes: a dead JVM shows up as a broken pipe or as an
                    # empty line that float() refuses. Say which scorer failed instead of a bare parse error.
                    if scorer is meteor:
                        message = f"METEOR's Java process failed ({exc!r}); is Java working?"
                        raise RuntimeError(message) from exc
                    raise
                scores = score if len(keys) > 1 else [score]
                results.update({key: float(value) for key, value in zip(keys, scores, strict=True)})
    finally:
        if meteor is not None:
            _close_meteor(meteor)
    return results


# ------------------------------------------------------------------------------------ attention correctness
def _check_box_and_size(box: Sequence[float], image_size: Sequence[int]) -> tuple[Box, tuple[float, float]]:
    if len(image_size) != 2 or not all(math.isfinite(v) and v > 0 for v in image_size):
        raise ValueError(f"image_size must be (width, height) with positive values, got {tuple(image_size)}")
    if len(box) != 4 or not all(math.isfinite(v) for v in box):
        raise ValueError(f"box must be 4 finite numbers (x0, y0, x1, y1), got {tuple(box)}")
    x0, y0, x1, y1 = (float(v) for v in box)
    if x1 < x0 or y1 < y0:
        raise ValueError(f"box must be (x0, y0, x1, y1) with x0 <= x1 and y0 <= y1, got {tuple(box)}")
    return (x0, y0, x1, y1), (float(image_size[0]), float(image_size[1]))


def _cell_fractions(lo: float, hi: float, extent: float, n_cells: int) -> np.ndarray:
    """Fraction of each of ``n_cells`` equal cells tiling ``[0, extent)`` that lies inside ``[lo, hi)``."""
    edges = np.linspace(0.0, extent, n_cells + 1)
    overlap = np.clip(np.minimum(hi, edges[1:]) - np.maximum(lo, edges[:-1]), 0.0, None)
    return overlap / (extent / n_cells)


def box_area_share(box: Sequence[float], image_size: Sequence[int]) -> float:
    """Share of the image covered by ``box``: what :func:`attention_in_box` gives for uniform attention.

    ``box`` is ``(x0, y0, x1, y1)`` in pixels with ``x1``/``y1`` exclusive, so its area is
    ``(x1 - x0) * (y1 - y0)``; ``image_size`` is ``(width, height)``. The part of the box outside the image
    is ignored, because attention can only fall on the image.
    """
    (x0, y0, x1, y1), (width, height) = _check_box_and_size(box, image_size)
    inside_w = max(0.0, min(x1, width) - max(x0, 0.0))
    inside_h = max(0.0, min(y1, height) - max(y0, 0.0))
    return inside_w * inside_h / (width * height)


def attention_in_box(alpha: np.ndarray, box: Sequence[float], image_size: Sequence[int]) -> float:
    """Share of one decoding step's attention that falls inside ``box``.

    ``alpha`` is the attention map of that step as a 2-D array of shape ``(H_grid, W_grid)`` -- rows first,
    as the encoder's feature map is laid out (reshape a flat ``(H_grid * W_grid,)`` vector yourself; convert
    a tensor with ``.detach().cpu().numpy()``). ``image_size`` is ``(width, height)`` -- columns first, as
    image libraries report it. ``box`` is ``(x0, y0, x1, y1)`` in pixels with ``x1``/``y1`` exclusive.

    Upsampling the grid bilinearly (as attention visualisations do) would smear mass across cell borders.
    Instead each grid cell is a uniform block of the image it covers, so the exact answer is::

        sum over cells of alpha[cell] * area(cell & box) / area(cell)

    Cell and box areas separate into x and y parts, so this is ``frac_y @ alpha @ frac_x``, where
    ``frac_x[j]`` is the fraction of column ``j``'s width inside ``[x0, x1)`` (and ``frac_y`` likewise).
    The result is divided by ``alpha.sum()``, so it is a share even if ``alpha`` is not exactly normalised
    (a softmax already sums to 1, up to float error). Uniform ``alpha`` gives :func:`box_area_share`.
    """
    a = np.asarray(alpha, dtype=np.float64)
    if a.ndim != 2 or a.size == 0:
        raise ValueError(f"alpha must be a non-empty 2-D (H_grid, W_grid) array, got shape {a.shape}")
    if not np.all(np.isfinite(a)) or np.any(a < 0):
        raise ValueError("alpha must contain finite, non-negative attention weights")
    total = float(a.sum())
    if total <= 0.0:
        raise ValueError("alpha sums to 0: there is no attention mass to locate")
    (x0, y0, x1, y1), (width, height) = _check_box_and_size(box, image_size)
    frac_y = _cell_fractions(y0, y1, height, a.shape[0])
    frac_x = _cell_fractions(x0, x1, width, a.shape[1])
    return float(frac_y @ a @ frac_x) / total


def mean_attention_correctness(
    records: Iterable[tuple[np.ndarray, Sequence[float], Sequence[int]]],
) -> dict[str, float]:
    """Average attention correctness over object words, next to the uniform-attention baseline.

    ``records`` yields one ``(alpha, box, image_size)`` per generated word that names an object (see
    :func:`attention_in_box` for the conventions). Returns ``{"attention_correctness": mean share inside the
    box, "uniform_baseline": mean box area share, "n_words": number of records}``. A model beats chance only
    where the first number exceeds the second. With no records both means are NaN (a young model may name
    no object at all; that is a result to report, not an error) and ``n_words`` is 0.
    """
    inside: list[float] = []
    baseline: list[float] = []
    for alpha, box, image_size in records:
        inside.append(attention_in_box(alpha, box, image_size))
        baseline.append(box_area_share(box, image_size))
    n_words = len(inside)
    return {
        "attention_correctness": float(np.mean(inside)) if n_words else math.nan,
        "uniform_baseline": float(np.mean(baseline)) if n_words else math.nan,
        "n_words": n_words,
    }
