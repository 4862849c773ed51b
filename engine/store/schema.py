"""The DuckDB schema of a build: one statement per table, and the sort order applied when a
build closes. `SCHEMA_VERSION` changes whenever a table does; readers refuse other versions."""

from __future__ import annotations

SCHEMA_VERSION = 2
"""2 (2026-11-25): contexts carry their split; per-context codes; feature matches between SAEs."""

# One statement per table. `sae` is the build-local name of an SAE run; features, experts,
# examples … are keyed by (sae, id). Per-feature lists (histogram, logits) live in the feature
# row so a feature page is one row lookup; examples/neighbours are rewritten sorted by
# (sae, feature) when the build closes so DuckDB's zone maps make point lookups cheap.
SCHEMA: dict[str, str] = {
    "meta": "key VARCHAR PRIMARY KEY, value VARCHAR",
    "models": "name VARCHAR PRIMARY KEY, hook VARCHAR, d_model INTEGER, n_layers INTEGER, info JSON",
    "saes": (
        "sae VARCHAR PRIMARY KEY, model VARCHAR, hook VARCHAR, arch VARCHAR, width INTEGER,"
        " experts INTEGER, active INTEGER, k INTEGER, config JSON, metrics JSON,"
        " training_log JSON, n_tokens BIGINT, n_contexts INTEGER, hist_edges DOUBLE[],"
        " load_entropy DOUBLE, map_method VARCHAR, logit_note VARCHAR"
    ),
    "experts": (
        "sae VARCHAR, expert INTEGER, n_features INTEGER, n_alive INTEGER, load_top1 DOUBLE,"
        " load_topk DOUBLE, omega DOUBLE, mean_confidence DOUBLE, router_entropy DOUBLE,"
        " domain_entropy DOUBLE, top_tokens JSON"
    ),
    "expert_domain_load": (
        "sae VARCHAR, expert INTEGER, domain VARCHAR, n_tokens BIGINT, load_top1 DOUBLE,"
        " load_topk DOUBLE"
    ),
    "expert_similarity": "sae VARCHAR, i INTEGER, j INTEGER, value DOUBLE",
    "features": (
        "sae VARCHAR, feature INTEGER, expert INTEGER, n_fires BIGINT, density DOUBLE,"
        " mean_act DOUBLE, max_act DOUBLE, x FLOAT, y FLOAT, cluster INTEGER, max_cos FLOAT,"
        " top_tokens VARCHAR, preferred_domain VARCHAR, domain_counts JSON, hist BIGINT[],"
        " logit_pos VARCHAR[], logit_pos_val FLOAT[], logit_neg VARCHAR[], logit_neg_val FLOAT[]"
    ),
    "neighbours": "sae VARCHAR, feature INTEGER, rank SMALLINT, other INTEGER, cos FLOAT",
    "bands": (
        "sae VARCHAR, feature INTEGER, band SMALLINT, lo FLOAT, hi FLOAT, n BIGINT, share DOUBLE"
    ),
    "contexts": (
        "id INTEGER PRIMARY KEY, domain VARCHAR, split VARCHAR, token_ids INTEGER[], tokens VARCHAR[],"
        " lower_text VARCHAR"  # the tokens joined and lower-cased: what text search scans
    ),
    # Every analysed context's strongest codes: [L · per_token] flattened, position-major;
    # feature −1 where a position was dropped (BOS, outliers) or fewer fired — what a text
    # search shows without a model.
    "context_codes": (
        "sae VARCHAR, context INTEGER, per_token SMALLINT, features INTEGER[], acts FLOAT[]"
    ),
    # Two SAEs of one model and hook, feature by feature (engine.analysis.compare); both
    # directions are stored, `sae` is the one whose features the rows are.
    "feature_matches": (
        "sae VARCHAR, other VARCHAR, feature INTEGER, nearest INTEGER, nearest_cos FLOAT,"
        " partner INTEGER, partner_cos FLOAT"
    ),
    "expert_matches": "sae VARCHAR, other VARCHAR, i INTEGER, j INTEGER, share DOUBLE, mean_cos DOUBLE",
    "examples": (
        "sae VARCHAR, feature INTEGER, kind VARCHAR, band SMALLINT, rank SMALLINT,"
        " context INTEGER, position SMALLINT, activation FLOAT,"
        " act_pos SMALLINT[], act_val FLOAT[]"
    ),
    "routing": "sae VARCHAR, context INTEGER, experts SMALLINT[], weights FLOAT[]",
    "duplicate_pairs": (
        "sae VARCHAR, a INTEGER, b INTEGER, cos FLOAT, expert_a INTEGER, expert_b INTEGER,"
        " within BOOLEAN"
    ),
    "steering_cache": "key VARCHAR PRIMARY KEY, payload JSON, created TIMESTAMP",
}

# Tables rewritten in this order when a build closes (ORDER BY → tight zone maps).
SORT_ON_CLOSE: dict[str, str] = {
    "features": "sae, feature",
    "neighbours": "sae, feature, rank",
    "bands": "sae, feature, band",
    "examples": "sae, feature, kind, band, rank",
    "routing": "sae, context",
    "duplicate_pairs": "sae, cos DESC",
    "expert_similarity": "sae, i, j",
    "context_codes": "sae, context",
    "feature_matches": "sae, other, feature",
    "expert_matches": "sae, other, i, j",
}
