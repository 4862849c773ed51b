"""engine.store: atomic builds, schema checks, and the documented query shapes."""

from __future__ import annotations

import duckdb
import numpy as np
import pytest

from engine.errors import DataError
from engine.store import (
    SCHEMA_VERSION,
    BuildWriter,
    FeatureInfo,
    SAEInfo,
    SteeringCache,
    open_db,
    ragged_list_column,
)

M, N, L = 8, 2, 5


def write_small(path, tag="v1", fail_midway=False):
    with BuildWriter(path, meta={"tag": tag}) as w:
        w.insert("models", {"name": ["m"], "hook": ["h"], "d_model": np.array([4]),
                            "n_layers": np.array([2]), "info": ['{"a": 1}']})
        w.insert("saes", {"sae": ["s"], "model": ["m"], "hook": ["h"], "arch": ["switch"],
                          "width": np.array([M]), "experts": np.array([N]), "active": np.array([1]),
                          "k": np.array([2]), "config": ['{"arch": "switch"}'],
                          "metrics": ['{"fvu": 0.25}'], "training_log": ['[{"step": 1}]'],
                          "n_tokens": np.array([10]), "n_contexts": np.array([2]),
                          "hist_edges": np.array([[0.1, 1.0, 10.0]]), "load_entropy": np.array([0.9]),
                          "map_method": ["pca"], "logit_note": ["scale only"]})
        w.insert("contexts", {"id": np.array([0, 1]), "domain": ["pydoc", "bible"],
                              "token_ids": np.array([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]]),
                              "tokens": [["it", "'s", " a", " test", "."], ["In", " the", " beginning", " God", ","]]})
        if fail_midway:
            raise RuntimeError("crash in the middle of a build")
        tops = [f"tok{f}" if f != 3 else "it's · a" for f in range(M)]
        w.insert("features", {"sae": ["s"] * M, "feature": np.arange(M), "expert": np.arange(M) // 4,
                              "n_fires": np.arange(M), "density": np.arange(M) / 10, "mean_act": np.ones(M),
                              "max_act": np.arange(M) + 1.0, "x": np.zeros(M, np.float32),
                              "y": np.ones(M, np.float32), "cluster": np.zeros(M, np.int32),
                              "max_cos": np.full(M, 0.5, np.float32), "top_tokens": tops,
                              "preferred_domain": ["pydoc"] * M, "domain_counts": ['{"pydoc": 2}'] * M,
                              "hist": np.ones((M, 2), np.int64),
                              "logit_pos": [["Beginning", "x"]] * M, "logit_pos_val": np.ones((M, 2), np.float32),
                              "logit_neg": [["y", "z"]] * M, "logit_neg_val": -np.ones((M, 2), np.float32)})
        w.insert("neighbours", {"sae": ["s"] * 2, "feature": np.array([0, 0]), "rank": np.array([1, 0]),
                                "other": np.array([2, 5]), "cos": np.array([0.3, 0.95], np.float32)})
        w.insert("bands", {"sae": ["s"] * 2, "feature": np.array([0, 0]), "band": np.array([0, 1]),
                           "lo": np.array([0.0, 0.5], np.float32), "hi": np.array([0.5, 1.0], np.float32),
                           "n": np.array([3, 1]), "share": np.array([0.75, 0.25])})
        w.insert("examples", {"sae": ["s"] * 3, "feature": np.array([0, 0, 0]), "kind": ["top", "band", "top"],
                              "band": np.array([-1, 1, -1]), "rank": np.array([1, 0, 0]),
                              "context": np.array([1, 0, 0]), "position": np.array([2, 3, 1]),
                              "activation": np.array([0.5, 0.9, 1.0], np.float32),
                              "act_pos": ragged_list_column(np.array([2, 3, 1, 4], np.int16), np.array([1, 1, 2])),
                              "act_val": ragged_list_column(np.array([0.5, 0.9, 1.0, 0.2], np.float32), np.array([1, 1, 2]))})
        w.insert("routing", {"sae": ["s"], "context": np.array([0]),
                             "experts": np.array([[0, 1, 1, -1, 0]], np.int16),
                             "weights": np.array([[0.9, 0.8, 0.7, 0.0, 0.6]], np.float32)})
        w.insert("duplicate_pairs", {"sae": ["s"] * 2, "a": np.array([0, 1]), "b": np.array([5, 2]),
                                     "cos": np.array([0.95, 0.92], np.float32), "expert_a": np.array([0, 0]),
                                     "expert_b": np.array([1, 0]), "within": np.array([False, True])})
        w.insert("experts", {"sae": ["s"] * N, "expert": np.arange(N), "n_features": np.full(N, 4),
                             "n_alive": np.full(N, 4), "load_top1": np.array([0.6, 0.4]),
                             "load_topk": np.array([0.6, 0.4]), "mean_confidence": np.array([0.7, 0.8]),
                             "domain_entropy": np.array([0.5, 0.5]),
                             "top_tokens": ['[{"token": "a", "count": 3, "share": 0.5}]'] * N})
        w.insert("expert_domain_load", {"sae": ["s"] * 2, "expert": np.array([0, 1]), "domain": ["pydoc", "pydoc"],
                                        "n_tokens": np.array([5, 5]), "load_top1": np.array([0.6, 0.4]),
                                        "load_topk": np.array([0.6, 0.4])})
        w.insert("expert_similarity", {"sae": ["s"] * 4, "i": np.array([0, 0, 1, 1]), "j": np.array([0, 1, 0, 1]),
                                       "value": np.array([1.0, 0.2, 0.3, 1.0])})


def test_queries_return_documented_shapes(tmp_path):
    db = tmp_path / "b.duckdb"
    write_small(db)
    with open_db(db) as s:
        assert s.list_saes()[0]["sae"] == "s" and s.list_saes()[0]["width"] == M
        info = s.sae_info("s")
        assert isinstance(info, SAEInfo) and info.metrics == {"fvu": 0.25}
        assert info.training_log == [{"step": 1}] == s.training_log("s")
        assert s.sae_info("nope") is None and s.feature("s", 999) is None
        assert s.models()[0]["info"] == {"a": 1}
        assert s.domains() == ["bible", "pydoc"]
        f = s.feature("s", 0)
        assert isinstance(f, FeatureInfo)
        assert [n["feature"] for n in f.neighbours] == [5, 2] and f.neighbours[0]["expert"] == 1
        assert f.logit_pos[0] == ("Beginning", 1.0) and f.hist_edges == [0.1, 1.0, 10.0]
        ex = s.feature_examples("s", 0, "top")
        assert [e["rank"] for e in ex] == [0, 1]
        assert ex[0]["tokens"] == ["it", "'s", " a", " test", "."]
        assert ex[0]["acts"] == pytest.approx([0, 1.0, 0, 0, 0.2])
        bands = s.quantile_bands("s", 0)
        assert [b["band"] for b in bands] == [1, 0]
        assert bands[0]["examples"][0]["position"] == 3 and bands[1]["examples"] == []
        pts = s.map_points("s")
        assert set(pts) >= {"feature", "x", "y", "expert", "density", "max_act", "top_tokens",
                            "preferred_domain", "cluster"}
        assert len(pts["x"]) == M
        assert [(p["a"], p["b"]) for p in s.duplicate_pairs("s", 0.9)] == [(0, 5), (1, 2)]
        assert [p["a"] for p in s.duplicate_pairs("s", 0.9, scope="within")] == [1]
        assert [p["a"] for p in s.duplicate_pairs("s", 0.9, scope="across")] == [0]
        assert s.duplicate_pairs("s", 0.94)[0]["top_tokens_b"] == "tok5"
        assert len(s.max_cos_distribution("s")["max_cos"]) == M
        np.testing.assert_allclose(s.expert_similarity("s"), [[1.0, 0.2], [0.3, 1.0]])
        assert s.experts("s")[0]["top_tokens"][0]["token"] == "a"
        assert s.expert_top_tokens("s", 1)[0]["count"] == 3
        assert [r["feature"] for r in s.expert_top_features("s", 1, 2)] == [7, 6]
        assert s.expert_domain_load("s")[0]["domain"] == "pydoc"
        rt = s.context_routing("s", 0)
        assert len(rt) == L and rt[1] == {"position": 1, "token": "'s", "experts": [1], "weights": [pytest.approx(0.8)]}
        assert rt[3]["experts"] == []
        assert [c["context"] for c in s.sample_contexts("s", 5)] == [0]
        assert s.sample_contexts("s", 5, domain="bible") == []


def test_search_is_parameterised_and_case_insensitive(tmp_path):
    db = tmp_path / "b.duckdb"
    write_small(db)
    with open_db(db) as s:
        assert [r["feature"] for r in s.search_features("s", "IT'S")] == [3]
        hits = s.search_features("s", "beginning")
        assert len(hits) == M and hits[0]["matched"] == "logits"
        assert s.search_features("s", "'; DROP TABLE features; --") == []
        assert s.search_features("s", "%") == []
        assert len(s.map_points("s")["x"]) == M


def test_crash_midway_leaves_old_file_readable(tmp_path):
    db = tmp_path / "b.duckdb"
    write_small(db, tag="old")
    with pytest.raises(RuntimeError):
        write_small(db, tag="new", fail_midway=True)
    with open_db(db) as s:
        assert s.meta()["tag"] == "old"
        assert len(s.map_points("s")["x"]) == M
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.duckdb"]
    write_small(db, tag="new")
    with open_db(db) as s:
        assert s.meta()["tag"] == "new"


def test_schema_version_mismatch_is_one_sentence(tmp_path):
    db = tmp_path / "old.duckdb"
    con = duckdb.connect(str(db))
    con.execute("CREATE TABLE meta (key VARCHAR, value VARCHAR)")
    con.execute("INSERT INTO meta VALUES ('schema_version', '0')")
    con.close()
    with pytest.raises(DataError) as e:
        open_db(db)
    assert str(e.value) == (
        f"This file was built with schema version 0; this explorer reads version {SCHEMA_VERSION}"
        " — rebuild it with `moesae build`."
    )


def test_unusable_files_give_clear_sentences(tmp_path):
    with pytest.raises(DataError, match="No build file"):
        open_db(tmp_path / "missing.duckdb")
    junk = tmp_path / "junk.duckdb"
    junk.write_bytes(b"not a database at all" * 100)
    with pytest.raises(DataError, match="not a readable DuckDB build"):
        open_db(junk)
    other = tmp_path / "other.duckdb"
    con = duckdb.connect(str(other))
    con.execute("CREATE TABLE t (a INT)")
    con.close()
    with pytest.raises(DataError, match="not a MoE-SAE Explorer build"):
        open_db(other)


def test_steering_cache_sidecar_while_db_is_open_read_only(tmp_path):
    db = tmp_path / "b.duckdb"
    write_small(db)
    with open_db(db) as s:
        cache = SteeringCache(db, store=s)
        assert cache.get("k") is None
        cache.put("k", {"text": "it's"})
        assert cache.get("k") == {"text": "it's"}
    assert (tmp_path / "b.duckdb.steer.duckdb").exists()


def test_temporaries_of_a_killed_build_are_removed_by_the_next(tmp_path):
    """kill -9 during a build leaves FILE.tmp-<pid> (and .wal); the next build removes those of
    processes that no longer exist, and never a live one's."""
    import os
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    path = tmp_path / "b.duckdb"
    stale = [tmp_path / f"b.duckdb.tmp-{dead}", tmp_path / f"b.duckdb.tmp-{dead}.wal"]
    live = tmp_path / f"b.duckdb.tmp-{os.getppid()}"
    for p in [*stale, live]:
        p.write_bytes(b"half a build")
    write_small(path)
    assert not any(p.exists() for p in stale) and live.exists()
