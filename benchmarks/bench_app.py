"""The web page's speed as a user sees it: time from dropping a photo to its caption shown, in a real browser.

    python benchmarks/bench_app.py                                   # shipped model, 6 photos, CPU
    python benchmarks/bench_app.py --screenshot docs/app_screenshot.png

Starts ``app.py`` on a free localhost port, opens it in headless Chromium (Debian's ``chromium`` and
``chromium-driver`` packages, driven by Selenium; nothing is downloaded), drops each photo on the page and times,
inside the page, from the file input's ``change`` event to the caption appearing (polled every 5 ms). The page
is cleared between photos. Prints one line per photo and the median; the first photo also pays for the model's
first run. ``--screenshot`` saves the page (1300 x 900) with the first photo captioned and its third word
chosen; ``--phone-screenshot`` the page on a phone's viewport after the first photo.

The browser helpers here are also used by tests/test_app.py.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlparse

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
# axe-core, Deque's accessibility checker, as npm packs it (`make browser-tools`); checked against its pinned sum.
AXE_VERSION = "4.10.3"
AXE_TGZ = REPO / ".browser-tools" / f"axe-core-{AXE_VERSION}.tgz"
AXE_SHA256 = "0f2b4d7dcdf7d1219df8d1959ad68e565f51d14c3f0d88bb71cd59abeb956292"
PHOTOS = ("chelsea.png", "coffee.png", "astronaut.png", "motorcycle_left.png", "rocket.jpg", "camera.png")

# Installed into the page: records when a file input receives a file (the user's drop) and, polling every
# 5 ms, when the caption's words first show after that.
TIMER_JS = """
window.__cameye = {dropped: null, shown: null};
document.addEventListener('change', e => {
  if (e.target.type === 'file') { window.__cameye = {dropped: performance.now(), shown: null}; }
}, true);
setInterval(() => {
  const view = document.querySelector('#viewer .cam-view[data-caption]');
  const t = window.__cameye;
  if (t.dropped !== null && t.shown === null && view) { t.shown = performance.now(); }
}, 5);
"""


def skimage_photo(name: str) -> Path:
    """A photo that ships inside scikit-image (an installed package: nothing to download)."""
    import skimage.data

    return Path(skimage.data.__file__).parent / name


def browser_missing() -> str | None:
    """Why no browser test can run here, or None: Selenium and Debian's chromium + chromium-driver are needed."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -r requirements-dev.txt)"
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not path.is_file():
            return f"{path} not found (apt-get install {package})"
    return None


def axe_script() -> tuple[str | None, str]:
    """(axe.min.js, "") from the pinned axe-core package, or (None, why not): it must be where
    ``make browser-tools`` puts it, with the pinned sha256."""
    import hashlib
    import tarfile

    if not AXE_TGZ.is_file():
        return None, f"{AXE_TGZ.relative_to(REPO)} not found (make browser-tools)"
    digest = hashlib.sha256(AXE_TGZ.read_bytes()).hexdigest()
    if digest != AXE_SHA256:
        return None, f"{AXE_TGZ.name} has sha256 {digest}, not the pinned {AXE_SHA256}"
    with tarfile.open(AXE_TGZ) as tar:
        return tar.extractfile("package/axe.min.js").read().decode("utf-8"), ""


def axe_violations(driver, script: str) -> list[dict]:
    """Run axe-core in the page against WCAG 2.0/2.1 A and AA; its violations, each with its impact, rule id,
    help text and the failing elements' selectors."""
    driver.execute_script(script)
    result = driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "axe.run(document, {runOnly: {type: 'tag', values: ['wcag2a', 'wcag2aa', 'wcag21a', 'wcag21aa']}})"
        ".then(r => done(r.violations.map(v => ({id: v.id, impact: v.impact, help: v.help,"
        " nodes: v.nodes.map(n => n.target.join(' '))})))).catch(e => done([{id: 'axe-error', impact: 'serious',"
        " help: String(e), nodes: []}]));"
    )
    return result


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_app(*args: str, timeout: float = 180.0) -> Iterator[SimpleNamespace]:
    """Run ``python app.py --port FREE ARGS`` until the block ends, then stop it with SIGTERM as a service manager
    would. Yields a namespace: ``url`` (once it answers), ``proc``, and after the block ``output`` (all it printed).

    Raises RuntimeError with the server's output if it exits or does not answer within ``timeout`` seconds.
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, str(REPO / "app.py"), "--port", str(port), *args]
    with tempfile.TemporaryDirectory(prefix="cameye-app-log-") as tmp:
        log = Path(tmp) / "app.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
        server = SimpleNamespace(url=url, proc=proc, output="")
        try:
            wait_until_serving(url, proc, log, timeout)
            yield server
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            server.output = log.read_text()


def wait_until_serving(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"app.py exited with status {proc.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"app.py did not answer on {url} within {timeout:.0f} s:\n{log.read_text()}")
        time.sleep(0.25)


PHONE = (390, 844)  # an iPhone 12-15's viewport in CSS pixels
DESKTOP = (1300, 900)


def chromium(width: int = 1300, height: int = 1350, mobile: bool = False):
    """Headless Chromium through chromedriver, both Debian's, logging every network request it makes; with
    ``mobile``, a phone's viewport of ``width`` x ``height`` CSS pixels (emulated: a window cannot be that narrow).

    The driver's path is given, so Selenium Manager never looks for (or downloads) a browser or driver.
    """
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={width},{height}", "--no-first-run", "--disable-extensions",
                "--disable-background-networking", "--disable-component-update", "--disable-sync"):  # fmt: skip
        options.add_argument(arg)  # --no-sandbox: Chromium refuses to run as root without it
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    if mobile:
        metrics = {"width": width, "height": height, "deviceScaleFactor": 2, "mobile": True}
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
    return driver


def open_page(driver, url: str, timeout: float = 60.0) -> None:
    """Load the page in the current tab and wait until it can take a photo; install the timer."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    WebDriverWait(driver, timeout).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#photo input[type=file]"))
    driver.execute_script(TIMER_JS)


def drop_photo(driver, path: Path) -> None:
    """Give the page's photo input a file, as a drop or the file chooser does."""
    from selenium.webdriver.common.by import By

    driver.find_element(By.CSS_SELECTOR, "#photo input[type=file]").send_keys(str(path))


def caption_text(driver) -> str:
    """The caption the page shows ('' while it shows none)."""
    return driver.execute_script(
        "const v = document.querySelector('#viewer .cam-view[data-caption]'); return v ? v.dataset.caption : '';"
    )


def word_buttons(driver) -> list:
    """The caption's words in the page: the buttons that choose which word's attention is shown."""
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, "#viewer .cam-word")


def status_text(driver) -> str:
    return driver.execute_script("const s = document.querySelector('#status'); return s ? s.innerText : '';")


def body_text(driver) -> str:
    """All text the page shows, Gradio's error toasts included."""
    return driver.execute_script("return document.body.innerText;")


def wait_for(driver, condition, timeout: float = 60.0, what: str = "the page"):
    """Poll ``condition(driver)`` every 50 ms until it returns something truthy; return that."""
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(condition, f"timed out waiting for {what}")


def clear_photo(driver) -> None:
    """Empty the photo input (its remove button, if it holds anything) and wait until the caption box is empty."""
    from selenium.webdriver.common.by import By

    for button in driver.find_elements(By.CSS_SELECTOR, "#photo button[aria-label='Remove Image']"):
        button.click()
    wait_for(driver, lambda d: caption_text(d) == "", 30, "the cleared page")


def seconds_to_caption(driver, path: Path, timeout: float = 60.0) -> tuple[str, float]:
    """Drop a photo on a page showing no caption; return its caption and the seconds until it was shown."""
    drop_photo(driver, path)
    wait_for(driver, lambda d: d.execute_script("return window.__cameye.shown !== null"), timeout, "the caption")
    t = driver.execute_script("return window.__cameye")
    return caption_text(driver), (t["shown"] - t["dropped"]) / 1000


def requested_urls(driver) -> list[str]:
    """Every URL the browser requested (or opened a WebSocket to) since the last call, from its performance log."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
        elif message["method"] == "Network.webSocketCreated":
            urls.append(message["params"]["url"])
    return urls


def off_host(urls: list[str]) -> list[str]:
    """The URLs that went anywhere but 127.0.0.1 (inline data: and blob: URLs stay in the page)."""
    return [u for u in urls if urlparse(u).scheme not in ("data", "blob") and urlparse(u).hostname != "127.0.0.1"]


def save_screenshot(driver, path: Path) -> int:
    """Save the browser window as a PNG of at most 256 colours (a few hundred KB); returns its size in bytes."""
    import io

    from PIL import Image

    sys.path.insert(0, str(REPO))
    from utils import atomic_path

    with Image.open(io.BytesIO(driver.get_screenshot_as_png())) as shot:
        small = shot.convert("RGB").quantize(colors=256)
    with atomic_path(path) as tmp:
        small.save(tmp, format="PNG", optimize=True)
    return path.stat().st_size


def attention_image(driver) -> str | None:
    """The URL of the attention layer the page shows over the photo, once loaded (None while there is none)."""
    return driver.execute_script(
        "const i = document.querySelector('#viewer .cam-overlay');"
        "return i && i.getAttribute('src') && i.complete && i.naturalWidth > 0 ? i.src : null;"
    )


def shown_word(driver) -> str:
    """The label drawn on the photo: the shown word and its place ("dog, 3 of 8")."""
    return driver.execute_script("const t = document.querySelector('#viewer .cam-tag'); return t ? t.textContent : '';")


def choose_word(driver, index: int, timeout: float = 30.0) -> str:
    """Click word ``index`` of the caption and wait for its attention layer; returns the layer's URL (a data: URL:
    the layers came with the caption)."""
    before = wait_for(driver, attention_image, timeout, "the first word's attention layer")
    word_buttons(driver)[index].click()
    if driver.execute_script("return document.querySelectorAll('#viewer .cam-word').length") == 1:
        return before
    return wait_for(
        driver,
        lambda d: (src := attention_image(d)) != before and src,
        timeout,
        f"the attention layer of word {index + 1}",
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--photos", nargs="+", type=Path, default=[skimage_photo(n) for n in PHOTOS],
                   help="photos to drop, one after another (default: six that ship inside scikit-image)")  # fmt: skip
    p.add_argument("--screenshot", type=Path, default=None, help="save the page after the first photo (PNG)")
    p.add_argument("--phone-screenshot", type=Path, default=None,
                   help="also save the page on a phone's viewport (390 x 844) after the first photo (PNG)")  # fmt: skip
    p.add_argument("--app-args", default="--device cpu", help="options for app.py, e.g. '--checkpoint x.pt'")
    args = p.parse_args(argv)
    missing = browser_missing()
    if missing:
        print(f"error: no browser: {missing}", file=sys.stderr)
        return 2
    with running_app(*args.app_args.split()) as app:
        url = app.url
        driver = chromium(*DESKTOP)
        try:
            open_page(driver, url)
            times = []
            for i, photo in enumerate(args.photos):
                if i:
                    clear_photo(driver)
                text, seconds = seconds_to_caption(driver, photo)
                times.append(seconds)
                print(f"{photo.name}: {seconds:.3f} s from drop to caption: {text}", flush=True)
                if i == 0 and args.screenshot:
                    choose_word(driver, min(2, len(text.split()) - 1))
                    time.sleep(0.5)  # let the image fade in
                    size = save_screenshot(driver, args.screenshot)
                    print(f"screenshot: {args.screenshot} ({size / 1024:.0f} KB)")
            print(f"drop to caption shown, {len(times)} photos: median {statistics.median(times):.3f} s, "
                  f"first {times[0]:.3f} s, max {max(times):.3f} s")  # fmt: skip
            if args.phone_screenshot:
                phone = chromium(*PHONE, mobile=True)
                try:
                    open_page(phone, url)
                    seconds_to_caption(phone, args.photos[0])
                    time.sleep(1.0)  # let the first word's layer draw
                    size = save_screenshot(phone, args.phone_screenshot)
                    print(f"phone screenshot: {args.phone_screenshot} ({size / 1024:.0f} KB)")
                finally:
                    phone.quit()
            strays = off_host(requested_urls(driver))
            print(f"requests to hosts other than 127.0.0.1: {len(strays)}", *strays[:5])
        finally:
            driver.quit()
    return 0


if __name__ == "__main__":
    sys.exit(main())
