"""Compare two captioners on the same images: each metric for A and B, and B - A with a paired bootstrap interval.

    python compare.py old/predictions_test.json new/predictions_test.json --references old/references_test.json

The inputs are what ``eval.py`` writes: ``predictions_<split>.json`` (a list of ``{"image_id", "caption",
"file_name"}``) of each system and the split's ``references_<split>.json`` (COCO caption annotations). Both
systems must caption exactly the reference images; captions are matched by ``image_id``. Two marginal
intervals that overlap do not show that two models are level: both models' scores rise and fall with the same
easy and hard images. The paired bootstrap (metrics.paired_bootstrap; Koehn, EMNLP 2004) resamples the images
once for both models and looks at the difference itself.

Where eval.py also wrote ``objects_<split>.json`` beside both predictions files (it does with ``--instances``),
CHAIR-s and object coverage are compared too, with the same paired bootstrap over images
(metrics.paired_mean_difference).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

from cli import HelpFormatter
from metrics import (
    PAIRED_METRICS,
    MetricError,
    PairedDifference,
    paired_bootstrap,
    paired_mean_difference,
    ptb_tokenize,
)
from utils import CamEyeError, cli_errors, non_negative_int, positive_int, read_json

TOKENIZERS = ("words", "ptb")


def read_predictions(path: Path, label: str) -> dict[Hashable, str]:
    """``{image_id: caption}`` from an eval.py predictions file; a one-line :class:`CamEyeError` if malformed."""
    rows = read_json(path, f"predictions file {label}")
    if not isinstance(rows, list):
        raise CamEyeError(f"predictions file {label} ({path}) must be a list of {{image_id, caption}} entries")
    captions: dict[Hashable, str] = {}
    for n, row in enumerate(rows):
        if not isinstance(row, dict) or "image_id" not in row or not isinstance(row.get("caption"), str):
            raise CamEyeError(f"{path}: entry {n} must have an image_id and a caption string, got {str(row)[:80]}")
        image_id = row["image_id"]
        if not isinstance(image_id, int | str) or isinstance(image_id, bool):
            raise CamEyeError(f"{path}: entry {n} has an image_id that is not an integer or a string: {image_id!r}")
        if image_id in captions:
            raise CamEyeError(f"{path}: image {image_id!r} is captioned twice")
        captions[image_id] = row["caption"]
    return captions


def read_references(path: Path) -> dict[Hashable, list[str]]:
    """``{image_id: [reference caption, ...]}`` from an eval.py references file (COCO caption annotations)."""
    coco = read_json(path, "references file")
    if not isinstance(coco, dict) or not isinstance(coco.get("annotations"), list):
        raise CamEyeError(f"references file {path} must be COCO caption annotations (a dict with 'annotations')")
    references: dict[Hashable, list[str]] = {}
    for n, ann in enumerate(coco["annotations"]):
        if not isinstance(ann, dict) or not isinstance(ann.get("caption"), str) or "image_id" not in ann:
            raise CamEyeError(f"{path}: annotation {n} must have an image_id and a caption string")
        references.setdefault(ann["image_id"], []).append(ann["caption"])
    if not references:
        raise CamEyeError(f"references file {path} has no annotations")
    return references


def _check_same_images(references: Mapping, captions: Mapping, label: str, path: Path) -> None:
    missing = [i for i in references if i not in captions]
    extra = [i for i in captions if i not in references]
    if missing:
        raise CamEyeError(
            f"{label} ({path}) has no caption for {len(missing)} of the {len(references)} reference images "
            f"(e.g. {', '.join(map(repr, missing[:3]))}): both systems must caption the same images"
        )
    if extra:
        raise CamEyeError(
            f"{label} ({path}) captions {len(extra)} image(s) without references (e.g. "
            f"{', '.join(map(repr, extra[:3]))}): are the references those of the same split?"
        )


OBJECT_METRICS = ("CHAIR-s", "coverage")  # from eval.py's objects_<split>.json, per image


def objects_beside(predictions: Path) -> Path:
    """The objects file eval.py writes beside ``predictions_<split>.json``: ``objects_<split>.json``."""
    return predictions.with_name(predictions.name.replace("predictions_", "objects_", 1))


def read_objects(path: Path, label: str) -> dict[Hashable, dict[str, float]]:
    """``{image_id: {"CHAIR-s": 0/1, "coverage": 0/1}}`` from an eval.py objects file (one line if malformed)."""
    rows = read_json(path, f"objects file {label}")
    flags: dict[Hashable, dict[str, float]] = {}
    for n, row in enumerate(rows if isinstance(rows, list) else [None]):
        if not isinstance(row, dict) or "image_id" not in row or not isinstance(row.get("hallucinated"), list):
            raise CamEyeError(f"{path}: entry {n} is not an eval.py objects record (image_id, hallucinated, ...)")
        covered = row.get("covered")  # eval.py's metrics.object_coverage flag; derived for files from before it
        if covered is None:
            covered = any(c not in row["hallucinated"] for c in row.get("mentioned", []))
        flags[row["image_id"]] = {"CHAIR-s": float(bool(row["hallucinated"])), "coverage": float(bool(covered))}
    return flags


def compare_objects(
    a: Mapping[Hashable, dict[str, float]], b: Mapping[Hashable, dict[str, float]], ids: Sequence[Hashable],
    samples: int = 1000, seed: int = 0,
) -> dict[str, PairedDifference]:  # fmt: skip
    """CHAIR-s and object coverage of A and B on the images ``ids``, B - A with its 95% paired interval."""
    missing = [i for i in ids if i not in a or i not in b]
    if missing:
        raise CamEyeError(f"the objects files do not cover {len(missing)} of the images (e.g. {missing[0]!r})")
    return {
        m: paired_mean_difference([a[i][m] for i in ids], [b[i][m] for i in ids], m, samples, seed=seed)
        for m in OBJECT_METRICS
    }


def read_inputs(
    predictions_a: Path, predictions_b: Path, references: Path
) -> tuple[dict[Hashable, list[str]], dict[Hashable, str], dict[Hashable, str]]:
    """The references and both systems' captions, checked to cover exactly the same images."""
    refs = read_references(references)
    a, b = read_predictions(predictions_a, "A"), read_predictions(predictions_b, "B")
    _check_same_images(refs, a, "A", predictions_a)
    _check_same_images(refs, b, "B", predictions_b)
    return refs, a, b


def _tokenized(
    references: Mapping[Hashable, list[str]], captions: Sequence[Mapping[Hashable, str]], tokenizer: str
) -> tuple[list[list[list[str]]], list[list[list[str]]]]:
    """Word lists of the references and of each system's captions, in the order of ``references``."""
    ids = list(references)
    if tokenizer == "ptb":  # pycocoevalcap's tokenizer (Java); each caption list tokenised in one JVM run
        refs = ptb_tokenize(references)
        systems = [ptb_tokenize({i: [c[i]] for i in ids}) for c in captions]
        return [[r.split() for r in refs[i]] for i in ids], [[s[i][0].split() for i in ids] for s in systems]
    from captions import tokenize  # the words the prepared references are made of

    return [[tokenize(r) for r in references[i]] for i in ids], [[tokenize(c[i]) for i in ids] for c in captions]


def compare(
    references: Mapping[Hashable, list[str]],
    captions_a: Mapping[Hashable, str],
    captions_b: Mapping[Hashable, str],
    samples: int = 1000,
    seed: int = 0,
    tokenizer: str = "words",
) -> dict[str, PairedDifference]:
    """Every metric of :data:`metrics.PAIRED_METRICS` for A and B, and B - A with its 95% paired interval.

    ``references`` maps an image id to its raw reference sentences, ``captions_a``/``captions_b`` map the same
    ids to one caption each. ``tokenizer`` "words" splits text as create_input_files.py does (the nltk BLEU of
    eval.py); "ptb" uses pycocoevalcap's PTB tokenizer (needs Java), so CIDEr-D equals pycocoevalcap's CIDEr.
    """
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"tokenizer must be one of {TOKENIZERS}, got {tokenizer!r}")
    refs, (hyps_a, hyps_b) = _tokenized(references, [captions_a, captions_b], tokenizer)
    return paired_bootstrap(refs, hyps_a, hyps_b, metrics=PAIRED_METRICS, resamples=samples, seed=seed)


def format_comparison(results: Mapping[str, PairedDifference], n_images: int, seed: int, tokenizer: str) -> str:
    """A table of the results, scores x100 (CIDEr-D too, as papers report it), and how they were computed."""
    first = next(iter(results.values()))
    level = f"{100 * first.level:.0f}%"
    lines = [f"{'metric':<8} {'A':>6} {'B':>6}  B - A [{level} paired interval]"]
    for metric, r in results.items():
        lines.append(
            f"{metric:<8} {100 * r.a:6.1f} {100 * r.b:6.1f}  "
            f"{100 * r.difference:+.1f} [{100 * r.low:+.1f}, {100 * r.high:+.1f}]"
        )
    words = "the PTB tokenizer's tokens" if tokenizer == "ptb" else "create_input_files.py's words"
    if any(m in results for m in OBJECT_METRICS):
        lines.append("CHAIR-s: % of captions naming an object that is not there; coverage: % naming one that is.")
    lines.append(
        f"{n_images} images, {first.resamples} paired resamples (seed {seed}): the same resampled images score "
        f"both systems. BLEU: nltk corpus_bleu; CIDEr-D: document frequencies from these references; on {words}. "
        f"An interval that excludes 0 is a difference at the {level} level."
    )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="compare.py",
        description="Compare two captioners evaluated by eval.py on the same images: BLEU-1..4 (nltk corpus BLEU) "
        "and CIDEr-D for system A and system B, and the difference B - A with a paired bootstrap interval (the "
        "same resampled images score both systems).",
        epilog="Exit status: 0 on success; 2 for bad input (a missing or malformed file, systems that caption "
        "different images), reported in one line.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("predictions_a", type=Path, help="system A's predictions_<split>.json (written by eval.py)")
    p.add_argument("predictions_b", type=Path, help="system B's predictions_<split>.json, on the same images")
    p.add_argument(
        "--references",
        type=Path,
        required=True,
        help="the split's references_<split>.json written by eval.py (COCO caption annotations)",
    )
    p.add_argument("--samples", type=positive_int, default=1000, help="bootstrap resamples of the images")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of the resampling (repeatable intervals)")
    p.add_argument(
        "--tokenizer",
        choices=TOKENIZERS,
        default="words",
        help="how captions become words: 'words' as create_input_files.py splits them (BLEU equals eval.py's nltk "
        "corpus_bleu); 'ptb' pycocoevalcap's PTB tokenizer (needs Java; CIDEr-D equals pycocoevalcap's CIDEr)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args: Any = build_parser().parse_args(argv)
    with cli_errors():
        references, a, b = read_inputs(args.predictions_a, args.predictions_b, args.references)
        try:
            results = compare(references, a, b, args.samples, args.seed, args.tokenizer)
        except MetricError as exc:  # the PTB tokenizer's Java failing: already one line
            raise CamEyeError(str(exc)) from None
        objects = [objects_beside(args.predictions_a), objects_beside(args.predictions_b)]
        if all(p.is_file() for p in objects):  # eval.py --instances wrote them: CHAIR-s and coverage too
            flags = [read_objects(p, label) for p, label in zip(objects, "AB")]
            results.update(compare_objects(*flags, list(references), args.samples, args.seed))
        print(f"A: {args.predictions_a}\nB: {args.predictions_b}")
        print(format_comparison(results, len(references), args.seed, args.tokenizer))
    return 0


if __name__ == "__main__":
    sys.exit(main())
