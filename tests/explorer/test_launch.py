"""`moesae serve` on a build: SIGTERM (a supervisor's or a user's `kill`) stops Streamlit and
frees the port; and no page carries a bare string that Streamlit's magic would render."""

from __future__ import annotations

import ast
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from .browser import free_port, wait_healthy

VIEWS = Path(__file__).resolve().parents[2] / "explorer" / "views"


def test_sigterm_stops_the_server_and_frees_the_port(build_db):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine.cli", "serve", "--db", str(build_db), "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc)
        os.kill(proc.pid, signal.SIGTERM)  # the moesae process only, as `kill PID` does
        proc.wait(timeout=30)
        deadline = time.time() + 10
        while time.time() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) != 0:
                    break
            time.sleep(0.2)
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, "Streamlit still listens after SIGTERM"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_no_page_has_a_bare_string_that_streamlit_would_render():
    """Streamlit's magic writes any bare expression statement of a page script; only the
    module docstring may stand alone."""
    for page in sorted(VIEWS.glob("*.py")):
        body = ast.parse(page.read_text()).body
        for node in body[1:]:
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
                raise AssertionError(f"{page.name}:{node.lineno} renders {node.value.value[:60]!r}")
