"""Tests for app.py, the CamEye web page.

* Its functions, in-process with the session's tiny model (tests/_tiny_model.py): a photo in; caption, best
  beams, per-word attention over the photo at its own aspect ratio, figure and GIF out; each bad input refused
  in one line; words from outside knowledge (``DecodeConfig.ground``, faked: no detector needed) marked, and
  "own words only" decoding with ground "off".
* The served page through Gradio's own client (in-process server): empty submit, a text file and then a photo,
  uploads deleted once decoded, a full queue answered with a message.
* A real browser (headless Debian chromium through chromedriver, Selenium) on ``python app.py`` with the shipped
  model: captions of real photos as caption.py writes them, a word's attention image, an error message while
  the server keeps serving, two tabs at once, figure downloads, and every request going to 127.0.0.1; and, on
  the tiny model, the outside-knowledge marks and the switch that takes them away. Skipped, with the reason,
  where no browser is installed.
"""

from __future__ import annotations

import html
import math
import os
import re
import shutil
import time
import urllib.request
import zlib
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from _tiny_model import SPECIAL_TOKENS, one_torch_thread, tiny_model
from PIL import Image

import app
import attention_maps
from attention_maps import attention_layer, attention_overlay, composite, figure_pixels, word_heat
from benchmarks import bench_app as browser
from captioner import OUTSIDE_MEANING, Captioner, caption_images
from decoding import DecodeConfig, Decoded
from utils import DEFAULT_CHECKPOINT, CamEyeError

# Gradio 6.31's queue statistics use pandas options that pandas 3 deprecates: its warning, not ours.
# A handler returning more or fewer values than the page has outputs is only a warning to Gradio: an error here.
pytestmark = [
    pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning"),
    pytest.mark.filterwarnings("error:A +function.* returned too many output values"),
    pytest.mark.filterwarnings("error:A +function.* didn't return enough output values"),
]


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    return tiny_model(tmp_path_factory)


@pytest.fixture(scope="module")
def captioner(model: SimpleNamespace) -> Captioner:
    return Captioner.load(model.checkpoint, "cpu")


def png_with_size(png: bytes, width: int, height: int) -> bytes:
    """A copy of a PNG whose header claims another size (its IHDR chunk rewritten, CRC included)."""
    assert png[12:16] == b"IHDR"
    body = b"IHDR" + width.to_bytes(4, "big") + height.to_bytes(4, "big") + png[24:29]
    return png[:12] + body + zlib.crc32(body).to_bytes(4, "big") + png[33:]


@pytest.fixture(scope="module")
def photos(model: SimpleNamespace, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A square synthetic photo, a 2:1 one, a JPEG stored 2:1 but rotated upright by EXIF, and bad files."""
    root = tmp_path_factory.mktemp("app_photos")
    square = root / "square.png"
    shutil.copyfile(model.images / "000003.png", square)
    with Image.open(model.images / "000005.png") as im:
        wide = im.convert("RGB").resize((128, 64))
    wide.save(root / "wide.png")
    exif = Image.Exif()
    exif[attention_maps.EXIF_ORIENTATION] = 6  # stored 128 x 64, shown rotated a quarter turn: 64 x 128
    wide.save(root / "rotated.jpg", exif=exif.tobytes())
    png = square.read_bytes()
    (root / "notes.txt").write_text("not a photo\n")
    (root / "text.jpg").write_text("not a photo either\n")
    shutil.copyfile(root / "text.jpg", root / "text_<i>x*_.jpg")
    (root / "truncated.png").write_bytes(png[: len(png) // 2])
    (root / "empty.png").write_bytes(b"")
    (root / "bomb.png").write_bytes(png_with_size(png, 20000, 20000))  # 400 M pixels claimed
    (root / "big_bomb.png").write_bytes(png_with_size(png, 10000, 10000))  # over the warning limit only
    with open(root / "huge.jpg", "wb") as f:  # sparse: 21 MB on paper, nothing on disk
        f.truncate(21 * 1024 * 1024)
    return SimpleNamespace(root=root, square=square, wide=root / "wide.png", rotated=root / "rotated.jpg")


def check_words(words: list[str], captioner: Captioner) -> None:
    assert words, "the tiny model captions every test photo with at least one word"
    assert set(words) <= set(captioner.word_map) - SPECIAL_TOKENS, words


# ------------------------------------------------------------------------------------------ the functions
def test_a_photo_gives_its_caption_beams_and_a_map_per_word(captioner: Captioner, photos: SimpleNamespace) -> None:
    answer = app.answer_photo(captioner, photos.wide, "wide.png", 3, 0.5)
    check_words(answer.words, captioner)
    # the caption caption.py writes for the same file, through the same code
    [(_, cli_words, _, _)] = list(caption_images([photos.wide], captioner))
    assert answer.words == cli_words
    size = captioner.config.image_size
    assert answer.image.shape == (3, size, size) and answer.image.dtype == np.uint8
    assert answer.photo.shape == (256, 512, 3), "shown at its own 2:1 aspect ratio, longest side 512"
    grid = math.isqrt(answer.grids.shape[1] * answer.grids.shape[2])
    assert answer.grids.shape == (len(answer.words), grid, grid)
    np.testing.assert_allclose(answer.grids.sum(axis=(1, 2)), 1.0, rtol=1e-4)  # a distribution per word
    # the best beams: 1..3, the first the caption itself, ranked by score / (words + <end>) ** 0.5
    assert 1 <= len(answer.beams) <= 3 and answer.beams[0].caption == " ".join(answer.words)
    normalised = [b.normalised for b in answer.beams]
    assert normalised == sorted(normalised, reverse=True)
    for beam in answer.beams:
        assert beam.normalised == pytest.approx(beam.score / (len(beam.words) + 1) ** 0.5, abs=2e-3)
        assert beam.grids.shape == (len(beam.words), grid, grid), "each beam has its own attention"
    assert len({b.caption for b in answer.beams}) == len(answer.beams), "distinct beams"


def test_beam_size_ten_gives_up_to_ten_beams(captioner: Captioner, photos: SimpleNamespace) -> None:
    answer = app.answer_photo(captioner, photos.square, "square.png", 10, 2.0)
    assert 1 <= len(answer.beams) <= 10
    assert answer.photo.shape == (512, 512, 3)


def trigrams(words: list[str]) -> list[tuple[str, ...]]:
    return list(zip(words, words[1:], words[2:]))


def test_server_wide_search_settings_reach_the_beam_search(captioner: Captioner, photos: SimpleNamespace) -> None:
    short = app.answer_photo(captioner, photos.wide, "wide.png", 3, 0.5, DecodeConfig(max_len=2))
    assert 1 <= len(short.words) <= 2 and all(len(b.words) <= 2 for b in short.beams)
    blocked = app.answer_photo(captioner, photos.wide, "wide.png", 5, 0.0, DecodeConfig(block_trigrams=True))
    for beam in blocked.beams:
        grams = trigrams(beam.words)
        assert len(grams) == len(set(grams)), f"a repeated trigram in {beam.caption!r}"


def test_a_server_without_the_detector_says_its_captions_are_its_own_words(
    captioner: Captioner, photos: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the detector's weights the captioner uses its own words (captioner.Captioner.no_detector); the
    status line says so instead of naming a grounding that did not happen."""
    monkeypatch.setattr(captioner, "grounder", None)
    monkeypatch.setattr(captioner, "no_detector", "the object detector's weights are not there")
    answer = app.answer_photo(captioner, photos.wide, "wide.png", 3, 0.5, DecodeConfig(ground="slot"))
    assert answer.settings.endswith("own words only (no object detector on this server)")
    assert not any(any(b.outside) for b in answer.beams if b.outside)
    assert app.search_settings(DecodeConfig(ground="slot")).endswith("outside knowledge: slot")


def test_exif_rotated_photo_is_shown_upright(captioner: Captioner, photos: SimpleNamespace) -> None:
    answer = app.answer_photo(captioner, photos.rotated, "rotated.jpg", 1, 0.0)
    assert answer.photo.shape == (512, 256, 3), "stored 2:1, shown 1:2 as its EXIF orientation says"


@pytest.mark.parametrize(
    ("beam", "penalty"),
    [(0, 0.5), (11, 0.5), (2.5, 0.5), (3, -0.1), (3, 2.01), (3, float("nan")), ("three", 0.5), (None, 0.5)],
)
def test_controls_out_of_bounds_are_refused_in_one_line(captioner: Captioner, photos, beam, penalty) -> None:
    with pytest.raises(CamEyeError) as err:
        app.answer_photo(captioner, photos.square, "square.png", beam, penalty)
    assert "\n" not in str(err.value) and ("beam size" in str(err.value) or "length penalty" in str(err.value))


def test_controls_at_their_bounds_are_accepted() -> None:
    assert app.check_controls(1, 0.0) == (1, 0.0)
    assert app.check_controls(10.0, 2) == (10, 2.0)
    assert app.check_controls("3", "0.5") == (3, 0.5)  # as an API call may send them


BAD_FILES = {
    "text file": ("notes.txt", "not an image"),
    "text file named .jpg": ("text.jpg", "not an image"),
    "truncated PNG": ("truncated.png", "the file is cut short (truncated)"),
    "empty file": ("empty.png", "the file is empty (0 bytes)"),
    "over 20 MB": ("huge.jpg", "the file is 21.0 MB; photos up to 20 MB are accepted"),
    "decompression bomb": ("bomb.png", "the photo has too many pixels to open safely (400 million"),
    "over the bomb warning limit": ("big_bomb.png", "the photo has too many pixels to open safely (100 million"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_file_is_one_line_naming_the_users_file(captioner: Captioner, photos: SimpleNamespace, case: str) -> None:
    name, reason = BAD_FILES[case]
    path = photos.root / name
    with pytest.raises(CamEyeError) as err:
        app.answer_photo(captioner, path, f"my {name}", 3, 0.5)
    message = str(err.value)
    assert message.startswith(f"my {name}: {reason}"), message
    assert "\n" not in message and str(photos.root) not in message, "the server's temporary path is not shown"
    assert "Error" not in message and "DOS" not in message and "not processed" not in message, "Pillow's words"


# ------------------------------------------------------------------------- words from outside knowledge
def last_word_outside(decoded: Decoded) -> Decoded:
    """The caption as grounding could give it: its last word (and each beam's) from outside knowledge, its
    attention row the step's own."""
    flagged = replace(decoded, outside=[False] * (len(decoded.tokens) - 1) + [True])
    return replace(flagged, alternatives=[last_word_outside(d) for d in decoded.alternatives])


@pytest.fixture
def grounded(captioner: Captioner, monkeypatch: pytest.MonkeyPatch) -> list[DecodeConfig]:
    """The captioner's decode with outside knowledge faked (no detector: its weights may be absent): any
    ``ground`` but "off" marks each beam's last word as from outside. Returns the DecodeConfigs decode is given."""
    seen: list[DecodeConfig] = []
    real = captioner.decode

    def decode(images, cfg: DecodeConfig = DecodeConfig()) -> list[Decoded]:
        seen.append(cfg)
        decoded = real(images, replace(cfg, ground="off"))
        return decoded if cfg.ground == "off" else [last_word_outside(d) for d in decoded]

    monkeypatch.setattr(captioner, "decode", decode)
    return seen


def test_words_from_outside_knowledge_are_marked_and_own_words_are_not(
    captioner: Captioner, photos: SimpleNamespace, grounded: list[DecodeConfig]
) -> None:
    slot = DecodeConfig(ground="slot")
    answer = app.answer_photo(captioner, photos.wide, "wide.png", 3, 0.5, slot)
    assert grounded[-1].ground == "slot" and answer.settings.endswith("outside knowledge: slot")
    words, last = answer.words, answer.words[-1]
    [decoded] = captioner.decode([answer.image], grounded[-1])
    assert answer.beams[0].caption == " ".join(captioner.words(decoded, marked=True)), "as caption.py prints it"
    assert answer.beams[0].caption.endswith(f"{last}*") and all(b.caption.endswith("*") for b in answer.beams)
    page = app.viewer_html(answer)
    assert page.count('class="cam-word cam-outside"') == 1 and page.count('class="cam-word"') == len(words) - 1
    button = re.search(r"<button[^>]*cam-outside[^>]*>(.*?)</button>", page)
    assert f'data-word="{last}"' in button[0], "the bare word, for the photo's label"
    assert button[1] == f'{last}<span class="cam-mark" aria-hidden="true">*</span>' \
        '<span class="cam-sr"> (from outside knowledge)</span>'  # fmt: skip
    assert 'class="cam-hint cam-outside-legend"' in page and html.escape(OUTSIDE_MEANING) in page
    assert f'data-caption="{answer.beams[0].caption}"' in page
    assert f"(from outside knowledge: {last})" in page, "the live region says it in words, not 'star'"

    # Own words only: the same photo decoded with ground "off"; nothing marked, no legend.
    own = app.answer_photo(captioner, photos.wide, "wide.png", 3, 0.5, slot, own_words=True)
    assert grounded[-1].ground == "off" and own.settings.endswith("own words only")
    assert own.words == words and not any(any(b.outside) for b in own.beams)
    page = app.viewer_html(own)
    assert page.count('class="cam-word"') == len(words)
    assert [part for part in ("cam-outside", "cam-mark", "cam-sr") if part in page] == []
    assert f'data-caption="{" ".join(words)}"' in page and not any("*" in b.caption for b in own.beams)
    # The outside word's attention is its step's own: the same rows as the same words decoded without marks.
    np.testing.assert_array_equal(answer.grids, own.grids)
    assert len(app.word_layers(answer)) == len(words)


@pytest.mark.parametrize("own_words", ["yes", 1, None])
def test_own_words_only_must_be_true_or_false(captioner: Captioner, photos: SimpleNamespace, own_words) -> None:
    with pytest.raises(CamEyeError, match="own words only must be true or false") as err:
        app.answer_photo(captioner, photos.square, "square.png", 3, 0.5, DecodeConfig(ground="slot"), own_words)
    assert "\n" not in str(err.value)


def test_renderings_keep_the_photo_visible_where_it_looked() -> None:
    grid = np.full((4, 4), 0.01)
    grid[0, 3] = 1.0  # top-right cell
    grid /= grid.sum()
    photo = np.random.default_rng(0).integers(0, 256, (100, 200, 3), dtype=np.uint8)
    heat = word_heat(grid, (100, 200), side=64)
    assert heat.shape == (100, 200) and 0.9 < heat.max() <= 1.0
    row, col = np.unravel_index(np.argmax(heat), heat.shape)
    assert (row // 50, col // 100) == (0, 1), "the peak stays in its corner when stretched to 2:1"
    contour = attention_layer(heat, "contour")
    inside = heat >= attention_maps.CONTOUR_LEVEL + 0.1  # clear of the line
    assert (contour[inside][:, 3] == 0).all(), "nothing is painted where the model looked"
    assert contour[heat < 0.05][:, 3].min() > 100, "far from it the photo is dimmed"
    heatmap = attention_layer(heat, "heatmap")
    assert heatmap[heat == 0][:, 3].max() == 0 and heatmap[..., 3].max() == round(255 * attention_maps.HEATMAP_ALPHA)
    # the figure's panel is the same layer composited over the photo
    np.testing.assert_array_equal(attention_overlay(photo, grid, side=64), composite(photo, contour))
    with pytest.raises(ValueError, match="rendering must be one of"):
        attention_layer(heat, "sepia")


def test_every_words_layers_come_with_the_answer(captioner: Captioner, photos: SimpleNamespace) -> None:
    answer = app.answer_photo(captioner, photos.wide, "wide <b>.png", 3, 0.5)
    layers = app.word_layers(answer)
    assert len(layers) == len(answer.words) and all(set(layer) == {"contour", "heatmap"} for layer in layers)
    assert all(uri.startswith("data:image/webp;base64,") for layer in layers for uri in layer.values())
    page = app.viewer_html(answer)
    assert page.count('class="cam-word"') == len(answer.words) and page.count('class="cam-beam"') == len(answer.beams)
    assert "wide &lt;b&gt;.png" in page and "<b>.png" not in page, "the file name is shown as typed"
    assert all(layer["heatmap"] in page for layer in layers)
    if len(answer.beams) > 1:
        other = app.viewer_html(answer, 1)
        assert 'data-beam="1" aria-pressed="true"' in other and "beam 2 of" in other


def test_figures_are_written_on_demand_with_safe_names(
    captioner: Captioner, photos: SimpleNamespace, tmp_path: Path
) -> None:
    answer = app.answer_photo(captioner, photos.wide, "../../my photo (1).png", 3, 0.5)
    png, gif = app.write_figures(answer, tmp_path)
    assert (png.name, gif.name) == ("my_photo_1_attention.png", "my_photo_1_attention.gif")
    assert png.parent == tmp_path and gif.parent == tmp_path
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size == figure_pixels(len(answer.words) + 1, 2.0), "the photo's own shape"
    with Image.open(gif) as im:
        assert im.format == "GIF" and im.n_frames == len(answer.words)


def test_model_summary_names_the_model_its_card_and_limits(captioner: Captioner) -> None:
    text = app.model_summary(captioner)
    assert "<b>last.pt</b>" in text and "model card" not in text and "Limits:" in text
    assert app.model_card(captioner) is None
    shipped = SimpleNamespace(
        checkpoint=DEFAULT_CHECKPOINT, config=captioner.config, word_map={}, device=captioner.device
    )
    text = app.model_summary(shipped)
    assert '<a href="#model-card">model card</a>' in text and "Good at" in text and "dogs" in text
    assert app.model_card(shipped).startswith("# CamEye model card")


def test_example_photos_are_the_demo_photos_that_ship_with_scikit_image() -> None:
    examples = app.example_photos()
    assert [p.name for p in examples] == list(app.EXAMPLE_PHOTOS)
    assert all(p.is_file() for p in examples)


def test_help_explains_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        app.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for option in ("--checkpoint", "--device", "--host", "--port", "--beam-size", "--length-penalty", "--queue-size",
                   "--keep-outputs"):  # fmt: skip
        assert option in out
    assert "127.0.0.1" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [(["--beam-size", "11"], "error: beam size must be a whole number from 1 to 10, got 11"),
     (["--length-penalty", "3"], "error: length penalty must be from 0.0 to 2.0, got 3.0"),
     (["--checkpoint", "missing.pt"], "error: checkpoint not found: missing.pt")],
)  # fmt: skip
def test_bad_options_are_one_line_and_exit_2(argv: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        app.main([*argv, "--device", "cpu"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines() == [message]


# ------------------------------------------------------------------------------- the page, Gradio's client
@pytest.fixture(scope="module")
def served(captioner: Captioner, tmp_path_factory: pytest.TempPathFactory):
    """The page served in-process on a free port (queue of 1, outputs kept 2 s) with its own Gradio folder, and
    Gradio's client on it (one session: the page's state carries over from one call to the next)."""
    from gradio_client import Client

    cache = tmp_path_factory.mktemp("gradio_cache")
    before = os.environ.get("GRADIO_TEMP_DIR")
    os.environ["GRADIO_TEMP_DIR"] = str(cache)
    page = app.build_page(captioner, queue_size=1, keep_outputs=2)
    try:
        url = app.launch_page(page, captioner, port=browser.free_port())
        client = Client(url, verbose=False, download_files=False, analytics_enabled=False)
        yield SimpleNamespace(page=page, client=client, cache=cache, url=url)
    finally:
        page.close()
        if before is None:
            os.environ.pop("GRADIO_TEMP_DIR", None)
        else:
            os.environ["GRADIO_TEMP_DIR"] = before


def status_and_caption(result: tuple) -> tuple[str, str]:
    """The status line (as text) and the caption from the page's outputs (status HTML, answer HTML, ...)."""
    caption = re.search(r'data-caption="([^"]*)"', result[1] or "")
    return html.unescape(re.sub(r"<[^>]+>", "", result[0] or "")), html.unescape(caption[1]) if caption else ""


def test_no_photo_shows_no_answer(served: SimpleNamespace) -> None:
    result = served.client.predict(None, 3, 0.5, api_name="/caption")
    assert status_and_caption(result) == ("", "") and result[1] == app.EMPTY_VIEWER


def test_a_text_file_gets_a_message_then_a_photo_its_caption_and_neither_upload_is_kept(
    served: SimpleNamespace, captioner: Captioner, photos: SimpleNamespace
) -> None:
    from gradio_client import handle_file

    status, caption = status_and_caption(
        served.client.predict(handle_file(str(photos.root / "notes.txt")), 3, 0.5, api_name="/caption")
    )
    assert status == "error: notes.txt: not an image (or an unsupported format)" and caption == ""
    status, caption = status_and_caption(
        served.client.predict(handle_file(str(photos.wide)), 3, 0.5, api_name="/caption")
    )
    assert status.startswith("wide.png: captioned in ")
    assert status.endswith(" s (beam 3, length penalty 0.5, outside knowledge: slot)")  # DecodeConfig's defaults
    assert caption == " ".join(app.answer_photo(captioner, photos.wide, "wide.png", 3, 0.5).words)
    kept = [p.name for p in served.cache.rglob("*") if p.is_file()]
    assert "notes.txt" not in kept and "wide.png" not in kept, kept


def test_figures_are_made_on_demand_and_outputs_deleted_after_keep_outputs(
    served: SimpleNamespace, photos: SimpleNamespace
) -> None:
    from gradio_client import handle_file

    served.client.predict(handle_file(str(photos.square)), 3, 0.5, api_name="/caption")
    files, note = served.client.predict(api_name="/figures")
    files = files["value"] if isinstance(files, dict) else files  # shown with gr.update(visible=True)
    assert "The server keeps these files until" in note and "data-expires=" in note
    paths = [Path(f["path"] if isinstance(f, dict) else f) for f in files]
    assert sorted(p.name for p in paths) == ["square_attention.gif", "square_attention.png"]
    assert all(p.is_file() and served.cache in p.parents for p in paths), "served from Gradio's cache as written"
    deadline = time.monotonic() + 15  # kept 2 s, swept every 2 s
    while any(p.exists() for p in paths):
        assert time.monotonic() < deadline, "outputs outlived --keep-outputs"
        time.sleep(0.25)


def test_a_full_queue_is_refused_with_a_message(
    served: SimpleNamespace, captioner: Captioner, photos: SimpleNamespace
) -> None:
    from gradio_client import handle_file
    from gradio_client.utils import Status

    def wait_status(job, wanted: Status) -> None:
        deadline = time.monotonic() + 30
        while job.status().code != wanted:
            assert time.monotonic() < deadline, f"job never reached {wanted}: {job.status()}"
            time.sleep(0.05)

    args = (handle_file(str(photos.square)), 1, 0.0)
    with captioner._lock:  # hold the model: the first request waits inside decode, occupying the one worker
        running = served.client.submit(*args, api_name="/caption")
        wait_status(running, Status.PROCESSING)
        waiting = served.client.submit(*args, api_name="/caption")
        wait_status(waiting, Status.IN_QUEUE)  # the queue holds 1
        refused = served.client.submit(*args, api_name="/caption")
        with pytest.raises(Exception, match="Queue is full"):
            refused.result(timeout=30)
    for job in (running, waiting):  # both answered once the model is free
        status, caption = status_and_caption(job.result(timeout=60))
        assert status.startswith("square.png: captioned in") and caption


@pytest.fixture
def grounded_page(
    captioner: Captioner, grounded: list[DecodeConfig], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> SimpleNamespace:
    """A page served with outside knowledge on (``--ground slot``, faked by :func:`grounded`), and its client."""
    from gradio_client import Client

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))
    page = app.build_page(captioner, DecodeConfig(ground="slot"), queue_size=4, keep_outputs=60)
    try:
        url = app.launch_page(page, captioner, port=browser.free_port())
        client = Client(url, verbose=False, download_files=False, analytics_enabled=False)
        yield SimpleNamespace(url=url, client=client, seen=grounded)
    finally:
        page.close()


def test_the_own_words_switch_recaptions_without_outside_knowledge(
    grounded_page: SimpleNamespace, photos: SimpleNamespace
) -> None:
    from gradio_client import handle_file

    photo, client, seen = handle_file(str(photos.wide)), grounded_page.client, grounded_page.seen
    status, caption = status_and_caption(client.predict(photo, 3, 0.5, False, api_name="/caption"))
    assert seen[-1].ground == "slot" and caption.endswith("*") and status.endswith("outside knowledge: slot)")
    status, caption = status_and_caption(client.predict(photo, 3, 0.5, True, api_name="/recaption_own_words"))
    assert seen[-1].ground == "off" and "*" not in caption and status.endswith("own words only)"), status
    assert caption == status_and_caption(client.predict(photo, 3, 0.5, False, api_name="/caption"))[1][:-1]
    refused = client.predict(photo, 3, 0.5, "yes", api_name="/recaption_own_words")  # as an API call may send it
    assert status_and_caption((refused[0], "")) == ("error: own words only must be true or false, got 'yes'", "")


# ----------------------------------------------------------------------------------------- a real browser
@pytest.fixture(scope="module")
def shipped_captions() -> dict[str, str]:
    """caption.py's captions of two real photos with the shipped model, at the page's default settings (with the
    outside-knowledge marks the page shows), and at beam 1 ("coffee.png@1": the page's slider moved to 1)."""
    photos = [browser.skimage_photo("chelsea.png"), browser.skimage_photo("coffee.png")]
    captioner = Captioner.load(DEFAULT_CHECKPOINT, "cpu")
    found = {p.name: " ".join(captioner.words(d, marked=True)) for p, _, d, _ in caption_images(photos, captioner)}
    greedy = caption_images(photos, captioner, DecodeConfig(beam_size=1))
    return {**found, **{f"{p.name}@1": " ".join(captioner.words(d, marked=True)) for p, _, d, _ in greedy}}


def in_view(driver, selector: str) -> bool:
    """Whether the element is wholly inside the window, the page not scrolled (what a user sees at once)."""
    return driver.execute_script(
        "const e = document.querySelector(arguments[0]); if (!e) return false;"
        "const r = e.getBoundingClientRect();"
        "return window.scrollY === 0 && r.top >= 0 && r.bottom <= window.innerHeight && r.height > 0;",
        selector,
    )


def focused(driver) -> str:
    """What has the keyboard focus: its tag, classes and text."""
    return driver.execute_script(
        "const e = document.activeElement; return `${e.tagName}.${e.className} ${(e.textContent || '').trim()}`;"
    )


def tab_to(driver, selector: str, most: int = 40) -> None:
    """Press Tab until the focus is on (or inside) ``selector``; fails after ``most`` presses."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    for _ in range(most):
        if driver.execute_script("return !!document.activeElement.closest(arguments[0])", selector):
            return
        ActionChains(driver).send_keys(Keys.TAB).perform()
    pytest.fail(f"{most} presses of Tab never reached {selector} (focus: {focused(driver)})")


def press(driver, key: str) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(driver).send_keys(key).perform()


def serious_violations(driver) -> list[dict]:
    """axe-core's serious and critical WCAG 2.1 A/AA violations in the page (all are printed)."""
    script, _ = browser.axe_script()
    found = browser.axe_violations(driver, script)
    for v in found:
        print(f"axe: {v['impact']} {v['id']}: {v['help']} {v['nodes'][:3]}")
    return [v for v in found if v["impact"] in ("serious", "critical")]


AXE_MISSING = browser.axe_script()[1]


@pytest.mark.skipif(bool(browser.browser_missing()), reason=f"no browser: {browser.browser_missing()}")
def test_in_a_real_browser(shipped_captions: dict[str, str], photos: SimpleNamespace) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    chelsea, coffee = browser.skimage_photo("chelsea.png"), browser.skimage_photo("coffee.png")
    with browser.running_app() as server:
        url = server.url
        driver = browser.chromium(*browser.DESKTOP)
        try:
            browser.open_page(driver, url)
            first = driver.current_window_handle
            if AXE_MISSING:
                print(f"\naxe-core not run: {AXE_MISSING}")
            else:
                assert serious_violations(driver) == [], "the empty page"

            # Keyboard only: Tab reaches the photo's upload button; the file goes in as its chooser would give it.
            tab_to(driver, "#photo button")
            assert "upload-container" in focused(driver)
            caption, seconds = browser.seconds_to_caption(driver, chelsea)
            assert caption == shipped_captions["chelsea.png"]
            print(f"\nbrowser: {seconds:.3f} s from drop to caption ({chelsea.name}, first photo)")
            words = caption.split()
            assert [b.text for b in browser.word_buttons(driver)] == words, "the caption's words are the picker"
            assert in_view(driver, "#viewer .cam-words") and in_view(driver, "#viewer .cam-tag"), "desktop: in view"
            assert browser.shown_word(driver) == f"{words[0]}, 1 of {len(words)}"
            live = driver.execute_script("return document.getElementById('cam-live').textContent")
            assert live == f"Caption of chelsea.png: {caption}", "the live region announces the caption"

            # Arrows through the words: the overlay and its label change, and the browser asks the server nothing.
            tab_to(driver, "#viewer .cam-word")
            browser.requested_urls(driver)  # forget the requests so far
            seen = {browser.attention_image(driver)}
            for i in range(1, len(words)):
                press(driver, Keys.ARROW_RIGHT)
                assert browser.shown_word(driver) == f"{words[i]}, {i + 1} of {len(words)}"
                seen.add(browser.attention_image(driver))
            assert len(seen) == len(words) and all(src.startswith("data:image/webp") for src in seen)
            press(driver, Keys.HOME)
            assert browser.shown_word(driver).startswith(f"{words[0]}, 1 of")
            assert "cam-word" in focused(driver) and focused(driver).endswith(words[0]), "the focus follows"
            assert [u for u in browser.requested_urls(driver) if not u.startswith("data:")] == [], "no request a word"
            alt = driver.find_element(By.CSS_SELECTOR, "#viewer .cam-overlay").get_attribute("alt")
            assert alt == f'where the model looked while writing "{words[0]}" (word 1 of {len(words)})'

            # Play steps through every word and stops at the last; the colour map is the other rendering.
            driver.find_element(By.CSS_SELECTOR, "#viewer .cam-play").click()
            browser.wait_for(driver, lambda d: browser.shown_word(d) == f"{words[-1]}, {len(words)} of {len(words)}")
            browser.wait_for(driver, lambda d: "Play" in d.find_element(By.CSS_SELECTOR, "#viewer .cam-play").text)
            driver.find_element(By.CSS_SELECTOR, "#viewer input[value=heatmap]").click()
            last = browser.word_buttons(driver)[-1]
            assert browser.attention_image(driver) == last.get_attribute("data-heatmap")
            assert driver.find_element(By.CSS_SELECTOR, "#viewer .cam-legend-heatmap").is_displayed()

            # A beam row shows that beam's own words and attention.
            rows = driver.find_elements(By.CSS_SELECTOR, "#viewer .cam-beam")
            assert len(rows) == 3 and rows[0].get_attribute("aria-pressed") == "true"
            second = rows[1].find_element(By.CSS_SELECTOR, ".cam-beam-text").text
            rows[1].click()
            browser.wait_for(driver, lambda d: [b.text for b in browser.word_buttons(d)] == second.split())
            assert driver.find_element(By.CSS_SELECTOR, "#viewer .cam-heading").text.startswith("Beam 2 of 3")

            # The slider re-captions when let go: beam 1 gives one beam.
            slider = driver.find_element(By.CSS_SELECTOR, "#beam input[type=range]")
            from selenium.webdriver.common.action_chains import ActionChains

            ActionChains(driver).move_to_element_with_offset(
                slider, -slider.size["width"] // 2 + 1, 0
            ).click().perform()
            browser.wait_for(driver, lambda d: "(beam 1," in browser.status_text(d), what="the re-caption")
            assert len(driver.find_elements(By.CSS_SELECTOR, "#viewer .cam-beam")) == 1

            # The model card is in the page, opened by the link beside the title.
            driver.find_element(By.CSS_SELECTOR, "#header a[href='#model-card']").click()
            browser.wait_for(driver, lambda d: "Known limitations" in d.find_element(By.ID, "model-card").text)

            # Figure and GIF on demand, with the time the server keeps them.
            driver.find_element(By.ID, "make-figures").click()
            links = browser.wait_for(
                driver,
                lambda d: d.execute_script("return [...document.querySelectorAll('#downloads a')].map(a => a.href)"),
                what="the downloads",
            )
            assert sorted(link.rsplit("/", 1)[1] for link in links) == [
                "chelsea_attention.gif",
                "chelsea_attention.png",
            ]
            for link in links:
                with urllib.request.urlopen(link) as response:
                    assert response.status == 200 and response.read(4) in (b"GIF8", b"\x89PNG")
            assert "The server keeps these files until" in driver.find_element(By.ID, "downloads-note").text
            # Once that time has passed the page says so (the time is moved back rather than waited for).
            driver.execute_script("document.querySelector('#downloads-note .cam-expiry').dataset.expires = '1'")
            browser.wait_for(driver, lambda d: "have expired" in d.find_element(By.ID, "downloads-note").text)
            assert not driver.find_element(By.ID, "downloads").is_displayed()

            if not AXE_MISSING:
                assert serious_violations(driver) == [], "the page with an answer"

            # Refusals in the page's own words; the server goes on answering.
            for name, message in (
                ("notes.txt", "error: notes.txt: not an image (or an unsupported format)"),
                ("huge.jpg", "error: huge.jpg: the file is 21.0 MB; photos up to 20 MB are accepted"),
                ("text_<i>x*_.jpg", "error: text_<i>x*_.jpg: not an image (or an unsupported format)"),
                ("truncated.png", "error: truncated.png: the file is cut short (truncated): save or download"),
            ):
                browser.clear_photo(driver)
                browser.drop_photo(driver, photos.root / name)
                browser.wait_for(driver, lambda d, m=message: browser.status_text(d).startswith(m), what=message)
                assert "exceed the maximum" not in browser.body_text(driver), "not Gradio's pop-up"
            browser.clear_photo(driver)
            caption, _ = browser.seconds_to_caption(driver, coffee)
            assert caption == shipped_captions["coffee.png@1"]  # the beam slider is still at 1

            # Two tabs at once: each gets the caption of its own photo.
            driver.switch_to.new_window("tab")
            second_tab = driver.current_window_handle
            browser.open_page(driver, url)
            driver.switch_to.window(first)
            browser.clear_photo(driver)
            browser.drop_photo(driver, chelsea)
            driver.switch_to.window(second_tab)
            browser.drop_photo(driver, coffee)
            # (the first tab's beam slider is still at 1; the new tab's at its default)
            for handle, name, key in (
                (first, "chelsea.png", "chelsea.png@1"),
                (second_tab, "coffee.png", "coffee.png"),
            ):
                driver.switch_to.window(handle)
                browser.wait_for(driver, lambda d, n=name: browser.status_text(d).startswith(f"{n}: captioned"))
                assert browser.caption_text(driver) == shipped_captions[key], name

            # Every request the page made went to this machine's server.
            urls = browser.requested_urls(driver)
            assert any(u.startswith(url) for u in urls) and browser.off_host(urls) == []
        finally:
            driver.quit()

        # A phone: the caption, the word picker and the photo's label in view after a drop, without scrolling.
        phone = browser.chromium(*browser.PHONE, mobile=True)
        try:
            browser.open_page(phone, url)
            assert phone.execute_script("return [window.innerWidth, window.innerHeight]") == list(browser.PHONE)
            caption, _ = browser.seconds_to_caption(phone, chelsea)
            assert caption == shipped_captions["chelsea.png"]
            for part in ("#status", "#viewer .cam-words", "#viewer .cam-tag"):
                assert in_view(phone, part), f"phone: {part} out of view"
            if not AXE_MISSING:
                assert serious_violations(phone) == [], "the page on a phone"
        finally:
            phone.quit()
    # Stopped by SIGTERM: exit status 143, no traceback, and its folder of uploads and outputs is gone.
    log = server.output
    assert server.proc.returncode == 143 and "Traceback" not in log, log
    [folder] = re.findall(r"uploads and outputs go to (\S+) ", log)
    assert not Path(folder).exists()


@pytest.mark.skipif(bool(browser.browser_missing()), reason=f"no browser: {browser.browser_missing()}")
def test_outside_words_in_a_real_browser(grounded_page: SimpleNamespace, photos: SimpleNamespace) -> None:
    """The marks as a user sees and hears them, and the switch that takes them away (the tiny model, faked
    grounding: no detector needed)."""
    from selenium.webdriver.common.by import By

    driver = browser.chromium(*browser.DESKTOP)
    try:
        browser.open_page(driver, grounded_page.url)
        browser.drop_photo(driver, photos.wide)
        browser.wait_for(driver, lambda d: "outside knowledge: slot)" in browser.status_text(d), what="the caption")
        words = browser.word_buttons(driver)
        [marked] = driver.find_elements(By.CSS_SELECTOR, "#viewer .cam-word.cam-outside")
        word = marked.get_attribute("data-word")
        assert driver.execute_script("return getComputedStyle(arguments[0]).borderTopStyle", marked) == "dashed"
        assert marked.get_attribute("textContent") == f"{word}* (from outside knowledge)", "what a reader hears"
        assert driver.find_element(By.CSS_SELECTOR, "#viewer .cam-outside-legend").is_displayed()
        marked.click()
        assert browser.shown_word(driver) == f"{word}*, {len(words)} of {len(words)}"
        alt = driver.find_element(By.CSS_SELECTOR, "#viewer .cam-overlay").get_attribute("alt")
        assert alt.endswith(f"(word {len(words)} of {len(words)}, from outside knowledge)"), alt
        if not AXE_MISSING:
            assert serious_violations(driver) == [], "the page with marked words"
        driver.find_element(By.CSS_SELECTOR, "#own-words input[type=checkbox]").click()
        browser.wait_for(driver, lambda d: browser.status_text(d).endswith("own words only)"), what="own words")
        assert grounded_page.seen[-1].ground == "off" and "*" not in browser.caption_text(driver)
        assert driver.find_elements(By.CSS_SELECTOR, "#viewer .cam-outside, #viewer .cam-outside-legend") == []
    finally:
        driver.quit()


def test_browser_helpers_find_requests_off_this_machine() -> None:
    urls = ["http://127.0.0.1:7860/x", "data:image/png;base64,AA", "blob:http://127.0.0.1:7860/1",
            "https://fonts.googleapis.com/css", "http://localhost:7860/"]  # fmt: skip
    assert browser.off_host(urls) == ["https://fonts.googleapis.com/css", "http://localhost:7860/"]


def test_names_are_escaped_for_html() -> None:
    line = '<p class="cam-status">a_b*&lt;img src=x&gt;.jpg (1)</p>'
    assert app.status_html("a_b*<img src=x>.jpg (1)") == f'<div class="cam-status-box">{line}</div>'
    assert "error: &lt;i&gt;.jpg: not an image</p>" in app.status_html("<i>.jpg: not an image", error=True)


def test_page_uses_system_fonts_only() -> None:
    """No font is fetched: the theme names system fonts, not Google's or Gradio's web fonts."""
    theme = app.page_theme()
    css = theme._get_theme_css()  # the stylesheet Gradio serves as theme.css
    assert "googleapis" not in css and "@font-face" not in css
    assert theme.font.startswith("system-ui")


def test_a_port_out_of_range_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 21: --port 70000 was an OverflowError traceback."""
    with pytest.raises(SystemExit) as info:
        app.main(["--port", "70000"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "--port" in err and "65535" in err, err
