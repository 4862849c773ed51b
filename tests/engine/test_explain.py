"""`moesae explain` against a local OpenAI-compatible server (a thread in this process)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from engine.cli.main import main
from engine.errors import ConfigError
from engine.explain import parse_features
from engine.store.notes import Notes
from tests.engine.store.test_store import write_small


@pytest.fixture
def server():
    seen: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append({"path": self.path, "auth": self.headers.get("Authorization"), **body})
            if body["model"] == "broken":
                self.send_response(500)
                self.end_headers()
                self.wfile.write(b"model exploded")
                return
            answer = {"choices": [{"message": {"role": "assistant", "content": ' "Sentence ends." '}}]}
            data = json.dumps(answer).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1", seen
    srv.shutdown()


def test_explain_writes_notes_and_sends_the_examples(tmp_path, server, capsys, monkeypatch):
    url, seen = server
    db = tmp_path / "b.duckdb"
    write_small(db)
    monkeypatch.setenv("MY_KEY", "sk-test")
    rc = main(["--quiet", "explain", "--db", str(db), "--sae", "s", "--endpoint", url, "--llm", "tiny",
               "--api-key-env", "MY_KEY", "--features", "0-1"])
    assert rc == 0
    assert "explained 1 features" in capsys.readouterr().out  # feature 1 has no examples
    (req,) = seen
    assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer sk-test"
    user = req["messages"][1]["content"]
    # top examples first (activation 1.0 at position 1 of context 0), the firing token marked
    assert user.index("it«'s»[1.00]") < user.index("In the «beginning»[0.50] God,")
    assert "'Beginning'" in user
    r = Notes(db).get("s", 0)
    assert (r["explanation"], r["explained_by"]) == ("Sentence ends", "tiny")
    # already explained: skipped unless --overwrite
    main(["--quiet", "explain", "--db", str(db), "--sae", "s", "--endpoint", url, "--llm", "tiny",
          "--features", "0"])
    assert len(seen) == 1
    main(["--quiet", "explain", "--db", str(db), "--sae", "s", "--endpoint", url, "--llm", "tiny",
          "--features", "0", "--overwrite"])
    assert len(seen) == 2


def test_explain_errors_are_one_sentence(tmp_path, server, capsys, monkeypatch):
    url, seen = server
    db = tmp_path / "b.duckdb"
    write_small(db)
    monkeypatch.delenv("MOESAE_EXPLAIN_URL", raising=False)
    assert main(["explain", "--db", str(db), "--sae", "s"]) == 2
    assert "nothing was sent" in capsys.readouterr().err and seen == []
    assert main(["explain", "--db", str(db), "--sae", "nope", "--endpoint", url, "--llm", "x"]) == 2
    assert "no SAE named 'nope'" in capsys.readouterr().err
    assert main(["explain", "--db", str(db), "--sae", "s", "--endpoint", url, "--llm", "broken",
                 "--features", "0"]) == 2
    err = capsys.readouterr().err
    assert "answered HTTP 500: model exploded" in err and "Traceback" not in err
    assert main(["explain", "--db", str(db), "--sae", "s", "--endpoint", "http://127.0.0.1:9/v1",
                 "--llm", "x", "--features", "0", "--request-timeout", "5"]) == 2
    assert "Could not reach the explainer" in capsys.readouterr().err
    assert Notes(db).get("s", 0) is None


def test_parse_features():
    assert parse_features("0-2, 5,5", 8) == [0, 1, 2, 5]
    with pytest.raises(ConfigError, match="outside 0–7"):
        parse_features("3-9", 8)
    with pytest.raises(ConfigError, match="ids and ranges"):
        parse_features("a-b", 8)
