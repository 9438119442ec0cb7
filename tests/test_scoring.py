"""Nightly refresh: the tag table, atomicity, repeatability and cold start."""

import numpy as np
import pandas as pd
import pytest

from features.events import EventLogError, open_log
from serving import refresh as refresh_module
from serving.models import load_champions
from serving.refresh import refresh_tags
from serving.tagstore import current_refresh, query_tags

pytestmark = pytest.mark.integration


def test_tag_table_has_the_contract_columns(trained):
    tags = pd.read_parquet(trained["tags"])
    for col in ("user_id", "slot_open_probs", "best_slot", "best_slot_open_prob", "churn_prob",
                "churn_tier", "open_model_version", "churn_model_version", "scored_at"):
        assert col in tags.columns, col
    reachable = tags[~tags["unsubscribed"]]
    probs = np.vstack(reachable["slot_open_probs"].to_numpy())
    assert probs.shape[1] == 24 and ((probs > 0) & (probs < 1)).all()
    assert (probs.argmax(axis=1) == reachable["best_slot"].to_numpy()).all()
    assert set(tags["churn_tier"]) <= {"low", "medium", "high"}
    truth = pd.read_parquet(trained["sim"] / "users.parquet")
    assert set(tags["user_id"]) >= set(truth["user_id"]) - set()  # every known user is scored


def test_cold_start_users_get_the_prior(trained):
    tags = pd.read_parquet(trained["tags"])
    cold = tags[tags["cold_start"]]
    assert len(cold) > 0
    priors = pd.read_parquet(current_refresh(trained["cfg"].serving.serving_dir).priors)
    prior_rows = np.vstack(priors["slot_open_probs"].to_numpy())
    for probs in cold["slot_open_probs"]:
        # tags hold float32: each cold user's probabilities are one of the priors
        assert np.abs(prior_rows - np.asarray(probs)).max(axis=1).min() < 1e-6


def test_tag_store_is_queryable(trained):
    frame = query_tags(trained["cfg"].serving.serving_dir,
                       "SELECT churn_tier, count(*) AS n FROM tags GROUP BY 1")
    assert frame["n"].sum() == len(pd.read_parquet(trained["tags"]))


def test_failed_refresh_leaves_previous_tags(trained, tmp_path, monkeypatch):
    cfg = trained["cfg"]
    before = current_refresh(cfg.serving.serving_dir)
    before_tags = pd.read_parquet(before.tags)
    out = tmp_path / "tags.parquet"
    # a bad input part-way: the log fails validation
    bad = pd.read_parquet(trained["sim"] / "events.parquet").head(100)
    bad.loc[5, "event"] = "opne"
    bad.to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(EventLogError):
        refresh_tags(open_log(tmp_path / "bad.parquet"), cfg, load_champions(cfg), out, progress=False)
    # a crash while scoring
    def boom(*args, **kwargs):
        raise RuntimeError("killed mid-way")
    monkeypatch.setattr(refresh_module.ScoringCore, "model_scores", boom)
    with pytest.raises(RuntimeError, match="killed"):
        refresh_tags(trained["log"], cfg, load_champions(cfg), out, progress=False)
    after = current_refresh(cfg.serving.serving_dir)
    assert after.root == before.root and not out.exists()
    pd.testing.assert_frame_equal(pd.read_parquet(after.tags), before_tags)
    assert not list((after.root.parent).glob(".building-*"))


def test_rerun_gives_the_same_tags(trained, tmp_path):
    cfg = trained["cfg"]
    out = tmp_path / "again.parquet"
    refresh_tags(trained["log"], cfg, load_champions(cfg), out, progress=False)
    a = pd.read_parquet(trained["tags"]).drop(columns=["scored_at"])
    b = pd.read_parquet(out).drop(columns=["scored_at"])
    pd.testing.assert_frame_equal(a, b)


def test_fast_slot_rows_encode_exactly_like_the_frame_path(trained):
    from features.matrix import build_matrix
    from features.rows import all_slot_rows, encode_all_slot_rows

    champions = load_champions(trained["cfg"])
    matrix, _ = build_matrix(trained["log"], trained["log"].max_ts(), trained["cfg"])
    positions = np.array([0, 5, 17, len(matrix) - 1])
    spec = champions.open.spec
    fast = encode_all_slot_rows(spec, matrix, positions)
    slow = spec.encode(all_slot_rows(matrix.subset(positions)))
    np.testing.assert_array_equal(fast, slow)


def test_a_running_service_picks_up_a_new_refresh_and_a_moved_champion(trained, tmp_path):
    from serving.live import LiveRecommender
    from training.registry import promote_champion

    cfg = trained["cfg"]
    live = LiveRecommender(cfg, check_seconds=0)
    first = live.current
    assert not live.check()                       # nothing moved yet
    refresh_tags(trained["log"], cfg, load_champions(cfg), tmp_path / "t.parquet", progress=False)
    assert live.check() and live.current.refresh.root != first.refresh.root
    assert live.current.refresh.root == current_refresh(cfg.serving.serving_dir).root
    # an engineer moves the open champion: the server follows, and follows back
    before = live.current.champions.versions()["open"]
    other = "2" if before == "1" else "1"
    try:
        promote_champion(cfg, "open", version=other, force=True)
        assert live.check() and live.current.champions.versions()["open"] == other
    finally:
        promote_champion(cfg, "open", version=before, force=True)
    assert live.check() and live.current.champions.versions()["open"] == before
    assert live.reloads == 3 and live.last_error is None


def test_a_failed_reload_keeps_the_old_state_serving(trained, tmp_path, monkeypatch):
    from serving import live as live_module
    from serving.live import LiveRecommender

    cfg = trained["cfg"]
    live = LiveRecommender(cfg, check_seconds=0)
    serving_before = live.current
    monkeypatch.setattr(live_module.LiveRecommender, "stale", lambda self: True)
    monkeypatch.setattr(live_module.Recommender, "load", classmethod(
        lambda cls, *a, **k: (_ for _ in ()).throw(OSError("snapshot unreadable"))))
    assert not live.check()
    assert live.current is serving_before and "snapshot unreadable" in live.last_error
    warm = str(serving_before.matrix.user_ids[serving_before.has_history][0])
    answer = live.current.recommend([warm], None, 24)[0]
    assert not answer["cold_start"] and answer["send_at"] is not None


def test_a_champion_that_cannot_score_the_snapshot_is_not_swapped_in(trained, monkeypatch):
    from serving import live as live_module
    from serving.live import LiveRecommender

    cfg = trained["cfg"]
    live = LiveRecommender(cfg, check_seconds=0)
    serving_before = live.current
    real_load = live_module.Recommender.load.__func__

    def load_with_a_model_that_wants_more(cls, *args, **kwargs):
        fresh = real_load(cls, *args, **kwargs)
        fresh.matrix.scalars = fresh.matrix.scalars.drop(columns=["sessions_90d"])  # an older snapshot
        return fresh

    monkeypatch.setattr(live_module.Recommender, "load", classmethod(load_with_a_model_that_wants_more))
    monkeypatch.setattr(live_module.LiveRecommender, "_signature", lambda self: ("moved",))
    assert not live.check() and live.current is serving_before and live.last_error
    # the same failed state is not reloaded every few seconds
    assert not live.stale()



def test_users_who_unsubscribed_after_their_last_send_get_no_slot(trained):
    from features.matrix import build_matrix

    cfg = trained["cfg"]
    tags = pd.read_parquet(trained["tags"]).set_index("user_id")
    matrix, _ = build_matrix(trained["log"], trained["log"].max_ts(), cfg)
    gone = matrix.scalars.index[matrix.scalars["unreachable"] > 0]
    assert len(gone) > 0
    assert tags.loc[gone, "unsubscribed"].all() and tags.loc[gone, "best_slot"].isna().all()
    assert tags.loc[gone, "best_slot_open_prob"].isna().all()
    assert all(max(p) == 0 for p in tags.loc[gone, "slot_open_probs"])
    reachable = tags[~tags["unsubscribed"] & ~tags["cold_start"]]
    assert reachable["best_slot"].notna().all()


def test_recommend_tells_the_scheduler_not_to_send_to_the_unsubscribed(trained):
    from serving.recommend import Recommender

    rec = Recommender.load(trained["cfg"])
    user = str(rec.matrix.user_ids[rec.unreachable][0])
    answer = rec.recommend([user], None, 24)[0]
    assert answer["unsubscribed"] and answer["send_at"] is None and answer["best_slot"] is None
    assert max(answer["slot_open_probs"]) == 0
