"""Tests for caption.py: 'file: caption' lines, attention figures (PNG panels, GIF frames), one-line errors.

Captioning runs in-process through ``caption.main`` with a tiny model trained once per session
(tests/_tiny_model.py); two runs go through ``python caption.py`` to check the real exit status and that no
traceback reaches the terminal.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from _tiny_model import SPECIAL_TOKENS, one_torch_thread, started_cli, tiny_model
from PIL import Image

import caption
import captioner as captioner_module
from attention_maps import figure_pixels, save_attention_figure, save_attention_gif, smooth_attention
from utils import write_json

ROOT = Path(__file__).resolve().parents[1]

REPO = Path(caption.__file__).resolve().parent


def panel_png_size(panels: int) -> tuple[int, int]:
    """Pixel size of save_attention_figure's PNG of square panels (caption.py shows the model's square input)."""
    return figure_pixels(panels, 1.0)


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> SimpleNamespace:
    """Run caption.main in-process: exit status, stdout lines, stderr lines (any other exception fails the test)."""
    try:
        status = caption.main(argv)
    except SystemExit as exc:
        status = exc.code
    captured = capsys.readouterr()
    return SimpleNamespace(status=status, out=captured.out.splitlines(), err=captured.err.splitlines())


def parse_lines(lines: list[str]) -> list[tuple[str, list[str]]]:
    """'file: caption' lines -> [(file, words)]."""
    parsed = []
    for line in lines:
        path, sep, text = line.rpartition(": ")
        assert sep, f"not a 'file: caption' line: {line!r}"
        parsed.append((path, text.split()))
    return parsed


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    return tiny_model(tmp_path_factory)


@pytest.fixture(scope="module")
def photos(model: SimpleNamespace, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """Copies of synthetic images: two loose files, a folder of two (plus a text file), and two different
    images that are both called x.png, in folders d1/ and d2/."""
    root = tmp_path_factory.mktemp("photos")
    src = model.images

    def copy(name: str, dest: Path) -> Path:
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / name, dest)
        return dest

    folder = root / "folder"
    ns = SimpleNamespace(
        root=root,
        one=copy("000003.png", root / "one.png"),
        two=copy("000005.png", root / "two.png"),
        folder=folder,
        in_folder=[copy("000010.png", folder / "a.png"), copy("000012.png", folder / "b.png")],
        dup=[copy("000007.png", root / "d1" / "x.png"), copy("000008.png", root / "d2" / "x.png")],
    )
    (folder / "notes.txt").write_text("not an image, and not an image suffix: skipped by the folder scan\n")
    return ns


def base_args(model: SimpleNamespace, out_dir: Path) -> list[str]:
    return ["--checkpoint", str(model.checkpoint), "--device", "cpu", "--out-dir", str(out_dir)]


def check_caption(words: list[str], model: SimpleNamespace) -> None:
    assert words, "the tiny model captions every test photo with at least one word"
    assert set(words) <= set(model.word_map) - SPECIAL_TOKENS, words


# ------------------------------------------------------------------------------------------ captioning
def test_one_image_prints_one_line_and_writes_its_figure(
    model: SimpleNamespace, photos: SimpleNamespace, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = run_main([str(photos.one), *base_args(model, tmp_path)], capsys)
    assert run.status == 0 and run.err == []
    [(path, words)] = parse_lines(run.out)
    assert path == str(photos.one)
    check_caption(words, model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one_attention.png"]  # no GIF unless --gif
    with Image.open(tmp_path / "one_attention.png") as im:
        assert im.format == "PNG" and im.size == panel_png_size(len(words) + 1)


def test_several_images_and_a_folder_each_get_a_line_a_figure_and_a_gif(
    model: SimpleNamespace, photos: SimpleNamespace, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inputs = [photos.one, photos.folder, *photos.dup]
    argv = [*map(str, inputs), "--gif", "--batch-size", "4", "--max-len", "6"]  # short captions: small figures
    run = run_main([*argv, *base_args(model, tmp_path)], capsys)
    assert run.status == 0 and run.err == []
    lines = parse_lines(run.out)
    # files as given, the folder's images sorted (its text file skipped), two x.png from different folders
    expected = [photos.one, *photos.in_folder, *photos.dup]
    assert [path for path, _ in lines] == [str(p) for p in expected]
    stems = ["one", "a", "b", "x", "x_2"]  # the second x.png must not overwrite the first's figures
    for (_, words), stem in zip(lines, stems):
        check_caption(words, model)
        assert len(words) <= 6
        with Image.open(tmp_path / f"{stem}_attention.png") as im:
            assert im.format == "PNG" and im.size == panel_png_size(len(words) + 1), stem
        with Image.open(tmp_path / f"{stem}_attention.gif") as im:
            assert im.format == "GIF" and im.size == (64, 64), stem
            assert im.n_frames == len(words), f"{stem}: one frame per word"
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == sorted(f"{s}_attention.{ext}" for s in stems for ext in ("png", "gif"))
    assert (tmp_path / "x_attention.png").read_bytes() != (tmp_path / "x_2_attention.png").read_bytes()


def test_word_map_option_accepts_the_models_own_word_map(
    model: SimpleNamespace, photos: SimpleNamespace, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [str(photos.one), "--word-map", str(model.data / "word_map.json"), "--no-figures"]
    run = run_main([*argv, *base_args(model, tmp_path / "figs")], capsys)
    assert run.status == 0 and run.err == [] and len(run.out) == 1
    assert not (tmp_path / "figs").exists(), "--no-figures writes nothing"


def test_block_trigrams_option_reaches_the_search(
    model: SimpleNamespace, photos: SimpleNamespace, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [str(photos.one), str(photos.two), "--block-trigrams", "--beam-size", "5", "--length-penalty", "0"]
    run = run_main([*argv, "--no-figures", *base_args(model, tmp_path)], capsys)
    assert run.status == 0 and run.err == []
    for _, words in parse_lines(run.out):
        grams = list(zip(words, words[1:], words[2:]))
        assert len(grams) == len(set(grams)), words


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_precision_and_object_prior_options_reach_the_captioner(
    model: SimpleNamespace, photos: SimpleNamespace, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch, precision: str,
) -> None:  # fmt: skip
    """Fix: caption.py and app.py accepted --precision and --object-prior and then ignored them."""
    loaded = []
    original = captioner_module.Captioner.load.__func__

    def spy(cls, *args, **kwargs):
        loaded.append(original(cls, *args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(captioner_module.Captioner, "load", classmethod(spy))
    argv = [str(photos.one), "--precision", precision, "--object-prior", "2", "--no-figures"]
    run = run_main([*argv, *base_args(model, tmp_path)], capsys)
    assert run.status == 0 and run.err == []
    [captioner] = loaded
    assert captioner.encoder.precision == precision
    assert captioner.prior is not None and captioner.prior.strength == 2


def test_captioning_without_figures_imports_no_plotting_or_compiler(model: SimpleNamespace, photos: SimpleNamespace):
    """Issue 10, start-up: a --no-figures run imports neither matplotlib nor imageio (about 0.5 s), and
    loading a checkpoint no longer pulls in torch._dynamo (1-4 s) through the meta-device size check."""
    argv = [str(photos.one), "--no-figures", "--device", "cpu", "--checkpoint", str(model.checkpoint)]
    script = (
        f"import sys, caption\nstatus = caption.main({argv!r})\n"
        "print([m for m in sys.modules if m.split('.')[0] in ('matplotlib', 'imageio') or m == 'torch._dynamo'])\n"
        "sys.exit(status)"
    )
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[-1] == "[]", run.stdout


# ---------------------------------------------------------------------------------------------- figures
def _image_and_grids(steps: int, grid: int = 2, repeat: bool = False) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (3, 64, 64), dtype=np.uint8)
    grids = rng.random((1 if repeat else steps, grid, grid))
    grids = np.repeat(grids, steps, axis=0) if repeat else grids
    return image, grids / grids.sum(axis=(1, 2), keepdims=True)


@pytest.mark.parametrize("n_words", [1, 4, 5])  # 2 panels; 5, one full row; 6, a second row
def test_attention_figure_has_a_panel_per_word_plus_the_photo(tmp_path: Path, n_words: int) -> None:
    image, grids = _image_and_grids(n_words)
    words = [f"w{i}" for i in range(n_words)]
    panels = save_attention_figure(image, words, grids, tmp_path / "fig.png")
    assert panels == n_words + 1
    with Image.open(tmp_path / "fig.png") as im:
        im.load()
        assert im.format == "PNG" and im.size == panel_png_size(panels)
    assert [p.name for p in tmp_path.iterdir()] == ["fig.png"], "no temporary file left behind"


@pytest.mark.parametrize(
    ("words", "repeat"),
    [(["a", "red", "circle"], False), (["circle"] * 12, True), ([f"word{i}" for i in range(30)], True)],
    ids=["distinct", "repeated word, same attention", "caption wider than the image"],
)
def test_attention_gif_has_one_frame_per_word(tmp_path: Path, words: list[str], repeat: bool) -> None:
    # Identical attention at every step used to give identical frames, which Pillow's GIF writer merges.
    image, grids = _image_and_grids(len(words), repeat=repeat)
    frames = save_attention_gif(image, words, grids, tmp_path / "anim.gif")
    assert frames == len(words)
    with Image.open(tmp_path / "anim.gif") as im:
        assert im.format == "GIF" and im.size == (64, 64)
        assert im.n_frames == len(words)


@pytest.mark.parametrize(
    ("grid", "size", "peak"), [(4, 64, (1, 2)), (2, 64, (0, 0)), (3, 50, (2, 1)), (8, 256, (7, 3))]
)
def test_smooth_attention_is_size_by_size_in_unit_range_with_the_peak_in_place(
    grid: int, size: int, peak: tuple[int, int]
) -> None:
    alpha = np.random.default_rng(1).random((grid, grid)) * 0.2
    alpha[peak] = 1.0
    alpha /= alpha.sum()
    heat = smooth_attention(alpha, size)
    assert heat.shape == (size, size)
    assert np.all(np.isfinite(heat)) and heat.min() == pytest.approx(0.0) and heat.max() == pytest.approx(1.0)
    assert 0.0 <= heat.min() and heat.max() <= 1.0
    row, col = np.unravel_index(np.argmax(heat), heat.shape)
    cell = size / grid
    assert (int(row // cell), int(col // cell)) == peak, "the brightest pixel lies in the grid's peak cell"


def test_smooth_attention_of_uniform_attention_is_flat_and_finite() -> None:
    heat = smooth_attention(np.full((4, 4), 1 / 16), 64)
    assert heat.shape == (64, 64) and np.all(heat == 0.0)


# ----------------------------------------------------------------------------------------------- errors
@pytest.fixture(scope="module")
def bad(model: SimpleNamespace, photos: SimpleNamespace, tmp_path_factory: pytest.TempPathFactory):
    """Bad inputs: images and checkpoints that caption.py must refuse in one line."""
    root = tmp_path_factory.mktemp("bad")
    png = photos.one.read_bytes()
    (root / "truncated.png").write_bytes(png[: len(png) // 2])
    (root / "text.jpg").write_text("this is a text file, not a JPEG\n")
    (root / "empty_folder").mkdir()
    torch.save({"weights": torch.zeros(3), "epoch": 1}, root / "random_dict.pt")
    (root / "text.pt").write_text("not a checkpoint\n")
    ckpt = torch.load(model.checkpoint, map_location="cpu", weights_only=True)
    ckpt["config"]["vocab_size"] += 1
    torch.save(ckpt, root / "vocab_size_edited.pt")
    other = dict(model.word_map)
    del other[max(other, key=other.get)]  # a valid word map, one word short of the model's
    write_json(other, root / "other_word_map.json")
    return root


IMAGE_ERRORS = {
    "missing image": ("missing.png", "file not found"),
    "truncated image": ("truncated.png", "unreadable image ("),
    "text file named .jpg": ("text.jpg", "not an image (or an unsupported format)"),
}


@pytest.mark.parametrize("case", list(IMAGE_ERRORS))
def test_bad_image_is_one_error_line_and_the_good_one_is_still_captioned(
    case: str,
    model: SimpleNamespace,
    photos: SimpleNamespace,
    bad: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    name, reason = IMAGE_ERRORS[case]
    path = bad / name
    run = run_main([str(path), str(photos.one), "--no-figures", *base_args(model, tmp_path)], capsys)
    assert run.status == 2
    assert len(run.err) == 1 and run.err[0].startswith(f"error: {path}: {reason}"), run.err
    [(good, words)] = parse_lines(run.out)
    assert good == str(photos.one)
    check_caption(words, model)


def test_each_bad_image_gets_its_own_line(
    model: SimpleNamespace, photos: SimpleNamespace, bad: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad_paths = [bad / name for name, _ in IMAGE_ERRORS.values()]
    inputs = [bad_paths[0], photos.one, bad_paths[1], bad_paths[2], photos.two]
    run = run_main([*map(str, inputs), "--batch-size", "2", "--no-figures", *base_args(model, tmp_path)], capsys)
    assert run.status == 2
    assert [line.split(": ")[1] for line in run.err] == [str(p) for p in bad_paths]
    assert all(line.startswith("error: ") for line in run.err)
    assert [path for path, _ in parse_lines(run.out)] == [str(photos.one), str(photos.two)]


def _checkpoint_errors(model: SimpleNamespace, bad: Path) -> dict[str, tuple[list[str], list[str], str]]:
    """case -> (inputs before photos.one, options, expected message)."""
    ckpt = ["--checkpoint", str(model.checkpoint)]
    return {
        "missing checkpoint": (
            [],
            ["--checkpoint", str(bad / "missing.pt")],
            f"checkpoint not found: {bad}/missing.pt",
        ),
        "random torch.save'd dict": (
            [],
            ["--checkpoint", str(bad / "random_dict.pt")],
            f"{bad}/random_dict.pt is not a CamEye checkpoint",
        ),
        "text file named .pt": (
            [],
            ["--checkpoint", str(bad / "text.pt")],
            f"{bad}/text.pt is not a CamEye checkpoint",
        ),
        "config vocab_size edited": (
            [],
            ["--checkpoint", str(bad / "vocab_size_edited.pt")],
            f"{bad}/vocab_size_edited.pt: the model's vocabulary does not match its word map",
        ),
        "--word-map of another vocabulary": (
            [],
            [*ckpt, "--word-map", str(bad / "other_word_map.json")],
            f"{bad}/other_word_map.json does not match the word map of {model.checkpoint}",
        ),
        "--word-map missing": (
            [],
            [*ckpt, "--word-map", str(bad / "missing.json")],
            f"word map not found: {bad}/missing.json",
        ),
        "empty folder": ([str(bad / "empty_folder")], ckpt, f"no images found in folder {bad}/empty_folder"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "missing checkpoint",
        "random torch.save'd dict",
        "text file named .pt",
        "config vocab_size edited",
        "--word-map of another vocabulary",
        "--word-map missing",
        "empty folder",
    ],
)
def test_unusable_checkpoint_or_word_map_is_one_error_line_and_exit_2(
    case: str,
    model: SimpleNamespace,
    photos: SimpleNamespace,
    bad: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    inputs, options, message = _checkpoint_errors(model, bad)[case]
    argv = [*inputs, str(photos.one), "--device", "cpu", "--out-dir", str(tmp_path / "figs"), *options]
    run = run_main(argv, capsys)
    assert run.status == 2
    assert len(run.err) == 1 and run.err[0].startswith(f"error: {message}"), run.err
    assert run.out == [], "nothing is captioned with a model that cannot be used"
    assert not (tmp_path / "figs").exists()


@pytest.fixture(scope="module", autouse=True)
def cli_runs(model: SimpleNamespace, photos: SimpleNamespace, bad: Path, tmp_path_factory: pytest.TempPathFactory):
    """``python caption.py`` with a bad image and with a bad checkpoint, started as soon as the model exists
    and left running beside the in-process tests (each subprocess spends seconds importing torch)."""
    tmp = tmp_path_factory.mktemp("caption_cli")
    common = ["--device", "cpu", "--out-dir", str(tmp / "figs")]
    commands = {
        "bad image": [str(bad / "text.jpg"), str(photos.one), "--checkpoint", str(model.checkpoint), *common],
        "bad checkpoint": [str(photos.one), "--checkpoint", str(bad / "text.pt"), *common],
    }
    with started_cli("caption.py", commands, tmp) as procs:
        yield procs


def test_command_line_exit_status_and_no_traceback(
    cli_runs: dict, model: SimpleNamespace, photos: SimpleNamespace, bad: Path
) -> None:
    """The real ``python caption.py``: exit status 2, one 'error:' line per problem, never a traceback."""
    results = {name: (*proc.communicate(timeout=300), proc.returncode) for name, proc in cli_runs.items()}

    stdout, stderr, status = results["bad image"]
    assert status == 2 and "Traceback" not in stderr
    assert stderr.splitlines() == [f"error: {bad / 'text.jpg'}: not an image (or an unsupported format)"]
    [(path, words)] = parse_lines(stdout.splitlines())
    assert path == str(photos.one)
    check_caption(words, model)

    stdout, stderr, status = results["bad checkpoint"]
    assert status == 2 and "Traceback" not in stderr and stdout == ""
    [line] = stderr.splitlines()
    assert line.startswith(f"error: {bad / 'text.pt'} is not a CamEye checkpoint")


def test_a_name_the_console_cannot_encode_is_escaped_not_a_crash(
    model: SimpleNamespace, photos: SimpleNamespace, tmp_path: Path
) -> None:
    """Issue 21: with a cp1252 standard output (Windows' redirected output), an emoji in a file name stopped
    caption.py with a UnicodeEncodeError traceback, and the later photos were never captioned."""
    emoji = tmp_path / "smile_\U0001f600.png"
    shutil.copy(photos.one, emoji)
    argv = [str(emoji), str(photos.one), "--no-figures", *base_args(model, tmp_path / "out")]
    code = f"import sys, caption\nsys.exit(caption.main({argv!r}))\n"
    env = {**os.environ, "PYTHONIOENCODING": "cp1252", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, timeout=300)
    assert result.returncode == 0 and b"Traceback" not in result.stderr, result.stderr.decode(errors="replace")
    lines = result.stdout.decode("cp1252").splitlines()
    assert len(lines) == 2 and "smile_\\U0001f600.png: " in lines[0], lines
