"""A behaviour simulator with known truth, for development, tests and honest evaluation.

What real push logs carry, and what the models must get right:

- per-user daily rhythms in local time, mixtures of archetypes (commute 08-09, lunch
  12-13, after school 16-17, evening 20-22, late night), narrower on weekdays, with the
  commute peak moving to late morning at weekends;
- users in several time zones, and a biased historical sender that sends at a few house
  hours of its own zone (so each zone sees other local hours), exploring rarely;
- fatigue: every send in the previous 24 h lowers the open probability;
- app sessions whose hours only partly follow the open rhythm; purchases after sessions;
- engagement that fades before a user goes dormant; unsubscribes (no send reaches a user
  after their unsubscribe); cold-start users;
- user attributes that are observable (time zone, region, device, age band, a loyalty
  tier that depends on the latent segment but does not reveal it).

Settings of ``[simulate]``, each off in the default setting and all on in
``configs/harder_setting.toml``, make the log harder to fit by construction: rhythms that
drift (a slow shift of each user's peak hours, and a new archetype mix part-way for some),
opens that arrive 24-72 h after their send, channels with their own open rates and delays,
unsubscribes per channel, purchases caused by opened sends (within 72 h of the open),
faded users who come back, and sends per segment at the volumes of ``domain.md``.

``truth.parquet`` holds what the judge needs at the snapshot: ``true_open_probs``, per
slot, the probability that a send on ``truth_channel`` in that slot during the following
week is opened within the attribution window (``labels.open_attribution_hours``: the
label the models predict), with the rhythm, engagement and subscription of those days;
``true_churn_prob`` from the engagement intensity over the horizon (come-backs included);
the realised ``churned`` label; and the latent ``segment`` and dominant ``archetype``.

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
SEGMENTS = np.array(["high_value", "potential", "silent"])
SEGMENT_SHARE = np.array([0.25, 0.45, 0.30])
SEGMENT_SENDS = np.array([1.35, 1.0, 0.55])     # x send_rate
SEGMENT_OPENS = np.array([1.4, 1.0, 0.55])      # x base_open_rate
SEGMENT_SESSIONS = np.array([1.7, 1.0, 0.45])   # x sessions_per_day
# the observable attribute written in place of the latent segment: it leans on the segment
# (rows: high_value, potential, silent) without giving it away
TIERS = np.array(["basic", "silver", "gold"])
TIER_GIVEN_SEGMENT = np.array([[0.25, 0.40, 0.35], [0.55, 0.35, 0.10], [0.80, 0.17, 0.03]])
_REGION = {"Asia/Shanghai": "cn", "Europe/London": "uk", "America/New_York": "us",
           "Asia/Kolkata": "in", "Australia/Sydney": "au"}
_DEVICES = np.array(["ios", "android", "web"])
_AGES = np.array(["18-24", "25-34", "35-44", "45+"])
_CHUNK = 25_000
RHYTHM_FLOOR = 0.12
EXTRA_ROUND = 0.08                 # the second daily send round, x each user's send rate
_OPEN_DELAY_CAP_MINUTES = 23.5 * 60  # opens that are not late come within the day
_LATE_OPEN_HOURS = (24.0, 72.0)     # a late open's delay, uniform
_PURCHASE_WINDOW_HOURS = 72.0       # a purchase caused by an open comes within this
_SWITCH_DAYS = 14.0                 # a new archetype mix takes over across two weeks
_RHYTHM_STEP_DAYS = 7.0             # a drifting rhythm is recomputed once a week
DORMANT = 0.03                     # engagement below this is none
_WINBACK_LEVEL = (0.3, 1.0)         # a come-back's engagement, uniform


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
        if sim.segment_sends_per_week:   # the domain's volumes, over both daily rounds
            per_day, floor = np.array(sim.segment_sends_per_week)[self.segment] / 7 / (1 + EXTRA_ROUND), 0.0
        else:
            per_day, floor = sim.send_rate * SEGMENT_SENDS[self.segment], 0.02
        self.send_rate = np.clip(per_day * rng.lognormal(0, 0.15, n), floor, 1.0)
        self.activity = sim.sessions_per_day * SEGMENT_SESSIONS[self.segment] * rng.lognormal(0, 0.4, n)
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
        # the harder setting's mechanisms draw only when on, so the default stays one setting
        self.drift = (rng.normal(0.0, sim.rhythm_drift_hours_per_30_days / 30, n)   # hours per day
                      if sim.rhythm_drift_hours_per_30_days > 0 else None)
        self.switch_day = self.weights_after = None
        if sim.rhythm_switch_share > 0:
            switches = rng.random(n) < sim.rhythm_switch_share
            self.switch_day = np.where(switches, rng.uniform(0, days, n), np.inf)
            self.weights_after = rng.dirichlet(np.full(len(ARCHETYPES), 0.35), size=n)
        self.comeback = None
        if sim.winback_share > 0:
            back = fades & (rng.random(n) < sim.winback_share)
            dormant_from = self.fade_start + self.fade_tau * np.log(1 / DORMANT)
            self.comeback = np.where(back, dormant_from + rng.exponential(sim.winback_after_days_mean, n), np.inf)
            self.comeback_level = rng.uniform(*_WINBACK_LEVEL, n)
        self.rhythm_today = self.rhythm
        self._rhythm_cache: tuple[int | None, np.ndarray] = (None, self.rhythm)
        # channels: names, shares, open factors, delays; unsubscribes per user and channel
        # (all of a user's channels at once unless unsubscribe_per_channel)
        channels = sim.channels
        self.channel_names = np.array(list(channels), dtype=object)
        share = np.array([c.share for c in channels.values()], dtype=float)
        self.channel_p = share / share.sum()
        self.open_factor = np.array([c.open_factor for c in channels.values()])
        self.delay_minutes = np.array([c.open_delay_minutes for c in channels.values()])
        self.truth_channel = list(channels).index(sim.truth_channel)
        self.in_window = self._share_in_window()
        self.unsubscribed_at = np.full((n, len(channels)), np.inf)
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

    def _share_in_window(self) -> np.ndarray:
        """(channels,) share of a channel's opens that come within the attribution window:
        the truth is the probability of the label the models learn, not of any open."""
        window_h = self.cfg.labels.open_attribution_hours
        late = self.cfg.simulate.late_open_share
        on_time = (np.ones(len(self.delay_minutes)) if window_h * 60 >= _OPEN_DELAY_CAP_MINUTES
                   else 1 - np.exp(-window_h * 60 / self.delay_minutes))
        lo, hi = _LATE_OPEN_HOURS
        return (1 - late) * on_time + late * float(np.clip((window_h - lo) / (hi - lo), 0, 1))

    def engagement(self, t_days: np.ndarray, users: np.ndarray) -> np.ndarray:
        e = np.exp(-np.maximum(t_days - self.fade_start[users], 0.0) / self.fade_tau[users])
        e = np.where(e < DORMANT, 0.0, e)
        if self.comeback is not None:
            e = np.where(t_days >= self.comeback[users], self.comeback_level[users], e)
        return e

    def _weights_on(self, day: float) -> np.ndarray:
        """Each user's archetype mix on ``day`` (days since start)."""
        if self.switch_day is None:
            return self.weights
        moved = np.clip((day - self.switch_day) / _SWITCH_DAYS, 0.0, 1.0)[:, None]
        return (1 - moved) * self.weights + moved * self.weights_after

    def _rhythm_on(self, day: float) -> np.ndarray:
        """(n, 2, 24) every user's rhythm on ``day``: the fixed one unless rhythms drift, then
        the one of the middle of ``day``'s week (drift is slow; a week's step keeps it cheap)."""
        if self.drift is None and self.switch_day is None:
            return self.rhythm
        week = int(np.floor(day / _RHYTHM_STEP_DAYS))
        if self._rhythm_cache[0] != week:
            mid = (week + 0.5) * _RHYTHM_STEP_DAYS
            shift = self.shift if self.drift is None else self.shift + self.drift * mid
            self._rhythm_cache = (week, rhythms(self._weights_on(mid), shift))
        return self._rhythm_cache[1]

    def _subscribed(self, users: np.ndarray, channel: np.ndarray) -> np.ndarray:
        return np.isinf(self.unsubscribed_at[users, channel])

    def _draw_channels(self, k: int) -> np.ndarray:
        return self.rng.choice(len(self.channel_p), k, p=self.channel_p)

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
            self.rhythm_today = self._rhythm_on(d + 0.5)
            # ---- sends, to users with a channel still subscribed
            can = started & np.isinf(self.unsubscribed_at).any(axis=1)
            if self.logged:
                self._logged_sends(d, can, fatigue)
            else:
                self._house_sends(d, can, house, fatigue)
            # ---- sessions in local time, partly from the user's rhythm
            e = self.engagement(np.full(n, d + 0.5), np.arange(n))
            lam = self.activity * e * started
            count = rng.poisson(lam)
            users = np.repeat(np.arange(n), count)
            if len(users):
                weekend = ((self.start.dayofweek + d) % 7) >= 5
                rhythm = self.rhythm_today[users, int(weekend)]
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

    def _house_sends(self, d: int, can: np.ndarray, house: np.ndarray, fatigue: float) -> None:
        """One day of the house sender: two rounds at house hours of its zone (sometimes a
        random hour), answered in time order."""
        sim, rng, n = self.cfg.simulate, self.rng, self.n
        users, t = [], []
        for rate in (self.send_rate, self.send_rate * EXTRA_ROUND):
            drawn = np.flatnonzero(can & (rng.random(n) < rate))
            explore = rng.random(len(drawn)) < sim.exploration
            hour = np.where(explore, rng.integers(0, 24, len(drawn)), rng.choice(house, len(drawn)))
            minute = rng.random(len(drawn)) * 60
            sent = d + (hour + minute / 60) / 24 - self.offsets[self.sender_zone, d] / 1440.0
            users.append(drawn)
            t.append(np.clip(sent, 0, None))
        users, t = np.concatenate(users), np.concatenate(t)
        channel = self._draw_channels(len(users))
        # a user drawn in both rounds gets two sends: the later waits for the answer to the
        # earlier (its fatigue, and an unsubscribe that cancels it)
        order = np.lexsort((t, users))
        users, t, channel = users[order], t[order], channel[order]
        later = np.zeros(len(users), dtype=bool)
        later[1:] = users[1:] == users[:-1]
        for part in (~later, later):
            u, tt, ch = users[part], t[part], channel[part]
            ok = self._subscribed(u, ch)
            by_time = np.argsort(tt[ok], kind="stable")
            self._send_and_respond(u[ok][by_time], tt[ok][by_time], ch[ok][by_time], fatigue)

    def _logged_sends(self, d: int, can: np.ndarray, fatigue: float) -> None:
        """One local day of the rule-obeying sender that logs propensities (module
        :mod:`simulator.sender`); local day ``d`` is the calendar date start + d everywhere."""
        sim, rng, n = self.cfg.simulate, self.rng, self.n
        date = self.start + pd.Timedelta(days=d)
        self.rules.new_day(date.year * 12 + date.month)
        house_minutes = np.array(sim.house_hours, dtype=np.int64) * 60
        for rate in (self.send_rate, self.send_rate * EXTRA_ROUND):
            # the second round comes after the first (the rules keep sends in time order), so
            # the first round's unsubscribes count
            can = can & np.isinf(self.unsubscribed_at).any(axis=1)
            users = np.flatnonzero(can & (rng.random(n) < rate))
            if not len(users):
                continue
            channel = self._draw_channels(len(users))
            quota = np.isin(self.channel_names[channel], self.cfg.plan.quota_channels)
            off = self.offsets[self.zone[users], d]
            slot_start = d + np.arange(24)[None, :] / 24.0 - off[:, None] / 1440.0
            allowed = allowed_hours(self.rules, users, slot_start, self.signup, quota, self.cfg)
            keep = allowed.any(axis=1) & self._subscribed(users, channel)
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
            counterfactual = self._counterfactual(users, t_all, channel, fatigue)
            order = np.argsort(t, kind="stable")
            users, t, channel, quota = users[order], t[order], channel[order], quota[order]
            propensity, counterfactual = propensity[order], counterfactual[order]
            opened = self._send_and_respond(users, t, channel, fatigue, propensity=propensity,
                                            counterfactual=counterfactual)
            self.rules.record(users, t, opened, quota, self.signup)

    def _open_prob(self, users: np.ndarray, t: np.ndarray, channel: np.ndarray, recent: np.ndarray,
                   fatigue: float) -> np.ndarray:
        """The probability that a send at ``t`` on ``channel`` is opened (at any delay)."""
        hour, weekend = self._local(users, t)
        h = np.floor(hour).astype(int) % 24
        p = (self.base[users] * self.open_factor[channel] * self.rhythm_today[users, weekend.astype(int), h]
             * self.engagement(t, users) * fatigue ** recent)
        return np.clip(p, 0, 0.95)

    def _counterfactual(self, users: np.ndarray, t_all: np.ndarray, channel: np.ndarray,
                        fatigue: float) -> np.ndarray:
        """(users, 24) the true probability that each send is opened within the attribution
        window had it gone at each local hour of its day instead (same minute, same channel,
        same earlier sends): what _send_and_respond draws."""
        m = len(users)
        recent = ((t_all[:, :, None] - self.prev_sends[users][:, None, :]) < 1.0).sum(axis=2).ravel()
        ch = np.repeat(channel, 24)
        p = self._open_prob(np.repeat(users, 24), t_all.ravel(), ch, recent, fatigue) * self.in_window[ch]
        return p.reshape(m, 24)

    def _send_and_respond(self, users: np.ndarray, t: np.ndarray, channel: np.ndarray, fatigue: float,
                          propensity=None, counterfactual=None) -> np.ndarray:
        """Emit the sends (distinct users, in time order) and the answers; returns which
        sends were opened."""
        sim, rng = self.cfg.simulate, self.rng
        if not len(users):
            return np.zeros(0, dtype=bool)
        recent = ((t[:, None] - self.prev_sends[users]) < 1.0).sum(axis=1)
        self.prev_sends[users, 1] = self.prev_sends[users, 0]
        self.prev_sends[users, 0] = t
        msg = self._message_ids(len(users))
        names = self.channel_names[channel]
        self._emit(users, t, "send", msg=msg, channel=names, propensity=propensity)
        if counterfactual is not None:
            for key, values in (("msg", msg), ("user", users), ("t", t), ("cf", counterfactual)):
                self.send_truth[key].append(values)
        opened = rng.random(len(users)) < self._open_prob(users, t, channel, recent, fatigue)
        if opened.any():
            k = int(opened.sum())
            u, ch = users[opened], channel[opened]
            delay = np.minimum(rng.exponential(self.delay_minutes[ch]), _OPEN_DELAY_CAP_MINUTES) / 1440
            if sim.late_open_share > 0:   # read a day or more later, still from the message
                late = rng.random(k) < sim.late_open_share
                delay = np.where(late, rng.uniform(*_LATE_OPEN_HOURS, k) / 24, delay)
            t_open = t[opened] + delay + 1e-5
            open_msg = msg[opened].copy()
            lost = rng.random(k) < 0.05   # real logs lose some message ids
            open_msg[lost] = None
            self._emit(u, t_open, "open", msg=open_msg, channel=names[opened])
            click = rng.random(k) < sim.click_per_open
            if click.any():
                self._emit(u[click], t_open[click] + rng.uniform(0.5, 10, click.sum()) / 1440,
                           "click", msg=msg[opened][click], channel=names[opened][click])
            if sim.purchase_per_open > 0:
                buy = rng.random(k) < sim.purchase_per_open
                if buy.any():
                    # an exponential wait cut at the window, by inverting its CDF
                    mean_h = sim.purchase_after_open_hours_mean
                    cut = 1 - np.exp(-_PURCHASE_WINDOW_HOURS / mean_h)
                    wait_h = -mean_h * np.log1p(-rng.random(buy.sum()) * cut)
                    self._emit(u[buy], t_open[buy] + wait_h / 24, "purchase",
                               value=np.round(rng.lognormal(3.1, 0.8, buy.sum()), 2))
        quits = rng.random(len(users)) < sim.unsubscribe_per_send * (1 + 3 * (1 - self.engagement(t, users))) * (
            1 + recent)
        quits &= ~opened
        if quits.any():
            if sim.unsubscribe_per_channel:
                self.unsubscribed_at[users[quits], channel[quits]] = t[quits]
                quit_channel = names[quits]
            else:
                self.unsubscribed_at[users[quits], :] = t[quits][:, None]
                quit_channel = None
            self._emit(users[quits], t[quits] + 1e-4, "unsubscribe", channel=quit_channel)
        return opened

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
        tier_cdf = np.cumsum(TIER_GIVEN_SEGMENT[self.segment], axis=1)
        users = pd.DataFrame({
            "user_id": self.user_ids,
            "signup_ts": pd.to_datetime(self.start.value // 1000 + np.round(self.signup * 86400e6).astype(np.int64),
                                        unit="us", utc=True),
            "timezone": np.array(self.zones, dtype=object)[self.zone],
            "region": [_REGION.get(self.zones[z], "other") for z in self.zone],
            "device": self.rng.choice(_DEVICES, self.n, p=[0.45, 0.45, 0.10]),
            "age_band": self.rng.choice(_AGES, self.n, p=[0.25, 0.35, 0.25, 0.15]),
            # observable, and only leaning on the latent segment (which stays in truth.parquet)
            "loyalty_tier": TIERS[np.minimum((self.rng.random(self.n)[:, None] > tier_cdf).sum(axis=1), 2)],
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
        reachable = self.unsubscribed_at > snapshot                     # (n, channels)
        tc = self.truth_channel
        expected_fatigue = 1.0 - self.send_rate * fatigue
        kind = cfg.slots.kind
        probs = np.zeros((n, cfg.slots.n_slots))
        start_dow = (self.start.dayofweek + int(snapshot)) % 7
        for k in range(7):
            day = snapshot + k + 0.5
            e = self.engagement(np.full(n, day), users)
            dow = (start_dow + k) % 7
            day_p = (self.base[:, None] * self.open_factor[tc] * self._rhythm_on(day)[:, int(dow >= 5), :]
                     * e[:, None] * expected_fatigue[:, None])
            day_p = np.clip(day_p, 0, 0.95) * self.in_window[tc]
            if kind == "hour_of_day":
                probs += day_p / 7
            else:
                probs[:, dow * 24:(dow + 1) * 24] = day_p
        probs *= reachable[:, tc][:, None]
        # the engagement intensity over the horizon gives the oracle churn probability: sessions
        # and opens of the channels still subscribed (clicks and purchases only follow them)
        grid = snapshot + np.arange(horizon) + 0.5
        e_grid = np.stack([self.engagement(np.full(n, g), users) for g in grid], axis=1)
        open_mix = (reachable * self.channel_p * self.open_factor).sum(axis=1)
        per_day = self.activity + self.send_rate * (1 + EXTRA_ROUND) * self.base * expected_fatigue * open_mix
        true_churn = np.exp(-(per_day[:, None] * e_grid).sum(axis=1))
        dominant = np.array([a[0] for a in ARCHETYPES])[self._weights_on(snapshot).argmax(axis=1)]
        return pd.DataFrame({
            "user_id": self.user_ids,
            "true_open_probs": list(probs),
            "active_at_snapshot": active,
            "churned": active & ~came_back,
            "true_churn_prob": true_churn,
            "archetype": dominant,
            "segment": SEGMENTS[self.segment],
            "truth_channel": np.full(n, self.channel_names[tc], dtype=object),
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
