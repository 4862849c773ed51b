"""Feature explanations by a language model: `moesae explain`.

For each chosen feature the prompt shows its top-activating examples (a window of tokens
around the strongest one, that token marked «like this», with its activation) and the output
tokens its decoder direction promotes; the model answers with a short phrase. Any server that
speaks the OpenAI chat-completions protocol works (OpenAI, a local vLLM, llama.cpp or Ollama
server); nothing is sent anywhere unless an endpoint is given. Explanations are written to the
build's notes file (engine.store.notes), where the explorer shows them beside the feature.
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError, DataError
from .store import open_db
from .store.notes import Notes

SYSTEM_PROMPT = (
    "You explain features of a sparse autoencoder trained on a language model's activations. "
    "You are shown text snippets where the feature fires most strongly (the token it fires on "
    "is marked «like this», with the activation in brackets) and the output tokens it promotes. "
    "Answer with one short phrase (at most 12 words) naming what the feature detects. No preamble."
)


@dataclass
class ExplainConfig:
    """Which features to explain, and which chat-completions server explains them."""

    endpoint: str = field(default="", metadata={"metavar": "URL"})
    """Base URL of an OpenAI-compatible API, e.g. http://localhost:8000/v1 (default: $MOESAE_EXPLAIN_URL). Nothing is sent without one."""
    llm: str = field(default="", metadata={"metavar": "NAME"})
    """The model the server should use (default: $MOESAE_EXPLAIN_MODEL)."""
    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the API key (none needed for most local servers)."""
    features: str = field(default="", metadata={"metavar": "LIST"})
    """Features to explain, e.g. 0-99,120 (default: the --top most frequently firing)."""
    top: int = 50
    """Without --features: explain this many features, most frequently firing first."""
    examples: int = 10
    """Top-activating examples shown per feature."""
    window: int = 12
    """Tokens shown either side of the marked one."""
    overwrite: bool = False
    """Explain again features that already have an explanation."""
    request_timeout: float = 60.0
    """Seconds to wait for each answer."""


def parse_features(spec: str, width: int) -> list[int]:
    """'0-9,20' → [0 … 9, 20]; one sentence for anything else or out of range."""
    out: list[int] = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        try:
            lo, _, hi = part.partition("-")
            a, b = int(lo), int(hi or lo)
        except ValueError:
            raise ConfigError(f"--features takes ids and ranges like 0-99,120; got {part!r}.") from None
        if not 0 <= a <= b < width:
            raise ConfigError(f"Feature range {part} is outside 0–{width - 1}.")
        out.extend(range(a, b + 1))
    return sorted(set(out))


def feature_prompt(store, sae: str, feature: int, examples: int, window: int) -> str | None:
    """The user message for one feature, or None when it never fires."""
    ex = store.feature_examples(sae, feature, "top", examples)
    if not ex:
        return None
    lines = ["Top-activating snippets:"]
    for e in ex:
        p = e["position"]
        toks = e["tokens"][max(0, p - window) : p + window + 1]
        mark = min(p, window)
        text = "".join(_marked(t, e["activation"]) if i == mark else t for i, t in enumerate(toks))
        lines.append("- " + " ".join(text.split()))
    info = store.feature(sae, feature)
    if info is not None and info.logit_pos:
        lines.append("Output tokens it promotes: " + ", ".join(repr(t) for t, _ in info.logit_pos[:10]))
    return "\n".join(lines)


def _marked(token: str, act: float) -> str:
    """' word' → ' «word»[1.00]' (the token's leading space stays outside the marks)."""
    core = token.lstrip()
    return f"{token[: len(token) - len(core)]}«{core}»[{act:.2f}]"


def chat(endpoint: str, llm: str, key: str | None, system: str, user: str, timeout: float) -> str:
    """One chat-completions request; the answer's text. Errors are one sentence."""
    url = endpoint.rstrip("/") + "/chat/completions"
    body = json.dumps({"model": llm, "temperature": 0, "max_tokens": 40,
                       "messages": [{"role": "system", "content": system},
                                    {"role": "user", "content": user}]}).encode()
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url, body, headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            payload = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read()[:200].decode("utf-8", "replace").strip()
        raise DataError(f"The explainer at {url} answered HTTP {exc.code}" +
                        (f": {detail}" if detail else "") + ".") from None
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DataError(f"Could not reach the explainer at {url} ({reason}).") from None
    except json.JSONDecodeError:
        raise DataError(f"The explainer at {url} did not answer with JSON.") from None
    try:
        text = payload["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise DataError(f"The explainer at {url} answered without choices[0].message.content.") from None
    return " ".join(str(text).split()).strip(" .\"'")


def explain(db: str | os.PathLike, sae: str, cfg: ExplainConfig, progress: bool = True) -> dict:
    """Explain the chosen features of `sae`; returns counts (explained, skipped, silent)."""
    endpoint = cfg.endpoint or os.environ.get("MOESAE_EXPLAIN_URL", "")
    llm = cfg.llm or os.environ.get("MOESAE_EXPLAIN_MODEL", "")
    if not endpoint or not llm:
        raise ConfigError("No explainer configured: pass --endpoint URL and --llm NAME (any "
                          "OpenAI-compatible chat server, e.g. a local vLLM or llama.cpp), or set "
                          "MOESAE_EXPLAIN_URL and MOESAE_EXPLAIN_MODEL; nothing was sent.")
    key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
    with open_db(db) as store:
        info = store.sae_info(sae)
        if info is None:
            names = ", ".join(r["sae"] for r in store.list_saes())
            raise ConfigError(f"This build has no SAE named {sae!r}; it has: {names}.")
        if cfg.features:
            chosen = parse_features(cfg.features, info.width)
        else:
            pts = store.map_points(sae)
            order = sorted(range(len(pts["feature"])), key=lambda i: -float(pts["density"][i]))
            chosen = [int(pts["feature"][i]) for i in order if pts["density"][i] > 0][: cfg.top]
        notes = Notes(db, store.build_hash())
        done = skipped = silent = 0
        t0 = time.perf_counter()
        for n, f in enumerate(chosen, 1):
            have = notes.get(sae, f)
            if have and have.get("explanation") and not cfg.overwrite:
                skipped += 1
                continue
            prompt = feature_prompt(store, sae, f, cfg.examples, cfg.window)
            if prompt is None:
                silent += 1
                continue
            text = chat(endpoint, llm, key, SYSTEM_PROMPT, prompt, cfg.request_timeout)
            notes.set_explanation(sae, f, text, llm)
            done += 1
            if progress:
                rate = n / max(time.perf_counter() - t0, 1e-9)
                print(f"[{n}/{len(chosen)}] feature {f}: {text}  ({rate:.1f} features/s, ETA "
                      f"{(len(chosen) - n) / rate:.0f} s)", file=sys.stderr)
    return {"explained": done, "skipped": skipped, "silent": silent, "notes": str(Path(notes.path))}
