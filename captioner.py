"""The Python API: a CamEye model loaded once and used to caption photos any number of times.

    from captioner import Captioner
    captioner = Captioner.load("checkpoints/flickr8k/cameye-flickr8k.pt")
    [decoded] = captioner.decode([captioner.read(Path("photo.jpg"))])
    print(" ".join(captioner.words(decoded)))

caption.py's command line, the web page (app.py) and the benchmarks caption through :class:`Captioner`, with
decoding.DecodeConfig's defaults unless told otherwise, so they all give the same caption for a photo.
Photos are decoded like the training data (EXIF rotation, any colour mode, squashed to the training size).
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from checkpoint import load_captioner, load_language_model
from decoding import DecodeConfig, Decoded, beam_search, content_word_mask
from images import read_image
from models import DecoderWithAttention, Encoder, ModelConfig, Preprocess
from utils import CamEyeError, read_json, reverse_word_map, select_device, validate_word_map

if TYPE_CHECKING:
    from grounding import Grounder
    from object_prior import ObjectPrior

# ends a word that came from outside knowledge (DecodeConfig.ground: the detector, the text-taught language model)
OUTSIDE_MARK = "*"
# What a marked word is, said once: caption.py's legend line and the page's (app.py) both read it.
OUTSIDE_MEANING = (
    "chosen by outside knowledge (the object detector, or the language model taught by everyday captions), "
    "not by the captioner's own words"
)
OUTSIDE_LEGEND = f"{OUTSIDE_MARK} {OUTSIDE_MEANING} (--ground off: those alone)"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


def collect_images(inputs: Sequence[Path]) -> list[Path]:
    """Expand folders into their image files (sorted); files are kept as given, even with odd suffixes."""
    paths: list[Path] = []
    for p in inputs:
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise CamEyeError(f"no images found in folder {p}")
            paths += found
        else:
            paths.append(p)
    return paths


@dataclass
class Captioner:
    """A CamEye model loaded once (:meth:`load`), ready to caption decoded images any number of times.

    caption.py's command line and the web page (app.py) both caption through it. :meth:`decode` holds a lock,
    so threads that share one captioner decode one batch at a time.
    """

    checkpoint: Path
    encoder: Encoder
    decoder: DecoderWithAttention
    word_map: dict[str, int]
    config: ModelConfig
    device: torch.device
    vocabulary: list[str] = field(init=False)  # word id -> word
    preprocess: Preprocess = field(init=False)
    prior: ObjectPrior | None = None  # word bonuses from the encoder's ImageNet classifier (see object_prior.py)
    content_words: torch.Tensor = field(init=False)  # V bools: words that may not end a repeated bigram
    # The COCO detector and the vocabulary's object names (grounding.py), loaded when a DecodeConfig.ground
    # other than "off" first asks for them.
    grounder: Grounder | None = None
    no_detector: str | None = None  # why the detector could not load (then grounding is off), None: not tried / fine
    _lock: threading.Lock = field(init=False, default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        self.vocabulary = reverse_word_map(self.word_map)
        self.content_words = content_word_mask(self.word_map)
        self.preprocess = Preprocess(self.config.backbone, self.config.input_size)

    @classmethod
    def load(cls, checkpoint: Path, device: str = "auto", word_map_path: Path | None = None,
             encoder_weights: str | None = None, precision: str = "float32",
             object_prior: float = 0.0) -> Captioner:  # fmt: skip
        """Load a checkpoint in eval mode on ``device``; one-line :class:`CamEyeError` if it cannot be used
        (or if ``word_map_path`` names a word map other than the model's). ``encoder_weights`` and
        ``precision`` (the encoder's): see ``checkpoint.load_captioner``; ``object_prior``: the strength of
        object_prior.ObjectPrior's word bonuses in beam search (0 = off)."""
        dev = select_device(device)
        encoder, decoder, word_map, cfg = load_captioner(checkpoint, dev, encoder_weights, precision)
        if word_map_path is not None:
            given = validate_word_map(read_json(word_map_path, "word map"))
            if given != word_map:
                raise CamEyeError(f"{word_map_path} does not match the word map of {checkpoint}")
        captioner = cls(Path(checkpoint), encoder, decoder, word_map, cfg, dev)
        if object_prior:
            from object_prior import ObjectPrior

            captioner.prior = ObjectPrior(cfg.backbone, word_map, object_prior)
        return captioner

    def read(self, path: Path) -> np.ndarray:
        """The image file decoded as the model expects it: uint8 3 x S x S (S = the model's image size)."""
        return read_image(path, self.config.image_size)

    def decode(self, images: Sequence[np.ndarray], cfg: DecodeConfig = DecodeConfig()) -> list[Decoded]:
        """Beam-search captions for images from :meth:`read` (each 3 x S x S uint8), in input order, as ``cfg``
        says (the defaults of caption.py, eval.py and the page); each result's ``alternatives`` holds its
        ``cfg.n_best`` best beams."""
        if not images:
            return []
        with self._lock, torch.inference_mode():  # a Captioner never trains: nothing made here needs autograd
            x = self.preprocess(torch.from_numpy(np.stack(images))).to(self.device)
            features = self.encoder(x)
            bonus = self.prior.bonus(features) if self.prior is not None else None
            if cfg.ground == "off" or self._grounder() is None:
                return beam_search(self.decoder, features, cfg, self.content_words, bonus)
            from grounding import detection_floor

            findings = self.grounder.find(images, detection_floor(cfg))
            return self.grounder.search(self.decoder, features, cfg, self.content_words, bonus, findings)

    def _grounder(self) -> Grounder | None:
        """The detector and the model's text knowledge, loaded when grounding is first asked for; None (after
        one note on stderr) when the detector's weights are not on this machine: the decoder's own words then."""
        if self.grounder is None and self.no_detector is None:
            from detector import DetectorUnavailable
            from grounding import Grounder

            text = load_language_model(self.checkpoint, self.word_map, self.device)  # a broken file: CamEyeError
            try:
                self.grounder = Grounder(self.word_map, image_size=self.config.image_size,
                                         backbone=self.config.backbone, precision=self.encoder.precision,
                                         language_model=text)  # fmt: skip
            except DetectorUnavailable as exc:
                self.no_detector = str(exc)
                print(f"note: {exc}; captions use the decoder's own words (as --ground off)", file=sys.stderr)
        return self.grounder

    def words(self, decoded: Decoded, marked: bool = False) -> list[str]:
        """The caption's words; with ``marked``, each word that came from the object detector (not from the
        decoder alone: ``Decoded.outside``) ends in :data:`OUTSIDE_MARK`."""
        words = [self.vocabulary[i] for i in decoded.tokens]
        return mark_outside(words, decoded.outside) if marked else words


def mark_outside(words: Sequence[str], outside: Sequence[bool]) -> list[str]:
    """``words`` with :data:`OUTSIDE_MARK` ending each one ``outside`` flags (``Decoded.outside``; empty: none)."""
    return [w + OUTSIDE_MARK if o else w for w, o in zip(words, outside)] if outside else list(words)


def caption_images(
    paths: Sequence[Path], model: Captioner | Path, cfg: DecodeConfig = DecodeConfig(), batch_size: int = 16,
    device: str = "auto", word_map_path: Path | None = None,
) -> Iterator[tuple[Path, list[str] | CamEyeError, Decoded | None, np.ndarray | None]]:  # fmt: skip
    """Yield ``(path, words, decoded, image)`` per usable image, or ``(path, CamEyeError, None, None)``.

    ``model`` is a loaded :class:`Captioner`, or a checkpoint to load on ``device`` (with ``word_map_path``).
    """
    captioner = model if isinstance(model, Captioner) else Captioner.load(model, device, word_map_path)
    for start in range(0, len(paths), batch_size):
        batch, images = [], []
        for path in paths[start : start + batch_size]:
            try:
                images.append(captioner.read(path))
                batch.append(path)
            except CamEyeError as err:
                yield path, err, None, None
        decoded = captioner.decode(images, cfg)
        for path, image, d in zip(batch, images, decoded):
            yield path, captioner.words(d), d, image
