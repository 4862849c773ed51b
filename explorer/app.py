"""MoE-SAE Explorer: the Streamlit entry point.

    streamlit run explorer/app.py -- --db data/demo.duckdb     (or `moesae serve --db FILE`)

Opens the build read-only, lets the reader pick an SAE in the sidebar, and runs the chosen
page. A build that cannot be read (missing, not a build, another schema version, empty)
gets a message page with one clear sentence instead of a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path

# `streamlit run explorer/app.py` puts explorer/ (not the repository) on sys.path.
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import streamlit as st  # noqa: E402

from engine.errors import DataError  # noqa: E402
from explorer import data, session  # noqa: E402

st.set_page_config(page_title="MoE-SAE Explorer", page_icon=":material/hub:", layout="wide")


def message_page(title: str, body: str) -> None:
    """A page that only explains why there is nothing to show."""

    def show() -> None:
        st.title("MoE-SAE Explorer")
        st.error(f"**{title}** {body}")
        st.markdown(
            "Build a file with `moesae build` (or `moesae demo`), then open it with "
            "`moesae serve --db FILE`."
        )

    st.navigation([st.Page(show, title="Explorer", url_path="message")], position="hidden").run()
    st.stop()


path = data.db_path_from_argv()
if path is None:
    message_page("No build file given.", "Start the explorer with `moesae serve --db FILE`.")
try:
    db = data.db_key(path)
    saes = data.list_saes(db)
except DataError as exc:
    message_page("This file cannot be opened.", str(exc))
if not saes:
    message_page("This build is empty.", f"{db[0]} holds no analysed SAE yet.")

session.set_db(db)
st.sidebar.caption(f"Build: `{Path(db[0]).name}`")
chosen = session.choose_sae(saes)

st.navigation(session.page_list()).run()
