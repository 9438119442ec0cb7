"""Buy till you die: the BG/NBD model of each user's engagement rhythm, fitted at a snapshot.

A purchase log's churn signal is long-run: how often a customer has come back since they
were first seen and how long they have now been away, against everyone else's rhythm. BG/NBD
(Fader, Hardie and Lee 2005) says it in four numbers: each user engages as a Poisson process
whose rate is Gamma(r, alpha) over users, and after each engagement drops out for good with a
probability that is Beta(a, b) over users. Fitted once per snapshot over everyone known at T
(like the population priors), it gives each user P(alive) and the engagement days expected in
the churn horizon: features for the churn model and a baseline it must beat.

Inputs per user, all in whole (UTC calendar) days of engagement (``cfg.labels.engagement_events``),
all from the feature state at T, so point-in-time by construction:

- x = ``active_days_ever`` - 1: repeat active days (several events on one day are one
  "transaction", as lifetimes' ``summary_data_from_transaction_data(freq="D")`` counts them);
- t_x = ``active_span_days``: days from the first to the last active day;
- T = floor(``days_since_first_engagement``), at least t_x: the whole days observed after the
  first active day. At the midnight snapshots of training this is the date before T minus the
  first active date, lifetimes' convention with the observation ending on the last full day;
  x and t_x count whole days, so T does too (a fractional T would credit each user with part
  of a day in which nothing could yet be seen).

Where nobody seems to drop out, the maximum-likelihood fit runs to a -> 0 (Online Retail: a
= 0.0004, b = 163 at 2011-10-10; Pareto/NBD's s -> 0 there too): P(alive) is then about 1 for
everyone and the expected days are each user's shrunk rate, (r + x) / (alpha + T) per day.

The fit uses ``lifetimes.BetaGeoFitter`` (imported only here, and only to fit); the per-user
quantities are the closed forms with the fitted parameters (scipy), vectorised, so scoring a
million users needs neither lifetimes nor a loop.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from scipy.special import expit, hyp2f1

from configs import Config
from features.families import Column

__all__ = ["BtydFit", "INPUT_COLUMNS", "btyd_columns", "btyd_declarations", "btyd_inputs", "expected_column",
           "fit_btyd"]

log = logging.getLogger(__name__)

# the fit's search box for log(r), log(alpha scaled so the oldest age is 1), log(a), log(b)
_LOG_PARAM_BOUNDS = (-15.0, 15.0)

INPUT_COLUMNS = ("active_days_ever", "active_span_days", "days_since_first_engagement")


def expected_column(cfg: Config) -> str:
    return f"btyd_expected_{cfg.labels.churn_horizon_days}d"


@dataclass(frozen=True)
class BtydFit:
    """BG/NBD parameters fitted at one snapshot (time in days) and how many users they came from."""

    r: float
    alpha: float
    a: float
    b: float
    n_fit: int

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "BtydFit":
        return cls(r=float(data["r"]), alpha=float(data["alpha"]), a=float(data["a"]), b=float(data["b"]),
                   n_fit=int(data["n_fit"]))


def btyd_inputs(frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x, t_x, T, engaged) per row of ``frame``; x, t_x and T are NaN where ``engaged`` is False."""
    missing = [c for c in INPUT_COLUMNS if c not in frame.columns]
    if missing:
        raise KeyError(f"BG/NBD needs the columns {', '.join(missing)} (features.families' rhythm and recency)")
    n = frame["active_days_ever"].to_numpy(dtype=float, na_value=np.nan)
    span = frame["active_span_days"].to_numpy(dtype=float, na_value=np.nan)
    age = frame["days_since_first_engagement"].to_numpy(dtype=float, na_value=np.nan)
    engaged = (n >= 1) & np.isfinite(span) & np.isfinite(age)
    x = np.where(engaged, np.floor(n) - 1.0, np.nan)
    t_x = np.where(engaged, np.clip(np.round(span), 0.0, None), np.nan)
    t_x = np.where(x == 0, 0.0, t_x)                       # one active day: no span by definition
    big_t = np.where(engaged, np.maximum(np.floor(np.clip(age, 0.0, None)), t_x), np.nan)
    return x, t_x, big_t, engaged


def _sample(ids: pd.Index, keep: np.ndarray, max_users: int) -> np.ndarray:
    """Positions of at most ``max_users`` of the kept rows, chosen by a hash of the user id:
    the same users at every snapshot and in every call, whatever the frame's order."""
    pos = np.flatnonzero(keep)
    if len(pos) <= max_users:
        return pos
    hashes = pd.util.hash_array(np.asarray(ids[pos], dtype=object).astype(str))
    return pos[np.sort(np.argsort(hashes, kind="stable")[:max_users])]


def fit_btyd(frame: pd.DataFrame, cfg: Config) -> BtydFit | None:
    """BG/NBD fitted on the engaged users of ``frame`` (everyone known at T; a deterministic
    sample of at most ``cfg.btyd.max_fit_users``). None, with the reason logged, when there is
    too little to fit or the fit fails: never raises on data."""
    c = cfg.btyd
    if not c.enabled:
        return None
    x, t_x, big_t, engaged = btyd_inputs(frame)
    pos = _sample(frame.index, engaged, c.max_fit_users)
    x, t_x, big_t = x[pos], t_x[pos], big_t[pos]
    repeaters = int((x > 0).sum())
    if len(pos) < c.min_fit_users or repeaters < c.min_fit_repeaters:
        log.info("BG/NBD not fitted: %d engaged users, %d with more than one active day (needs %d and %d)",
                 len(pos), repeaters, c.min_fit_users, c.min_fit_repeaters)
        return None
    # users with the same (x, t_x, T) share one likelihood term: whole days make them few; in a
    # fixed order, so the same users give the same numbers to the last bit in any order
    patterns = (pd.DataFrame({"x": x, "t_x": t_x, "T": big_t}).value_counts().reset_index(name="n")
                .sort_values(["x", "t_x", "T"], ignore_index=True))
    try:
        params = _fit_patterns(patterns, c.penalizer)
    except Exception as exc:  # noqa: BLE001 - a failed fit is a missing feature, not a failed job
        log.warning("BG/NBD fit failed on %d users (%d repeaters): %s", len(pos), repeaters,
                    str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
        return None
    r, alpha, a, b = params
    if not all(np.isfinite(v) and v > 0 for v in params):
        log.warning("BG/NBD fit on %d users gave unusable parameters r=%s alpha=%s a=%s b=%s",
                    len(pos), r, alpha, a, b)
        return None
    fit = BtydFit(r=r, alpha=alpha, a=a, b=b, n_fit=len(pos))
    log.debug("BG/NBD fitted on %d users (%d patterns): r=%.4g alpha=%.4g a=%.4g b=%.4g",
             len(pos), len(patterns), r, alpha, a, b)
    return fit


def _fit_patterns(patterns: pd.DataFrame, penalizer: float) -> tuple[float, float, float, float]:
    """lifetimes' maximum-likelihood fit, its warnings and its printout on failure kept local."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        from lifetimes import BetaGeoFitter

        model = BetaGeoFitter(penalizer_coef=penalizer)
        # bounded log-parameters make scipy use L-BFGS-B: where nobody seems to drop out (a -> 0,
        # b -> inf: Online Retail's case) BFGS loses precision on the flat ridge and lifetimes
        # calls that a failure; bounded, it stops at a point whose likelihood is as good
        model.fit(patterns["x"].to_numpy(int), patterns["t_x"].to_numpy(float), patterns["T"].to_numpy(float),
                  weights=patterns["n"].to_numpy(int), bounds=[_LOG_PARAM_BOUNDS] * 4)
        p = model.params_
        return float(p["r"]), float(p["alpha"]), float(p["a"]), float(p["b"])


def _log_alive_odds(fit: BtydFit, x: np.ndarray, t_x: np.ndarray, big_t: np.ndarray) -> np.ndarray:
    """log of P(dead)/P(alive) given (x, t_x, T); -inf for x = 0 (no repeat: alive by the model)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        odds = ((fit.r + x) * (np.log(fit.alpha + big_t) - np.log(fit.alpha + t_x))
                + np.log(fit.a) - np.log(fit.b + np.maximum(x, 1.0) - 1.0))
    return np.where(x > 0, odds, -np.inf)


def _expected(fit: BtydFit, days: float, x: np.ndarray, big_t: np.ndarray, p_alive: np.ndarray) -> np.ndarray:
    """E[active days in (T, T + days] | x, t_x, T]: equation (10) of Fader, Hardie and Lee."""
    r, alpha, a, b = fit.r, fit.alpha, fit.a, fit.b
    c_, a_, b_ = a + b + x - 1.0, r + x, b + x
    z = days / (alpha + big_t + days)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        log_h = np.log(hyp2f1(a_, b_, c_, z))
        # Euler's transformation where the series overflows (long, busy histories)
        alt = np.log(hyp2f1(c_ - a_, c_ - b_, c_, z)) + (c_ - a_ - b_) * np.log1p(-z)
        log_h = np.where(np.isfinite(log_h), log_h, alt)
        second = -np.expm1(log_h + a_ * (np.log(alpha + big_t) - np.log(alpha + big_t + days)))
        out = (a + b + x - 1.0) / (a - 1.0) * second * p_alive
    return np.where(np.isfinite(out), np.clip(out, 0.0, None), np.nan)


def btyd_columns(fit: BtydFit | None, frame: pd.DataFrame, cfg: Config) -> dict[str, np.ndarray]:
    """``btyd_p_alive`` and ``btyd_expected_{h}d`` (h: the churn horizon) for each row of
    ``frame``; NaN where there is no fit or the user never engaged."""
    h = cfg.labels.churn_horizon_days
    names = ("btyd_p_alive", expected_column(cfg))
    if fit is None:
        return {name: np.full(len(frame), np.nan) for name in names}
    x, t_x, big_t, engaged = btyd_inputs(frame)
    p_alive = np.where(engaged, expit(-_log_alive_odds(fit, x, t_x, big_t)), np.nan)
    expected = np.where(engaged, _expected(fit, float(h), x, big_t, p_alive), np.nan)
    return dict(zip(names, (p_alive, expected)))


def btyd_declarations(cfg: Config) -> list[Column]:
    """The columns :func:`btyd_columns` adds, with what they mean and how a reason says them."""
    h = cfg.labels.churn_horizon_days
    return [
        Column("btyd_p_alive", "probability the user still engages, by the BG/NBD model fitted at T over "
               "everyone known then, from their active days, span and age (missing: never engaged or no fit)",
               lambda v: (f"{v:.0%} likely still active, given how often and how recently they came back"
                          if v == v else "no engagement rhythm yet")),
        Column(expected_column(cfg), f"active days the BG/NBD model expects in the {h} days after T "
               "(missing: never engaged or no fit)",
               lambda v, h=h: (f"{v:.1f} active days expected in the next {h} days by their rhythm"
                               if v == v else "no engagement rhythm yet")),
    ]
