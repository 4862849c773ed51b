"""`moesae serve`: run the explorer with Streamlit on a build file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

APP = Path(__file__).resolve().parent / "app.py"


def command(db_path: str | os.PathLike, host: str = "127.0.0.1", port: int = 8501,
            open_browser: bool = False) -> list[str]:
    """The streamlit command line that serves `db_path` (what `serve` runs)."""
    return [
        sys.executable, "-m", "streamlit", "run", str(APP),
        "--server.address", host,
        "--server.port", str(int(port)),
        "--server.headless", "false" if open_browser else "true",
        "--browser.gatherUsageStats", "false",
        "--client.toolbarMode", "minimal",
        "--", "--db", str(Path(db_path).expanduser().resolve()),
    ]


def serve(db_path: str | os.PathLike, host: str = "127.0.0.1", port: int = 8501,
          open_browser: bool = False) -> int:
    """Serve the explorer on http://host:port until interrupted; returns Streamlit's exit code.
    Binds to localhost unless told otherwise (the explorer has no authentication)."""
    print(f"MoE-SAE Explorer on http://{host}:{port}  (build: {db_path}; Ctrl-C to stop)", flush=True)
    proc = subprocess.Popen(command(db_path, host, port, open_browser))

    def stop(signum, frame):  # SIGTERM (a supervisor, `kill`) stops the server like Ctrl-C
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        try:
            return proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
