"""The CamEye page: drop a photo in the browser, read its caption, and step through the words to see where it looked.

    python app.py                                    # http://127.0.0.1:7860, the shipped model, CPU unless CUDA
    python app.py --port 8080 --checkpoint checkpoints/run/best.pt --device cpu
    make serve

A Gradio page (the usual form of a model demo). A photo comes by upload, drag-and-drop, paste, webcam or one
of the example photos that ship inside scikit-image. The caption comes at once, with the best beams and their
length-normalised scores; clicking a word lays that word's attention over the photo (smoothed as in caption.py's
figures, stretched back to the photo's own aspect ratio), and the full attention figure and GIF are made on
demand for download. Decoding and figures are the Python API's (:class:`captioner.Captioner`, attention_maps.py), with
decoding.DecodeConfig's defaults, so the page and caption.py give the same caption.

Offline and private by construction: the server listens on 127.0.0.1 unless --host says otherwise, no share
link, no analytics, no run history, system fonts only (nothing is fetched from the internet). Uploads go to a
temporary folder of this process: each is deleted as soon as it is decoded, the page's outputs are deleted
``--keep-outputs`` seconds after they were made, and the whole folder when the server stops.

One request decodes at a time; up to ``--queue-size`` more wait, and the page says so when the queue is full.
A file that is not an image, a truncated or oversized one, or an empty submit gets a one-line message in the
page, and the server keeps serving.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
from PIL import Image

from attention_maps import attention_grids, attention_overlay, save_attention_figure, save_attention_gif
from captioner import Captioner
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

MAX_UPLOAD_MB = 20  # larger files are refused before decoding
DISPLAY_SIDE = 512  # longest side, in pixels, of the photo the attention is drawn over
BEAM_SIZES = (1, 10)  # the page's bounds for beam size ...
LENGTH_PENALTIES = (0.0, 2.0)  # ... and for the length penalty
EXAMPLE_PHOTOS = ("chelsea.png", "coffee.png", "astronaut.png", "motorcycle_left.png", "rocket.jpg", "camera.png")
EXIF_ORIENTATION = 0x0112
LIMITS = {
    "cameye-flickr8k.pt": "it knows Flickr8k's world of people and dogs: other animals and objects often become "
    "dogs or people, and gender words are guesses learned from the data.",
}


@dataclass
class Answer:
    """One photo's answer, kept per browser tab (in a ``gr.State``) so clicks on words need no new decoding.

    ``source`` is the upload's server path (the file itself is deleted once decoded); ``photo`` is H x W x 3
    uint8 at the photo's own aspect ratio, ``image`` the model's 3 x S x S input, ``grids`` words x g x g.
    """

    source: str
    name: str
    photo: np.ndarray
    image: np.ndarray
    words: list[str]
    grids: np.ndarray
    beams: list[list[Any]]  # [caption, log-probability, normalised score] per beam, best first


# ---------------------------------------------------------------------------------------------- decoding
def example_photos() -> list[Path]:
    """The example photos: the ones ``make demo`` captions, from scikit-image's installed data folder."""
    import skimage.data

    folder = Path(skimage.data.__file__).parent
    return [folder / name for name in EXAMPLE_PHOTOS if (folder / name).is_file()]


def display_size(path: Path, side: int = DISPLAY_SIDE) -> tuple[int, int]:
    """(width, height) to show the photo at: its own aspect ratio (after EXIF rotation), longest side ``side``."""
    with Image.open(path) as im:
        w, h = im.size
        if im.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8):  # rotated a quarter turn
            w, h = h, w
    scale = side / max(w, h, 1)
    return max(1, round(w * scale)), max(1, round(h * scale))


def decode_upload(path: Path, name: str, captioner: Captioner) -> tuple[np.ndarray, np.ndarray]:
    """The model's input (3 x S x S uint8) and the photo to show (H x W x 3 uint8, own aspect ratio).

    Raises a one-line :class:`CamEyeError` naming the file as the user called it (``name``), not its temporary
    path: too large, not an image, truncated, or over Pillow's decompression-bomb limit.
    """
    size = path.stat().st_size
    if size > MAX_UPLOAD_MB * 1024 * 1024:
        raise CamEyeError(f"{name}: the file is {size / 2**20:.1f} MB; photos up to {MAX_UPLOAD_MB} MB are accepted")
    try:
        image = captioner.read(path)
        square = read_image(path, DISPLAY_SIDE)
        width, height = display_size(path)
    except CamEyeError as err:
        raise CamEyeError(str(err).replace(str(path), name, 1)) from None
    # Decoded as the model sees it (squashed to a square), then stretched back to the photo's own shape.
    photo = np.asarray(Image.fromarray(square.transpose(1, 2, 0)).resize((width, height), Image.Resampling.BICUBIC))
    return image, photo


def answer_photo(captioner: Captioner, path: Path, name: str, beam_size: Any, length_penalty: Any,
                 decode: DecodeConfig = DecodeConfig()) -> Answer:  # fmt: skip
    """Decode and caption one photo file with the page's ``beam_size`` and ``length_penalty`` and the rest of
    ``decode`` (see :func:`caption_answer`).

    Raises :class:`CamEyeError` (one line) for an unusable file or a beam size / length penalty out of bounds.
    """
    decode = page_search(decode, beam_size, length_penalty)
    image, photo = decode_upload(path, name, captioner)
    return caption_answer(captioner, str(path), name, image, photo, decode)


def page_search(decode: DecodeConfig, beam_size: Any, length_penalty: Any) -> DecodeConfig:
    """``decode`` with the page's controls (checked: :func:`check_controls`), showing every beam."""
    beam_size, length_penalty = check_controls(beam_size, length_penalty)
    return replace(decode, beam_size=beam_size, length_penalty=length_penalty, n_best=beam_size)


def caption_answer(captioner: Captioner, source: str, name: str, image: np.ndarray, photo: np.ndarray,
                   decode: DecodeConfig) -> Answer:  # fmt: skip
    """Caption a decoded photo: its words, per-word attention grids and the ``decode.n_best`` best beams."""
    [decoded] = captioner.decode([image], decode)
    beams = [
        [" ".join(captioner.words(d)), round(d.score, 3), round(d.normalised_score, 3)]
        for d in decoded.alternatives or [decoded]
    ]
    return Answer(source, name, photo, image, captioner.words(decoded), attention_grids(decoded), beams)


def port_number(text: str) -> int:
    """argparse type: a TCP port, 1-65535."""
    port = int(text)
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is from 1 to 65535, got {port}")
    return port


def check_controls(beam_size: Any, length_penalty: Any) -> tuple[int, float]:
    """The page's beam size and length penalty as int and float, or a one-line :class:`CamEyeError` if out of
    bounds (the sliders keep them in bounds; a direct API call may not)."""
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


def word_overlay(answer: Answer | None, index: Any) -> np.ndarray | None:
    """Word ``index``'s attention over the photo, brighter where it looked (H x W x 3 uint8); None without an answer.

    The attention is smoothed at the model's image size, exactly as in the attention figure, then stretched.
    """
    if answer is None or not answer.words:
        return None
    try:
        i = int(index)
    except (TypeError, ValueError):
        i = 0
    grid = answer.grids[min(max(i, 0), len(answer.words) - 1)]
    return attention_overlay(answer.photo, grid, side=answer.image.shape[1])


def write_figures(answer: Answer, folder: Path) -> list[Path]:
    """Write the answer's full attention figure (PNG) and GIF into ``folder``; returns their paths."""
    stem = re.sub(r"[^\w.-]+", "_", Path(answer.name).stem).strip("_.")[:60] or "photo"
    png, gif = folder / f"{stem}_attention.png", folder / f"{stem}_attention.gif"
    save_attention_figure(answer.image, answer.words, answer.grids, png)
    save_attention_gif(answer.image, answer.words, answer.grids, gif)
    return [png, gif]


def model_summary(captioner: Captioner) -> str:
    """Markdown: which model answers, a link to its model card (served by this page) and a line on its limits."""
    ckpt, cfg = captioner.checkpoint, captioner.config
    card = ckpt.parent / "MODEL_CARD.md"
    link = f" · [model card](/gradio_api/file={quote(str(card.resolve()))})" if card.is_file() else " · no model card"
    limits = LIMITS.get(ckpt.name, "a Show, Attend and Tell model knows only the kinds of photos it was trained on.")
    return (
        f"Answered by **{ckpt.name}** ({cfg.backbone} encoder, LSTM decoder with soft attention, "
        f"{len(captioner.word_map):,} words) on {captioner.device.type.upper()}{link}.  \n"
        f"Limits: {limits}"
    )


# ------------------------------------------------------------------------------------------------- the page
def upload_of(payload: Any) -> tuple[Path, str] | None:
    """The server path and the user's file name of an image component's raw value (None if there is none)."""
    if not isinstance(payload, dict) or not payload.get("path"):
        return None
    path = Path(payload["path"])
    return path, str(payload.get("orig_name") or path.name)


def markdown_text(text: str) -> str:
    """``text`` escaped for Markdown, so that a file name such as ``<img src=...>`` or ``a_b_c.jpg`` shows as typed
    (and the page never loads what a name points to)."""
    return re.sub(r"([\\`*_{}\[\]()#+\-.!|<>~&])", r"\\\1", text)


def page_theme():
    """Gradio's default theme with the system's fonts: nothing to fetch, not even from Gradio's own server."""
    import gradio as gr

    return gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


def build_page(captioner: Captioner, decode: DecodeConfig = DecodeConfig(), queue_size: int = 16,
               keep_outputs: int = 300):  # fmt: skip
    """The Gradio Blocks of the page (not launched). ``decode``'s beam size and length penalty are the sliders'
    first values; the rest of it holds for every request. ``queue_size`` requests may wait while one decodes;
    outputs (overlays, figures) are deleted ``keep_outputs`` seconds after they were made."""
    import gradio as gr

    def forget_upload(path: Path) -> None:
        # Example photos live in the same cache but are kept; anything else was uploaded by a user.
        if str(path) not in photo_in.keep_in_cache:
            path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):  # Gradio's folder for this one upload, now empty
                path.parent.rmdir()

    def cleared(status_line: str) -> tuple:
        """The answer's outputs for no caption: a status line, everything else empty."""
        return status_line, "", gr.update(choices=[], value=None), None, None, None

    def answer(payload: Any, beam: Any, penalty: Any, previous: Answer | None, required: bool):
        """Event handler: (status, caption, words, beams, state, downloads); the first word's overlay follows."""
        upload = upload_of(payload)
        if upload is None:
            message = "**error:** no photo: upload, drop, paste or take one, or pick an example" if required else ""
            return cleared(message)
        path, name = upload
        started = time.perf_counter()
        try:
            beam, penalty = check_controls(beam, penalty)
            if previous is not None and previous.source == str(path) and not path.exists():
                # The same photo again (new settings): its upload was deleted after the first answer.
                result = caption_answer(
                    captioner, previous.source, name, previous.image, previous.photo, page_search(decode, beam, penalty)
                )
            elif path.is_file():
                result = answer_photo(captioner, path, name, beam, penalty, decode)
            else:
                raise CamEyeError(f"{name}: the upload is no longer on the server; please add the photo again")
        except CamEyeError as err:
            return cleared(f"**error:** {markdown_text(str(err))}")
        finally:
            forget_upload(path)
        seconds = time.perf_counter() - started
        status = markdown_text(f"{name}: captioned in {seconds:.2f} s (beam {beam}, length penalty {penalty:g})")
        choices = [(f"{i + 1}. {w}", i) for i, w in enumerate(result.words)]
        return (
            status,
            " ".join(result.words),
            gr.update(choices=choices, value=0),
            result.beams,
            result,
            None,
        )

    def figures(state: Answer | None):
        if state is None:
            return None
        # Written inside Gradio's cache, so it serves them as they are and deletes them after keep_outputs.
        cache = Path(downloads.GRADIO_CACHE)
        cache.mkdir(parents=True, exist_ok=True)
        return [str(p) for p in write_figures(state, Path(tempfile.mkdtemp(dir=cache)))]

    # Every min(60 s, keep_outputs) Gradio deletes the files it made for this page that are older than keep_outputs.
    delete_cache = (min(60, keep_outputs), keep_outputs)
    with gr.Blocks(title="CamEye", analytics_enabled=False, delete_cache=delete_cache) as page:
        state = gr.State(None)
        gr.Markdown(
            "# CamEye: where does it look?\n"
            "Drop a photo to caption it, then click a word to see where the model looked while writing it."
        )
        with gr.Row():
            with gr.Column(scale=1):
                photo_in = gr.Image(
                    label="photo (upload, drop, paste or webcam)",
                    sources=["upload", "clipboard", "webcam"],
                    type="filepath",
                    elem_id="photo",
                )
                beam_in = gr.Slider(*BEAM_SIZES, value=decode.beam_size, step=1, label="beam size", elem_id="beam")
                penalty_in = gr.Slider(*LENGTH_PENALTIES, value=decode.length_penalty, step=0.1, label="length penalty",
                                       info="beams are ranked by log-probability / length ** penalty",
                                       elem_id="penalty")  # fmt: skip
                submit = gr.Button("Caption", variant="primary", elem_id="submit")
                gr.Examples([[str(p)] for p in example_photos()], inputs=photo_in, label="example photos")
                gr.Markdown(model_summary(captioner), elem_id="model")
            with gr.Column(scale=1):
                status = gr.Markdown(elem_id="status")
                caption_out = gr.Textbox(label="caption", interactive=False, elem_id="caption")
                words = gr.Radio(label="click a word to see where it looked", elem_id="words")
                overlay = gr.Image(label="attention of the chosen word", interactive=False, format="jpeg",
                                   elem_id="attention")  # fmt: skip
                beams = gr.Dataframe(
                    headers=["caption", "log-prob", "normalised"],
                    label="best beams (ranked by normalised score)",
                    interactive=False,
                    wrap=True,
                    column_widths=["66%", "17%", "17%"],
                    elem_id="beams",
                )
                make_figures = gr.Button("Attention figure and GIF", elem_id="make-figures")
                downloads = gr.File(label="downloads", file_count="multiple", interactive=False, height=120,
                                    elem_id="downloads")  # fmt: skip

        outputs = [status, caption_out, words, beams, state, downloads]
        events = {"outputs": outputs, "preprocess": False, "concurrency_id": "decode", "concurrency_limit": 1}
        inputs = [photo_in, beam_in, penalty_in, state]
        # The caption is shown as soon as it is decoded; the first word's attention image follows.
        first_word = {"fn": lambda result: word_overlay(result, 0), "inputs": state, "outputs": overlay,
                      "api_visibility": "private", "concurrency_limit": 4}  # fmt: skip
        submit.click(lambda *a: answer(*a, required=True), inputs, api_name="caption", **events).then(**first_word)
        photo_in.change(lambda *a: answer(*a, required=False), inputs, api_name="caption_new_photo", **events).then(
            **first_word
        )
        words.input(word_overlay, [state, words], overlay, api_name="show_word", concurrency_limit=4)
        make_figures.click(figures, state, downloads, api_name="figures", concurrency_limit=2)
    page.queue(default_concurrency_limit=1, max_size=queue_size)
    return page


# ----------------------------------------------------------------------------------------------- serving
def launch_page(page, captioner: Captioner, host: str = "127.0.0.1", port: int = 7860) -> str:
    """Start serving ``page`` in background threads (stop it with ``page.close()``); returns its local URL.

    Offline: no share link, no server-side rendering (it would need Node), no run history kept in the browser,
    no footer links, uploads over ``MAX_UPLOAD_MB`` refused by Gradio itself; only the model card is served
    from outside Gradio's cache.
    """
    card = captioner.checkpoint.parent / "MODEL_CARD.md"
    try:
        _, url, _ = page.launch(
            server_name=host,
            server_port=port,
            share=False,
            ssr_mode=False,
            run_history=False,
            footer_links=[],
            max_file_size=f"{MAX_UPLOAD_MB}mb",
            allowed_paths=[str(card.resolve())] if card.is_file() else None,
            theme=page_theme(),
            prevent_thread_lock=True,
            quiet=True,
        )
    except OSError as err:  # the port is taken, or the address is not this machine's
        raise CamEyeError(f"cannot serve on {host}:{port} ({str(err).splitlines()[0]})") from None
    print(f"CamEye page on {url} (Ctrl-C to stop)", flush=True)
    return url


def warm_up(captioner: Captioner) -> None:
    """Caption one example photo before serving: a model's first run pays for one-off allocations and kernel
    choices (measured: the first photo took 1.0-1.6 s in the browser, later ones 0.4-0.9 s on a busy CPU)."""
    for path in example_photos()[:1]:
        captioner.decode([captioner.read(path)], replace(DecodeConfig(), n_best=DecodeConfig.beam_size))


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
        warm_up(captioner)
        # Everything Gradio writes (uploads, outputs) goes to a folder of this process, removed when it stops.
        cache = tempfile.mkdtemp(prefix="cameye-app-")
        print(f"uploads and outputs go to {cache} (removed when the server stops)", flush=True)
        os.environ["GRADIO_TEMP_DIR"] = cache
        os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
        try:
            page = build_page(captioner, options_from_args(DecodeConfig, args), args.queue_size, args.keep_outputs)
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
