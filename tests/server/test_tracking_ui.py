"""TensorBoard as a user sees it: a finished run's event files served by ``tensorboard`` and opened in headless
chromium, driven over the DevTools protocol; the accuracy chart and the sample grid must be on the page and loaded.
A screenshot is kept in results/ui-artefacts/tensorboard.png."""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.sync.client import ClientConnection, connect

from alignfl_app.server.metrics import RunRecorder
from tests.server.test_tracking import CLASSES, CONFIG, events, play_round

CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")

PROJECT = Path(__file__).resolve().parents[2]
ARTEFACT = PROJECT / "results" / "ui-artefacts" / "tensorboard.png"
ACCURACIES = (0.55, 0.65, 0.8125)  # the last one is what the chart's data table must show
STARTUP_S = 20.0
RENDER_S = 20.0  # a few seconds here; bounded so a broken UI fails well within two minutes

# The time-series dashboard (Angular, no shadow DOM on these parts): one card-view per tag, its name in
# tb-truncated-path; a scalar card draws its line on a canvas and lists the last point in a data table.
SCALAR_CARD_JS = """(() => {
  const card = [...document.querySelectorAll('scalar-card')].find(
    c => c.querySelector('tb-truncated-path')?.textContent.trim() === %s && c.getBoundingClientRect().height > 0);
  if (!card) return null;
  const canvas = card.querySelector('line-chart canvas');
  const box = canvas ? canvas.getBoundingClientRect() : null;
  const head = [...card.querySelectorAll('tb-data-table-header-cell')].map(x => x.innerText.trim());
  const rows = [...card.querySelectorAll('tb-data-table-content-row')].map(r => Object.fromEntries(
    [...r.querySelectorAll('tb-data-table-content-cell')].map((x, i) => [head[i], x.innerText.trim()])));
  return {canvas: box ? [box.width, box.height] : null, rows};
})()"""
IMAGE_CARD_JS = """(() => {
  const card = [...document.querySelectorAll('card-view')].find(
    c => c.querySelector('tb-truncated-path')?.textContent.trim() === %s && c.getBoundingClientRect().height > 0);
  const img = card?.querySelector('img');
  if (!img) return null;
  return {complete: img.complete, width: img.naturalWidth, height: img.naturalHeight, text: card.innerText};
})()"""


def free_port() -> int:
    """A loopback port nothing listens on now (the OS picks it), so parallel runs do not collide."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(probe: Callable[[], Any], ok: Callable[[Any], bool], timeout: float, what: str) -> Any:
    """``probe()`` until ``ok`` holds, at most ``timeout`` seconds: a UI that never gets there fails, not hangs."""
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, urllib.error.URLError):
            last = probe()
            if ok(last):
                return last
        time.sleep(0.25)
    pytest.fail(f"{what}: not within {timeout:.0f} s; last seen: {str(last)[:1500]}")


@contextlib.contextmanager
def process(args: list[str], log: Path) -> Iterator[subprocess.Popen]:
    """``args`` running in its own session, its output in ``log``; it and its children end when the test does."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
        try:
            yield proc
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)


def alive(proc: subprocess.Popen, log: Path) -> bool:
    """True while ``proc`` runs; one that exited fails the test at once, with the end of its output."""
    if proc.poll() is not None:
        pytest.fail(f"{proc.args[0]} exited with {proc.returncode}: {log.read_text(errors='replace')[-1500:]}")
    return True


def http_get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as reply:
        return reply.read()


class Page:
    """One browser tab over the DevTools protocol: commands by id, events in between ignored."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.ids = itertools.count(1)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        n = next(self.ids)
        self.ws.send(json.dumps({"id": n, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=30))
            if msg.get("id") == n:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    def eval(self, js: str) -> Any:
        result = self.call("Runtime.evaluate", expression=js, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def press(self, key: str, code: int) -> None:
        for kind in ("keyDown", "keyUp"):
            self.call("Input.dispatchKeyEvent", type=kind, key=key, code=key, windowsVirtualKeyCode=code)

    def screenshot(self) -> bytes:
        return base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])


def keep_screenshot(page: Page, tmp_path: Path) -> bytes:
    """The page as a PNG, kept as the test's artefact (results/ is not versioned) and in ``tmp_path``."""
    png = page.screenshot()
    ARTEFACT.parent.mkdir(parents=True, exist_ok=True)
    ARTEFACT.write_bytes(png)
    (tmp_path / "tensorboard.png").write_bytes(png)
    return png


def finished_run(folder: Path) -> Path:
    """The event files of a three-round run as the server leaves them, from the recorder the server uses."""
    rec = RunRecorder(folder, CONFIG, class_names=CLASSES)
    for n, accuracy in enumerate(ACCURACIES, start=1):
        play_round(rec, n, accuracy)
    rec.finish()
    return folder


@contextlib.contextmanager
def tensorboard(logdir: Path, log: Path) -> Iterator[str]:
    """``tensorboard`` serving ``logdir`` on loopback, as a user starts it; yields its address once it has read the
    scalars (the page asks for the tags once, so a page opened earlier could stay empty until its next reload)."""
    port = free_port()
    args = [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1"]
    with process([*args, "--port", str(port)], log) as proc:
        url = f"http://127.0.0.1:{port}"
        wait_for(
            lambda: alive(proc, log) and json.loads(http_get(f"{url}/data/plugin/scalars/tags")),
            lambda runs: any(runs.values()),
            STARTUP_S,
            f"tensorboard at {url} with the run's scalars",
        )
        yield url


@contextlib.contextmanager
def browser(profile: Path, log: Path) -> Iterator[Page]:
    """Headless chromium (no sandbox: CI runs as root) with its DevTools port on loopback; yields its blank tab."""
    port = free_port()
    args = [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run"]
    args += [f"--remote-debugging-port={port}", f"--user-data-dir={profile}", "--window-size=1400,1000", "about:blank"]
    with process(args, log) as proc:
        targets = wait_for(
            lambda: alive(proc, log) and json.loads(http_get(f"http://127.0.0.1:{port}/json/list")),
            lambda ts: any(t["type"] == "page" for t in ts),
            STARTUP_S,
            "chromium's DevTools",
        )
        url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
        with connect(url, max_size=None, open_timeout=10) as ws:
            yield Page(ws)


def test_the_accuracy_chart_and_sample_grid_show_in_tensorboard(tmp_path):
    run = finished_run(tmp_path / "run")
    grid = events(run).Images("samples")[-1]
    with (
        tensorboard(run / "tensorboard", tmp_path / "tensorboard.log") as url,
        browser(tmp_path / "profile", tmp_path / "chromium.log") as page,
    ):
        try:
            page.call("Page.navigate", url=f"{url}/#timeseries")
            chart = wait_for(
                lambda: page.eval(SCALAR_CARD_JS % json.dumps("global/accuracy")),
                lambda c: c and c["canvas"] and min(c["canvas"]) > 0 and c["rows"],
                RENDER_S,
                "the global/accuracy chart",
            )
            # the sample grid's group starts folded: filter the tags as a user would, both cards stay in view
            page.eval("document.querySelector('metrics-tag-filter input').focus()")
            page.call("Input.insertText", text="global/accuracy|samples")
            image = wait_for(
                lambda: page.eval(IMAGE_CARD_JS % json.dumps("samples")),
                lambda i: i and i["complete"] and i["width"] > 0,
                RENDER_S,
                "the samples image",
            )
            page.press("Escape", 27)  # the tag suggestions would cover the charts in the screenshot
            time.sleep(0.5)
        except BaseException:
            with contextlib.suppress(Exception):
                keep_screenshot(page, tmp_path)  # what the page showed when it failed
            raise
        png = keep_screenshot(page, tmp_path)
    assert [(r.get("Run"), r.get("Value"), r.get("Step")) for r in chart["rows"]] == [(".", "0.8125", "3")]
    assert (image["width"], image["height"]) == (grid.width, grid.height) and "Step 3" in image["text"]
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
