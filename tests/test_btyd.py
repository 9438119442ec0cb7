"""The BG/NBD model (features.btyd): the fit, its columns, point in time, and the churn baselines."""

from __future__ import annotations

import json
import logging
import warnings
from datetime import datetime

import numpy as np
import pandas as pd
import pytest

from features.btyd import BtydFit, btyd_columns, btyd_declarations, btyd_inputs, expected_column, fit_btyd
from training.metrics import churn_baseline_aucs

TRUE = {"r": 0.5, "alpha": 10.0, "a": 1.0, "b": 3.0}


def simulate_bgnbd(n: int, seed: int, r: float = TRUE["r"], alpha: float = TRUE["alpha"], a: float = TRUE["a"],
                   b: float = TRUE["b"]) -> pd.DataFrame:
    """Users drawn from BG/NBD itself (rate ~ Gamma(r, alpha), drop-out ~ Beta(a, b), first
    active on day 0, observed for T days), as the columns the feature state keeps."""
    rng = np.random.default_rng(seed)
    rate, drop = rng.gamma(r, 1.0 / alpha, n), rng.beta(a, b, n)
    age = rng.uniform(60, 365, n)
    days_ever, span = np.ones(n), np.zeros(n)
    for i in range(n):
        t, days = 0.0, {0}
        while True:
            t += rng.exponential(1.0 / rate[i])
            if t > age[i]:
                break
            days.add(int(t))
            if rng.random() < drop[i]:
                break
        days_ever[i], span[i] = len(days), max(days)
    return pd.DataFrame({"active_days_ever": days_ever, "active_span_days": span, "days_since_first_engagement": age},
                        index=pd.Index([f"u{i}" for i in range(n)], name="user_id"))


@pytest.fixture(scope="module")
def simulated() -> pd.DataFrame:
    return simulate_bgnbd(4000, seed=3)


@pytest.fixture(scope="module")
def fitted(simulated, cfg) -> BtydFit:
    fit = fit_btyd(simulated, cfg)
    assert fit is not None
    return fit


def test_fit_recovers_the_simulated_population(fitted, simulated):
    # the mean engagement rate r / alpha and the mean drop-out probability a / (a + b)
    assert fitted.r / fitted.alpha == pytest.approx(TRUE["r"] / TRUE["alpha"], rel=0.2)
    assert fitted.a / (fitted.a + fitted.b) == pytest.approx(TRUE["a"] / (TRUE["a"] + TRUE["b"]), rel=0.25)
    assert fitted.n_fit == len(simulated)
    assert BtydFit.from_dict(json.loads(json.dumps(fitted.to_dict()))) == fitted


def test_columns_are_lifetimes_closed_forms(fitted, simulated, cfg):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from lifetimes import BetaGeoFitter
    model = BetaGeoFitter()
    model.params_ = pd.Series({"r": fitted.r, "alpha": fitted.alpha, "a": fitted.a, "b": fitted.b})
    x, t_x, big_t, _ = btyd_inputs(simulated)
    cols = btyd_columns(fitted, simulated, cfg)
    h = cfg.labels.churn_horizon_days
    np.testing.assert_allclose(cols["btyd_p_alive"], model.conditional_probability_alive(x, t_x, big_t), rtol=1e-9)
    np.testing.assert_allclose(cols[expected_column(cfg)],
                               model.conditional_expected_number_of_purchases_up_to_time(h, x, t_x, big_t), rtol=1e-7)


def test_columns_shapes_missing_values_and_direction(fitted, cfg):
    frame = pd.DataFrame({"active_days_ever": [0, 1, 5, 5, 5, np.nan],
                          "active_span_days": [0, 0, 100, 40, 100, np.nan],
                          "days_since_first_engagement": [np.nan, 30.5, 120.2, 120.2, 300.0, np.nan]},
                         index=pd.Index(list("abcdef"), name="user_id"))
    cols = btyd_columns(fitted, frame, cfg)
    assert set(cols) == {c.name for c in btyd_declarations(cfg)} == {"btyd_p_alive", expected_column(cfg)}
    p, e = cols["btyd_p_alive"], cols[expected_column(cfg)]
    assert all(len(v) == len(frame) for v in cols.values())
    assert np.isnan(p[[0, 5]]).all() and np.isnan(e[[0, 5]]).all()      # never engaged
    assert p[1] == 1.0                                                    # no repeat: alive by the model
    assert np.isfinite(p[1:5]).all() and ((p[1:5] > 0) & (p[1:5] <= 1)).all() and (e[1:5] >= 0).all()
    assert p[2] > p[3] and e[2] > e[3]          # same buyer, last seen more recently: more alive
    assert p[2] > p[4]                          # same history, observed longer since: less alive
    none = btyd_columns(None, frame, cfg)
    assert all(np.isnan(v).all() and len(v) == len(frame) for v in none.values())
    catalog = {c.name: c for c in btyd_declarations(cfg)}
    assert "still active" in catalog["btyd_p_alive"].phrase(0.4)
    assert "never" not in catalog["btyd_p_alive"].phrase(np.nan) and catalog["btyd_p_alive"].phrase(np.nan)


def test_too_little_to_fit_gives_none_and_never_raises(simulated, cfg, caplog):
    caplog.set_level(logging.INFO, logger="features.btyd")
    assert fit_btyd(simulated.head(20), cfg) is None                       # too few users
    one_day = simulated.assign(active_days_ever=1.0, active_span_days=0.0)
    assert fit_btyd(one_day, cfg) is None                                   # nobody came back
    junk = simulated.head(200).assign(active_days_ever=np.nan)
    assert fit_btyd(junk, cfg) is None
    assert "not fitted" in caplog.text
    same = pd.DataFrame({"active_days_ever": [3.0] * 100, "active_span_days": [10.0] * 100,
                         "days_since_first_engagement": [10.0] * 100})
    fit = fit_btyd(same, cfg)                                               # degenerate: a fit or None, no error
    assert fit is None or all(np.isfinite([fit.r, fit.alpha, fit.a, fit.b]))
    assert fit_btyd(simulated, cfg.with_overrides(btyd={"enabled": False})) is None


def test_the_fit_sample_is_the_same_users_in_any_order(simulated, cfg):
    small = cfg.with_overrides(btyd={"max_fit_users": 1500})
    fit = fit_btyd(simulated, small)
    shuffled = fit_btyd(simulated.sample(frac=1.0, random_state=5), small)
    assert fit is not None and fit.n_fit == 1500 and shuffled == fit


def _purchase_log(seed: int, users: int = 120, days: int = 200) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    start = pd.Timestamp("2026-01-01", tz="UTC")
    for u in range(users):
        first, rate = rng.uniform(0, days - 20), rng.gamma(1.0, 0.05)
        t = first
        while t < days:
            rows.append((f"u{u}", start + pd.Timedelta(days=float(t)), "purchase", None))
            t += rng.exponential(1.0 / rate)
    frame = pd.DataFrame(rows, columns=["user_id", "ts", "event", "message_id"])
    frame["value"] = 10.0
    return frame


def test_btyd_features_never_look_past_as_of(cfg):
    """Purchases after T change neither the fit at T nor any user's BG/NBD columns."""
    from features.events import from_frames
    from features.matrix import build_matrix

    as_of = datetime(2026, 5, 1, 12)
    events = _purchase_log(1)
    cut = pd.Timestamp(as_of, tz="UTC")
    past = events[events["ts"] <= cut]
    future = _purchase_log(2)
    future = future[future["ts"] > cut]
    m_past, priors_past = build_matrix(from_frames(past), as_of, cfg)
    m_all, priors_all = build_matrix(from_frames(pd.concat([past, future, events[events["ts"] > cut]])), as_of, cfg)
    names = ["active_days_ever", "active_span_days", "days_since_first_engagement"]
    if "btyd_p_alive" not in m_past.scalars.columns:
        pytest.skip("the BG/NBD columns are not in the matrix yet")
    names += ["btyd_p_alive", expected_column(cfg)]
    assert priors_past.btyd is not None and priors_past.btyd == priors_all.btyd
    assert m_past.scalars["btyd_p_alive"].notna().sum() > 50
    pd.testing.assert_frame_equal(m_past.scalars[names], m_all.scalars.loc[m_past.scalars.index, names])


def test_churn_baselines_on_the_same_rows(cfg):
    rng = np.random.default_rng(0)
    n = 400
    y = rng.integers(0, 2, n)
    rows = pd.DataFrame({"days_since_engagement": rng.exponential(10, n) + 20 * y,
                         "active_days_90d": rng.poisson(5, n).astype(float),
                         "active_days_ever": rng.poisson(9, n) + 4.0 * (1 - y),
                         "btyd_p_alive": rng.uniform(0, 1, n),
                         expected_column(cfg): rng.uniform(0, 2, n) + 1.0 * (1 - y)})
    out = churn_baseline_aucs(rows, y, 90)
    assert set(out) == {"baseline_recency_auc", "baseline_frequency_auc", "baseline_frequency_ever_auc",
                        "baseline_btyd_p_alive_auc", "baseline_btyd_expected_auc", "baseline_best_auc"}
    assert out["baseline_recency_auc"] > 0.8 and out["baseline_btyd_expected_auc"] > 0.7
    assert out["baseline_best_auc"] == max(v for k, v in out.items() if k != "baseline_best_auc")
    # no fit (all missing) and no whole-history columns: the two classic keys only
    old = churn_baseline_aucs(rows[["days_since_engagement", "active_days_90d"]].assign(btyd_p_alive=np.nan), y, 90)
    assert set(old) == {"baseline_recency_auc", "baseline_frequency_auc", "baseline_best_auc"}
    assert churn_baseline_aucs(rows, np.zeros(n), 90) == {}
