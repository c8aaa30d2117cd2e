"""Evaluate a trained captioner on a split: caption every image with batched beam search, then score.

    python eval.py --checkpoint checkpoints/flickr8k/best.pt --data data/flickr8k --split test --beam-size 3

Reports, each labelled with how it was computed:

* BLEU-1..4 from nltk's ``corpus_bleu`` on word lists (the common tutorial's number);
* BLEU-1..4, METEOR, ROUGE-L and CIDEr from ``pycocoevalcap`` after its PTB tokenizer, against the original
  reference sentences (the numbers papers report; needs Java, skipped with a note without it);
* on data with object boxes (the synthetic set), attention correctness: for each generated word that names
  an object, the share of that step's attention inside the object's box, next to the uniform baseline;
* with ``--instances`` (COCO instance annotations of the split's photos): CHAIR-s and CHAIR-i, the share of
  captions / of object mentions naming a COCO object that is in neither the photo's boxes nor its references,
  object coverage, the share of captions naming at least one COCO object that is in either (issue 20), and
  attention correctness inside the boxes of the objects the caption names (compare.py gives the paired
  difference of CHAIR-s and coverage between two runs);
* with ``--bootstrap N``: 95% percentile intervals over images.

Writes ``predictions_<split>.json`` (COCO results format) and ``references_<split>.json`` (COCO caption
annotations, so any COCO tool can re-score the predictions) to ``--out`` as soon as decoding ends, then
``metrics_<split>.json`` after each family of metrics (and ``objects_<split>.json`` with ``--instances``). A
metric that fails (Java that will not start) is reported in one line and recorded there; the others are still
computed, and the exit status is 3.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from checkpoint import load_captioner, load_language_model
from cli import HelpFormatter, options_from_args
from datasets import CaptionDataset, check_split_has_images, collate_eval
from decoding import DecodeConfig, Decoded, add_decoding_arguments, content_word_mask, decode_loader
from metrics import (
    MEAN_OF_PER_IMAGE,
    MetricError,
    attention_in_box,
    attention_in_boxes,
    bootstrap_interval,
    box_area_share,
    boxes_area_share,
    chair,
    coco_mentions,
    image_truth,
    iter_coco_metrics,
    java_available,
    mean_attention_correctness,
    nltk_bleu,
    object_coverage,
)
from metrics_data import COCO_SYNONYMS
from models import Preprocess
from object_prior import ObjectPrior
from utils import (
    CamEyeError,
    cli_errors,
    freeze_imported_objects,
    handle_sigterm,
    ignore_signals_in_worker,
    keep_freed_memory,
    local_path,
    non_negative_int,
    positive_int,
    read_json,
    reverse_word_map,
    select_device,
    write_json,
)

EXIT_METRIC_FAILED = 3  # everything was written, but some metric could not be computed


def object_word_records(tokens: Sequence[str], alphas: torch.Tensor, objects: dict):
    """(alpha grid, box, image size) for each generated word that names an object of the image.

    A noun phrase is [size] [colour] shape; it names the object with that colour and shape (unique within a
    synthetic image), and each of its words counts, as in the dataset's ``caption_objects``.
    """
    grid = math.isqrt(alphas.shape[1])
    size = (objects["width"], objects["height"])
    for t, word in enumerate(tokens):
        if t == 0 or not any(o["shape"] == word for o in objects["objects"]):
            continue
        colour = tokens[t - 1]
        match = [o for o in objects["objects"] if o["shape"] == word and o["colour"] == colour]
        if not match:
            continue  # a hallucinated object has no box to look at
        first = t - 2 if t >= 2 and tokens[t - 2] == match[0]["size"] else t - 1
        for s in range(first, t + 1):
            yield alphas[s].reshape(grid, grid).numpy(), match[0]["box"], size


def file_names(dataset: CaptionDataset) -> list[str]:
    """Each image's file name as create_input_files.py stored it (the image id in files made without names)."""
    # Not the image id: only Flickr8k's ids are file names ("42" for COCO, Karpathy and synthetic data).
    if "filenames" not in dataset.h5:
        return list(dataset.image_ids)
    return [s.decode() if isinstance(s, bytes) else s for s in dataset.h5["filenames"][:]]


def json_safe(value):
    """``value`` with NaN and infinite floats replaced by None (JSON null), in nested dicts and lists."""
    # Attention correctness is NaN when the model names no object, and json.dump would write the bare token NaN,
    # which is not JSON: strict readers (jq, JavaScript, most non-Python tools) reject it.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def coco_ids(image_ids: Sequence[str]) -> list[int]:
    """COCO tools want unique integer ids: COCO's own ids stay; otherwise (Flickr file names, or ids that
    repeat) every image gets its row index."""
    # Chosen for the whole split, not per image: in a split mixing numeric and other ids, or holding an id twice,
    # per-image choices could give two images one id, and one would silently vanish from the scores.
    if all(i.isdigit() for i in image_ids) and len({int(i) for i in image_ids}) == len(image_ids):
        return [int(i) for i in image_ids]
    return list(range(len(image_ids)))


def coco_id(image_id: str, index: int) -> int:
    """One image's id for COCO tools: its number, else its row index (kept for benchmarks/sweep_decoding.py;
    use :func:`coco_ids`, which also keeps ids unique across a split)."""
    return int(image_id) if image_id.isdigit() else index


def open_eval_split(data: Path, split: str) -> CaptionDataset:
    """The split to evaluate, or one line saying why it cannot be (missing, not ours, empty)."""
    path = data / f"{split}.hdf5"
    check_split_has_images(path, advice="evaluate another --split or prepare the data again")
    return CaptionDataset(path, "eval")


def check_writable(out: Path) -> None:
    """Fail in one line now, not after decoding, when ``out`` cannot hold the results."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        raise CamEyeError(f"cannot write the results to {out}: {exc.strerror or exc}") from None


def read_instances(path: Path, image_ids: Sequence[str], split: str) -> list[dict]:
    """Boxes of every image of the split from COCO instance annotations, matched by COCO image id.

    Returns, per image in split order, ``{"width", "height", "boxes": {category: [(x0, y0, x1, y1), ...]}}``
    in pixels of the original photo. Raises :class:`CamEyeError` (one line) for a file that is not COCO
    instance annotations, a category outside COCO's 80, a bad box, or split images the file does not cover.
    """
    data = read_json(path, "instances file")
    try:
        names = {int(c["id"]): str(c["name"]) for c in data["categories"]}
        sizes = {int(im["id"]): (float(im["width"]), float(im["height"])) for im in data["images"]}
        boxes: dict[int, dict[str, list]] = {}
        for ann in data["annotations"]:
            x, y, w, h = (float(v) for v in ann["bbox"])
            if not all(math.isfinite(v) for v in (x, y, w, h)) or w < 0 or h < 0:
                raise ValueError(f"bad bbox {ann['bbox']} of annotation {ann.get('id')}")
            category = names[int(ann["category_id"])]
            boxes.setdefault(int(ann["image_id"]), {}).setdefault(category, []).append((x, y, x + w, y + h))
    except (KeyError, TypeError, ValueError) as exc:
        raise CamEyeError(f"{path}: not COCO instance annotations ({type(exc).__name__}: {exc})") from None
    unknown = sorted(set(names.values()) - set(COCO_SYNONYMS))
    if unknown:
        raise CamEyeError(f"{path}: categories outside COCO's 80 ({', '.join(unknown[:3])}): CHAIR needs COCO's")
    if any(not (w > 0 and h > 0) for w, h in sizes.values()):
        raise CamEyeError(f"{path}: an image has a width or height that is not positive")
    missing = [i for i in image_ids if not i.isdigit() or int(i) not in sizes]
    if missing:
        raise CamEyeError(
            f"{len(missing)} of {len(image_ids)} {split} images are not in {path} (e.g. {', '.join(missing[:3])}): "
            "--instances must describe the evaluated images, matched by COCO image id"
        )
    return [{"width": sizes[int(i)][0], "height": sizes[int(i)][1], "boxes": boxes.get(int(i), {})} for i in image_ids]


def vocabulary_note(word_map: dict[str, int], data: Path, references: list[list[str]]) -> dict | None:
    """How the model's vocabulary compares with the data's word map, when they differ (else None).

    A different vocabulary is fine for evaluation: references are scored as text, never through word ids
    (e.g. a Flickr8k model on COCO photos). The share of reference words the model cannot say is reported.
    """
    try:
        data_map = read_json(data / "word_map.json", "word map")
    except CamEyeError:
        return None  # no word map beside the data: nothing to compare
    if data_map == word_map:
        return None
    words = [w for refs in references for ref in refs for w in ref]
    outside = sum(w not in word_map for w in words)
    return {
        "model_words": len(word_map),
        "data_words": len(data_map) if isinstance(data_map, dict) else None,
        "reference_words_outside_vocabulary": outside / len(words) if words else math.nan,
    }


def coco_attention_pairs(tokens: Sequence[str], alphas: torch.Tensor, image: dict):
    """(share of attention inside, uniform baseline) for each generated word naming a COCO object of the image.

    A mention's every word counts ("teddy" and "bear"), against the union of all boxes of its category
    (three dogs: the three boxes); a mention of a category without boxes is a hallucination (CHAIR) or only
    in the references, and has no box to look at.
    """
    grid = math.isqrt(alphas.shape[1])
    size = (image["width"], image["height"])
    for start, end, category in coco_mentions(tokens):
        boxes = image["boxes"].get(category)
        if not boxes:
            continue
        baseline = boxes_area_share(boxes, size)
        for t in range(start, end):
            yield attention_in_boxes(alphas[t].reshape(grid, grid).numpy(), boxes, size), baseline


def summarise_attention(per_image: list[list[tuple[float, float]]]) -> dict:
    """Mean attention share inside the boxes over all object words, beside the uniform baseline."""
    pairs = [p for image in per_image for p in image]
    return {
        "attention_correctness": float(np.mean([p[0] for p in pairs])) if pairs else math.nan,
        "uniform_baseline": float(np.mean([p[1] for p in pairs])) if pairs else math.nan,
        "n_words": len(pairs),
    }


def intervals(per_image: dict[str, tuple], resamples: int, level: float = 0.95) -> dict:
    """Bootstrap intervals over images of each statistic in ``per_image`` (name -> (numerators, denominators))."""
    out: dict = {"resamples": resamples, "level": level, "unit": "images"}
    for name, (numerators, denominators) in per_image.items():
        out[name] = list(bootstrap_interval(numerators, denominators, resamples, level))
    return out


def one_line(exc: BaseException) -> str:
    """An exception as one line: its type and the first line of its message (MetricErrors are one line)."""
    text = str(exc).strip().splitlines()
    reason = text[0] if text else "no message"
    return reason if isinstance(exc, MetricError) else f"{type(exc).__name__}: {reason}"


class MetricsFile:
    """The results of an evaluation, written to ``metrics_<split>.json`` again after every family of metrics.

    A family that fails is recorded under ``"failed_metrics"`` with a one-line reason (also printed to
    stderr) and the others still run, so a broken Java never costs the predictions or the other numbers.
    ``per_image`` collects each statistic's per-image (numerators, denominators) for bootstrap intervals.
    """

    def __init__(self, results: dict, path: Path) -> None:
        self.results, self.path = results, path
        self.per_image: dict[str, tuple] = {}

    def fail(self, family: str, reason: str) -> None:
        self.results.setdefault("failed_metrics", {})[family] = reason
        print(f"error: {family} not computed: {reason}", file=sys.stderr)

    def save(self) -> None:
        write_json(json_safe(self.results), self.path)  # NaN -> null: see json_safe

    def run(self, family: str, compute: Callable[[], tuple[dict, dict]]) -> None:
        """Add what ``compute()`` returns (results entries, per-image statistics), or its failure; then save."""
        try:
            entries, per_image = compute()
        except Exception as exc:  # any failure of one metric must not lose the others
            self.fail(family, one_line(exc))
        else:
            self.results.update(entries)
            self.per_image.update(per_image)
        self.save()


def attention_statistics(pairs: list[list[tuple[float, float]]]) -> dict[str, tuple]:
    """Per-image sums of (inside share, baseline) over object words, and word counts, for intervals."""
    words = [len(image) for image in pairs]
    return {
        "attention_correctness": ([sum(p[0] for p in image) for image in pairs], words),
        "uniform_baseline": ([sum(p[1] for p in image) for image in pairs], words),
    }


def synthetic_attention(dataset: CaptionDataset, indices: list[int], hyps: list, preds: list) -> tuple[dict, dict]:
    """Attention correctness on data whose images carry object boxes (the synthetic set); else nothing."""
    objects = [dataset.objects(i) for i in indices]
    if not objects or not all(o is not None for o in objects):
        return {}, {}
    records = [list(object_word_records(h, p.alphas, o)) for h, p, o in zip(hyps, preds, objects)]
    pairs = [[(attention_in_box(*r), box_area_share(r[1], r[2])) for r in image] for image in records]
    return {"attention_correctness": mean_attention_correctness(r for image in records for r in image)}, (
        attention_statistics(pairs)
    )


def object_scores(
    hyps: list[list[str]], preds: list[Decoded], images: list[dict], references: list[list[str]]
) -> tuple[dict, dict, list[dict]]:
    """CHAIR, object coverage and attention correctness against COCO instance boxes (``images`` from
    :func:`read_instances`).

    Returns the results entries, the per-image statistics, and one record per image for ``objects_<split>.json``
    (what the caption names, what of it is hallucinated, the categories in the boxes and in the references).
    """
    truths = [image_truth(image["boxes"], refs) for image, refs in zip(images, references)]
    scores = chair(hyps, truths)
    per_caption = scores.pop("per_image")
    scores["coverage"], covered = object_coverage(hyps, truths)
    pairs = [list(coco_attention_pairs(h, p.alphas, image)) for h, p, image in zip(hyps, preds, images)]
    statistics = {
        "CHAIR-s": ([float(bool(p["hallucinated"])) for p in per_caption], None),
        "CHAIR-i": ([len(p["hallucinated"]) for p in per_caption], [len(p["mentioned"]) for p in per_caption]),
        "coverage": ([float(c) for c in covered], None),
        **attention_statistics(pairs),
    }
    details = [
        {
            "mentioned": p["mentioned"],
            "hallucinated": p["hallucinated"],
            "covered": c,
            "in_boxes": sorted(image["boxes"]),
            "in_references_only": sorted(truth - set(image["boxes"])),
        }
        for p, c, image, truth in zip(per_caption, covered, images, truths)
    ]
    return {"chair": scores, "attention_correctness": summarise_attention(pairs)}, statistics, details


def evaluate(
    checkpoint: Path,
    data: Path,
    split: str,
    out: Path,
    decode: DecodeConfig = DecodeConfig(),
    batch_size: int = 64,
    device: str = "auto",
    max_images: int = 0,
    workers: int = 2,
    coco: bool = True,
    instances: Path | None = None,
    bootstrap: int = 0,
    skip_images: int = 0,
    encoder_weights: str | None = None,
    precision: str = "float32",
    object_prior: float = 0.0,
) -> dict:
    """Decode ``split`` with the checkpoint's model, score it and write predictions and metrics to ``out``.

    Inputs are checked before the model is loaded: the split (missing or empty), ``out`` (writable) and
    ``instances`` (COCO boxes for every evaluated image). Predictions, references and nltk BLEU are written
    as soon as decoding ends; ``metrics_<split>.json`` is rewritten after each further family of metrics, and
    a family that fails (Java) is reported in one line under ``"failed_metrics"`` while the others still run.
    ``bootstrap`` > 0 adds 95% percentile intervals over images (``"intervals"``). Only the images from row
    ``skip_images`` on are evaluated, at most ``max_images`` of them (0: all). ``decode`` says how captions are
    searched for; ``encoder_weights`` and ``precision`` go to ``load_captioner``. Returns the results.
    """
    dataset = open_eval_split(data, split)
    if skip_images >= len(dataset):
        raise CamEyeError(f"--skip-images {skip_images} leaves none of the {len(dataset)} images of {split}.hdf5")
    stop = min(skip_images + max_images, len(dataset)) if max_images else len(dataset)
    rows = range(skip_images, stop)
    if instances is not None:
        boxes = read_instances(instances, [dataset.image_ids[i] for i in rows], split)
        images = dict(zip(rows, boxes))
    check_writable(out)
    preds, refs, indices, word_map, precision, note = decode_split(
        checkpoint, dataset, rows, decode, batch_size, device, workers, encoder_weights, precision, object_prior
    )
    rev = reverse_word_map(word_map)
    hyps = [[rev[i] for i in p.tokens] for p in preds]
    all_ids = coco_ids(dataset.image_ids)
    ids = [all_ids[i] for i in indices]
    raw_refs = {cid: dataset.references(i, raw=True) for cid, i in zip(ids, indices)}
    predictions = {cid: " ".join(h) for cid, h in zip(ids, hyps)}

    # The decoded captions first: nothing after this point may lose them.
    write_predictions(dataset, ids, indices, hyps, preds, raw_refs, out, split)
    # What produced these numbers: the checkpoint, the split, every decoding setting (DecodeConfig), the precision.
    search = {f.name: getattr(decode, f.name) for f in fields(DecodeConfig) if f.name not in ("min_len", "n_best")}
    results = {"checkpoint": str(checkpoint), "split": split, "images": len(preds), **search}
    results.update(encoder_precision=precision, object_prior=object_prior)
    if note is not None:
        results["vocabulary"] = note
    metrics = MetricsFile(results, out / f"metrics_{split}.json")
    metrics.run("nltk BLEU", lambda: ({"nltk_corpus_bleu": nltk_bleu(refs, hyps)}, {}))
    metrics.run("attention correctness", lambda: synthetic_attention(dataset, indices, hyps, preds))
    if instances is not None:

        def objects() -> tuple[dict, dict]:
            picked = [images[i] for i in indices]
            entries, statistics, details = object_scores(hyps, preds, picked, [raw_refs[c] for c in ids])
            rows = [{"image_id": c, "caption": predictions[c], **d} for c, d in zip(ids, details)]
            write_json(rows, out / f"objects_{split}.json")
            return entries, statistics

        metrics.run("CHAIR and attention correctness", objects)
    if coco and java_available():
        coco_metrics_into(metrics, raw_refs, predictions)
    else:
        results["coco_caption_metrics_skipped"] = "no Java on this machine" if coco else "--no-coco"
    if bootstrap:
        results["intervals"] = intervals(metrics.per_image, bootstrap)
    metrics.save()
    return results


def decode_split(
    checkpoint: Path, dataset: CaptionDataset, rows: range, decode: DecodeConfig, batch_size: int, device: str,
    workers: int, encoder_weights: str | None, precision: str, object_prior: float,
):  # fmt: skip
    """Load the model and caption the dataset's ``rows``. Returns (captions, each image's references, dataset
    indices, the model's word map, the encoder's precision, the vocabulary note or None)."""
    data = Path(dataset.path).parent
    dev = select_device(device)
    encoder, decoder, word_map, cfg = load_captioner(checkpoint, dev, encoder_weights, precision)
    note = vocabulary_note(word_map, data, [dataset.references(i) for i in rows])
    if note is not None:
        print(
            f"note: the model's vocabulary ({note['model_words']} words) is another word list than "
            f"{data / 'word_map.json'}'s ({note['data_words']} words); fine for evaluation, which scores text: "
            f"{100 * note['reference_words_outside_vocabulary']:.1f}% of the reference words are outside the model's",
            file=sys.stderr,
        )
    dataset.transform = Preprocess(cfg.backbone, cfg.input_size)
    subset = Subset(dataset, rows) if len(rows) < len(dataset) else dataset
    loader = DataLoader(
        subset, batch_size=batch_size, num_workers=workers, collate_fn=collate_eval, worker_init_fn=quiet_worker
    )
    prior = ObjectPrior(cfg.backbone, word_map, object_prior) if object_prior else None
    grounder, findings = None, None
    if decode.ground != "off":  # the detector sees the prepared image, as the encoder does (grounding.py)
        from detector import DetectorUnavailable
        from grounding import Grounder, detection_floor

        try:
            grounder = Grounder(word_map, image_size=cfg.image_size, backbone=cfg.backbone,
                                precision=encoder.precision,
                                language_model=load_language_model(checkpoint, word_map, dev))  # fmt: skip
            findings = {i: grounder.find([dataset.h5["images"][i]], detection_floor(decode))[0] for i in rows}
        except DetectorUnavailable as exc:  # as caption.py does; the note says the numbers are the decoder's own
            print(f"note: {exc}; scoring the decoder's own words (as --ground off)", file=sys.stderr)
            decode = replace(decode, ground="off")
    preds, refs, indices = decode_loader(
        encoder, decoder, loader, dev, decode, content_word_mask(word_map), prior, True, grounder, findings
    )
    return preds, refs, indices, word_map, encoder.precision, note


def write_predictions(dataset, ids: list[int], indices: list[int], hyps: list[list[str]], preds: list[Decoded],
                      raw_refs: dict, out: Path, split: str) -> None:  # fmt: skip
    """Write predictions_<split>.json (COCO results format, with each image's file name and the words that came
    from the detector, "outside") and references_<split>.json (COCO caption annotations)."""
    names = file_names(dataset)
    rows = [
        {
            "image_id": cid,
            "caption": " ".join(h),
            "file_name": names[i],
            "outside": [w for w, o in zip(h, p.outside) if o],
        }
        for cid, i, h, p in zip(ids, indices, hyps, preds)
    ]
    write_json(rows, out / f"predictions_{split}.json")
    write_json(references_as_coco(raw_refs, dataset, ids, indices), out / f"references_{split}.json")


def coco_metrics_into(metrics: MetricsFile, references: dict, predictions: dict) -> None:
    """pycocoevalcap's metrics one family at a time into ``metrics`` (saved after each; failures recorded)."""
    try:
        for family in iter_coco_metrics(references, predictions):
            if family.error is not None:
                metrics.fail(family.family, family.error)
            else:
                if family.note is not None:
                    metrics.results.setdefault("notes", []).append(family.note)
                    print(f"note: {family.note}", file=sys.stderr)
                metrics.results.setdefault("coco_caption_metrics", {}).update(family.scores)
                means = {name: v for name, v in family.per_image.items() if name in MEAN_OF_PER_IMAGE}
                metrics.per_image.update({name: (values, None) for name, values in means.items()})
            metrics.save()
    except Exception as exc:  # e.g. pycocoevalcap not installed: one line, the rest is kept
        metrics.fail("COCO caption metrics", one_line(exc))
        metrics.save()


def quiet_worker(worker_id: int) -> None:
    """DataLoader worker initialiser: SIGINT/SIGTERM are the main process's to handle (no worker tracebacks)."""
    ignore_signals_in_worker()


def references_as_coco(raw_refs: dict, dataset: CaptionDataset, ids: list[int], indices: list[int]) -> dict:
    """The references in COCO's caption-annotation format (readable by pycocotools' COCO class)."""
    names = file_names(dataset)  # fix: was dataset.image_ids[i] (see file_names)
    images = [{"id": cid, "file_name": names[i]} for cid, i in zip(ids, indices)]
    anns = [
        {"image_id": cid, "id": n, "caption": c}
        for n, (cid, c) in enumerate((cid, c) for cid in ids for c in raw_refs[cid])
    ]
    return {"info": {}, "licenses": [], "type": "captions", "images": images, "annotations": anns}


def _number(value: float | None, interval: list | None = None, scale: float = 100.0, digits: int = 1) -> str:
    """``value`` scaled and rounded, with its bootstrap interval in brackets when there is one."""
    if value is None or math.isnan(value):
        return "nan"
    text = f"{value * scale:.{digits}f}"
    if interval and all(v is not None and not math.isnan(v) for v in interval):
        text += f" [{interval[0] * scale:.{digits}f}, {interval[1] * scale:.{digits}f}]"
    return text


def format_results(results: dict) -> str:
    """A small human-readable table of ``results``: scores x100 (CIDEr included, as papers report them),
    bootstrap intervals in brackets when they were asked for, and the metrics that failed."""
    lines = [f"{results['split']}: {results['images']} images, beam {results['beam_size']}"]
    spans = results.get("intervals", {})
    pretty = {
        "nltk_corpus_bleu": "nltk corpus_bleu (word lists, tutorial's way)",
        "coco_caption_metrics": "pycocoevalcap (PTB tokenizer; the standard COCO caption metrics)",
    }
    for key, title in pretty.items():
        if key in results:
            lines.append(f"  {title}:")
            # the interval names are pycocoevalcap's; nltk's numbers have none
            named = {k: spans.get(k) if key == "coco_caption_metrics" else None for k in results[key]}
            lines.append("    " + "  ".join(f"{k} {_number(v, named[k])}" for k, v in results[key].items()))
    if "coco_caption_metrics_skipped" in results:
        lines.append(f"  COCO caption metrics skipped: {results['coco_caption_metrics_skipped']}")
    if "chair" in results:
        c = results["chair"]
        lines.append(
            f"  object hallucination (lower is better): CHAIR-s {_number(c['CHAIR-s'], spans.get('CHAIR-s'))} "
            f"(% of captions), CHAIR-i {_number(c['CHAIR-i'], spans.get('CHAIR-i'))} "
            f"(% of {c['mentions']} object mentions)"
        )
        if "coverage" in c:  # (metrics files from before issue 20 have none)
            lines.append(
                f"  object coverage (higher is better): {_number(c['coverage'], spans.get('coverage'))} "
                "(% of captions naming at least one object that is there)"
            )
    if "attention_correctness" in results:
        a = results["attention_correctness"]
        inside = _number(a["attention_correctness"], spans.get("attention_correctness"), 1, 3)
        uniform = _number(a["uniform_baseline"], spans.get("uniform_baseline"), 1, 3)
        lines.append(f"  attention correctness {inside} vs uniform baseline {uniform} over {a['n_words']} object words")
    if spans:
        level, resamples = 100 * spans["level"], spans["resamples"]
        lines.append(f"  [low, high]: {level:.0f}% bootstrap intervals over images ({resamples} resamples)")
    for family, reason in results.get("failed_metrics", {}).items():
        lines.append(f"  {family} FAILED: {reason}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Caption a prepared split with beam search and report BLEU, METEOR, ROUGE-L, CIDEr (and "
        "attention correctness on synthetic data; CHAIR and attention correctness with --instances).",
        epilog="Exit status: 0 when every metric was computed; 2 for bad input (nothing done); 3 when a metric "
        "failed (e.g. Java would not start): the predictions, references and every other metric are written "
        "anyway and the failure is recorded in metrics_<split>.json.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--data", type=local_path, required=True, help="folder made by create_input_files.py")
    p.add_argument("--split", default="test", choices=["train", "val", "test"], help="which split to evaluate")
    p.add_argument(
        "--out", type=local_path, default=None, help="folder for predictions/metrics (default: --data/results)"
    )
    add_decoding_arguments(p)
    p.add_argument("--batch-size", type=positive_int, default=64, help="images encoded and decoded together")
    p.add_argument("--max-images", type=non_negative_int, default=0, help="evaluate only the first N images (0 = all)")
    p.add_argument(
        "--skip-images",
        type=non_negative_int,
        default=0,
        help="start at image N of the split (with --max-images: a range; e.g. coco-dev80, sorted by COCO id: "
        "--max-images 40 is its first half, --skip-images 40 the other)",
    )
    p.add_argument("--no-coco", dest="coco", action="store_false", help="skip the pycocoevalcap metrics (Java)")
    p.add_argument(
        "--instances",
        type=local_path,
        default=None,
        help="COCO instance annotations (instances_*.json) of the split's images, matched by COCO image id: "
        "adds CHAIR-s/CHAIR-i (object hallucination), object coverage and attention correctness inside the "
        "named objects' boxes, and writes objects_<split>.json",
    )
    p.add_argument(
        "--bootstrap",
        type=non_negative_int,
        default=0,
        help="N > 0: 95%% bootstrap intervals over images (N resamples) for ROUGE-L, CIDEr, CHAIR and "
        "attention correctness (corpus BLEU and METEOR, pooled over all captions, have none)",
    )
    p.add_argument("--workers", type=non_negative_int, default=2, help="DataLoader worker processes")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handle_sigterm()
    keep_freed_memory()
    with cli_errors():
        if not java_available() and args.coco:
            print("note: no Java found: METEOR, ROUGE-L, CIDEr and COCO BLEU are skipped", file=sys.stderr)
        out = args.out or args.data / "results"
        results = evaluate(
            args.checkpoint,
            args.data,
            args.split,
            out,
            options_from_args(DecodeConfig, args),
            args.batch_size,
            args.device,
            args.max_images,
            args.workers,
            args.coco,
            args.instances,
            args.bootstrap,
            args.skip_images,
            args.encoder_weights,
            args.precision,
            args.object_prior,
        )
        print(format_results(results))
        if results.get("failed_metrics"):
            print(
                f"error: {len(results['failed_metrics'])} metric(s) failed (see above); the predictions and every "
                f"other metric are in {out}",
                file=sys.stderr,
            )
            return EXIT_METRIC_FAILED
    return 0


if __name__ == "__main__":
    freeze_imported_objects()
    sys.exit(main())
