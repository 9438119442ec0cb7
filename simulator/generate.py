"""A behaviour simulator with known truth, for development, tests and honest evaluation.

What real push logs carry, and what the models must get right:

- per-user daily rhythms in local time, mixtures of archetypes (commute 08-09, lunch
  12-13, after school 16-17, evening 20-22, late night), narrower on weekdays, with the
  commute peak moving to late morning at weekends;
- users in several time zones, and a biased historical sender that sends at a few house
  hours of its own zone (so each zone sees other local hours), exploring rarely;
- fatigue: every send in the previous 24 h lowers the open probability;
- app sessions whose hours only partly follow the open rhythm; purchases after sessions;
- engagement that fades before a user goes dormant; unsubscribes; cold-start users.

Users are simulated in chunks with numpy and appended to Parquet, so a million users fit
in a few GB. The same seed gives the same tables. Events after the snapshot are simulated
too, but only to label churn in ``truth.parquet``.
"""

from __future__ import annotations

import logging
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from configs import Config, atomic_path
from simulator.sender import RuleState, allowed_hours, choose_hours

__all__ = ["ARCHETYPES", "GENERIC_SESSION_SHAPE", "RHYTHM_FLOOR", "SEGMENT_OPENS", "SEGMENT_SHARE",
           "SimulationSummary", "rhythms", "simulate", "von_mises"]

log = logging.getLogger(__name__)

# (name, weekday peak hour, weekend peak hour, concentration)
ARCHETYPES: tuple[tuple[str, float, float, float], ...] = (
    ("commute", 8.3, 10.5, 7.0),
    ("lunch", 12.5, 12.8, 8.0),
    ("after_school", 16.5, 15.5, 7.0),
    ("evening", 20.8, 20.5, 5.0),
    ("late_night", 23.3, 0.3, 6.0),
)
_SEGMENTS = np.array(["high_value", "potential", "silent"])
SEGMENT_SHARE = np.array([0.25, 0.45, 0.30])
_SEGMENT_SENDS = np.array([1.35, 1.0, 0.55])     # x send_rate
SEGMENT_OPENS = np.array([1.4, 1.0, 0.55])      # x base_open_rate
_SEGMENT_SESSIONS = np.array([1.7, 1.0, 0.45])   # x sessions_per_day
_REGION = {"Asia/Shanghai": "cn", "Europe/London": "uk", "America/New_York": "us",
           "Asia/Kolkata": "in", "Australia/Sydney": "au"}
_DEVICES = np.array(["ios", "android", "web"])
_AGES = np.array(["18-24", "25-34", "35-44", "45+"])
_CHUNK = 25_000
_CHANNELS = np.array(["push", "wechat", "email"], dtype=object)
_CHANNEL_SHARES = [0.7, 0.2, 0.1]
RHYTHM_FLOOR = 0.12


@dataclass(frozen=True)
class SimulationSummary:
    events_path: Path
    users_path: Path
    truth_path: Path
    snapshot: datetime
    n_users: int
    n_events: int


def von_mises(hours: np.ndarray, peak: float, kappa: float) -> np.ndarray:
    return np.exp(kappa * (np.cos(2 * np.pi * (hours - peak) / 24.0) - 1.0))


def rhythms(weights: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """(n_users, 2 [weekday, weekend], 24) rhythm, normalised to mean 1 over hours."""
    hours = np.arange(24.0)
    out = np.full((len(weights), 2, 24), RHYTHM_FLOOR)
    for k, (_, wd, we, kappa) in enumerate(ARCHETYPES):
        for day_type, peak, kap in ((0, wd, kappa), (1, we, kappa * 0.7)):
            bump = von_mises(hours[None, :] - shift[:, None], peak, kap)
            out[:, day_type, :] += weights[:, k, None] * bump
    return out / out.mean(axis=2, keepdims=True)


# a generic app-usage profile: sessions not driven by the user's own rhythm
GENERIC_SESSION_SHAPE = np.array([0.2, 0.1, 0.05, 0.05, 0.05, 0.1, 0.3, 0.6, 0.8, 0.9, 1.0, 1.0,
                     1.1, 1.0, 0.9, 0.9, 1.0, 1.0, 1.1, 1.2, 1.3, 1.2, 0.9, 0.5])
GENERIC_CDF = np.cumsum(GENERIC_SESSION_SHAPE / GENERIC_SESSION_SHAPE.sum())


def _offsets_minutes(zones: list[str], start: pd.Timestamp, n_days: int) -> np.ndarray:
    """UTC offset in minutes of each zone at local noon of each simulated day (DST aware)."""
    days = pd.date_range(start, periods=n_days, freq="D") + pd.Timedelta(hours=12)
    out = np.zeros((len(zones), n_days), dtype=np.int64)
    for i, zone in enumerate(zones):
        local = days.tz_convert(zone)
        out[i] = np.array([ts.utcoffset().total_seconds() // 60 for ts in local], dtype=np.int64)
    return out


def _sample_hours(rng: np.random.Generator, cdf: np.ndarray) -> np.ndarray:
    u = rng.random(len(cdf))
    return np.minimum((u[:, None] > cdf).sum(axis=1), 23)


class _Chunk:
    """Simulate one chunk of users; collects columns in lists of numpy arrays."""

    def __init__(self, cfg: Config, rng: np.random.Generator, first_user: int, n: int, days: int,
                 start: pd.Timestamp, zones: list[str], offsets: np.ndarray, sender_zone: int) -> None:
        sim = cfg.simulate
        self.cfg, self.rng, self.n, self.days, self.start = cfg, rng, n, days, start
        self.horizon = cfg.labels.churn_horizon_days + 7
        self.total_days = days + self.horizon
        self.zones, self.offsets, self.sender_zone = zones, offsets, sender_zone
        shares = np.array(list(sim.timezones.values()), dtype=float)
        self.user_ids = np.array([f"u{i:07d}" for i in range(first_user + 1, first_user + n + 1)])
        self.zone = rng.choice(len(zones), size=n, p=shares / shares.sum())
        self.segment = rng.choice(3, size=n, p=SEGMENT_SHARE)
        self.weights = rng.dirichlet(np.full(len(ARCHETYPES), 0.35), size=n)
        self.shift = rng.normal(0.0, 0.5, size=n)   # personal offset of the peaks, in hours
        self.rhythm = rhythms(self.weights, self.shift)
        mean_open = np.clip(sim.base_open_rate * SEGMENT_OPENS[self.segment], 0.01, 0.6)
        self.base = rng.beta(4.0, 4.0 * (1 - mean_open) / mean_open)
        self.send_rate = np.clip(sim.send_rate * _SEGMENT_SENDS[self.segment]
                                 * rng.lognormal(0, 0.15, n), 0.02, 1.0)
        self.activity = sim.sessions_per_day * _SEGMENT_SESSIONS[self.segment] * rng.lognormal(0, 0.4, n)
        fades = rng.random(n) < sim.fade_share
        # fading starts any time, so every snapshot (not only the last) sees users on their way out
        self.fade_start = np.where(fades, rng.uniform(-20, days + 60, n), np.inf)
        self.fade_tau = 2.0 + rng.exponential(sim.fade_days_mean, n)
        # cold start: new in the last week; half of them have done nothing yet
        cold = rng.random(n) < sim.cold_start_share
        self.first_day = np.where(cold, rng.integers(days - 7, days, n), 0)
        self.no_events = cold & (rng.random(n) < 0.5)
        self.signup = np.where(cold, self.first_day + rng.random(n),
                               -rng.uniform(1, 700, n))  # days relative to start
        self.unsubscribed_at = np.full(n, np.inf)
        self.prev_sends = np.full((n, 2), -np.inf)     # last two send times, in days
        self.cols: dict[str, list] = {k: [] for k in ("user", "t", "event", "msg", "channel", "value")}
        # the logged sender (opt-in) adds a propensity column and every send's counterfactual truth
        self.logged = sim.sender == "logged"
        if self.logged:
            self.cols["propensity"] = []
            self.rules = RuleState(n, cfg)
            self.send_truth: dict[str, list] = {"msg": [], "user": [], "t": [], "cf": []}
        self.msg_counter = 0
        self.msg_prefix = f"m{first_user // _CHUNK:04d}-"

    def engagement(self, t_days: np.ndarray, users: np.ndarray) -> np.ndarray:
        e = np.exp(-np.maximum(t_days - self.fade_start[users], 0.0) / self.fade_tau[users])
        return np.where(e < 0.03, 0.0, e)

    def _emit(self, users: np.ndarray, t: np.ndarray, event: str, msg=None, channel=None, value=None,
              propensity=None) -> None:
        if not len(users):
            return
        c = self.cols
        if self.logged:
            c["propensity"].append(propensity if propensity is not None else np.full(len(users), np.nan))
        c["user"].append(users)
        c["t"].append(t)
        c["event"].append(np.full(len(users), event, dtype=object))
        c["msg"].append(msg if msg is not None else np.full(len(users), None, dtype=object))
        c["channel"].append(channel if channel is not None else np.full(len(users), None, dtype=object))
        c["value"].append(value if value is not None else np.full(len(users), np.nan))

    def _local(self, users: np.ndarray, t_days: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Local hour (float) and weekend flag of UTC times (days since start)."""
        day = np.clip(np.floor(t_days).astype(int), 0, self.total_days - 1)
        local = t_days + self.offsets[self.zone[users], day] / 1440.0
        weekday = (self.start.dayofweek + np.floor(local).astype(int)) % 7
        return (local % 1.0) * 24.0, weekday >= 5

    def _message_ids(self, k: int) -> np.ndarray:
        ids = np.arange(self.msg_counter, self.msg_counter + k)
        self.msg_counter += k
        return np.char.add(self.msg_prefix, ids.astype(str)).astype(object)

    def run(self) -> None:
        sim, rng, n = self.cfg.simulate, self.rng, self.n
        house = np.array(sim.house_hours, dtype=float)
        fatigue = 1.0 - sim.fatigue_per_recent_send
        alive = ~self.no_events
        for d in range(self.total_days):
            started = alive & (self.first_day <= d)
            # ---- sends: house hours of the sender's zone, sometimes a random hour
            can = started & (self.unsubscribed_at > d)
            if self.logged:
                self._logged_sends(d, can, fatigue)
            else:
                for extra in (0, 1):
                    rate = self.send_rate * (1.0 if extra == 0 else 0.08)
                    users = np.flatnonzero(can & (rng.random(n) < rate))
                    if not len(users):
                        continue
                    explore = rng.random(len(users)) < sim.exploration
                    hour = np.where(explore, rng.integers(0, 24, len(users)),
                                    rng.choice(house, len(users)))
                    minute = rng.random(len(users)) * 60
                    t = d + (hour + minute / 60) / 24 - self.offsets[self.sender_zone, d] / 1440.0
                    t = np.clip(t, 0, None)
                    order = np.argsort(t, kind="stable")
                    users, t = users[order], t[order]
                    self._send_and_respond(users, t, fatigue)
            # ---- sessions in local time, partly from the user's rhythm
            e = self.engagement(np.full(n, d + 0.5), np.arange(n))
            lam = self.activity * e * started
            count = rng.poisson(lam)
            users = np.repeat(np.arange(n), count)
            if len(users):
                weekend = ((self.start.dayofweek + d) % 7) >= 5
                rhythm = self.rhythm[users, int(weekend)]
                cdf = np.cumsum(rhythm, axis=1) / rhythm.sum(axis=1, keepdims=True)
                own = _sample_hours(rng, cdf)
                generic = _sample_hours(rng, np.broadcast_to(GENERIC_CDF, (len(users), 24)))
                hour = np.where(rng.random(len(users)) < sim.session_rhythm_share, own, generic)
                local = d + (hour + rng.random(len(users))) / 24
                t = local - self.offsets[self.zone[users], d] / 1440.0
                keep = t >= 0
                users, t = users[keep], t[keep]
                self._emit(users, t, "session")
                buy = rng.random(len(users)) < sim.purchase_per_session * SEGMENT_OPENS[self.segment[users]]
                if buy.any():
                    self._emit(users[buy], t[buy] + rng.uniform(2, 30, buy.sum()) / 1440, "purchase",
                               value=np.round(rng.lognormal(3.1, 0.8, buy.sum()), 2))

    def _logged_sends(self, d: int, can: np.ndarray, fatigue: float) -> None:
        """One local day of the rule-obeying sender that logs propensities (module
        :mod:`simulator.sender`); local day ``d`` is the calendar date start + d everywhere."""
        sim, rng, n = self.cfg.simulate, self.rng, self.n
        date = self.start + pd.Timedelta(days=d)
        self.rules.new_day(date.year * 12 + date.month)
        house_minutes = np.array(sim.house_hours, dtype=np.int64) * 60
        for extra in (0, 1):
            rate = self.send_rate * (1.0 if extra == 0 else 0.08)
            users = np.flatnonzero(can & (rng.random(n) < rate))
            if not len(users):
                continue
            channel = rng.choice(_CHANNELS, len(users), p=_CHANNEL_SHARES)
            quota = np.isin(channel, self.cfg.plan.quota_channels)
            off = self.offsets[self.zone[users], d]
            slot_start = d + np.arange(24)[None, :] / 24.0 - off[:, None] / 1440.0
            allowed = allowed_hours(self.rules, users, slot_start, self.signup, quota, self.cfg)
            keep = allowed.any(axis=1)
            if not keep.any():
                continue
            users, channel, quota, off = users[keep], channel[keep], quota[keep], off[keep]
            slot_start, allowed = slot_start[keep], allowed[keep]
            m = len(users)
            # the house hours of the sender's zone, as hours of each user's local day
            sender_off = self.offsets[self.sender_zone, d]
            house_local = ((house_minutes[None, :] + off[:, None] - sender_off) % 1440) // 60
            house = np.zeros_like(allowed)
            house[np.arange(m)[:, None], house_local] = True
            hour, propensity = choose_hours(rng, allowed, house, sim.exploration)
            t_all = slot_start + rng.random(m)[:, None] / 24.0   # a random minute of each hour
            t = t_all[np.arange(m), hour]
            counterfactual = self._counterfactual(users, t_all, fatigue)
            order = np.argsort(t, kind="stable")
            users, t, channel, quota = users[order], t[order], channel[order], quota[order]
            propensity, counterfactual = propensity[order], counterfactual[order]
            opened = self._send_and_respond(users, t, fatigue, channel=channel, propensity=propensity,
                                            counterfactual=counterfactual)
            self.rules.record(users, t, opened, quota, self.signup)

    def _counterfactual(self, users: np.ndarray, t_all: np.ndarray, fatigue: float) -> np.ndarray:
        """(users, 24) the true open probability of each send had it gone at each local hour
        of its day instead (same minute, same earlier sends): what _send_and_respond draws."""
        m = len(users)
        u = np.repeat(users, 24)
        tt = t_all.ravel()
        hour, weekend = self._local(u, tt)
        h = np.floor(hour).astype(int) % 24
        recent = ((t_all[:, :, None] - self.prev_sends[users][:, None, :]) < 1.0).sum(axis=2).ravel()
        p = self.base[u] * self.rhythm[u, weekend.astype(int), h] * self.engagement(tt, u) * fatigue ** recent
        return np.clip(p, 0, 0.95).reshape(m, 24)

    def _send_and_respond(self, users: np.ndarray, t: np.ndarray, fatigue: float, channel=None,
                          propensity=None, counterfactual=None) -> np.ndarray:
        """Emit the sends and the answers; returns which sends were opened."""
        sim, rng = self.cfg.simulate, self.rng
        # a user can get two sends in a day: handle them one at a time so fatigue sees both
        first = np.ones(len(users), dtype=bool)
        first[1:] = users[1:] != users[:-1]
        opened_all = np.zeros(len(users), dtype=bool)
        given_channel = channel
        for part in (first, ~first):
            if not part.any():
                continue
            u, tt = users[part], t[part]
            recent = ((tt[:, None] - self.prev_sends[u]) < 1.0).sum(axis=1)
            self.prev_sends[u, 1] = self.prev_sends[u, 0]
            self.prev_sends[u, 0] = tt
            msg = self._message_ids(len(u))
            if given_channel is None:
                channel = rng.choice(_CHANNELS, len(u), p=_CHANNEL_SHARES)
            else:
                channel = given_channel[part]
            self._emit(u, tt, "send", msg=msg, channel=channel,
                       propensity=None if propensity is None else propensity[part])
            if counterfactual is not None:
                for key, values in (("msg", msg), ("user", u), ("t", tt), ("cf", counterfactual[part])):
                    self.send_truth[key].append(values)
            hour, weekend = self._local(u, tt)
            h = np.floor(hour).astype(int) % 24
            p = self.base[u] * self.rhythm[u, weekend.astype(int), h] * self.engagement(tt, u) * fatigue ** recent
            opened = rng.random(len(u)) < np.clip(p, 0, 0.95)
            opened_all[part] = opened
            if opened.any():
                delay = np.minimum(rng.exponential(40.0, opened.sum()), 23.5 * 60) / 1440
                t_open = tt[opened] + delay + 1e-5
                open_msg = msg[opened].copy()
                lost = rng.random(len(open_msg)) < 0.05   # real logs lose some message ids
                open_msg[lost] = None
                self._emit(u[opened], t_open, "open", msg=open_msg, channel=channel[opened])
                click = rng.random(opened.sum()) < sim.click_per_open
                if click.any():
                    self._emit(u[opened][click], t_open[click] + rng.uniform(0.5, 10, click.sum()) / 1440,
                               "click", msg=msg[opened][click], channel=channel[opened][click])
            quits = rng.random(len(u)) < sim.unsubscribe_per_send * (1 + 3 * (1 - self.engagement(tt, u))) * (
                1 + recent)
            quits &= ~opened
            if quits.any():
                self.unsubscribed_at[u[quits]] = tt[quits]
                self._emit(u[quits], tt[quits] + 1e-4, "unsubscribe")
        return opened_all

    # ---------------------------------------------------------------- outputs

    def frames(self, snapshot_day: float) -> tuple[pa.Table, pd.DataFrame, pd.DataFrame]:
        c = self.cols
        if c["user"]:
            user = np.concatenate(c["user"])
            t = np.concatenate(c["t"])
            event = np.concatenate(c["event"])
            msg = np.concatenate(c["msg"])
            channel = np.concatenate(c["channel"])
            value = np.concatenate(c["value"])
        else:
            user, t = np.zeros(0, int), np.zeros(0)
            event = msg = channel = np.zeros(0, dtype=object)
            value = np.zeros(0)
        ts_us = (self.start.value // 1000 + np.round(t * 86400e6)).astype(np.int64)
        engagement = np.isin(event, self.cfg.labels.engagement_events)
        truth = self._truth(user, t, engagement, snapshot_day)
        keep = t <= snapshot_day
        order = np.lexsort((ts_us[keep], user[keep]))
        idx = np.flatnonzero(keep)[order]
        columns = {
            "user_id": pa.array(self.user_ids[user[idx]], pa.string()),
            "ts": pa.array(ts_us[idx], pa.timestamp("us", tz="UTC")),
            "event": pa.array(event[idx].astype(str), pa.string()),
            "message_id": pa.array(msg[idx], pa.string()),
            "channel": pa.array(channel[idx], pa.string()),
            "value": pa.array(value[idx], pa.float64(), from_pandas=True),
        }
        if self.logged:
            propensity = np.concatenate(c["propensity"]) if c["propensity"] else np.zeros(0)
            columns["propensity"] = pa.array(propensity[idx], pa.float64(), from_pandas=True)
        events = pa.table(columns)
        users = pd.DataFrame({
            "user_id": self.user_ids,
            "signup_ts": pd.to_datetime(self.start.value // 1000 + np.round(self.signup * 86400e6).astype(np.int64),
                                        unit="us", utc=True),
            "timezone": np.array(self.zones, dtype=object)[self.zone],
            "region": [_REGION.get(self.zones[z], "other") for z in self.zone],
            "device": self.rng.choice(_DEVICES, self.n, p=[0.45, 0.45, 0.10]),
            "age_band": self.rng.choice(_AGES, self.n, p=[0.25, 0.35, 0.25, 0.15]),
            "segment": _SEGMENTS[self.segment],
        })
        return events, users, truth

    def send_truth_table(self, snapshot_day: float) -> pa.Table:
        """Every logged send's true open probability at each local hour of its day."""
        st = self.send_truth
        t = np.concatenate(st["t"]) if st["t"] else np.zeros(0)
        keep = t <= snapshot_day
        cf = np.concatenate(st["cf"])[keep] if st["cf"] else np.zeros((0, 24))
        user = np.concatenate(st["user"])[keep] if st["user"] else np.zeros(0, int)
        ts_us = (self.start.value // 1000 + np.round(t[keep] * 86400e6)).astype(np.int64)
        return pa.table({
            "message_id": pa.array(np.concatenate(st["msg"])[keep] if st["msg"] else [], pa.string()),
            "user_id": pa.array(self.user_ids[user], pa.string()),
            "ts": pa.array(ts_us, pa.timestamp("us", tz="UTC")),
            "true_open_probs": pa.array(list(cf.astype(np.float32)), pa.list_(pa.float32())),
        })

    def _truth(self, user: np.ndarray, t: np.ndarray, engagement: np.ndarray, snapshot: float) -> pd.DataFrame:
        cfg = self.cfg
        n = self.n
        lookback, horizon = cfg.labels.churn_lookback_days, cfg.labels.churn_horizon_days
        before = engagement & (t <= snapshot) & (t >= snapshot - lookback)
        after = engagement & (t > snapshot) & (t <= snapshot + horizon)
        active = np.zeros(n, bool)
        active[user[before]] = True
        came_back = np.zeros(n, bool)
        came_back[user[after]] = True
        users = np.arange(n)
        fatigue = cfg.simulate.fatigue_per_recent_send
        subscribed = self.unsubscribed_at > snapshot
        expected_fatigue = 1.0 - self.send_rate * fatigue
        kind = cfg.slots.kind
        probs = np.zeros((n, cfg.slots.n_slots))
        start_dow = (self.start.dayofweek + int(snapshot)) % 7
        for k in range(7):
            e = self.engagement(np.full(n, snapshot + k + 0.5), users)
            dow = (start_dow + k) % 7
            day_p = (self.base[:, None] * self.rhythm[:, int(dow >= 5), :] * e[:, None]
                     * expected_fatigue[:, None])
            day_p = np.clip(day_p, 0, 0.95)
            if kind == "hour_of_day":
                probs += day_p / 7
            else:
                probs[:, dow * 24:(dow + 1) * 24] = day_p
        probs *= subscribed[:, None]
        # the engagement intensity over the horizon gives the oracle churn probability
        grid = snapshot + np.arange(horizon) + 0.5
        e_grid = np.stack([self.engagement(np.full(n, g), users) for g in grid], axis=1)
        sends = self.send_rate * subscribed
        per_day = (self.activity * (1 + cfg.simulate.purchase_per_session)
                   + sends * self.base * expected_fatigue * (1 + cfg.simulate.click_per_open))
        true_churn = np.exp(-(per_day[:, None] * e_grid).sum(axis=1))
        dominant = np.array([a[0] for a in ARCHETYPES])[self.weights.argmax(axis=1)]
        return pd.DataFrame({
            "user_id": self.user_ids,
            "true_open_probs": list(probs),
            "active_at_snapshot": active,
            "churned": active & ~came_back,
            "true_churn_prob": true_churn,
            "archetype": dominant,
        })


def simulate(cfg: Config, out_dir: Path, *, users: int | None = None, days: int | None = None,
             seed: int | None = None, progress: bool = True,
             sender: str | None = None) -> SimulationSummary:
    """Write events.parquet, users.parquet, truth.parquet and snapshot.txt into ``out_dir``.

    ``sender="logged"`` (or ``simulate.sender``) uses the rule-obeying sender that logs
    propensities, and also writes send_truth.parquet (see :mod:`simulator.sender`).
    """
    if sender is not None:
        cfg = cfg.with_overrides(simulate={"sender": sender})
    sim = cfg.simulate
    n_users = users or sim.users
    n_days = days or sim.days
    seed = sim.seed if seed is None else seed
    if n_days < 1 or n_users < 1:
        raise ValueError("simulate: --users and --days must be positive")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = pd.Timestamp(sim.start).tz_convert("UTC") if pd.Timestamp(sim.start).tzinfo else pd.Timestamp(sim.start, tz="UTC")
    snapshot = (start + pd.Timedelta(days=n_days)).to_pydatetime()
    zones = list(sim.timezones)
    if sim.sender_timezone not in zones:
        zones.append(sim.sender_timezone)
    total_days = n_days + cfg.labels.churn_horizon_days + 7
    offsets = _offsets_minutes(zones, start, total_days)
    n_chunks = (n_users + _CHUNK - 1) // _CHUNK
    seeds = np.random.SeedSequence(seed).spawn(n_chunks)
    names = ("events", "users", "truth") + (("send_truth",) if sim.sender == "logged" else ())
    paths = {name: out_dir / f"{name}.parquet" for name in names}
    writers: dict[str, pq.ParquetWriter] = {}
    n_events = 0
    # the three tables appear together or not at all (a crash leaves the old ones)
    with ExitStack() as stack:
        tmp = {name: stack.enter_context(atomic_path(path)) for name, path in paths.items()}
        try:
            for i in tqdm(range(n_chunks), desc="simulating users", unit="chunk", disable=not progress):
                first = i * _CHUNK
                chunk = _Chunk(cfg, np.random.default_rng(seeds[i]), first, min(_CHUNK, n_users - first),
                               n_days, start, zones, offsets, zones.index(sim.sender_timezone))
                chunk.run()
                events, users_frame, truth = chunk.frames(float(n_days))
                tables = {"events": events,
                          "users": pa.Table.from_pandas(users_frame, preserve_index=False),
                          "truth": pa.Table.from_pandas(truth, preserve_index=False)}
                if chunk.logged:
                    tables["send_truth"] = chunk.send_truth_table(float(n_days))
                for name, table in tables.items():
                    if name not in writers:
                        writers[name] = pq.ParquetWriter(tmp[name], table.schema)
                    writers[name].write_table(table)
                n_events += events.num_rows
        finally:
            for w in writers.values():
                w.close()
    (out_dir / "snapshot.txt").write_text(snapshot.isoformat() + "\n")
    return SimulationSummary(events_path=paths["events"], users_path=paths["users"], truth_path=paths["truth"],
                             snapshot=snapshot, n_users=n_users, n_events=n_events)
