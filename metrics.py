"""Caption, hallucination and attention metrics for CamEye.

The families of numbers here answer different questions:

* :func:`nltk_bleu` -- corpus BLEU-1..4 computed the way most PyTorch captioning tutorials do it (sgrvinod's
  "a-PyTorch-Tutorial-to-Image-Captioning"): ``nltk.translate.bleu_score.corpus_bleu`` on lists of words, no
  smoothing. It needs nothing but Python, so it is always available, which makes it the number to watch
  during training. It is *not* the number papers report.
* :func:`coco_metrics` / :func:`iter_coco_metrics` -- the official MS-COCO caption metrics from
  ``pycocoevalcap`` (BLEU-1..4, METEOR, ROUGE-L, CIDEr), computed exactly as ``COCOEvalCap.evaluate`` does:
  both sides go through the Stanford PTB tokenizer first (lower-cased, punctuation removed; :func:`ptb_tokenize`
  runs it without writing into the package, so read-only installs work). These are the numbers papers report.
  They need Java and cost a few seconds of JVM start-up, so they belong at the end of an evaluation. The
  iterator gives one scorer ("family") at a time, so a METEOR whose JVM fails costs nothing else. COCO BLEU
  differs from nltk BLEU: the tokenisation differs, and the COCO brevity penalty uses the "closest"
  reference length with a tiny smoothing of its own.
* :class:`CiderD` / :func:`cider_d_corpus` -- CIDEr-D on token lists without Java, equal to pycocoevalcap's
  ``Cider`` given the same references and document frequencies: fast per-caption rewards for self-critical
  training (document frequencies fixed from the training references), or a corpus score.
* :func:`chair` -- CHAIR-s and CHAIR-i (Rohrbach et al., EMNLP 2018): the share of captions / of object mentions
  naming a COCO object that is neither in the image's instance boxes nor in its reference captions, with the
  80 COCO categories and their synonyms (metrics_data.py).
* :func:`attention_in_box`, :func:`attention_in_boxes` and friends -- "attention correctness": when the decoder
  emits a word naming an object, how much of that step's attention lies inside the object's box (the synthetic
  set's boxes, or the union of a COCO category's boxes)? :func:`box_area_share` is the score a model that
  attends uniformly would get, the baseline that makes the first number meaningful.
* :func:`bootstrap_interval` -- percentile intervals over images for any of these (few test images, e.g. 80);
  :func:`paired_bootstrap` -- the interval of the difference between two systems on the same images (corpus
  BLEU and CIDEr-D), the one to read when comparing models.

BLEU-n in both families is *cumulative*: the geometric mean of the modified 1..n-gram precisions, times a
brevity penalty. All scores are fractions in 0..1 except CIDEr, which is usually between 0 and ~3 (it is
a TF-IDF weighted cosine similarity, scaled by 10).
"""

from __future__ import annotations

import contextlib
import functools
import io
import itertools
import math
import re
import shutil
import subprocess
import sys
import threading
import unicodedata
import warnings
from collections.abc import Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from metrics_data import COCO_SYNONYMS, COMPOUNDS, IRREGULAR_PLURALS, SAME_PLURAL

__all__ = [
    "BLEU_WEIGHTS",
    "COCO_FAMILIES",
    "CiderD",
    "FamilyResult",
    "JavaNotFoundError",
    "MetricError",
    "attention_in_box",
    "attention_in_boxes",
    "PAIRED_METRICS",
    "PairedDifference",
    "bootstrap_interval",
    "box_area_share",
    "boxes_area_share",
    "caption_words",
    "chair",
    "cider_d_corpus",
    "coco_mentions",
    "coco_metrics",
    "image_truth",
    "iter_coco_metrics",
    "java_available",
    "mean_attention_correctness",
    "nltk_bleu",
    "object_coverage",
    "paired_bootstrap",
    "paired_mean_difference",
    "ptb_tokenize",
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

# pycocoevalcap's scorers in COCOEvalCap's order (SPICE left out: it downloads Stanford CoreNLP), each with
# the names its scores get here. A "family" is what one scorer computes, and fails or succeeds as one.
COCO_FAMILIES: dict[str, tuple[str, ...]] = {
    "BLEU": ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4"),
    "METEOR": ("METEOR",),
    "ROUGE-L": ("ROUGE-L",),
    "CIDEr": ("CIDEr",),
}


class MetricError(RuntimeError):
    """A metric could not be computed (Java would not start, a scorer crashed); ``str()`` is one line."""


@dataclass
class FamilyResult:
    """What one COCO scorer gave: ``scores`` (empty on failure), per-image scores and the failure, if any.

    ``per_image`` holds one score per image, in the order of the ``references`` mapping, for METEOR, ROUGE-L and
    CIDEr (corpus BLEU has none). ROUGE-L and CIDEr are the means of theirs; METEOR is not: it pools its
    statistics over all segments (see :data:`MEAN_OF_PER_IMAGE`).
    """

    family: str
    scores: dict[str, float | None] = field(default_factory=dict)
    per_image: dict[str, list[float]] = field(default_factory=dict)
    error: str | None = None
    note: str | None = None  # a score left out on purpose (None in ``scores``), and why


# Scores equal to the mean of their per-image scores, so that resampling images gives their bootstrap
# interval. METEOR's corpus score pools matches and penalties over all segments (on a Flickr8k val run: 19.2
# against a per-image mean of about 20.3): the per-image mean's interval did not contain it.
MEAN_OF_PER_IMAGE = frozenset({"ROUGE-L", "CIDEr"})


def _java_timeout(n_lines: int) -> float:
    """Seconds to wait for a Java scorer before calling it hung: generous, and growing with the work."""
    return 300.0 + 0.05 * n_lines


def _last_line(data: bytes | str | None) -> str:
    """The last non-empty line of a process's output (where a JVM puts its reason), shortened."""
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else (data or "")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no message"


def ptb_tokenize(captions: Mapping[Hashable, Sequence[str]]) -> dict[Hashable, list[str]]:
    """Tokenise ``{id: [caption, ...]}`` exactly as pycocoevalcap's ``PTBTokenizer`` does, writing no file.

    Same jar, same options (``-preserveLines -lowerCase``), same punctuation removal afterwards. The one
    difference is how the captions reach Java: pycocoevalcap writes them to a temporary file *inside its own
    package folder* (``tempfile.NamedTemporaryFile(dir=path_to_jar_dirname)``), which fails on a read-only
    install (shared environments, containers) and leaves the file behind when interrupted; here they go
    through Java's standard input, which the tokenizer reads the same way (UTF-8, one caption per line).
    Line-break characters inside a caption become spaces, so captions cannot shift onto other images.

    Returns ``{id: [tokenised caption, ...]}`` in the input's order. Raises :class:`MetricError` (one line,
    with Java's own reason) when Java cannot start, fails, hangs, or returns the wrong number of lines.
    """
    from pycocoevalcap.tokenizer import ptbtokenizer as ptb

    jar = Path(ptb.__file__).resolve().parent / ptb.STANFORD_CORENLP_3_4_1_JAR
    keys = [key for key, caps in captions.items() for _ in caps]
    text = "\n".join(_LINE_BREAKS.sub(" ", caption) for caps in captions.values() for caption in caps)
    command = ["java", "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase"]
    try:
        # errors="replace": a lone surrogate (possible in a JSON word map) must not end the evaluation.
        done = subprocess.run(
            command, input=text.encode("utf-8", "replace"), capture_output=True, timeout=_java_timeout(len(keys))
        )
    except OSError as exc:
        raise MetricError(f"the PTB tokenizer could not start Java: {exc}") from None
    except subprocess.TimeoutExpired:
        raise MetricError(f"the PTB tokenizer (Java) gave no answer within {_java_timeout(len(keys)):.0f} s") from None
    if done.returncode != 0:
        # HotSpot prints why it could not start (e.g. no memory for its heap) on stdout, not stderr
        reason = _last_line(done.stderr) if done.stderr.strip() else _last_line(done.stdout)
        raise MetricError(f"the PTB tokenizer (Java) failed with exit status {done.returncode}: {reason}")
    lines = done.stdout.decode("utf-8", "replace").split("\n")
    if len(lines) == len(keys) + 1 and lines[-1] == "":
        lines.pop()  # a final newline
    if len(lines) != len(keys):
        raise MetricError(f"the PTB tokenizer (Java) returned {len(lines)} lines for {len(keys)} captions")
    tokenized: dict[Hashable, list[str]] = {key: [] for key in captions}
    for key, line in zip(keys, lines):
        tokenized[key].append(" ".join(w for w in line.rstrip().split(" ") if w not in ptb.PUNCTUATIONS))
    return tokenized


def _close_meteor(meteor: object) -> None:
    """Stop METEOR's Java subprocess now instead of whenever the garbage collector runs ``Meteor.__del__``.

    This mirrors ``Meteor.__del__`` but does not take ``meteor.lock``: if ``compute_score`` raised half way,
    it never released that lock, and ``__del__`` would then block forever at interpreter exit. Swapping in a
    fresh lock lets the later ``__del__`` run (its close/kill/wait are harmless on a finished process).
    """
    process = meteor.meteor_p  # type: ignore[attr-defined]
    process.kill()
    process.wait()
    for stream in (process.stdin, process.stdout, process.stderr):
        with contextlib.suppress(OSError):
            stream.close()
    meteor.lock = threading.Lock()  # type: ignore[attr-defined]


def _meteor_score(gts: dict, res: dict) -> tuple[float, list[float]]:
    """pycocoevalcap's METEOR, its JVM always stopped, its failures one :class:`MetricError` line."""
    from pycocoevalcap.meteor import meteor as meteor_module

    class GuardedMeteor(meteor_module.Meteor):  # looked up now, so tests can substitute their own Meteor
        def __del__(self) -> None:
            # Meteor.__init__ may fail before it sets these (java not executable); its __del__ would then
            # print an "Exception ignored" traceback.
            if hasattr(self, "lock") and hasattr(self, "meteor_p"):
                super().__del__()

    try:
        meteor = GuardedMeteor()  # starts its JVM right away
    except OSError as exc:
        raise MetricError(f"METEOR could not start Java: {exc}") from None
    # A JVM that fails to start prints its reason on stdout, where METEOR's scores are read: keep it.
    output = meteor.meteor_p.stdout = _RecordingReader(meteor.meteor_p.stdout)
    # A JVM that is alive but never answers would block readline() forever; killing it ends the wait.
    timeout, timed_out = _java_timeout(len(gts)), threading.Event()
    watchdog = threading.Timer(timeout, lambda: (timed_out.set(), meteor.meteor_p.kill()))
    watchdog.daemon = True
    watchdog.start()
    try:
        return meteor.compute_score(gts, res)
    except (OSError, ValueError) as exc:
        # A dead JVM shows up as a broken pipe, or as an empty line that float() refuses: say why it died.
        meteor.meteor_p.kill()
        meteor.meteor_p.wait()
        if timed_out.is_set():
            raise MetricError(f"METEOR's Java process gave no answer within {timeout:.0f} s and was stopped") from exc
        errors = _last_line(meteor.meteor_p.stderr.read()) if meteor.meteor_p.stderr else "no message"
        reason = errors if errors != "no message" else (output.other[-1][:300] if output.other else str(exc))
        status = meteor.meteor_p.returncode
        raise MetricError(f"METEOR's Java process failed (exit status {status}: {reason}); is Java working?") from exc
    finally:
        watchdog.cancel()
        _close_meteor(meteor)


class _RecordingReader:
    """METEOR's stdout, remembering the lines that are not scores (where a failing JVM says why)."""

    def __init__(self, stream) -> None:
        self.stream, self.other = stream, []

    def readline(self) -> bytes:
        line = self.stream.readline()
        text = line.decode("utf-8", "replace").strip()
        if text and not all(_is_number(token) for token in text.split()):
            self.other.append(text)
        return line

    def read(self) -> bytes:
        return self.stream.read()

    def close(self) -> None:
        self.stream.close()


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _score_family(family: str, gts: dict, res: dict) -> FamilyResult:
    """Run one pycocoevalcap scorer on tokenised ``gts``/``res`` (their print-outs swallowed)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    names = COCO_FAMILIES[family]
    with contextlib.redirect_stdout(io.StringIO()):  # BLEU prints "{'testlen': ...}" and "ratio: ..."
        if family == "METEOR":
            score, per_image = _meteor_score(gts, res)
        else:
            scorer = {"BLEU": lambda: Bleu(4), "ROUGE-L": Rouge, "CIDEr": Cider}[family]()
            score, per_image = scorer.compute_score(gts, res)
    scores = score if len(names) > 1 else [score]
    result = FamilyResult(family, {name: float(value) for name, value in zip(names, scores, strict=True)})
    if len(names) == 1:
        result.per_image = {names[0]: [float(v) for v in per_image]}
    return result


def _check_coco_inputs(references: Mapping, predictions: Mapping) -> None:
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


CIDER_NEEDS_IMAGES = "CIDEr needs at least 2 images (its document frequencies): not computed"


def iter_coco_metrics(
    references: Mapping[Hashable, Sequence[str]],
    predictions: Mapping[Hashable, str],
    use_meteor: bool = True,
) -> Iterator[FamilyResult]:
    """The COCO caption metrics one scorer at a time, so a failing one loses nothing of the others.

    Yields a :class:`FamilyResult` per family of ``COCO_FAMILIES`` (METEOR only with ``use_meteor``), in
    that order, each with its scores or its one-line ``error``: METEOR's JVM failing still gives BLEU, ROUGE-L
    and CIDEr. When the PTB tokenizer fails, every family fails with the tokenizer's reason. Inputs and
    exceptions as for :func:`coco_metrics`; a scorer's own exception becomes its ``error`` (not raised).
    """
    _check_coco_inputs(references, predictions)
    families = [family for family in COCO_FAMILIES if use_meteor or family != "METEOR"]
    try:
        # Same shapes as COCOEvalCap: {id: [caption, ...]} on both sides, one caption per prediction, both in
        # the order of ``references`` so per-image scores line up (corpus scores do not depend on the order).
        gts = ptb_tokenize(references)
        res = ptb_tokenize({key: [predictions[key]] for key in references})
    except MetricError as exc:
        for family in families:
            yield FamilyResult(family, error=str(exc))
        return
    for family in families:
        try:
            if family == "CIDEr" and len(references) < 2:
                # CIDEr weighs n-grams by their document frequency over the evaluated images: with one image
                # every n-gram is in every "document", and the score is 0 whatever the caption.
                yield FamilyResult(family, {"CIDEr": None}, note=CIDER_NEEDS_IMAGES)
                continue
            yield _score_family(family, gts, res)
        except MetricError as exc:
            yield FamilyResult(family, error=str(exc))
        except Exception as exc:  # a scorer's own failure (an assert, a bug): reported, the others still run
            yield FamilyResult(family, error=f"{family} failed: {type(exc).__name__}: {_last_line(str(exc))}")


def coco_metrics(
    references: Mapping[Hashable, Sequence[str]],
    predictions: Mapping[Hashable, str],
    use_meteor: bool = True,
) -> dict[str, float]:
    """The MS-COCO caption metrics of ``predictions`` against ``references``, computed as COCOEvalCap does.

    ``references`` maps an image id to its reference captions (raw strings: any case, with punctuation);
    ``predictions`` maps the same ids to one generated caption each. Both sides are tokenised with
    pycocoevalcap's Stanford PTB tokenizer (:func:`ptb_tokenize`: lower-cased, punctuation dropped), then
    scored with ``Bleu(4)``, ``Meteor()``, ``Rouge()`` and ``Cider()`` -- the scorer list of
    ``COCOEvalCap.evaluate`` minus SPICE, which would download Stanford CoreNLP.

    Returns ``{"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"}``; "METEOR" is left out
    when ``use_meteor`` is false (it is the slowest scorer: a JVM loading paraphrase tables). Things to know:

    * CIDEr's IDF is computed over the references of the images passed in, so it is only meaningful on a
      real test set. On one image every n-gram has IDF 0 and CIDEr is 0 whatever the caption.
    * The scorers' print-outs and the tokenizer's summary line are swallowed.
    * Java starts three times: the tokenizer twice (a fraction of a second each) and METEOR once (~8 s on
      a 2-core machine, loading its paraphrase tables, with a JVM heap of up to 2 GB). The METEOR JVM is
      stopped before the function returns. Nothing is written to disk, so a read-only install works.

    Raises ``ValueError`` when the two mappings do not cover the same image ids or an image has no
    references, ``TypeError`` when a prediction is not a single string, ``JavaNotFoundError`` without Java
    (after those checks), and :class:`MetricError` on the first scorer that fails (use
    :func:`iter_coco_metrics` to keep the others).
    """
    results: dict[str, float] = {}
    for family in iter_coco_metrics(references, predictions, use_meteor):
        if family.error is not None:
            raise MetricError(family.error)
        results.update(family.scores)
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


def _cell_coverage(boxes: Sequence[Sequence[float]], image_size: Sequence[float], grid: tuple[int, int]) -> np.ndarray:
    """Fraction of each cell of a ``grid`` (rows, cols) tiling the image that the *union* of ``boxes`` covers.

    Exact, by coordinate compression: the box and cell edges cut the image into small rectangles that are
    each wholly inside or outside the union and inside one cell; overlapping boxes count once.
    """
    checked = [_check_box_and_size(box, image_size) for box in boxes]
    width, height = float(image_size[0]), float(image_size[1])
    rows, cols = grid
    xs = np.unique(
        np.clip(
            [0.0, width, *np.linspace(0, width, cols + 1), *(v for (b, _) in checked for v in (b[0], b[2]))], 0, width
        )
    )
    ys = np.unique(
        np.clip(
            [0.0, height, *np.linspace(0, height, rows + 1), *(v for (b, _) in checked for v in (b[1], b[3]))],
            0,
            height,
        )
    )
    cx, cy = (xs[:-1] + xs[1:]) / 2, (ys[:-1] + ys[1:]) / 2  # centres of the small rectangles
    inside = np.zeros((len(cy), len(cx)), dtype=bool)
    for (x0, y0, x1, y1), _ in checked:
        inside |= ((cy > y0) & (cy < y1))[:, None] & ((cx > x0) & (cx < x1))[None, :]
    area = np.diff(ys)[:, None] * np.diff(xs)[None, :] * inside
    cell_row = np.minimum((cy * rows / height).astype(int), rows - 1)
    cell_col = np.minimum((cx * cols / width).astype(int), cols - 1)
    covered = np.zeros(grid)
    np.add.at(covered, (cell_row[:, None], cell_col[None, :]), area)
    return covered / (width / cols * height / rows)


def attention_in_boxes(alpha: np.ndarray, boxes: Sequence[Sequence[float]], image_size: Sequence[float]) -> float:
    """Share of one step's attention inside the union of ``boxes`` (e.g. every box of one COCO category).

    Conventions as :func:`attention_in_box` (``alpha`` is ``(H_grid, W_grid)``, boxes ``(x0, y0, x1, y1)`` in
    pixels of an image of ``image_size = (width, height)``). The grid tiles the whole image however its
    aspect, which is right for CamEye's images: they are squashed to a square before encoding, so a box
    keeps its place relative to the photo's width and height. For one box this equals ``attention_in_box``.
    """
    a = np.asarray(alpha, dtype=np.float64)
    if a.ndim != 2 or a.size == 0 or not np.all(np.isfinite(a)) or np.any(a < 0) or a.sum() <= 0:
        raise ValueError(f"alpha must be a non-empty 2-D array of finite, non-negative weights, got shape {a.shape}")
    if len(boxes) == 0:
        raise ValueError("attention_in_boxes needs at least one box")
    return float((a * _cell_coverage(boxes, image_size, a.shape)).sum() / a.sum())


def boxes_area_share(boxes: Sequence[Sequence[float]], image_size: Sequence[float]) -> float:
    """Share of the image that the union of ``boxes`` covers: :func:`attention_in_boxes` of uniform attention."""
    if len(boxes) == 0:
        raise ValueError("boxes_area_share needs at least one box")
    return float(_cell_coverage(boxes, image_size, (1, 1))[0, 0])


# ---------------------------------------------------------------------------------------------- CIDEr-D
Token = Hashable


def _ngrams(tokens: Sequence[Token], n: int) -> dict[tuple, int]:
    """Counts of every 1..n-gram of ``tokens`` (as pycocoevalcap's ``precook``)."""
    tokens = tuple(tokens)
    counts: dict[tuple, int] = {}
    for k in range(1, n + 1):
        for i in range(len(tokens) - k + 1):
            gram = tokens[i : i + k]
            counts[gram] = counts.get(gram, 0) + 1
    return counts


class CiderD:
    """CIDEr-D on token lists, without Java: document frequencies fixed once, then fast per-caption scores.

    This is the CIDEr of pycocoevalcap's ``Cider`` scorer (which is CIDEr-D: n-grams up to 4, TF-IDF vectors,
    each candidate n-gram's weight clipped at the reference's, a Gaussian length penalty with sigma 6,
    averaged over the references and the four n-gram orders, times 10), with the document frequencies taken
    from ``reference_corpus`` (one entry per image: that image's reference captions, each a list of tokens)
    instead of from the captions being scored. For self-critical training, build it once from the training
    references and call :meth:`scores` every step; :func:`cider_d_corpus` gives COCOEvalCap's corpus CIDEr.

    Tokens are any hashable values (words, or word-map ids) compared by equality, so candidates and references
    must use the same kind. Leave out ``<start>``/``<pad>``; ruotianluo's SCST code appends an end token to both
    sides, which makes a caption's last words count in its final n-grams (it discourages "... with a" endings).
    Quirks of the original kept on purpose: a caption's "length" in the penalty is its number of bigrams, and an
    n-gram absent from the corpus gets the document frequency 1.
    """

    def __init__(self, reference_corpus: Iterable[Sequence[Sequence[Token]]], n: int = 4, sigma: float = 6.0) -> None:
        document_frequency: dict[tuple, int] = {}
        n_images = 0
        for refs in reference_corpus:
            # dict.fromkeys, not a set: n-grams numbered in the order they appear, so that the sums below run in the
            # same order in every process (a set's order follows Python's per-process string hashing).
            for gram in dict.fromkeys(g for ref in refs for g in _ngrams(ref, n)):
                document_frequency[gram] = document_frequency.get(gram, 0) + 1
            n_images += 1
        if n_images == 0:
            raise ValueError("CiderD needs a reference corpus of at least one image")
        self.n, self.sigma, self.n_images = n, sigma, n_images
        self.log_n_images = float(np.log(float(n_images)))
        # Every corpus n-gram gets an id; log(max(1, df)) as pycocoevalcap computes it, per id. An n-gram
        # missing from the corpus gets a temporary id per call and log(1) = 0.
        self._ids = {gram: i for i, gram in enumerate(document_frequency)}
        self._log_df = np.log(np.maximum(1.0, np.fromiter(document_frequency.values(), dtype=np.float64)))

    def _cook(self, sentences: Sequence[Sequence[Token]], unseen: dict[tuple, int]) -> tuple[np.ndarray, ...]:
        """Flat arrays over the distinct n-grams of each sentence: (sentence, n-gram id, order, tf-idf value),
        and each sentence's length (its number of bigrams, as pycocoevalcap counts it). ``unseen`` numbers the
        n-grams missing from the corpus, shared by the candidates and references of one call."""
        grams: list[tuple] = []
        orders: list[int] = []
        sizes, lengths = [], []
        for tokens in sentences:
            t = tuple(tokens)
            before = len(grams)
            for k in range(1, self.n + 1):
                grams += [t[i : i + k] for i in range(len(t) - k + 1)]
                orders += [k - 1] * max(len(t) - k + 1, 0)
            sizes.append(len(grams) - before)
            lengths.append(max(len(t) - 1, 0))
        known = len(self._ids)
        ids = np.fromiter(map(self._ids.get, grams, itertools.repeat(-1)), dtype=np.int64, count=len(grams))
        for j in np.flatnonzero(ids < 0):
            ids[j] = unseen.setdefault(grams[j], known + len(unseen))
        sentence = np.repeat(np.arange(len(sentences), dtype=np.int64), sizes)
        # term frequencies: count each (sentence, n-gram) pair
        keys, first, tf = np.unique((sentence << 40) | ids, return_index=True, return_counts=True)
        gram_id = keys & ((1 << 40) - 1)
        log_df = np.where(gram_id < known, self._log_df[np.minimum(gram_id, max(known - 1, 0))], 0.0)
        return (
            keys >> 40,
            gram_id,
            np.asarray(orders, dtype=np.int64)[first],
            tf * (self.log_n_images - log_df),
            np.asarray(lengths, dtype=np.float64),
        )

    def _norms(self, sentence: np.ndarray, order: np.ndarray, value: np.ndarray, count: int) -> np.ndarray:
        squares = np.bincount(sentence * self.n + order, weights=value * value, minlength=count * self.n)
        return np.sqrt(squares).reshape(count, self.n)

    def scores(
        self,
        candidates: Sequence[Sequence[Token]],
        references: Sequence[Sequence[Sequence[Token]]],
        image_index: Sequence[int] | np.ndarray | None = None,
    ) -> np.ndarray:
        """CIDEr-D of each candidate against its image's references: a float64 array of ``len(candidates)``.

        ``references[j]`` holds image ``j``'s reference captions; candidate ``i`` belongs to image
        ``image_index[i]`` (default ``i``), so several sampled captions of one image share its references
        (cooked once). Vectorised: the n-grams are counted in Python, everything else is NumPy.
        Raises ``ValueError`` for an image without references or an index out of range.
        """
        n_cand = len(candidates)
        image_index = np.arange(n_cand) if image_index is None else np.asarray(image_index, dtype=np.int64)
        if image_index.shape != (n_cand,):
            raise ValueError(f"image_index must give one image per candidate ({n_cand}), got shape {image_index.shape}")
        if n_cand and (image_index.min() < 0 or image_index.max() >= len(references)):
            raise ValueError(f"image_index must lie in 0..{len(references) - 1}")
        if n_cand == 0:
            return np.zeros(0)
        used = np.unique(image_index)
        ref_counts = np.array([len(references[j]) for j in used], dtype=np.int64)
        if np.any(ref_counts == 0):
            raise ValueError(f"image {int(used[np.argmin(ref_counts)])} has no references")
        ref_start = np.zeros(len(references), dtype=np.int64)  # first ref row of each used image
        ref_start[used] = np.cumsum(ref_counts) - ref_counts
        n_refs = np.zeros(len(references), dtype=np.int64)
        n_refs[used] = ref_counts

        unseen: dict[tuple, int] = {}
        c_sent, c_gram, c_order, c_value, c_len = self._cook(candidates, unseen)
        r_sent, r_gram, r_order, r_value, r_len = self._cook([ref for j in used for ref in references[j]], unseen)
        c_norm = self._norms(c_sent, c_order, c_value, n_cand)
        r_norm = self._norms(r_sent, r_order, r_value, len(r_len))

        # Each candidate is paired with every reference of its image: pair p = (candidate, reference).
        pairs_per_cand = n_refs[image_index]
        pair_start = np.cumsum(pairs_per_cand) - pairs_per_cand
        pair_cand = np.repeat(np.arange(n_cand), pairs_per_cand)
        pair_ref = ref_start[image_index[pair_cand]] + (np.arange(len(pair_cand)) - pair_start[pair_cand])

        # Clipped dot products: for each candidate n-gram and each reference of its image, look the n-gram
        # up in that reference (sorted keys + searchsorted) and add min(candidate, reference) * reference.
        n_grams = len(self._ids) + len(unseen)
        ref_key = r_sent * n_grams + r_gram
        order_by_key = np.argsort(ref_key)
        ref_key, ref_val = ref_key[order_by_key], r_value[order_by_key]
        per_entry = pairs_per_cand[c_sent]
        entry = np.repeat(np.arange(len(c_sent)), per_entry)
        k = np.arange(len(entry)) - np.repeat(np.cumsum(per_entry) - per_entry, per_entry)
        pair = pair_start[c_sent[entry]] + k
        key = pair_ref[pair] * n_grams + c_gram[entry]
        found = np.minimum(np.searchsorted(ref_key, key), max(len(ref_key) - 1, 0))
        hit = ref_key[found] == key if len(ref_key) else np.zeros(len(key), dtype=bool)
        r_hit = np.where(hit, ref_val[found] if len(ref_key) else 0.0, 0.0)
        dot = np.bincount(
            pair * self.n + c_order[entry],
            weights=np.minimum(c_value[entry], r_hit) * r_hit,
            minlength=len(pair_cand) * self.n,
        ).reshape(len(pair_cand), self.n)
        dot = dot.astype(np.float64)  # bincount of no weights (an empty caption) is an integer array

        denominator = c_norm[pair_cand] * r_norm[pair_ref]
        similarity = np.divide(dot, denominator, out=dot.copy(), where=denominator != 0)
        delta = c_len[pair_cand] - r_len[pair_ref]
        similarity *= np.exp(-(delta**2) / (2 * self.sigma**2))[:, None]
        per_candidate = np.bincount(pair_cand, weights=similarity.mean(axis=1), minlength=n_cand)
        return per_candidate / pairs_per_cand * 10.0


def cider_d_corpus(
    references: Sequence[Sequence[Sequence[Token]]], candidates: Sequence[Sequence[Token]]
) -> tuple[float, np.ndarray]:
    """Corpus CIDEr(-D) as COCOEvalCap computes it: document frequencies from these images' references.

    ``references[i]`` are image ``i``'s reference captions and ``candidates[i]`` its one generated caption,
    all token lists. Returns the corpus score (the mean) and the per-image scores. Equals pycocoevalcap's
    ``Cider`` on the same tokens (feed it PTB-tokenised text to get the number papers report).
    """
    if len(references) != len(candidates):
        raise ValueError(f"cider_d_corpus needs one candidate per image: {len(candidates)} for {len(references)}")
    per_image = CiderD(references).scores(candidates, references)
    return float(per_image.mean()), per_image


# ------------------------------------------------------------------------------------------------- CHAIR
def caption_words(text: str) -> list[str]:
    """Lower-cased words of ``text`` (Unicode letters and digits; NFC-normalised) for object matching."""
    return _WORD.findall(unicodedata.normalize("NFC", text).lower())


_WORD = re.compile(r"[^\W_]+")


def _plural(word: str) -> str:
    """English plural of one table word (the regular rules plus metrics_data's irregular ones)."""
    if word in IRREGULAR_PLURALS:
        return IRREGULAR_PLURALS[word]
    if word in SAME_PLURAL:
        return word
    if word.endswith("man"):
        return word[:-3] + "men"  # woman, policeman, gentleman, serviceman
    if word.endswith(("s", "x", "z", "ch", "sh")):
        return word + "es"
    if word.endswith("y") and len(word) > 1 and word[-2] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


@functools.lru_cache(maxsize=1)
def _mention_table() -> dict[tuple[str, ...], str | None]:
    """Word tuple (singular or plural) -> COCO category, or None for compounds that name no object."""
    table: dict[tuple[str, ...], str | None] = {}
    for category, names in COCO_SYNONYMS.items():
        for name in names:
            words = tuple(name.split())
            if len(words) > 2:
                # Deliberately left out, to match the published CHAIR numbers: Rohrbach et al.'s chair.py joins
                # at most two words into one name, so its "stove top oven" never matches as a whole and
                # counts as "stove" and "oven", two oven mentions (CHAIR-i counts both).
                continue
            table[words] = category
            table[(*words[:-1], _plural(words[-1]))] = category
    for name, category in COMPOUNDS.items():
        words = tuple(name.split())
        table[words] = category
        table[(*words[:-1], _plural(words[-1]))] = category
    return table


def coco_mentions(words: Sequence[str]) -> list[tuple[int, int, str]]:
    """The COCO objects a caption names: ``(first word, end word (exclusive), category)`` per mention.

    ``words`` are lower-case words (see :func:`caption_words`). Longest names first, so "hot dog" is a hot
    dog and not a dog, "teddy bears" are teddy bears, "a baby elephant" is an elephant (not a person too) and
    "train tracks" name nothing; in a caption with the word "toilet" (or "toilets"; not a synonym such as
    "urinal"), "seat" is the toilet's, not a chair. These are the rules of the paper's code (chair.py), kept
    exactly, so names longer than two words are not matched whole (see :func:`_mention_table`). Every occurrence
    counts: "a dog and another dog" names the dog twice.
    """
    table = _mention_table()
    longest = max(len(k) for k in table)
    mentions: list[tuple[int, int, str]] = []
    i = 0
    while i < len(words):
        for size in range(min(longest, len(words) - i), 0, -1):
            key = tuple(words[i : i + size])
            if key in table:
                if table[key] is not None:
                    mentions.append((i, i + size, table[key]))
                i += size
                break
        else:
            i += 1
    if "toilet" in words or "toilets" in words:
        mentions = [m for m in mentions if not (m[2] == "chair" and words[m[0]] in ("seat", "seats"))]
    return mentions


def chair(captions: Sequence[Sequence[str]], truths: Sequence[Iterable[str]]) -> dict[str, Any]:
    """CHAIR-s and CHAIR-i (Rohrbach et al., 2018) of generated ``captions`` (word lists), one per image.

    ``truths[i]`` are the COCO categories really in image ``i``: those with instance boxes together with
    those its reference captions name (see :func:`image_truth`). A mention of a category outside the truth
    is hallucinated. CHAIR-i = hallucinated mentions / all mentions; CHAIR-s = captions with at least one
    hallucinated mention / all captions (lower is better for both).

    Returns ``{"CHAIR-s", "CHAIR-i", "captions", "mentions", "hallucinated", "per_image"}``, where
    ``per_image[i]`` is ``{"mentioned": [categories], "hallucinated": [categories]}`` in caption order (for
    bootstrap intervals and examples). CHAIR-i is NaN when no caption names any object.
    """
    per_image = [
        {"mentioned": mentioned, "hallucinated": [c for c in mentioned if c not in truth]}
        for mentioned, truth in _mentions_and_truths(captions, truths, "chair")
    ]
    n_mentions = sum(len(p["mentioned"]) for p in per_image)
    n_hallucinated = sum(len(p["hallucinated"]) for p in per_image)
    return {
        "CHAIR-s": sum(bool(p["hallucinated"]) for p in per_image) / len(per_image) if per_image else math.nan,
        "CHAIR-i": n_hallucinated / n_mentions if n_mentions else math.nan,
        "captions": len(per_image),
        "mentions": n_mentions,
        "hallucinated": n_hallucinated,
        "per_image": per_image,
    }


def object_coverage(captions: Sequence[Sequence[str]], truths: Sequence[Iterable[str]]) -> tuple[float, list[bool]]:
    """Object coverage: the share of captions (word lists) that name at least one COCO object really in their
    image (``truths[i]`` as for :func:`chair`: its boxes' categories plus those its references name), and the
    per-caption flags. CHAIR's other side: a caption that names nothing, or only what is not there, is not
    covered; a caption that names one true object and one hallucinated one is covered and CHAIR-s counts it.
    (Issue 20: the share of photos whose caption names something that is there.) NaN for no captions."""
    flags = [
        any(c in truth for c in mentioned)
        for mentioned, truth in _mentions_and_truths(captions, truths, "object_coverage")
    ]
    return (sum(flags) / len(flags) if flags else math.nan), flags


def _mentions_and_truths(
    captions: Sequence[Sequence[str]], truths: Sequence[Iterable[str]], caller: str
) -> Iterator[tuple[list[str], set[str]]]:
    """Per caption (a word list): the COCO categories it mentions, in order, and its image's truth as a set.
    Raises ValueError for unequal lengths and TypeError for a caption given as a string."""
    if len(captions) != len(truths):
        raise ValueError(f"{caller} needs one truth set per caption: {len(truths)} for {len(captions)}")
    for words, truth in zip(captions, truths):
        if isinstance(words, str):
            raise TypeError(f"{caller}: each caption must be a list of words, not a string")
        yield [category for _, _, category in coco_mentions(list(words))], set(truth)


def image_truth(box_categories: Iterable[str], references: Iterable[str]) -> set[str]:
    """The COCO categories of an image for CHAIR: its boxes' categories plus those its references name."""
    truth = set(box_categories)
    for reference in references:
        truth.update(category for _, _, category in coco_mentions(caption_words(reference)))
    return truth


# --------------------------------------------------------------------------------------------- bootstrap
def _resampled_sums(statistics: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """Column sums of ``statistics`` (images x k) over ``resamples`` seeded draws of the images with replacement.

    Returns ``(resamples, k)``. Every column is summed over the *same* draw, which is what makes a statistic
    of several columns (a ratio, corpus BLEU, one system's score minus another's) a bootstrap over images.
    """
    n = len(statistics)
    sums = []
    rng = np.random.default_rng(seed)
    for start in range(0, resamples, 256):  # chunks keep the count matrix small for big test sets
        idx = rng.integers(0, n, size=(min(256, resamples - start), n))
        counts = np.bincount((np.arange(len(idx))[:, None] * n + idx).ravel(), minlength=len(idx) * n)
        sums.append(counts.reshape(len(idx), n).astype(np.float64) @ statistics)
    return np.concatenate(sums)


def _percentile_interval(values: np.ndarray, level: float) -> tuple[float, float]:
    """The ``(1 - level) / 2`` and ``(1 + level) / 2`` percentiles of the non-NaN ``values``; NaNs if none."""
    values = values[~np.isnan(values)]
    if values.size == 0:
        return math.nan, math.nan
    low, high = np.percentile(values, [50 * (1 - level), 50 * (1 + level)])
    return float(low), float(high)


def _check_bootstrap(resamples: int, level: float) -> None:
    if not 0 < level < 1 or resamples < 1:
        raise ValueError("a bootstrap needs 0 < level < 1 and at least one resample")


def bootstrap_interval(
    numerators: Sequence[float] | np.ndarray,
    denominators: Sequence[float] | np.ndarray | None = None,
    resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval over items (images) of a mean, or of a ratio of sums.

    Without ``denominators`` the statistic is ``mean(numerators)`` (e.g. per-image CIDEr, or CHAIR-s from
    0/1 flags); with them it is ``sum(numerators) / sum(denominators)`` over the resampled images (e.g.
    CHAIR-i: hallucinated mentions / mentions per image), which keeps images with more mentions weightier as
    the statistic itself does. Images are drawn with replacement ``resamples`` times (seeded, so the interval
    is repeatable); returns the ``(1 - level) / 2`` and ``(1 + level) / 2`` percentiles. Resamples whose
    denominators sum to 0 are left out; ``(nan, nan)`` when there is nothing to resample. For the difference
    between two systems on the same images, see :func:`paired_bootstrap`.
    """
    num = np.asarray(numerators, dtype=np.float64)
    den = np.ones_like(num) if denominators is None else np.asarray(denominators, dtype=np.float64)
    if den.shape != num.shape:
        raise ValueError(f"numerators and denominators differ in shape: {num.shape} vs {den.shape}")
    _check_bootstrap(resamples, level)
    if num.size == 0:
        return math.nan, math.nan
    sums = _resampled_sums(np.stack([num, den], axis=1), resamples, seed)
    ratios = np.divide(sums[:, 0], sums[:, 1], out=np.full(len(sums), np.nan), where=sums[:, 1] != 0)
    return _percentile_interval(ratios, level)


def _bleu_statistics(references: Sequence[Sequence[Sequence[str]]], hypotheses: Sequence[Sequence[str]]) -> np.ndarray:
    """Per-image sums behind nltk's corpus BLEU, shape ``(images, 10)``: clipped n-gram matches for n = 1..4,
    the hypothesis's n-gram counts (at least 1 each, as nltk counts them), its length, the closest reference
    length. Summed over any set of images they give that set's corpus BLEU (:func:`_bleu_from_sums`)."""
    from nltk.translate.bleu_score import closest_ref_length, modified_precision

    rows = []
    for refs, hyp in zip(references, hypotheses, strict=True):
        precisions = [modified_precision(refs, hyp, n) for n in range(1, 5)]
        rows.append(
            [*(p.numerator for p in precisions), *(p.denominator for p in precisions), len(hyp)]
            + [closest_ref_length(refs, len(hyp))]
        )
    return np.array(rows, dtype=np.float64).reshape(-1, 10)


def _bleu_from_sums(sums: np.ndarray, weights: Sequence[float]) -> np.ndarray:
    """nltk's unsmoothed ``corpus_bleu`` from :func:`_bleu_statistics` summed over images: ``(m, 10) -> (m,)``.

    ``BP * exp(sum_n w_n log p_n)`` with ``p_n`` = matches / counts, a zero ``p_n`` replaced by the smallest
    float (nltk's method0), ``BP = exp(1 - r / c)`` when ``c <= r`` (0 for ``c = 0``), and 0 without a single
    unigram match. Equals ``nltk_bleu`` to rounding (tests/test_metrics.py).
    """
    matches, counts, c, r = sums[:, :4], sums[:, 4:8], sums[:, 8], sums[:, 9]
    w = np.zeros(4)
    w[: len(weights)] = weights
    with np.errstate(divide="ignore", invalid="ignore"):
        log_p = np.where(matches > 0, np.log(matches / counts), math.log(sys.float_info.min))
        penalty = np.where(c > r, 1.0, np.where(c > 0, np.exp(1 - r / c), 0.0))
    return np.where(matches[:, 0] > 0, penalty * np.exp(log_p @ w), 0.0)


# Metrics :func:`paired_bootstrap` compares: nltk's corpus BLEU-n and CIDEr-D.
PAIRED_METRICS = (*BLEU_WEIGHTS, "CIDEr-D")


@dataclass(frozen=True)
class PairedDifference:
    """One corpus metric of systems A and B on the same images, and ``difference = b - a`` with its interval.

    ``low``/``high`` are the percentiles of B - A over ``resamples`` draws of the images, each draw scoring
    both systems on the same images; the difference is significant at ``level`` when the interval excludes 0.
    """

    metric: str
    a: float
    b: float
    difference: float
    low: float
    high: float
    resamples: int
    level: float


def paired_bootstrap(
    references: Sequence[Sequence[Sequence[Token]]],
    hypotheses_a: Sequence[Sequence[Token]],
    hypotheses_b: Sequence[Sequence[Token]],
    metrics: Sequence[str] = ("BLEU-4", "CIDEr-D"),
    resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, PairedDifference]:
    """Paired bootstrap (Koehn, EMNLP 2004) of corpus metrics: system B minus system A on the same images.

    ``references[i]`` are image ``i``'s reference captions and ``hypotheses_a[i]``/``hypotheses_b[i]`` the two
    systems' captions of it, all word lists. ``metrics`` are names from :data:`PAIRED_METRICS`: "BLEU-n" is
    :func:`nltk_bleu`'s corpus BLEU, recomputed on each resample from per-image n-gram counts (corpus BLEU is
    not a mean over images); "CIDEr-D" is :func:`cider_d_corpus`, document frequencies from all of these
    references, fixed (a mean of per-image scores, resampled as :func:`bootstrap_interval` does). Both systems
    and all metrics share one set of draws. Two marginal intervals that overlap say little about a difference:
    both systems' scores rise and fall with the same easy and hard images, which the paired difference cancels.

    Returns ``{metric: PairedDifference}`` with ``a`` and ``b`` on all images (fractions; CIDEr-D ~0..3).
    Raises ``ValueError`` for a length mismatch, an unknown metric or bad bootstrap settings, and what
    :func:`nltk_bleu` raises for bad captions.
    """
    if not len(hypotheses_a) == len(hypotheses_b) == len(references):
        raise ValueError(
            f"paired_bootstrap needs one caption per image from each system: {len(hypotheses_a)} and "
            f"{len(hypotheses_b)} for {len(references)} images"
        )
    unknown = [m for m in metrics if m not in PAIRED_METRICS]
    if unknown:
        raise ValueError(f"paired_bootstrap: unknown metric(s) {unknown}; choose from {list(PAIRED_METRICS)}")
    _check_bootstrap(resamples, level)
    # The point values from the functions that define them (which also check the inputs); on each resample, a
    # statistic of per-image columns summed: (columns of A, columns of B, function of (m, k) sums -> (m,)).
    points: dict[str, tuple[float, float]] = {}
    blocks: dict[str, tuple[np.ndarray, np.ndarray, Any]] = {}
    bleu = [m for m in metrics if m in BLEU_WEIGHTS]
    if bleu:
        scores = nltk_bleu(references, hypotheses_a), nltk_bleu(references, hypotheses_b)
        stats = _bleu_statistics(references, hypotheses_a), _bleu_statistics(references, hypotheses_b)
        for m in bleu:
            points[m] = scores[0][m], scores[1][m]
            blocks[m] = (*stats, functools.partial(_bleu_from_sums, weights=BLEU_WEIGHTS[m]))
    if "CIDEr-D" in metrics:
        cider = CiderD(references)
        per_a, per_b = cider.scores(hypotheses_a, references), cider.scores(hypotheses_b, references)
        points["CIDEr-D"] = float(per_a.mean()), float(per_b.mean())
        n_images = len(references)
        blocks["CIDEr-D"] = per_a[:, None], per_b[:, None], lambda sums: sums[:, 0] / n_images

    # Every column of both systems summed over one set of draws: the pairing is the draws' being shared.
    columns = [c for stats_a, stats_b, _ in blocks.values() for c in (stats_a, stats_b)]
    sums = np.split(
        _resampled_sums(np.hstack(columns), resamples, seed), np.cumsum([c.shape[1] for c in columns])[:-1], axis=1
    )
    results = {}
    for (m, (_, _, statistic)), sums_a, sums_b in zip(blocks.items(), sums[::2], sums[1::2]):
        low, high = _percentile_interval(statistic(sums_b) - statistic(sums_a), level)
        point_a, point_b = points[m]
        results[m] = PairedDifference(m, point_a, point_b, point_b - point_a, low, high, resamples, level)
    return {m: results[m] for m in metrics}


def paired_mean_difference(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    metric: str = "mean",
    resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> PairedDifference:
    """Paired bootstrap of a per-image statistic's mean, system B minus system A on the same images (e.g. the
    0/1 flags of CHAIR-s or of :func:`object_coverage`). Both systems are scored on the same draws of the
    images, as :func:`paired_bootstrap` does for corpus BLEU and CIDEr-D."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"paired_mean_difference needs one value per image from each system: {x.shape}, {y.shape}")
    _check_bootstrap(resamples, level)
    if x.size == 0:
        return PairedDifference(metric, math.nan, math.nan, math.nan, math.nan, math.nan, resamples, level)
    sums = _resampled_sums(np.stack([x, y], axis=1), resamples, seed) / x.size
    low, high = _percentile_interval(sums[:, 1] - sums[:, 0], level)
    return PairedDifference(metric, float(x.mean()), float(y.mean()), float(y.mean() - x.mean()), low, high,
                            resamples, level)  # fmt: skip
