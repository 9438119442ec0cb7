import numpy as np

from configs import load_config
from features.families import feature_catalog
from features.families import phrase as phrase_in
from serving.reasons import top_reasons

CATALOG = feature_catalog(load_config())


def phrase(feature, value, categories=None):
    return phrase_in(CATALOG, feature, value, categories)


def test_reasons_are_the_largest_pushes_toward_churn_in_plain_words():
    names = ["days_since_session", "open_rate_trend", "sessions_7d", "consecutive_unopened"]
    x = np.array([[21.0, 0.5, 0.0, 6.0], [1.0, 1.2, 9.0, 0.0]])
    contrib = np.array([[0.9, 0.4, 0.1, 0.6, -2.0],      # last column: the bias term
                        [-0.5, -0.1, -0.3, -0.2, -2.0]])
    reasons = top_reasons(contrib, x, names, k=3, catalog=CATALOG)
    assert reasons[0] == ["no session for 21 days", "6 messages in a row unopened", "open rate at 50% of its 90-day level"]
    assert reasons[1] == []   # nothing pushes this user toward churn


def test_phrases_cover_windows_and_fall_back_to_the_name():
    assert phrase("sessions_7d", 0) == "0 sessions in the last 7 days"
    assert phrase("days_since_open", float("nan")) == "never opened a message"
    assert phrase("utc_offset_hours", 8) == "utc offset hours = 8"


def test_categorical_reasons_name_the_level_not_its_code():
    cats = {"segment": ("high_value", "potential", "silent")}
    assert phrase("segment", 2.0, cats["segment"]) == "segment: silent"
    assert phrase("segment", float("nan"), cats["segment"]) == "segment: unknown"
    reasons = top_reasons(np.array([[0.5, 0.0]]), np.array([[1.0]]), ["segment"], k=1, catalog=CATALOG, categories=cats)
    assert reasons == [["segment: potential"]]


def test_reason_wording_follows_the_configured_windows():
    cfg = load_config().with_overrides(features={"frequency_windows_days": (7, 28, 120)})
    catalog = feature_catalog(cfg)
    assert phrase_in(catalog, "open_rate_trend", 0.5) == "open rate at 50% of its 120-day level"
    assert phrase_in(catalog, "sessions_28d", 3) == "3 sessions in the last 28 days"
    assert "sessions_30d" not in catalog


def test_feature_families_declare_each_column_once_and_match_the_matrix(sim_dir, cfg):
    from features.events import open_log
    from features.families import check_declarations
    from features.matrix import build_matrix

    check_declarations(cfg)
    small_log = open_log(sim_dir / "events.parquet", sim_dir / "users.parquet")
    matrix, _ = build_matrix(small_log, small_log.max_ts(), cfg)
    catalog = feature_catalog(cfg)
    undeclared = [c for c in matrix.scalars.columns
                  if c not in catalog and c not in matrix.attributes and c not in small_log.numeric_attributes]
    assert undeclared == []
