import json
from collections import Counter

import numpy as np
import pytest

from engine.data.corpus import Document, available_sources, load_corpus, make_contexts
from engine.errors import DataError


def test_default_mix_is_balanced_and_deterministic(tiny_model):
    docs = load_corpus(None)
    assert {d.domain for d in docs} == set(available_sources())
    a = make_contexts(tiny_model, docs, context_len=32, n_tokens=3100, seed=0)
    b = make_contexts(tiny_model, docs, context_len=32, n_tokens=3100, seed=0)
    c = make_contexts(tiny_model, docs, context_len=32, n_tokens=3100, seed=1)
    assert np.array_equal(a.tokens, b.tokens) and a.domains == b.domains
    assert not np.array_equal(a.tokens, c.tokens)
    assert a.tokens.dtype == np.int32 and a.tokens.shape == (100, 32)  # ceil(3100 / 31)
    assert (a.tokens[:, 0] == tiny_model.bos_token_id).all()
    counts = Counter(a.domains)
    assert set(counts) == set(available_sources())
    assert max(counts.values()) - min(counts.values()) <= 1


def test_each_context_keeps_its_domain(tiny_model, tmp_path):
    (tmp_path / "cats.txt").write_text("Cats purr and sleep all day long. " * 40)
    rows = [
        {"text": "Dogs bark at the mailman every morning. " * 20, "domain": "dogs"},
        {"text": "Birds sing at dawn. " * 30},
    ]
    (tmp_path / "animals.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    docs = load_corpus(str(tmp_path))
    assert Counter(d.domain for d in docs) == {"cats": 1, "dogs": 1, "animals": 1}
    ctx = make_contexts(tiny_model, docs, context_len=16, seed=0)
    for row, domain in zip(ctx.tokens, ctx.domains, strict=True):
        text = tiny_model.decode(row)
        word = {"cats": "Cats", "dogs": "Dogs", "animals": "Birds"}[domain]
        assert word.lower() in text.lower()


def test_builtin_sources_are_clean():
    fortunes = load_corpus("fortunes") if "fortunes" in available_sources() else []
    assert all("\n%\n" not in d.text and d.text.strip() for d in fortunes[:2000])
    if "bible" in available_sources():
        bible = load_corpus("bible")
        assert len(bible) == 1189 and bible[0].text.startswith("In the beginning God created")
    pydoc = load_corpus("pydoc")
    assert len(pydoc) > 100 and all(d.domain == "pydoc" for d in pydoc)


def test_empty_corpus_is_a_data_error(tiny_model, tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(DataError, match="holds no text"):
        load_corpus(str(tmp_path / "empty.txt"))
    with pytest.raises(DataError, match="Unknown corpus source 'nope'"):
        load_corpus("nope")
    with pytest.raises(DataError):
        make_contexts(tiny_model, [], context_len=16)
    with pytest.raises(DataError, match="shorter than one context"):
        make_contexts(tiny_model, [Document("hi", "x")], context_len=64)


def test_bad_jsonl_is_a_data_error(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"body": "no text field"}\n')
    with pytest.raises(DataError, match="Line 1 of"):
        load_corpus(str(tmp_path / "bad.jsonl"))


@pytest.mark.parametrize("name", ["linux-docs", "python-manual"])
def test_debian_documentation_domains(name):
    if name not in available_sources():
        pytest.skip(f"{name} is not installed here (make system-deps installs it as root)")
    docs = load_corpus(name)
    assert len(docs) > 400 and {d.domain for d in docs} == {name}
    assert sum(len(d.text) for d in docs) > 5_000_000
    again = load_corpus(name)  # from the JSONL cache the first call wrote
    assert [d.text for d in again] == [d.text for d in docs]


def test_unknown_source_lists_the_built_in_ones():
    with pytest.raises(DataError, match="linux-docs, python-manual"):
        load_corpus("wikipedia")


def test_a_corpus_too_small_for_the_tokens_asked_says_how_many_it_holds(tiny_model):
    docs = [Document("one two three four five six seven eight nine ten " * 40, "tiny")]
    with pytest.raises(DataError, match=r"holds [\d,]+ tokens .* fewer than the 100,000 asked for"):
        make_contexts(tiny_model, docs, context_len=32, n_tokens=100_000)
