"""What the browser tests share: Debian Chromium through Playwright, a free port, and waiting
for a Streamlit server to answer."""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run"]
needs_chromium = pytest.mark.skipif(
    not Path(CHROMIUM).exists(),
    reason=f"Debian Chromium is not installed at {CHROMIUM} (apt-get install chromium)",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, seconds: float = 60) -> None:
    """Return once the server at `url` answers /_stcore/health; fail the test if it dies or
    does not answer in time."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            out = proc.stdout.read().decode() if proc.stdout and proc.poll() is not None else ""
            proc.kill()
            pytest.fail(f"explorer did not start: {out[-2000:]}")
        time.sleep(0.3)


def launch(pw):
    """Debian Chromium, headless, with the flags this machine needs."""
    return pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
