"""The CamEye page: drop a photo in the browser, read its caption, and step through the words to see where it looked.

    python app.py                                    # http://127.0.0.1:7860, the shipped model, CPU unless CUDA
    python app.py --port 8080 --checkpoint checkpoints/run/best.pt --device cpu
    make serve

A Gradio page (the usual form of a model demo), laid out for the photo. A photo comes by upload, drag-and-drop,
paste, webcam or one of the example photos that ship inside scikit-image. The answer is one piece of HTML (a
``gr.HTML`` component with its own script, :data:`VIEWER_JS`): the caption, whose words are buttons that pick
the word to show; the photo with that word's attention drawn over it and named ("dog, 3 of 8"); previous, play
and next; a switch between the two renderings of attention.py (a contour or a colour map, with its legend); and
the best beams as a list whose rows show their own words and attention. Every word's attention layer comes with
the answer (as small ``data:`` images), so moving between words is instant and asks the server nothing; choosing
another beam asks once for that beam's layers. Decoding and drawing are the Python API's
(:class:`captioner.Captioner`, attention_maps.py) with decoding.DecodeConfig's defaults, so the page and
caption.py give the same caption and draw attention the same way. Words from outside knowledge
(``DecodeConfig.ground``: the object detector) are marked as caption.py marks them (``*``, with a dashed border
in the word picker, words for screen readers and a legend), and "Own words only" captions without them.

Offline and private by construction: the server listens on 127.0.0.1 unless --host says otherwise, no share
link, no analytics, no run history, system fonts only (nothing is fetched from the internet). Uploads go to a
temporary folder of this process: each is deleted as soon as it is decoded, the figure downloads are deleted
``--keep-outputs`` seconds after they were made (the page says until when, and says so once they are gone), and
the whole folder when the server stops.

One request decodes at a time; up to ``--queue-size`` more wait, and the page says so when the queue is full.
A file that is not an image, a truncated or oversized one, or one with too many pixels gets a one-line message
in the page's own words (files over the size limit and files that are not images are refused in the browser,
before uploading), and the server keeps serving.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import html
import io
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
from PIL import Image

from attention_maps import (
    CONTOUR_LEVEL,
    DISPLAY_SIDE,
    HEATMAP_ALPHA,
    HEATMAP_COLORMAP,
    RENDERINGS,
    attention_grids,
    attention_layer,
    colormap_table,
    photo_shape,
    save_attention_figure,
    save_attention_gif,
    stretch_photo,
    word_heat,
)
from captioner import OUTSIDE_MARK, OUTSIDE_MEANING, Captioner, mark_outside
from cli import HelpFormatter, options_from_args
from decoding import DecodeConfig, add_decoding_arguments
from images import read_image
from utils import (
    CamEyeError,
    cli_errors,
    freeze_imported_objects,
    handle_sigterm,
    keep_freed_memory,
    positive_int,
)

MAX_UPLOAD_MB = 20  # larger files are refused before decoding (in the browser, and again by the server)
LAYER_SIDE = 256  # longest side of the attention layers sent to the browser, which stretches them smoothly
BEAM_SIZES = (1, 10)  # the page's bounds for beam size ...
LENGTH_PENALTIES = (0.0, 2.0)  # ... and for the length penalty
EXAMPLE_PHOTOS = ("chelsea.png", "coffee.png", "astronaut.png", "motorcycle_left.png", "rocket.jpg", "camera.png")
PLAY_SECONDS = 0.9  # how long the play button shows each word
OUTSIDE_SAID = "from outside knowledge"  # what a screen reader says after a marked word (it would read "*" as "star")
GOOD_AT = {
    "cameye-flickr8k.pt": "people and dogs outdoors (Flickr8k's photos: CIDEr 57.9 on its test photos) and, with "
    "the object detector and a language model taught by everyday captions, the main object of everyday photos "
    "(80 COCO photos: CIDEr 58.0, 12.5% of captions name an object that is not there).",
}
SHORT = {  # the two above in a sentence, for a phone's first screen
    "cameye-flickr8k.pt": "Show, Attend and Tell on Flickr8k, naming what an object detector sees; words marked * "
    "came from that outside knowledge.",
}
LIMITS = {
    "cameye-flickr8k.pt": 'the rest of the sentence is often Flickr8k\'s template ("a cup is sitting on a table"), '
    "objects outside COCO's 80 categories get only Flickr8k's words (dogs and people), and gender words are "
    "guesses learned from the data.",
}


@dataclass
class Beam:
    """One of the best beams: its words, each word's attention (words x grid x grid), its two scores and which
    words came from outside knowledge (``Decoded.outside``: empty when all are the captioner's own)."""

    words: list[str]
    grids: np.ndarray
    score: float  # log-probability of the caption (and its <end>): closer to 0 is likelier
    normalised: float  # score / (words + 1) ** length_penalty: what the beams are ranked by
    outside: list[bool] = field(default_factory=list)

    @property
    def caption(self) -> str:
        """The caption as caption.py prints it: words from outside knowledge end in captioner.OUTSIDE_MARK."""
        return " ".join(mark_outside(self.words, self.outside))

    @property
    def marked(self) -> list[bool]:
        """Per word, whether it came from outside knowledge (all False when none did)."""
        return self.outside or [False] * len(self.words)


@dataclass
class Answer:
    """One photo's answer, kept per browser tab (in a ``gr.State``) so choosing a beam needs no new decoding.

    ``source`` is the upload's server path (the file itself is deleted once decoded); ``photo`` is H x W x 3
    uint8 at the photo's own aspect ratio, ``image`` the model's 3 x S x S input; ``beams`` best first (the
    first is the caption).
    """

    source: str
    name: str
    photo: np.ndarray
    image: np.ndarray
    beams: list[Beam]
    seconds: float = 0.0
    settings: str = ""

    @property
    def words(self) -> list[str]:
        return self.beams[0].words

    @property
    def grids(self) -> np.ndarray:
        return self.beams[0].grids


# ---------------------------------------------------------------------------------------------- decoding
def example_photos() -> list[Path]:
    """The example photos: the ones ``make demo`` captions, from scikit-image's installed data folder."""
    import skimage.data

    folder = Path(skimage.data.__file__).parent
    return [folder / name for name in EXAMPLE_PHOTOS if (folder / name).is_file()]


def in_page_words(name: str, reason: str) -> str:
    """A reason from images.read_image said in the page's own words: Pillow's wording ("could be decompression
    bomb DOS attack", "24 bytes not processed") means nothing to someone who dropped a photo."""
    pixels = re.search(r"Image size \((\d+) pixels\)", reason)
    if "DecompressionBomb" in reason and pixels:
        limit = Image.MAX_IMAGE_PIXELS or 0
        million = int(pixels[1]) / 1e6
        return (f"{name}: the photo has too many pixels to open safely ({million:.0f} million; photos up to "
                f"{limit / 1e6:.0f} million pixels are accepted, as a decompression bomb guard)")  # fmt: skip
    if "truncated" in reason:
        return f"{name}: the file is cut short (truncated): save or download the photo again and retry"
    if reason == "empty file":
        return f"{name}: the file is empty (0 bytes)"
    if reason.startswith("unreadable image"):
        return f"{name}: the photo cannot be read (the file is damaged or in a form this page cannot decode)"
    return f"{name}: {reason}"


def decode_upload(path: Path, name: str, captioner: Captioner) -> tuple[np.ndarray, np.ndarray]:
    """The model's input (3 x S x S uint8) and the photo to show (H x W x 3 uint8, own aspect ratio).

    Raises a one-line :class:`CamEyeError` in the page's words (:func:`in_page_words`) naming the file as the
    user called it (``name``), not its temporary path: too large, not an image, truncated, too many pixels.
    """
    size = path.stat().st_size
    if size > MAX_UPLOAD_MB * 1024 * 1024:
        raise CamEyeError(f"{name}: the file is {size / 2**20:.1f} MB; photos up to {MAX_UPLOAD_MB} MB are accepted")
    try:
        image = captioner.read(path)
        square = read_image(path, DISPLAY_SIDE)
        shape = photo_shape(path)
    except CamEyeError as err:
        raise CamEyeError(in_page_words(name, str(err).removeprefix(f"{path}: "))) from None
    # Decoded as the model sees it (squashed to a square), then stretched back to the photo's own shape.
    return image, stretch_photo(square, shape)


def answer_photo(captioner: Captioner, path: Path, name: str, beam_size: Any, length_penalty: Any,
                 decode: DecodeConfig = DecodeConfig(), own_words: Any = False) -> Answer:  # fmt: skip
    """Decode and caption one photo file with the page's ``beam_size``, ``length_penalty`` and "own words only"
    switch (``own_words``: ``decode.ground`` "off") and the rest of ``decode`` (see :func:`caption_answer`).

    Raises :class:`CamEyeError` (one line) for an unusable file or a control out of bounds.
    """
    search = page_search(decode, beam_size, length_penalty, own_words)
    image, photo = decode_upload(path, name, captioner)
    answer = caption_answer(captioner, str(path), name, image, photo, search)
    answer.settings = search_settings(search, decode, captioner.no_detector is not None)
    return answer


def page_search(decode: DecodeConfig, beam_size: Any, length_penalty: Any, own_words: Any = False) -> DecodeConfig:
    """``decode`` with the page's controls (checked: :func:`check_controls`), showing every beam; with
    ``own_words``, outside knowledge off (``ground="off"``: the captioner's own words alone)."""
    beam_size, length_penalty = check_controls(beam_size, length_penalty)
    if not isinstance(own_words, bool):  # the checkbox sends a bool; a direct API call may send anything
        raise CamEyeError(f"own words only must be true or false, got {own_words!r}")
    ground = "off" if own_words else decode.ground
    return replace(decode, beam_size=beam_size, length_penalty=length_penalty, n_best=beam_size, ground=ground)


def search_settings(search: DecodeConfig, configured: DecodeConfig | None = None, no_detector: bool = False) -> str:
    """How the caption was searched for, for the status line; "own words only" where the page's switch turned
    off the outside knowledge that the server's ``configured`` search has, or where the server has no detector
    (``no_detector``: the captioner then used its own words, captioner.Captioner.no_detector)."""
    text = f"beam {search.beam_size}, length penalty {search.length_penalty:g}"
    if search.ground != "off" and no_detector:
        return f"{text}, own words only (no object detector on this server)"
    if search.ground != "off":
        return f"{text}, outside knowledge: {search.ground}"
    return f"{text}, own words only" if configured is not None and configured.ground != "off" else text


def caption_answer(captioner: Captioner, source: str, name: str, image: np.ndarray, photo: np.ndarray,
                   decode: DecodeConfig) -> Answer:  # fmt: skip
    """Caption a decoded photo: the ``decode.n_best`` best beams, each with its words, per-word attention and
    outside-knowledge marks."""
    [decoded] = captioner.decode([image], decode)
    # The caption itself first, then the other beams: grounding may change the caption after the search
    # (grounding.agree_articles' "an airplane") without changing its copy among the alternatives.
    beams = [
        Beam(captioner.words(d), attention_grids(d), round(d.score, 3), round(d.normalised_score, 3), d.outside)
        for d in [decoded, *decoded.alternatives[1:]]
    ]
    return Answer(source, name, photo, image, beams, settings=search_settings(decode))


def port_number(text: str) -> int:
    """argparse type: a TCP port, 1-65535."""
    port = int(text)
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is from 1 to 65535, got {port}")
    return port


def check_controls(beam_size: Any, length_penalty: Any) -> tuple[int, float]:
    """The page's beam size and length penalty as int and float, or a one-line :class:`CamEyeError` if out of
    bounds (the sliders keep them in bounds; a number typed into a slider's box or a direct API call may not)."""
    try:
        beam, penalty = float(beam_size), float(length_penalty)
    except (TypeError, ValueError):
        raise CamEyeError("beam size and length penalty must be numbers") from None
    lo, hi = BEAM_SIZES
    if not (lo <= beam <= hi and beam == int(beam)):
        raise CamEyeError(f"beam size must be a whole number from {lo} to {hi}, got {beam_size}")
    lo, hi = LENGTH_PENALTIES
    if not lo <= penalty <= hi:  # also refuses NaN
        raise CamEyeError(f"length penalty must be from {lo} to {hi}, got {length_penalty}")
    return int(beam), penalty


def write_figures(answer: Answer, folder: Path) -> list[Path]:
    """Write the answer's full attention figure (PNG, the photo at its own shape) and GIF into ``folder``, its
    words marked as caption.py marks them."""
    stem = re.sub(r"[^\w.-]+", "_", Path(answer.name).stem).strip("_.")[:60] or "photo"
    png, gif = folder / f"{stem}_attention.png", folder / f"{stem}_attention.gif"
    words = mark_outside(answer.words, answer.beams[0].outside)
    save_attention_figure(answer.image, words, answer.grids, png, photo=answer.photo)
    save_attention_gif(answer.image, words, answer.grids, gif)
    return [png, gif]


# ------------------------------------------------------------------------------------------- the answer's HTML
def data_uri(image: np.ndarray, fmt: str = "WEBP", **options: Any) -> str:
    """``image`` (H x W x 3 or 4 uint8) as an inline ``data:`` URL: nothing to fetch, nothing left on disk."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt, **options)
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}"


def word_layers(answer: Answer, beam: int = 0) -> list[dict[str, str]]:
    """Beam ``beam``'s attention layers, one per word and rendering (``{"contour": data URL, "heatmap": ...}``):
    RGBA images the browser lays over the photo, drawn by attention_maps.attention_layer as the figure's panels
    are, at :data:`LAYER_SIDE` (the maps are smooth; the browser stretches them to the photo)."""
    h, w = answer.photo.shape[:2]
    scale = LAYER_SIDE / max(h, w)
    shape = (max(1, round(h * scale)), max(1, round(w * scale)))
    layers = []
    for grid in answer.beams[beam].grids:
        heat = word_heat(grid, shape, side=answer.image.shape[1])
        layers.append({r: data_uri(attention_layer(heat, r), quality=80, method=0) for r in RENDERINGS})
    return layers


def heatmap_gradient() -> str:
    """The heat map's legend as a CSS gradient: the colour map's colours at its opacity, from none to the peak."""
    table = colormap_table()
    stops = [
        f"rgba({r},{g},{b},{HEATMAP_ALPHA * i / 255:.2f})" for i in (0, 64, 128, 191, 255) for r, g, b in [table[i]]
    ]
    return f"linear-gradient(to right, {', '.join(stops)})"


def marked_word_html(word: str, outside: bool) -> str:
    """A word as the page writes it: one from outside knowledge ends in :data:`captioner.OUTSIDE_MARK`, as in
    caption.py, which screen readers hear as :data:`OUTSIDE_SAID` instead of "star"."""
    if not outside:
        return html.escape(word)
    return (f'{html.escape(word)}<span class="cam-mark" aria-hidden="true">{OUTSIDE_MARK}</span>'
            f'<span class="cam-sr"> ({OUTSIDE_SAID})</span>')  # fmt: skip


def marked_caption_html(beam: Beam) -> str:
    """The beam's caption, its words from outside knowledge marked (:func:`marked_word_html`)."""
    return " ".join(marked_word_html(w, o) for w, o in zip(beam.words, beam.marked))


def word_button(word: str, outside: bool, layer: dict[str, str]) -> str:
    """One word of the picker with its attention layers; a word from outside knowledge also has a dashed border
    (``cam-outside``). ``data-word`` is the bare word, which the picker's script names in the photo's label."""
    kind = "cam-word cam-outside" if outside else "cam-word"
    return (f'<button type="button" class="{kind}" role="radio" aria-checked="false" tabindex="-1" '
            f'data-word="{html.escape(word)}" data-contour="{layer["contour"]}" data-heatmap="{layer["heatmap"]}">'
            f"{marked_word_html(word, outside)}</button>")  # fmt: skip


def outside_legend_html(beam: Beam) -> str:
    """The line under the words that says what their mark means (from captioner.OUTSIDE_MEANING, as caption.py's
    legend), only when one of them is marked."""
    if not any(beam.marked):
        return ""
    return (f'<p class="cam-hint cam-outside-legend"><span aria-hidden="true">{OUTSIDE_MARK}</span> '
            f'{OUTSIDE_SAID}: {html.escape(OUTSIDE_MEANING)} ("Own words only" leaves them out).</p>')  # fmt: skip


def spoken_caption(beam: Beam) -> str:
    """The caption as the live region reads it out: plain words, then which came from outside knowledge."""
    named = [w for w, o in zip(beam.words, beam.marked) if o]
    return " ".join(beam.words) + (f" ({OUTSIDE_SAID}: {', '.join(named)})" if named else "")


def viewer_html(answer: Answer, beam: int = 0) -> str:
    """The answer as the page shows it: the chosen beam's words (the word picker, words from outside knowledge
    marked, with a legend), the photo with the chosen word's attention, the play controls and renderings, and
    the best beams as a list (see :data:`VIEWER_JS`)."""
    chosen = answer.beams[beam]
    esc = html.escape
    buttons = "".join(
        word_button(word, outside, layer)
        for word, outside, layer in zip(chosen.words, chosen.marked, word_layers(answer, beam))
    )
    h, w = answer.photo.shape[:2]
    photo = data_uri(answer.photo, "JPEG", quality=85)
    which = "the caption" if beam == 0 else f"beam {beam + 1} of {len(answer.beams)}"
    rows = "".join(
        f'<li><button type="button" class="cam-beam" data-beam="{i}" aria-pressed="{str(i == beam).lower()}">'
        f'<span class="cam-beam-text">{marked_caption_html(b)}</span>'
        f'<span class="cam-beam-score">log-probability {b.score:.2f} · ranked by {b.normalised:.2f}</span>'
        f"</button></li>"
        for i, b in enumerate(answer.beams)
    )
    spoken = spoken_caption(chosen)
    announce = f"Caption of {answer.name}: {spoken}" if beam == 0 else f"{which}: {spoken}"
    return f"""
<div class="cam-view" data-announce="{esc(announce)}" data-caption="{esc(answer.beams[0].caption)}">
  <h2 class="cam-heading">{esc(which.capitalize())}
    <span class="cam-hint">(choose a word or use the arrow keys: where did it look?)</span></h2>
  <div class="cam-words" role="radiogroup" aria-label="words of {esc(which)}">{buttons}</div>
  {outside_legend_html(chosen)}
  <figure class="cam-figure">
    <div class="cam-stage" style="aspect-ratio: {w} / {h}; width: min(100%, calc(60vh * {w / h:.4f}))">
      <img class="cam-photo" src="{photo}" alt="the photo, {esc(answer.name)}" width="{w}" height="{h}">
      <img class="cam-overlay" src="" alt="" width="{w}" height="{h}">
      <span class="cam-tag" aria-hidden="true"></span>
    </div>
    <figcaption>
      <span class="cam-legend cam-legend-contour">Inside the white line: where the model looked while writing the
        word (the line is at {CONTOUR_LEVEL:.0%} of its peak attention; the rest of the photo is dimmed).</span>
      <span class="cam-legend cam-legend-heatmap"><span class="cam-scale" style="background: {heatmap_gradient()}">
        </span><span>no attention</span><span>the word's peak ({HEATMAP_COLORMAP})</span></span>
    </figcaption>
  </figure>
  <div class="cam-tools">
    <button type="button" class="cam-prev">&#9664; Previous</button>
    <button type="button" class="cam-play" aria-pressed="false">&#9654; Play</button>
    <button type="button" class="cam-next">Next &#9654;</button>
    <fieldset class="cam-renderings"><legend>Show attention as</legend>
      <label><input type="radio" name="cam-rendering" value="contour" checked> contour</label>
      <label><input type="radio" name="cam-rendering" value="heatmap"> colour map</label>
    </fieldset>
  </div>
  <h2 class="cam-heading">Best beams <span class="cam-hint">(choose one to see its own attention)</span></h2>
  <ol class="cam-beams">{rows}</ol>
  <p class="cam-hint">Scores are log-probabilities (closer to 0 is likelier); beams are ranked by the
    log-probability divided by (words + 1) to the power of the length penalty, so longer captions are not
    punished for their length alone.</p>
</div>"""


EMPTY_VIEWER = (
    '<div class="cam-view cam-empty"><p>Drop a photo, or choose one of the example photos: its caption appears '
    "here, and each of its words shows where the model looked while writing it.</p></div>"
)


def status_html(text: str, error: bool = False) -> str:
    """The line above the answer: what was captioned and how fast, or why not (an alert, read out at once).

    Always a ``cam-status-box``, even empty: the page's own script writes the refusals it makes before an upload
    into that box (inside the HTML this component rendered, so the next answer simply replaces it)."""
    if error:
        line = f'<p class="cam-error" role="alert">error: {html.escape(text)}</p>'
    else:
        line = f'<p class="cam-status">{html.escape(text)}</p>' if text else ""
    return f'<div class="cam-status-box">{line}</div>'


def model_summary(captioner: Captioner) -> str:
    """HTML for next to the title: which model answers, what it is good at and its limits (in full on a wide
    screen; in one short sentence on a phone, where the photo and its caption must fit the first screen)."""
    ckpt, cfg = captioner.checkpoint, captioner.config
    name = html.escape(ckpt.name)
    good = html.escape(GOOD_AT.get(ckpt.name, "the kinds of photos it was trained on."))
    limits = LIMITS.get(ckpt.name, "a Show, Attend and Tell model knows only the kinds of photos it was trained on.")
    short = SHORT.get(ckpt.name, "Show, Attend and Tell; it knows only the kinds of photos it was trained on.")
    card = ' See the <a href="#model-card">model card</a>.' if (ckpt.parent / "MODEL_CARD.md").is_file() else ""
    return (
        f'<p class="cam-long">Captions by <b>{name}</b>, a Show, Attend and Tell model ({html.escape(cfg.backbone)} '
        f"encoder, LSTM decoder with soft attention, {len(captioner.word_map):,} words) on "
        f"{captioner.device.type.upper()}. <b>Good at</b> {good} <b>Limits:</b> {html.escape(limits)}{card}</p>"
        f'<p class="cam-short"><b>{name}</b>: {html.escape(short)}{card}</p>'
    )


def model_card(captioner: Captioner) -> str | None:
    """The model card's Markdown (shown in the page), or None if the checkpoint has none."""
    card = captioner.checkpoint.parent / "MODEL_CARD.md"
    return card.read_text(encoding="utf-8") if card.is_file() else None


def expiry_html(made: float, keep_outputs: int) -> str:
    """The note under the downloads: until when the server keeps them (:data:`PAGE_JS` says once they are gone)."""
    until = time.strftime("%H:%M:%S", time.localtime(made + keep_outputs))
    return (
        f'<p class="cam-hint cam-expiry" data-expires="{round((made + keep_outputs) * 1000)}">The server keeps these '
        f"files until {until} ({keep_outputs} s), then deletes them.</p>"
    )


# ------------------------------------------------------------------------------------------------- the page
# The answer's behaviour, run once by gr.HTML with ``element`` (the component's box, whose content each answer
# replaces), ``props`` and ``trigger``. Words are a radio group (arrow keys, Home, End; one tab stop); each
# word's layers came with the answer, so showing one changes an <img> and asks the server nothing. Choosing
# another beam triggers the component's click event with {beam: i}, answered by that beam's HTML.
VIEWER_JS = """
const live = document.getElementById('cam-live') || (() => {
  const el = document.createElement('div');
  el.id = 'cam-live'; el.className = 'cam-sr';
  el.setAttribute('role', 'status'); el.setAttribute('aria-live', 'polite');
  document.body.appendChild(el);
  return el;
})();
let timer = null, rendering = 'contour', index = 0;
const one = s => element.querySelector(s);
const words = () => [...element.querySelectorAll('.cam-word')];
function show(i, focus) {
  const all = words();
  if (!all.length) return;
  index = Math.max(0, Math.min(all.length - 1, i));
  all.forEach((w, j) => { w.setAttribute('aria-checked', String(j === index)); w.tabIndex = j === index ? 0 : -1; });
  // data-word is the bare word: the button's text also holds a mark and words for screen readers.
  const word = all[index], outside = word.classList.contains('cam-outside');
  const where = `${word.dataset.word}${outside ? 'OUTSIDE_MARK' : ''}, ${index + 1} of ${all.length}`;
  const overlay = one('.cam-overlay');
  overlay.src = word.dataset[rendering];
  overlay.alt = `where the model looked while writing "${word.dataset.word}" (word ${index + 1} of ${all.length}`
    + `${outside ? ', OUTSIDE_SAID' : ''})`;
  one('.cam-tag').textContent = where;
  one('.cam-view').dataset.rendering = rendering;
  if (focus) word.focus();
}
function stop() {
  clearInterval(timer); timer = null;
  const play = one('.cam-play');
  if (play) { play.innerHTML = '&#9654; Play'; play.setAttribute('aria-pressed', 'false'); }
}
function play() {
  if (index >= words().length - 1) show(0);
  const button = one('.cam-play');
  button.innerHTML = '&#10074;&#10074; Pause'; button.setAttribute('aria-pressed', 'true');
  timer = setInterval(() => (index + 1 < words().length ? show(index + 1) : stop()), PLAY_MS);
}
element.addEventListener('click', e => {
  const t = e.target.closest('button');
  if (!t || !element.contains(t)) return;
  if (t.classList.contains('cam-word')) { stop(); show(words().indexOf(t)); }
  else if (t.classList.contains('cam-prev')) { stop(); show(index - 1); }
  else if (t.classList.contains('cam-next')) { stop(); show(index + 1); }
  else if (t.classList.contains('cam-play')) { timer ? stop() : play(); }
  else if (t.classList.contains('cam-beam') && t.getAttribute('aria-pressed') !== 'true') {
    stop(); t.setAttribute('aria-busy', 'true'); trigger('click', {beam: Number(t.dataset.beam)});
  }
});
element.addEventListener('keydown', e => {
  if (!e.target.classList || !e.target.classList.contains('cam-word')) return;
  const step = {ArrowRight: 1, ArrowDown: 1, ArrowLeft: -1, ArrowUp: -1}[e.key];
  const to = step !== undefined ? index + step : e.key === 'Home' ? 0 : e.key === 'End' ? words().length - 1 : null;
  if (to === null) return;
  e.preventDefault(); stop(); show(to, true);
});
element.addEventListener('change', e => {
  if (e.target.name === 'cam-rendering') { rendering = e.target.value; show(index); }
});
function start() {
  const view = one('.cam-view');
  if (!view || view.dataset.started) return;
  view.dataset.started = '1';
  stop(); index = 0;
  element.querySelectorAll('input[name=cam-rendering]').forEach(r => { r.checked = r.value === rendering; });
  show(0);
  if (view.dataset.announce) live.textContent = view.dataset.announce;
  const words = one('.cam-words');
  if (words) {
    const box = words.getBoundingClientRect();
    if (box.top < 0 || box.bottom > window.innerHeight) words.scrollIntoView({block: 'start', behavior: 'smooth'});
  }
}
new MutationObserver(start).observe(element, {childList: true, subtree: true});
start();
"""

# Page-wide: refusals in the page's own words before a file is uploaded (Gradio's own checks would show its
# pop-up: "Invalid file type", "exceed the maximum allowed size of 20.0 Mb"); the figure downloads marked as
# gone once the server has deleted them; and names for the parts of Gradio's markup that have none.
PAGE_JS = """
(() => {
  const LIMIT = MAX_BYTES;
  function refusal(file) {
    if (file.size > LIMIT)
      return `${file.name}: the file is ${(file.size / 1048576).toFixed(1)} MB; photos up to MAX_MB MB are accepted`;
    if (file.type && !file.type.startsWith('image/')) return `${file.name}: not an image (or an unsupported format)`;
    return null;
  }
  function say(message) {
    const status = document.querySelector('#status .cam-status-box');
    if (!status) return;
    const p = document.createElement('p');
    p.className = 'cam-error'; p.setAttribute('role', 'alert'); p.textContent = `error: ${message}`;
    status.replaceChildren(p);
  }
  function check(event, files, input) {
    for (const file of files || []) {
      const message = refusal(file);
      if (message) {
        event.preventDefault(); event.stopImmediatePropagation();
        if (input) input.value = '';
        say(message);
        return;
      }
    }
  }
  document.addEventListener('change', e => {
    if (e.target.type === 'file' && e.target.closest('#photo')) check(e, e.target.files, e.target);
  }, true);
  document.addEventListener('drop', e => {
    if (e.target.closest && e.target.closest('#photo')) check(e, e.dataTransfer && e.dataTransfer.files, null);
  }, true);
  setInterval(() => {
    const note = document.querySelector('#downloads-note .cam-expiry');
    const files = document.querySelector('#downloads');
    if (!note || !files) return;
    const gone = Date.now() > Number(note.dataset.expires);
    files.classList.toggle('cam-gone', gone);
    if (gone && !note.dataset.gone) {
      note.dataset.gone = '1';
      note.textContent = 'These downloads have expired: the server has deleted them. '
        + 'Press the button again to make them anew.';
    }
  }, 1000);
  document.addEventListener('click', e => {  // the header's link opens the model card where it is
    if (!e.target.closest || !e.target.closest('a[href="#model-card"]')) return;
    const toggle = document.querySelector('#model-card button, #model-card .label-wrap');
    if (toggle && !document.querySelector('#model-card-text')?.offsetParent) toggle.click();
  });
  new MutationObserver(() => {
    document.querySelectorAll('#examples button').forEach((b, i) => {
      const img = b.querySelector('img');
      const name = EXAMPLE_NAMES[i] || 'example photo';
      if (!b.getAttribute('aria-label')) b.setAttribute('aria-label', `example photo: ${name}`);
      if (img && !img.getAttribute('alt')) img.setAttribute('alt', '');
    });
    document.querySelectorAll('#model-card-text pre:not([tabindex])').forEach(pre => {  // scrolled by keyboard too
      pre.setAttribute('tabindex', '0'); pre.setAttribute('aria-label', 'command');
    });
  }).observe(document.documentElement, {childList: true, subtree: true});
})();
"""

PAGE_CSS = """
.cam-sr { position: absolute; width: 1px; height: 1px; overflow: hidden; clip-path: inset(50%); white-space: nowrap; }
#header h1 { font-size: 1.6rem; margin: 0 0 .25rem; }
#header p { margin: 0; font-size: .92rem; line-height: 1.35; }
#main { display: grid !important; grid-template-columns: minmax(0, 2fr) minmax(0, 3fr); grid-template-rows: auto 1fr;
  gap: 16px; align-items: start; }
#input-col { grid-column: 1; grid-row: 1; }
#settings-col { grid-column: 1; grid-row: 2; }
#result-col { grid-column: 2; grid-row: 1 / span 2; }
@media (max-width: 760px) {
  #main { grid-template-columns: minmax(0, 1fr); gap: 8px; }
  #input-col, #settings-col, #result-col { grid-column: 1; grid-row: auto; }
  #header h1 { font-size: 1.25rem; }
  #header p { font-size: .85rem; }
  #photo { height: 170px !important; }
  #status p, .cam-hint { font-size: .8rem; }
  .cam-long { display: none; }
}
@media (min-width: 761px) { .cam-short { display: none; } }
#status p { margin: 0; }
.cam-error { color: #b42318; font-weight: 600; }
.cam-heading { font-size: 1.05rem; margin: .25rem 0 .4rem; }
.cam-hint { font-size: .85rem; font-weight: normal; color: #4b5563; }
.cam-words { display: flex; flex-wrap: wrap; gap: 6px; margin-bottom: .5rem; }
.cam-word, .cam-tools button, .cam-beam { font: inherit; color: #111827; background: #fff; border: 1px solid #6b7280;
  border-radius: 6px; cursor: pointer; }
.cam-word { font-size: 1.15rem; padding: 2px 10px; }
.cam-word[aria-checked=true] { background: #1d4ed8; border-color: #1d4ed8; color: #fff; }
.cam-word.cam-outside { border: 2px dashed #92400e; padding: 1px 9px; }  /* a mark that is not colour alone */
.cam-word.cam-outside[aria-checked=true] { border-color: #f59e0b; }
.cam-mark { font-weight: 700; }
.cam-outside-legend { margin: 0 0 .5rem; }
.cam-word:focus-visible, .cam-tools button:focus-visible, .cam-beam:focus-visible, .cam-renderings input:focus-visible {
  outline: 3px solid #f59e0b; outline-offset: 2px; }
.cam-figure { margin: 0; }
.cam-stage { position: relative; background: #000; }
.cam-stage img { position: absolute; inset: 0; width: 100%; height: 100%; object-fit: contain; }
.cam-overlay[src=""] { visibility: hidden; }
.cam-tag { position: absolute; left: 8px; top: 8px; padding: 2px 8px; border-radius: 4px; background: rgba(0,0,0,.75);
  color: #fff; font-size: 1rem; font-weight: 600; }
.cam-tag:empty { display: none; }
figcaption { font-size: .85rem; color: #374151; margin-top: 4px; }
.cam-legend-heatmap { display: none; align-items: center; gap: 6px; flex-wrap: wrap; }
.cam-legend-heatmap > span:nth-child(2) { order: -1; }
.cam-scale { display: inline-block; width: 160px; height: 12px; border: 1px solid #6b7280; }
.cam-view[data-rendering=heatmap] .cam-legend-heatmap { display: flex; }
.cam-view[data-rendering=heatmap] .cam-legend-contour { display: none; }
.cam-tools { display: flex; flex-wrap: wrap; gap: 6px; align-items: center; margin: .5rem 0; }
.cam-tools button { padding: 4px 12px; }
.cam-renderings { border: 0; margin: 0 0 0 auto; padding: 0; display: flex; gap: 10px; align-items: center; }
.cam-renderings legend { float: left; margin-right: 6px; font-size: .9rem; }
.cam-beams { margin: 0; padding-left: 1.6rem; }
.cam-beams li { margin: 0 0 4px; }
.cam-beam { display: block; width: 100%; text-align: left; padding: 4px 8px; }
.cam-beam[aria-pressed=true] { border: 2px solid #1d4ed8; background: #eff6ff; }
.cam-beam-text { display: block; }
.cam-beam-score { display: block; font-size: .8rem; color: #4b5563; font-variant-numeric: tabular-nums; }
.cam-empty p { color: #374151; }
#downloads.cam-gone { display: none; }
#model-card-text pre, #model-card-text pre * { color: #1f2937 !important; }  /* the highlighter's greys: 3:1 */
"""


def upload_of(payload: Any) -> tuple[Path, str] | None:
    """The server path and the user's file name of an image component's raw value (None if there is none)."""
    if not isinstance(payload, dict) or not payload.get("path"):
        return None
    path = Path(payload["path"])
    return path, str(payload.get("orig_name") or path.name)


def page_theme():
    """Gradio's default theme with the system's fonts (nothing to fetch, not even from Gradio's own server) and
    hints dark enough to read (WCAG AA asks 4.5:1; the default grey was 1.9:1)."""
    import gradio as gr

    theme = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    return theme.set(block_info_text_color="*neutral_600", body_text_color_subdued="*neutral_600")


def viewer_script() -> str:
    """:data:`VIEWER_JS` with this page's play speed and outside-knowledge mark filled in."""
    filled = {"PLAY_MS": str(round(PLAY_SECONDS * 1000)), "OUTSIDE_MARK": OUTSIDE_MARK, "OUTSIDE_SAID": OUTSIDE_SAID}
    return re.sub("|".join(filled), lambda m: filled[m[0]], VIEWER_JS)


def page_head() -> str:
    """The page's own script for the document's head (:data:`PAGE_JS` with this page's limits filled in)."""
    names = [p.name for p in example_photos()]
    script = (PAGE_JS.replace("MAX_BYTES", str(MAX_UPLOAD_MB * 1024 * 1024)).replace("MAX_MB", str(MAX_UPLOAD_MB))
              .replace("EXAMPLE_NAMES", repr(names)))  # fmt: skip
    return f"<script>{script}</script>"


def caption_event(captioner: Captioner, decode: DecodeConfig, upload: tuple[Path, str], beam: Any, penalty: Any,
                  previous: Answer | None, own_words: Any = False
                  ) -> tuple[str, Answer | None, str | None]:  # fmt: skip
    """The page's answer to a photo (or to new settings for the photo it shows): (status HTML, the answer, its
    viewer HTML). A refused beam size, length penalty or "own words only" value gives (message, None, "") and
    the shown answer stays; an unusable photo gives (message, None, None)."""
    path, name = upload
    started = time.perf_counter()
    try:
        search = page_search(decode, beam, penalty, own_words)  # the controls checked once
    except CamEyeError as err:  # e.g. 2.5 typed into the beam box: say so, keep the answer shown
        return status_html(str(err), error=True), None, ""
    try:
        if previous is not None and previous.source == str(path) and not path.exists():
            # The same photo again (new settings): its upload was deleted after the first answer.
            result = caption_answer(captioner, previous.source, name, previous.image, previous.photo, search)
        elif path.is_file():
            image, photo = decode_upload(path, name, captioner)
            result = caption_answer(captioner, str(path), name, image, photo, search)
        else:
            raise CamEyeError(f"{name}: the upload is no longer on the server; please add the photo again")
        viewer = viewer_html(result)
    except CamEyeError as err:
        return status_html(str(err), error=True), None, None
    result.seconds = time.perf_counter() - started
    result.settings = search_settings(search, decode, captioner.no_detector is not None)
    return status_html(f"{name}: captioned in {result.seconds:.2f} s ({result.settings})"), result, viewer


def page_layout(captioner: Captioner, decode: DecodeConfig, card: str | None) -> SimpleNamespace:
    """The page's components, laid out inside the current gr.Blocks: the photo, the result (status and the word
    viewer), and the settings column (examples, sliders, figures, the model card). Returns them by name."""
    import gradio as gr

    state = gr.State(None)
    gr.HTML(f"<h1>CamEye: where does it look?</h1>{model_summary(captioner)}", elem_id="header")
    with gr.Row(elem_id="main"):
        with gr.Column(elem_id="input-col", min_width=0):
            photo_in = gr.Image(
                label="Your photo (drop, upload, paste or webcam)",
                sources=["upload", "clipboard", "webcam"],
                type="filepath",
                height=230,
                buttons=[],
                elem_id="photo",
            )
        with gr.Column(elem_id="result-col", min_width=0):
            status = gr.HTML(status_html(""), elem_id="status")
            viewer = gr.HTML(EMPTY_VIEWER, js_on_load=viewer_script(), elem_id="viewer")
        with gr.Column(elem_id="settings-col", min_width=0):
            gr.Examples([[str(p)] for p in example_photos()], inputs=photo_in, label="Example photos",
                        elem_id="examples")  # fmt: skip
            beam_in = gr.Slider(*BEAM_SIZES, value=decode.beam_size, step=1, label="Beam size", elem_id="beam",
                                info="captions kept at each step; re-captions when you let go")  # fmt: skip
            penalty_in = gr.Slider(*LENGTH_PENALTIES, value=decode.length_penalty, step=0.1, label="Length penalty",
                                   info="higher favours longer captions; re-captions when you let go",
                                   elem_id="penalty")  # fmt: skip
            own_words_in = own_words_control(decode)
            make_figures = gr.Button("Attention figure and GIF (to download)", elem_id="make-figures")
            downloads = gr.File(
                label="Downloads",
                file_count="multiple",
                interactive=False,
                height=120,
                visible=False,
                elem_id="downloads",
            )  # fmt: skip (shown once there are files)
            downloads_note = gr.HTML(elem_id="downloads-note")
            if card is not None:
                with gr.Accordion("Model card", open=False, elem_id="model-card"):
                    gr.Markdown(card, elem_id="model-card-text")

    return SimpleNamespace(
        state=state, photo_in=photo_in, status=status, viewer=viewer, beam_in=beam_in, penalty_in=penalty_in,
        own_words_in=own_words_in, make_figures=make_figures, downloads=downloads, downloads_note=downloads_note,
    )  # fmt: skip


def own_words_control(decode: DecodeConfig):
    """The "own words only" switch: unticked, the page decodes with the server's ``decode.ground``; ticked, with
    "off". Where the server's is already "off" it stays ticked and disabled, saying how to turn grounding on."""
    import gradio as gr

    if decode.ground == "off":
        return gr.Checkbox(True, label="Own words only", interactive=False, elem_id="own-words",
                           info="outside knowledge is off on this server (python app.py --ground slot or swap lets "
                           "the object detector name objects)")  # fmt: skip
    return gr.Checkbox(False, label="Own words only", elem_id="own-words",
                       info=f"tick to caption without outside knowledge (here --ground {decode.ground}, whose words "
                       f"are marked {OUTSIDE_MARK}); re-captions when changed")  # fmt: skip


def build_page(captioner: Captioner, decode: DecodeConfig = DecodeConfig(), queue_size: int = 16,
               keep_outputs: int = 300):  # fmt: skip
    """The Gradio Blocks of the page (not launched). ``decode``'s beam size and length penalty are the sliders'
    first values and its ``ground`` what "own words only" switches off (:func:`own_words_control`); the rest
    of it holds for every request. ``queue_size`` requests may wait while one decodes; figure downloads are
    deleted ``keep_outputs`` seconds after they were made."""
    import gradio as gr

    # Every min(60 s, keep_outputs) Gradio deletes the files it made for this page that are older than keep_outputs.
    delete_cache = (min(60, keep_outputs), keep_outputs)
    card = model_card(captioner)
    with gr.Blocks(title="CamEye: where does it look?", analytics_enabled=False, delete_cache=delete_cache) as page:
        ui = page_layout(captioner, decode, card)

        def forget_upload(path: Path) -> None:
            # Example photos live in the same cache but are kept; anything else was uploaded by a user.
            if str(path) not in ui.photo_in.keep_in_cache:
                path.unlink(missing_ok=True)
                with contextlib.suppress(OSError):  # Gradio's folder for this one upload, now empty
                    path.parent.rmdir()

        def cleared(status: str) -> tuple:
            """The outputs for no answer: a status line, the empty viewer, no state, no downloads."""
            return status, EMPTY_VIEWER, None, gr.update(value=None, visible=False), ""

        def answer(payload: Any, beam: Any, penalty: Any, own_words: Any, previous: Answer | None):
            """Event handler: (status, viewer, state, downloads, downloads note)."""
            upload = upload_of(payload)
            if upload is None:
                return cleared(status_html(""))
            try:
                status, result, viewer = caption_event(captioner, decode, upload, beam, penalty, previous, own_words)
            finally:
                forget_upload(upload[0])
            if result is None:
                return cleared(status) if viewer is None else (status, *[gr.update()] * 4)
            return status, viewer, result, gr.update(value=None, visible=False), ""

        def choose_beam(state: Answer | None, event: gr.EventData):
            """Event handler: the viewer for beam ``event.beam`` of the tab's answer (a click on a beam row)."""
            beam = getattr(event, "beam", 0) if state is not None else 0
            if state is None or not isinstance(beam, int) or not 0 <= beam < len(state.beams):
                return gr.update()
            return viewer_html(state, beam)

        choose_beam.__annotations__["event"] = gr.EventData  # how Gradio knows to pass it (not a postponed string)

        def figures(state: Answer | None):
            if state is None:
                message = status_html("no caption yet: drop a photo first", error=True)
                return gr.update(value=None, visible=False), message
            # Written inside Gradio's cache, so it serves them as they are and deletes them after keep_outputs.
            cache = Path(ui.downloads.GRADIO_CACHE)
            cache.mkdir(parents=True, exist_ok=True)
            made = time.time()
            files = [str(p) for p in write_figures(state, Path(tempfile.mkdtemp(dir=cache)))]
            return gr.update(value=files, visible=True), expiry_html(made, keep_outputs)

        outputs = [ui.status, ui.viewer, ui.state, ui.downloads, ui.downloads_note]
        events = {"outputs": outputs, "preprocess": False, "concurrency_id": "decode", "concurrency_limit": 1}
        inputs = [ui.photo_in, ui.beam_in, ui.penalty_in, ui.own_words_in, ui.state]
        ui.photo_in.change(answer, inputs, api_name="caption", **events)
        ui.beam_in.release(answer, inputs, api_name="recaption_beam", **events)
        ui.penalty_in.release(answer, inputs, api_name="recaption_penalty", **events)
        ui.own_words_in.input(answer, inputs, api_name="recaption_own_words", **events)
        ui.viewer.click(choose_beam, ui.state, ui.viewer, api_name="beam", concurrency_limit=2)
        ui.make_figures.click(
            figures, ui.state, [ui.downloads, ui.downloads_note], api_name="figures", concurrency_limit=2
        )
    page.queue(default_concurrency_limit=1, max_size=queue_size)
    return page


# ----------------------------------------------------------------------------------------------- serving
def launch_page(page, captioner: Captioner, host: str = "127.0.0.1", port: int = 7860) -> str:
    """Start serving ``page`` in background threads (stop it with ``page.close()``); returns its local URL.

    Offline: no share link, no server-side rendering (it would need Node), no run history kept in the browser,
    no footer links, uploads over ``MAX_UPLOAD_MB`` refused by Gradio itself (the page refuses them first, in
    its own words); nothing is served from outside Gradio's cache.
    """
    try:
        _, url, _ = page.launch(
            server_name=host,
            server_port=port,
            share=False,
            ssr_mode=False,
            run_history=False,
            footer_links=[],
            max_file_size=f"{MAX_UPLOAD_MB}mb",
            theme=page_theme(),
            css=PAGE_CSS,
            head=page_head(),
            prevent_thread_lock=True,
            quiet=True,
        )
    except OSError as err:  # the port is taken, or the address is not this machine's
        raise CamEyeError(f"cannot serve on {host}:{port} ({str(err).splitlines()[0]})") from None
    print(f"CamEye page on {url} (Ctrl-C to stop)", flush=True)
    return url


def warm_up(captioner: Captioner, decode: DecodeConfig = DecodeConfig()) -> None:
    """Caption one example photo before serving: a model's first run pays for one-off allocations and kernel
    choices (measured: the first photo took 1.0-1.6 s in the browser, later ones 0.4-0.9 s on a busy CPU).
    With ``decode.ground`` on, this also loads the detector, so missing weights stop the server in one line
    at start rather than refusing every photo."""
    for path in example_photos()[:1]:
        captioner.decode([captioner.read(path)], replace(decode, n_best=decode.beam_size))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Serve the CamEye page: caption a photo in the browser and see, word by word, where it looked.",
        formatter_class=HelpFormatter,
    )
    add_decoding_arguments(p)
    p.set_defaults(device="cpu")  # a demo server: predictable, and the GPU stays free for training
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 exposes the page to the network)")
    p.add_argument("--port", type=port_number, default=7860, help="port to listen on (1-65535)")
    p.add_argument("--queue-size", type=positive_int, default=16, help="requests that may wait while one decodes")
    p.add_argument(
        "--keep-outputs", type=positive_int, default=300, help="seconds before the page's outputs are deleted"
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    with cli_errors():
        handle_sigterm()  # so that stopping the server still removes its folder of uploads and outputs
        check_controls(args.beam_size, args.length_penalty)
        keep_freed_memory()
        captioner = Captioner.load(args.checkpoint, args.device, encoder_weights=args.encoder_weights,
                                   precision=args.precision, object_prior=args.object_prior)  # fmt: skip
        decode = options_from_args(DecodeConfig, args)
        warm_up(captioner, decode)
        # Everything Gradio writes (uploads, outputs) goes to a folder of this process, removed when it stops.
        cache = tempfile.mkdtemp(prefix="cameye-app-")
        print(f"uploads and outputs go to {cache} (removed when the server stops)", flush=True)
        os.environ["GRADIO_TEMP_DIR"] = cache
        os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
        try:
            page = build_page(captioner, decode, args.queue_size, args.keep_outputs)
            launch_page(page, captioner, args.host, args.port)
            try:
                while True:  # serve until Ctrl-C or SIGTERM (cli_errors turns them into exit status 130 / 143)
                    time.sleep(1)
            finally:
                page.close()
        finally:
            shutil.rmtree(cache, ignore_errors=True)
    return 0


if __name__ == "__main__":
    freeze_imported_objects()
    sys.exit(main())
