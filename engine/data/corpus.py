"""Text sources → fixed-length token contexts, each labelled with the domain it came from.

Sources (comma-separated in a spec): `pydoc` (the standard library's own docstrings and
`pydoc_data.topics`), `fortunes` (Debian fortunes), `bible` (KJV via `bible-kjv`),
`linux-docs` (the Linux kernel's Documentation, Debian `linux-doc-6.1`), `python-manual` (the
Python manual's reST sources, Debian `python3.11-doc`), a local .txt/.jsonl file or folder,
`hf:NAME[:split]`. Distinct domains make expert specialisation
visible, so the default mix is every built-in domain available, balanced by tokens.
"""

from __future__ import annotations

import ast
import gzip
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..paths import atomic_write, data_dir

BUILTIN_SOURCES = ("pydoc", "fortunes", "bible", "linux-docs", "python-manual")
FORTUNES_DIR = Path("/usr/share/games/fortunes")
DOC_DIR = Path("/usr/share/doc")
"""Where Debian puts linux-doc-<version>/Documentation and python3.<minor>/html/_sources."""
HF_MAX_DOCS = 50_000
_SKIP_STDLIB_DIRS = {
    "test",
    "tests",
    "idle_test",
    "site-packages",
    "dist-packages",
    "__pycache__",
    "idlelib",
    "turtledemo",
    "lib2to3",
    "ensurepip",
}


@dataclass(frozen=True)
class Document:
    text: str
    domain: str


@dataclass
class Contexts:
    tokens: np.ndarray
    """int32 [n_ctx, L]; every row starts with BOS (when the tokenizer has one)."""
    domains: list[str]
    """The domain of each context (a context never mixes domains)."""

    def __len__(self) -> int:
        return len(self.domains)


# ---- sources ---------------------------------------------------------------------------


def _pydoc_documents() -> list[Document]:
    """One document per stdlib module (its module, class and function docstrings, read with
    `ast` so nothing is imported) plus one per `pydoc_data.topics` entry. Cached as JSONL
    because parsing the stdlib takes several seconds."""
    def make() -> list[Document]:
        docs: list[Document] = []
        root = Path(sysconfig.get_paths()["stdlib"])
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(
                d for d in dirnames if d not in _SKIP_STDLIB_DIRS and not d.startswith("config-")
            )
            for fname in sorted(filenames):
                if not fname.endswith(".py"):
                    continue
                path = Path(dirpath) / fname
                text = _module_docs(path, ".".join(path.relative_to(root).with_suffix("").parts))
                if text:
                    docs.append(Document(text, "pydoc"))
        try:
            from pydoc_data.topics import topics
        except ImportError:  # some distributions strip pydoc_data; the module docstrings remain
            topics = {}
        docs += [Document(topics[k].strip(), "pydoc") for k in sorted(topics) if topics[k].strip()]
        return docs

    return _cached(f"pydoc-py{sys.version_info.major}{sys.version_info.minor}", "pydoc", make)


def _module_docs(path: Path, module: str) -> str:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
        return ""
    parts: list[str] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                if child.name.startswith("_"):
                    continue
                name = f"{prefix}.{child.name}"
                doc = ast.get_docstring(child)
                if doc:
                    parts.append(f"{name}\n{doc}")
                if isinstance(child, ast.ClassDef):
                    visit(child, name)

    doc = ast.get_docstring(tree)
    if doc:
        parts.append(f"{module}\n{doc}")
    visit(tree, module)
    return "\n\n".join(parts)


def _fortune_documents() -> list[Document]:
    if not FORTUNES_DIR.is_dir():
        raise DataError(
            f"The fortunes corpus is not installed ({FORTUNES_DIR} is missing; apt-get install fortunes)."
        )
    docs: list[Document] = []
    # Only plain files without extension: .dat are indexes, .u8 links to the same text, and the
    # offensive collection lives in the skipped 'off' folder.
    for path in sorted(FORTUNES_DIR.iterdir()):
        if not path.is_file() or path.is_symlink() or path.suffix:
            continue
        text = path.read_bytes().decode("utf-8", errors="replace")
        entry: list[str] = []
        for line in text.splitlines() + ["%"]:
            if line.strip() == "%":
                body = "\n".join(entry).strip()
                if body:
                    docs.append(Document(body, "fortunes"))
                entry = []
            else:
                entry.append(line)
    return docs


def _bible_documents() -> list[Document]:
    """One document per chapter, verse references stripped."""
    exe = shutil.which("bible")
    if exe is None:
        raise DataError(
            "The bible corpus is not installed (no 'bible' command; apt-get install bible-kjv)."
        )
    try:
        out = subprocess.run(
            [exe, "-f", "Gen1:1-Rev22:21"], capture_output=True, check=True, timeout=120
        ).stdout.decode("utf-8", errors="replace")
    except (subprocess.SubprocessError, OSError) as e:
        raise DataError(f"Running 'bible -f' failed ({e}).") from e
    chapters: dict[str, list[str]] = {}
    for line in out.splitlines():
        ref, _, verse = line.partition(" ")
        if ":" not in ref or not verse.strip():
            continue
        chapters.setdefault(ref.split(":")[0], []).append(verse.strip())
    return [Document(" ".join(v), "bible") for v in chapters.values()]


def _newest(pattern: str) -> Path | None:
    found = sorted(DOC_DIR.glob(pattern))
    return found[-1] if found else None


def _cached(name: str, domain: str, make) -> list[Document]:
    """Documents cached as JSONL under data/corpora (reading thousands of files takes seconds)."""
    cache = data_dir() / "corpora" / f"{name}.jsonl"
    if cache.exists():
        return _read_jsonl(cache, default_domain=domain)
    docs = make()
    cache.parent.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps({"text": d.text, "domain": d.domain}) + "\n" for d in docs)
    atomic_write(cache, lambda f: f.write(lines))
    return docs


def _linux_doc_documents() -> list[Document]:
    """One document per file of the kernel's Documentation (*.rst.gz)."""
    root = _newest("linux-doc-*/Documentation")
    if root is None:
        raise DataError(
            "The linux-docs corpus is not installed (no /usr/share/doc/linux-doc-*/Documentation; "
            "apt-get install linux-doc-6.1)."
        )

    def make() -> list[Document]:
        docs = []
        for f in sorted(root.rglob("*.rst.gz")):
            text = gzip.decompress(f.read_bytes()).decode("utf-8", errors="replace")
            if text.strip():
                docs.append(Document(text, "linux-docs"))
        return docs

    return _cached(f"linux-docs-{root.parent.name}", "linux-docs", make)


def _python_manual_documents() -> list[Document]:
    """One document per reST source page of the Python manual."""
    root = _newest("python3.*/html/_sources")
    if root is None:
        raise DataError(
            "The python-manual corpus is not installed (no /usr/share/doc/python3.*/html/_sources; "
            "apt-get install python3.11-doc)."
        )

    def make() -> list[Document]:
        docs = []
        for f in sorted(root.rglob("*.txt")):
            text = f.read_text(encoding="utf-8", errors="replace")
            if text.strip():
                docs.append(Document(text, "python-manual"))
        return docs

    return _cached(f"python-manual-{root.parent.parent.name}", "python-manual", make)


def _read_jsonl(path: Path, default_domain: str) -> list[Document]:
    docs = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                text = row["text"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise DataError(
                    f"Line {n} of {path} is not a JSON object with a 'text' field."
                ) from e
            if isinstance(text, str) and text.strip():
                docs.append(Document(text, str(row.get("domain") or default_domain)))
    return docs


def _file_documents(path: Path) -> list[Document]:
    files = (
        [path]
        if path.is_file()
        else sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".txt", ".jsonl"))
    )
    docs: list[Document] = []
    for f in files:
        if f.suffix == ".jsonl":
            docs += _read_jsonl(f, default_domain=f.stem)
        elif f.suffix == ".txt":
            text = f.read_text(encoding="utf-8", errors="replace")
            if text.strip():
                docs.append(Document(text, f.stem))
        else:
            raise DataError(f"Corpus file {f} is neither .txt nor .jsonl.")
    return docs


def _hf_documents(spec: str) -> list[Document]:
    name, _, split = spec[3:].partition(":")
    try:
        import datasets
    except ImportError as e:
        raise DataError(
            f"Corpus '{spec}' needs the package datasets (pip install datasets)."
        ) from e
    try:
        stream = datasets.load_dataset(name, split=split or "train", streaming=True)
        docs = []
        for row in stream:
            text = row.get("text")
            if isinstance(text, str) and text.strip():
                docs.append(Document(text, str(row.get("domain") or name)))
            if len(docs) >= HF_MAX_DOCS:
                break
    except Exception as e:  # noqa: BLE001 - offline, unknown name, bad split, no 'text' column
        msg = " ".join(str(e).split())[:160]
        raise DataError(
            f"Could not read Hugging Face dataset '{name}' (offline or unknown: {msg})."
        ) from e
    return docs


def available_sources() -> list[str]:
    """The built-in domains present on this machine, in a fixed order."""
    found = ["pydoc"]
    if FORTUNES_DIR.is_dir():
        found.append("fortunes")
    if shutil.which("bible"):
        found.append("bible")
    if _newest("linux-doc-*/Documentation") is not None:
        found.append("linux-docs")
    if _newest("python3.*/html/_sources") is not None:
        found.append("python-manual")
    return found


def load_corpus(spec: str | None = None) -> list[Document]:
    """Documents from a comma-separated spec (None → every available built-in domain).
    The order is deterministic; shuffling happens in `make_contexts`."""
    parts = [p.strip() for p in (spec.split(",") if spec else available_sources()) if p.strip()]
    docs: list[Document] = []
    for part in parts:
        if part == "pydoc":
            docs += _pydoc_documents()
        elif part == "fortunes":
            docs += _fortune_documents()
        elif part == "bible":
            docs += _bible_documents()
        elif part == "linux-docs":
            docs += _linux_doc_documents()
        elif part == "python-manual":
            docs += _python_manual_documents()
        elif part.startswith("hf:"):
            docs += _hf_documents(part)
        elif Path(part).expanduser().exists():
            docs += _file_documents(Path(part).expanduser())
        else:
            raise DataError(
                f"Unknown corpus source '{part}'; use {', '.join(BUILTIN_SOURCES)}, a .txt/.jsonl "
                "file or folder, or hf:NAME[:split]."
            )
    if not docs:
        raise DataError(f"The corpus '{spec or ','.join(parts)}' holds no text.")
    return docs


# ---- contexts --------------------------------------------------------------------------


def _domain_chunks(
    lm, docs: list[Document], body_len: int, rng: np.random.Generator, batch: int = 64
) -> Iterator[list[int]]:
    """Token chunks of exactly body_len from one domain: documents in a seeded order, joined
    with EOS, tokenised lazily so a small harvest does not tokenise the whole corpus."""
    order = rng.permutation(len(docs))
    sep = [lm.eos_token_id] if lm.eos_token_id is not None else []
    buf: list[int] = []
    for start in range(0, len(order), batch):
        texts = [docs[i].text for i in order[start : start + batch]]
        for ids in lm.tokenize(texts, prepend_bos=False):
            buf.extend(ids)
            buf.extend(sep)
            at = 0  # chunks are cut from `at` on, the rest kept once (a long document is not
            while len(buf) - at >= body_len:  # copied again for every chunk cut from it)
                yield buf[at : at + body_len]
                at += body_len
            del buf[:at]


SHUFFLE_BLOCK = 8_192
"""Contexts are shuffled within consecutive blocks of this many (1M tokens at 128 a context),
so a harvest starts its forward passes once the first block is tokenised. A harvest of at most
one block is shuffled as a whole."""


def _generate(loaded_model, docs: list[Document], context_len: int, want: int | None,
              seed: int) -> Iterator[tuple[list[int], str]]:
    """(row, domain) in generation order: domains take turns, each reading its documents in a
    seeded order, until `want` rows (None: until every domain runs out)."""
    bos = [loaded_model.bos_token_id] if loaded_model.bos_token_id is not None else []
    body_len = context_len - len(bos)
    by_domain: dict[str, list[Document]] = {}
    for d in docs:
        by_domain.setdefault(d.domain, []).append(d)
    names = sorted(by_domain)
    streams = {
        n: _domain_chunks(loaded_model, by_domain[n], body_len, np.random.default_rng([seed, i]))
        for i, n in enumerate(names)
    }
    made = 0
    live = list(names)
    while live and (want is None or made < want):
        for name in list(live):
            if want is not None and made >= want:
                break
            chunk = next(streams[name], None)
            if chunk is None:
                live.remove(name)
                continue
            made += 1
            yield bos + chunk, name


def context_blocks(
    loaded_model,
    docs: list[Document],
    context_len: int = 128,
    n_tokens: int | None = None,
    seed: int = 0,
    block: int = SHUFFLE_BLOCK,
) -> Iterator[Contexts]:
    """`make_contexts`, a block at a time: the contexts in generation order, cut into blocks of
    `block` and each block shuffled (one seeded generator, drawn block by block). Checks that
    need no tokens fail before the first block; a corpus too short fails after the last."""
    if not docs:
        raise DataError("The corpus holds no documents.")
    has_bos = loaded_model.bos_token_id is not None
    body_len = context_len - int(has_bos)
    if body_len < 1:
        raise DataError(f"Context length {context_len} is too short.")
    want = None if n_tokens is None else -(-n_tokens // body_len)
    rng = np.random.default_rng(seed)
    rows: list[list[int]] = []
    domains: list[str] = []
    made = 0

    def shuffled() -> Contexts:
        order = rng.permutation(len(rows))
        return Contexts(tokens=np.asarray(rows, dtype=np.int32)[order],
                        domains=[domains[i] for i in order])

    for row, name in _generate(loaded_model, docs, context_len, want, seed):
        rows.append(row)
        domains.append(name)
        made += 1
        if len(rows) == block:
            yield shuffled()
            rows, domains = [], []
    if made == 0:
        raise DataError(f"The corpus is shorter than one context of {context_len} tokens.")
    if want is not None and made < want:
        raise DataError(
            f"The corpus holds {made * body_len:,} tokens (in {context_len}-token contexts), "
            f"fewer than the {n_tokens:,} asked for; ask for fewer --tokens or add text."
        )
    if rows:
        yield shuffled()


def make_contexts(
    loaded_model,
    docs: list[Document],
    context_len: int = 128,
    n_tokens: int | None = None,
    seed: int = 0,
    block: int = SHUFFLE_BLOCK,
) -> Contexts:
    """Fixed-length contexts, BOS first, enough for `n_tokens` non-BOS tokens (None → all).
    Domains take turns, so they are balanced by tokens until the smaller ones run out; the
    result is shuffled by `seed` within blocks of `block` contexts. Same docs, model, seed and
    block → same contexts."""
    blocks = list(context_blocks(loaded_model, docs, context_len, n_tokens, seed, block))
    return Contexts(tokens=np.concatenate([b.tokens for b in blocks]),
                    domains=[d for b in blocks for d in b.domains])
