"""`moesae serve`: the explorer on a build file, on 127.0.0.1 unless told otherwise."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from ..runtime import release_freed_memory

HELP = "open the explorer on a DuckDB file"


def add_address(p) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8501, help="port")


def add(sub) -> None:
    p = sub.add_parser("serve", help=HELP)
    p.add_argument("--db", required=True, help="DuckDB file made by build/analyze")
    add_address(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from explorer.launch import serve

    from ..store import open_db

    db = Path(args.db)
    if not db.exists():
        raise UserError(f"{db} does not exist; build one with `moesae build` or `moesae demo`.")
    open_db(db).close()  # a wrong or old file fails here with one sentence
    release_freed_memory()  # what a build before it (`moesae demo`) kept, while the server runs
    return serve(db, host=args.host, port=args.port)
