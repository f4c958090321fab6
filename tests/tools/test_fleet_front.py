"""The fleet front's body limit: oversize request bodies are refused before they are buffered, by anyone."""

import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import certifi
import httpx
import psutil
import pytest
from starlette.testclient import TestClient

from alignfl_app.tools.fleet_front import BodyBudget, BodyTooLarge, create_app
from tests.conftest import PROJECT

PATH = "/v1/fleet/push-messages"
MIB = 2**20


def chunks(total_mib: int, chunk: int = MIB):
    """A body streamed without a Content-Length (as a sender that hides its size would)."""
    block = b"\0" * chunk
    for _ in range(total_mib * MIB // chunk):
        yield block


@pytest.fixture
def client(tmp_path):
    app = create_app("127.0.0.1:1", Path(certifi.where()), tmp_path, max_body_mb=8)  # no SuperLink behind it
    with TestClient(app) as c:
        yield c


def test_a_body_announced_past_the_limit_is_refused_unread(client):
    reply = client.post(PATH, content=b"\0" * (9 * MIB))
    assert reply.status_code == 413 and "at most 8 MiB" in reply.text


def test_a_streamed_body_past_the_limit_is_refused_and_one_within_it_forwarded(client):
    assert client.post(PATH, content=chunks(16)).status_code == 413
    assert client.post(PATH, content=chunks(4)).status_code == 503  # within it: forwarded (nobody there)


def test_four_quarter_gigabyte_bodies_at_once_raise_the_front_by_less_than_the_limit_plus_64_mib(tmp_path):
    """The front in its own process on a real socket (the test client would buffer the bodies itself)."""
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, uvicorn; from pathlib import Path; from alignfl_app.tools.fleet_front import create_app; "
            f"uvicorn.run(create_app('127.0.0.1:1', Path({certifi.where()!r}), Path({str(tmp_path)!r}), 64), "
            f"host='127.0.0.1', port={port}, log_level='error')",
        ],
        cwd=PROJECT,
    )
    try:
        wait_for_port(port)
        process = psutil.Process(server.pid)
        base, peak = process.memory_info().rss, [0]
        done = threading.Event()

        def watch() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], process.memory_info().rss)
                time.sleep(0.02)

        def send(_: int) -> int | str:
            try:
                return httpx.post(f"http://127.0.0.1:{port}{PATH}", content=chunks(256), timeout=120).status_code
            except httpx.HTTPError as exc:  # the front closed the connection while the body was still coming
                return type(exc).__name__

        watcher = threading.Thread(target=watch)
        watcher.start()
        with ThreadPoolExecutor(4) as pool:
            outcomes = list(pool.map(send, range(4)))
        done.set()
        watcher.join()
        assert all(o == 413 or isinstance(o, str) for o in outcomes), outcomes
        assert (peak[0] - base) / MIB < 64 + 64, f"front grew by {(peak[0] - base) / MIB:.0f} MiB"
    finally:
        server.terminate()
        server.wait(timeout=30)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"the front did not listen on {port}")


def test_the_budget_is_shared_by_every_request_in_flight():
    budget = BodyBudget(10)
    budget.take(6)
    with pytest.raises(BodyTooLarge):
        budget.take(5)  # another request's body: together past the limit
    budget.give_back(6)
    budget.take(10)
    assert budget.held == 10
