"""Each user's daily rhythm as a mixture of a few shapes learned from the whole population.

A user's app use and answers to sends, slot by slot, are thin: a few dozen sessions spread
over 24 hours, and sends at the few hours the sender chose. But people's rhythms come in a
few common shapes (a morning peak, a lunch peak, an evening ...), and the population shows
them. So, from everyone known at T:

- a small non-negative basis of slot profiles (:class:`RhythmBasis`), fitted as a Poisson
  factorisation of the population's whole-history evidence by slot: each component has an
  engagement shape (its share of sessions and purchases per slot) and an open rate per slot
  (how likely a send in that slot is opened, learned from opened AND unopened sends at that
  slot, each user's own level factored out), and a user is a mix of the components;
- each user's mix, the posterior mode under a Dirichlet prior whose mean and strength are
  learned from the population (:func:`rhythm_weights`): every engagement event's slot and
  every send's outcome at its slot weigh in, so a user with little evidence stays near the
  population's mix and a user with much evidence gets their own;
- optionally a background (``background_share``): a share of everyone's engagement that is
  nobody's rhythm (the hours at which everyone uses the app), its shape learned as what the
  users' own mixes leave over, so each user's mix is read from the rest;
- per-slot values from that mix (:func:`rhythm_families`): the engagement profile, the open
  rhythm (the mix of the components' open rates, mean 1 over slots) and an open propensity
  at the slot (the user's level times the rhythm, pooled with the user's own sends and
  opens in that slot).

A factorisation like this has many near-equal optima (the likelihoods of different starts
differ by 1e-4 per event while their best slots differ by a percent of capture), so the
basis is fitted from ``n_starts`` fixed starts and the users' values are averaged over them.

Nothing here knows how a log was made: the shapes, their open rates and the prior all come
from the log. The fit is deterministic (fixed starts, no random draws), vectorised, and its
cost is linear in users (the basis is fitted on at most ``max_fit_users`` users, chosen by a
stable hash of their ids when given; every user's mix is computed a block at a time).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pandas as pd
from threadpoolctl import threadpool_limits

__all__ = ["RHYTHM_FAMILIES", "RhythmBasis", "fit_evidence", "fit_rhythm_basis", "fit_rows", "rhythm_families", "rhythm_weights"]

# per-slot families this module adds, each an (n_users, n_slots) array
RHYTHM_FAMILIES: tuple[str, ...] = (
    "rhythm_share",   # posterior engagement profile: share of the user's engagement in the slot, x n_slots
    "rhythm_open",    # posterior open rhythm: the mix of the components' open rates, mean 1 over slots
    "rhythm_expected",  # the user's open level x the open rhythm: the slot's open rate from the rhythm alone
    "rhythm_rate",    # the same pooled with the slot's own sends and opens
    "rhythm_rank",    # rank of rhythm_rate within the user (0 = best slot)
)

_TINY = 1e-12
# pseudo-counts per component while the basis is fitted: the users' own mixes
_FLAT_PRIOR = 1e-3
# pseudo-sends at the population's rate in each send-volume group's pooled rate
_GROUP_PSEUDO_SENDS = 50.0


@dataclass(frozen=True)
class RhythmBasis:
    """What the population says about rhythms; fitted once over one stated population.
    One basis per start (the leading axis of each array)."""

    shapes: np.ndarray       # (starts, K, n_slots) each component's engagement share per slot (sums to 1)
    open_rates: np.ndarray   # (starts, K, n_slots) each component's open rate per slot, relative (mean 1)
    prior: np.ndarray        # (starts, K) Dirichlet pseudo-counts of a user's mix
    overall_rate: float      # the fit users' opened / sends (0: a log without sends)
    population: str = ""     # which users it was fitted on
    # (starts, n_slots) engagement that is nobody's rhythm, the same for every user: its sum
    # is that share of each user's engagement, spread over the slots as everyone's is (None:
    # every event is the user's own rhythm)
    background: np.ndarray | None = None
    # a user's open level is shrunk toward the pooled rate of the users sent to about as often:
    # (groups - 1) ascending edges of the age-weighted send count, and each group's rate (None:
    # toward overall_rate)
    level_edges: np.ndarray | None = None
    level_rates: np.ndarray | None = None

    @property
    def n_starts(self) -> int:
        return self.prior.shape[0]

    @property
    def n_components(self) -> int:
        return self.prior.shape[1]

    def to_dict(self) -> dict:
        return {"shapes": self.shapes.tolist(), "open_rates": self.open_rates.tolist(),
                "prior": self.prior.tolist(), "overall_rate": self.overall_rate, "population": self.population,
                "background": None if self.background is None else self.background.tolist(),
                "level_edges": None if self.level_edges is None else self.level_edges.tolist(),
                "level_rates": None if self.level_rates is None else self.level_rates.tolist()}

    @classmethod
    def from_dict(cls, data: dict) -> "RhythmBasis":
        return cls(shapes=np.asarray(data["shapes"], dtype=float), open_rates=np.asarray(data["open_rates"], dtype=float),
                   prior=np.asarray(data["prior"], dtype=float), overall_rate=float(data["overall_rate"]),
                   population=data.get("population", ""),
                   background=_optional(data, "background"), level_edges=_optional(data, "level_edges"),
                   level_rates=_optional(data, "level_rates"))

    def level_prior(self, sends: np.ndarray) -> np.ndarray | float:
        """The rate each user's open level is shrunk toward, from their sends by slot."""
        if self.level_rates is None:
            return self.overall_rate
        return self.level_rates[_send_group(self.level_edges, sends.sum(axis=1))][:, None]


def _send_group(edges: np.ndarray, volume: np.ndarray) -> np.ndarray:
    """Each user's send-volume group (0 .. len(edges)) from their total sends."""
    return np.searchsorted(edges, volume, side="right")


def _optional(data: dict, key: str) -> np.ndarray | None:
    return None if data.get(key) is None else np.asarray(data[key], dtype=float)


def _initial_shapes(n_components: int, n_slots: int, offset: float) -> np.ndarray:
    """Evenly spaced circular bumps over the slots, the first ``offset`` of a spacing past
    slot 0, plus a little of everything: a fixed start, so the same log gives the same basis."""
    slots = np.arange(n_slots)
    centres = (np.arange(n_components) + offset) * n_slots / n_components
    gap = np.abs(slots[None, :] - centres[:, None])
    gap = np.minimum(gap, n_slots - gap)
    bumps = np.exp(-0.5 * (gap / (n_slots / n_components)) ** 2) + 0.05
    return bumps / bumps.sum(axis=1, keepdims=True)


def _own_over_mix(activity: np.ndarray, mix: np.ndarray, background: np.ndarray | None) -> np.ndarray:
    """The part of each user's engagement by slot their own rhythm ``mix`` (rows sum to 1)
    accounts for beside the ``background`` (sums to its share), over the mix: the E step of
    the two, (1 - share) a / ((1 - share) mix + background), in one pass (no background: all
    of it, a / mix)."""
    if background is None:
        return activity / mix
    own = 1.0 - background.sum()
    return activity * (own / (own * mix + background + _TINY))


def _weight_step(weights: np.ndarray, activity: np.ndarray, opened: np.ndarray | None, shapes: np.ndarray,
                 open_rates: np.ndarray, prior: np.ndarray, totals: np.ndarray,
                 exposure: np.ndarray | None, background: np.ndarray | None = None) -> np.ndarray:
    """One minorise-maximise step of every user's mix (rows on the simplex).

    The user's log posterior in the mix w: sum_s a_s log(w.B_s) - A log(sum w) (engagement by
    slot, its total profiled out), + sum_s o_s log(w.C_s) - O log(sum_s n_s w.C_s) (which
    slots the opens fell in, given where the sends went: unopened sends count through the
    exposure, the user's own open level profiled out), + sum_k prior_k log(w_k / sum w).
    Jensen on the log-sums and tangents on the -log terms give a closed-form update that
    never lowers it. ``totals``: (A + sum prior, O) per user; ``exposure``: sends @ C.T.
    With a ``background``, a user's engagement is the background plus their own mix (its
    weight 1 - the background's share), and the mix is moved on the part of it the mix
    accounts for (an EM step of the two inside the MM step: neither lowers the posterior)."""
    mix = weights @ shapes + _TINY
    ratio = _own_over_mix(activity, mix, background)
    if background is None:
        total = totals[:, :1]
    else:
        total = (ratio * mix).sum(axis=1, keepdims=True) + prior.sum()
    gain = weights * (ratio @ shapes.T)
    if opened is not None:
        rate = weights @ open_rates + _TINY
        expected = (weights * exposure).sum(axis=1, keepdims=True) + _TINY
        gain += weights * ((opened / rate) @ open_rates.T)
        total = total + totals[:, 1:] * exposure / expected
    out = (gain + prior) / total
    return out / out.sum(axis=1, keepdims=True)


def _totals(activity: np.ndarray, opened: np.ndarray | None, prior: np.ndarray) -> np.ndarray:
    first = activity.sum(axis=1) + prior.sum()
    return np.stack([first, opened.sum(axis=1) if opened is not None else np.zeros_like(first)], axis=1)


def _dirichlet_prior(weights: np.ndarray, evidence: np.ndarray, min_evidence: float) -> np.ndarray:
    """Dirichlet pseudo-counts by moments of the mixes of the users with the most evidence,
    fitted under an almost flat prior (their own mixes, not pulled toward a prior that is
    being estimated: that loop feeds on itself, toward the population's mean mix for
    everyone): mean = their average mix, strength from the spread."""
    rich = evidence >= min_evidence
    if rich.sum() < 10 * weights.shape[1]:
        rich = evidence >= np.quantile(evidence, 0.75)
    w = weights[rich]
    mean = w.mean(axis=0)
    var = w.var(axis=0) + _TINY
    strength = float(np.median(mean * (1 - mean) / var - 1))
    return mean * float(np.clip(strength, 0.05, 10.0 * len(mean)))


def _through_spectrum(profiles: np.ndarray, gain: np.ndarray) -> np.ndarray:
    """``profiles`` (rows over circular slots) with each Fourier harmonic multiplied by
    ``gain`` (one factor per harmonic); the ripple below zero clipped away."""
    n_slots = profiles.shape[-1]
    return np.maximum(np.fft.irfft(np.fft.rfft(profiles, axis=-1) * gain, n=n_slots, axis=-1), 1e-6)


def _smooth(profiles: np.ndarray, harmonics: int) -> np.ndarray:
    """``profiles`` kept to their first ``harmonics`` harmonics (0: as they are)."""
    n_harmonics = profiles.shape[-1] // 2 + 1
    if harmonics <= 0 or harmonics + 2 >= n_harmonics:
        return profiles
    return _through_spectrum(profiles, (np.arange(n_harmonics) <= harmonics).astype(float))


def _fit_one(a: np.ndarray, s: np.ndarray | None, o: np.ndarray | None, evidence: np.ndarray, n_components: int,
             offset: float, iterations: int, min_evidence: float, rate_pseudo_sends: float,
             overall: float, harmonics: int = 0,
             background_share: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None,
                                                     np.ndarray | None]:
    """One start's (shapes, open rates, prior, background, exposure), components ordered by
    their peak slot; ``background_share`` > 0: that share of engagement is nobody's rhythm, its
    shape learned (else None); exposure: each fit user's sends weighed by their fitted open
    rhythm (mean 1), what their opens are a rate of (None without sends)."""
    n_slots = a.shape[1]
    shapes = _initial_shapes(n_components, n_slots, offset)
    background = np.full(n_slots, background_share / n_slots) if background_share > 0 else None
    open_rates = np.full((n_components, n_slots), max(overall, 1e-3))
    # the basis is learned from near-maximum-likelihood mixes; the prior from them at the end
    flat = np.full(n_components, _FLAT_PRIOR)
    totals = _totals(a, o, flat)
    weights = np.full((len(a), n_components), 1.0 / n_components)
    for _ in range(iterations):
        mix = weights @ shapes + _TINY
        ratio = _own_over_mix(a, mix, background)
        new_shapes = shapes * (weights.T @ ratio) + 1e-6
        if background is not None:
            # its shape: the engagement the users' own mixes leave over; its share stays
            left = (a - ratio * mix).sum(axis=0) + _TINY
            background = background_share * left / left.sum()
        if o is not None:
            # Poisson in the opens of each (user, slot), exposure = sends x the user's level
            rate = weights @ open_rates + _TINY
            exposure = s @ open_rates.T
            level = o.sum(axis=1, keepdims=True) / ((weights * exposure).sum(axis=1, keepdims=True) + _TINY)
            numer = open_rates * (weights.T @ (o / rate))
            denom = (weights * level).T @ s
            centre = open_rates.mean(axis=1, keepdims=True)
            # sends go out at the few hours senders choose, so most slots' rates rest on a
            # handful of sends; a rhythm is smooth in time, so the rates keep its low harmonics
            open_rates = _smooth((numer + rate_pseudo_sends * centre) / (denom + rate_pseudo_sends), harmonics)
        shapes = new_shapes / new_shapes.sum(axis=1, keepdims=True)
        weights = _weight_step(weights, a, o, shapes, open_rates, flat, totals,
                               s @ open_rates.T if o is not None else None, background)
    prior = _dirichlet_prior(weights, evidence, min_evidence)
    exposure = None
    if o is not None:
        open_rates = open_rates / open_rates.mean()   # one common scale: relative rates
        rhythm = weights @ open_rates
        exposure = (s * rhythm / (rhythm.mean(axis=1, keepdims=True) + _TINY)).sum(axis=1)
    else:
        # nothing says when this log's users answer a message: their engagement is the best guess
        open_rates = shapes * n_slots
    order = np.argsort(shapes.argmax(axis=1), kind="stable")
    return shapes[order], open_rates[order], prior[order], background, exposure


def fit_evidence(activity: np.ndarray, opened: np.ndarray | None = None) -> np.ndarray:
    """Each user's events the basis learns from (engagement, plus opens where sends are
    given): who may fit it (:func:`fit_rows`) and whose mix informs its prior."""
    evidence = np.asarray(activity).sum(axis=1, dtype=np.float64)
    if opened is not None:
        evidence = evidence + np.asarray(opened).sum(axis=1, dtype=np.float64)
    return evidence


def fit_rows(evidence: np.ndarray, max_fit_users: int, user_ids: np.ndarray | None = None) -> np.ndarray:
    """Positions of the users the basis is fitted on, in their given order: those with any
    evidence, at most ``max_fit_users`` of them. With ``user_ids``, the ones whose ids hash
    lowest (a stable hash: the same users however the population is split into partitions,
    each partition sending its lowest hashes); without, evenly spaced through the rows."""
    informative = np.flatnonzero(np.asarray(evidence) > 0)
    if len(informative) <= max_fit_users:
        return informative
    if user_ids is None:
        return informative[np.linspace(0, len(informative) - 1, max_fit_users).round().astype(np.int64)]
    hashes = pd.util.hash_array(np.asarray(user_ids, dtype=object)[informative].astype(str).astype(object))
    return np.sort(informative[np.argsort(hashes, kind="stable")[:max_fit_users]])


def fit_rhythm_basis(activity: np.ndarray, sends: np.ndarray | None = None, opened: np.ndarray | None = None,
                     n_components: int = 6, n_starts: int = 4, iterations: int = 60, min_evidence: float = 30.0,
                     max_fit_users: int = 50_000, rate_pseudo_sends: float = 1.0,
                     user_ids: np.ndarray | None = None, population: str = "",
                     harmonics: int = 0, threads: int = 1, background_share: float = 0.0,
                     level_groups: int = 0) -> RhythmBasis:
    """The basis of a population from its per-slot evidence (rows: users, columns: slots).

    ``activity``: engagement by slot (sessions, purchases; age-weighted counts are fine);
    ``sends``/``opened``: matured sends by slot and how many of them were opened (None: a log
    without sends; each component's open rates are then its engagement shape).
    ``n_starts``: starts (bumps shifted by 1/n_starts of their spacing) whose values are
    averaged; ``min_evidence``: events a user needs for their mix to inform the prior's
    strength; ``rate_pseudo_sends``: pulls each component's open rate in a slot toward its
    mean where few sends went (a slot nobody was sent at gets the component's mean rate);
    ``user_ids``: the rows' ids, to pick the fit's users by id (:func:`fit_rows`);
    ``harmonics``: each component's open rates keep this many Fourier harmonics of the slot
    cycle (0: every slot free); ``threads``: starts fitted at once (each on one BLAS thread;
    the numbers do not depend on it); ``background_share``: with sends, this share of every
    user's engagement is taken as nobody's rhythm (generic use of the app, the same hours
    for everyone: its shape is learned as what the users' own mixes leave over), so a user's
    mix, and the open rhythm read from it, is fitted to the rest (0: all of it is theirs);
    ``level_groups`` > 1: with sends, the fit users are cut into that many groups by their
    (age-weighted) send count, and each group's pooled open rate is what the level of a user
    in it is shrunk toward (:meth:`RhythmBasis.level_prior`; 0: the population's rate).
    """
    given = sends is not None and opened is not None
    # float64 copies of the fit's users only (at 1M users a whole copy is 200 MB an array)
    evidence = fit_evidence(activity, opened if given else None)
    # everything below reads the fit's users only: the same users give the same basis,
    # however the rest of the population was gathered
    rows = fit_rows(evidence, max_fit_users, user_ids)
    a = np.asarray(activity)[rows].astype(np.float64)
    s = np.asarray(sends)[rows].astype(np.float64) if given else None
    o = np.asarray(opened)[rows].astype(np.float64) if given else None
    if s is not None and float(s.sum()) > 0:
        overall = float((o.sum() + 1.0) / (s.sum() + 10.0))
    else:
        s = o = None
        overall = 0.0
    if not len(rows):
        # nobody to learn from (a new or empty log): flat components, every user's rhythm flat
        n_slots = np.asarray(activity).shape[1]
        flat = np.full((n_starts, n_components, n_slots), 1.0 / n_slots)
        return RhythmBasis(shapes=flat, open_rates=flat * n_slots, prior=np.ones((n_starts, n_components)),
                           overall_rate=overall, population=population)
    def one_start(start: int) -> tuple:
        return _fit_one(a, s, o, evidence[rows], n_components, start / n_starts, iterations, min_evidence,
                        rate_pseudo_sends, overall, harmonics, background_share if s is not None else 0.0)

    with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(max(1, threads)) as pool:
        fits = list(pool.map(one_start, range(n_starts)))
    backgrounds = None if fits[0][3] is None else np.stack([f[3] for f in fits])
    edges = rates = None
    if level_groups > 1 and s is not None:
        # the pooled rate of each group of fit users by send volume, what a user's level is
        # shrunk toward: opens over the sends weighed by the fitted rhythm, averaged over starts
        volume = s.sum(axis=1)
        edges = np.unique(np.quantile(volume, np.linspace(0, 1, level_groups + 1)[1:-1]))
        group = _send_group(edges, volume)
        exposure = np.mean([f[4] for f in fits], axis=0)
        rates = ((np.bincount(group, o.sum(axis=1), len(edges) + 1) + _GROUP_PSEUDO_SENDS * overall)
                 / (np.bincount(group, exposure, len(edges) + 1) + _GROUP_PSEUDO_SENDS))
    return RhythmBasis(shapes=np.stack([f[0] for f in fits]), open_rates=np.stack([f[1] for f in fits]),
                       prior=np.stack([f[2] for f in fits]), overall_rate=overall, population=population,
                       background=backgrounds, level_edges=edges, level_rates=rates)


def rhythm_weights(basis: RhythmBasis, activity: np.ndarray, sends: np.ndarray | None = None,
                   opened: np.ndarray | None = None, iterations: int = 20) -> np.ndarray:
    """(starts, n_users, K) each user's mix under each start's basis: the posterior mode
    under its prior (a user's mix depends only on their own evidence and the basis)."""
    activity = np.asarray(activity, dtype=np.float64)
    use_sends = sends is not None and opened is not None and basis.overall_rate > 0
    s = np.asarray(sends, dtype=np.float64) if use_sends else None
    o = np.asarray(opened, dtype=np.float64) if use_sends else None
    out = np.empty((basis.n_starts, len(activity), basis.n_components))
    for m in range(basis.n_starts):
        prior = basis.prior[m]
        out[m] = _climb(_prior_mix(prior, len(activity)), iterations, activity, s, o, basis.shapes[m],
                        basis.open_rates[m], prior, _totals(activity, o, prior), _background_of(basis, m))
    return out


def _background_of(basis: RhythmBasis, start: int) -> np.ndarray | None:
    """The background of one start's basis (None: it has none)."""
    return None if basis.background is None else basis.background[start]


def _prior_mix(prior: np.ndarray, n: int) -> np.ndarray:
    """Every user's mix at the prior's mean: where the climb starts."""
    return np.broadcast_to(prior / prior.sum(), (n, len(prior))).copy()


def _climb(w: np.ndarray, steps: int, activity: np.ndarray, sends: np.ndarray | None, opened: np.ndarray | None,
           shapes: np.ndarray, open_rates: np.ndarray, prior: np.ndarray, totals: np.ndarray,
           background: np.ndarray | None = None) -> np.ndarray:
    """``steps`` of :func:`_weight_step` from the mixes ``w`` (opened None: engagement only)."""
    # the sends' exposure to each component stays put while the mix moves
    exposure = sends @ open_rates.T if opened is not None else None
    for _ in range(steps):
        w = _weight_step(w, activity, opened, shapes, open_rates, prior, totals, exposure, background)
    return w


def _rank(values: np.ndarray) -> np.ndarray:
    """0 for the user's highest slot, 1 for the next, ..."""
    return np.argsort(np.argsort(-values, axis=1), axis=1).astype(float)


def _shifted(profiles: np.ndarray, shift: float) -> np.ndarray:
    """``profiles`` (rows over circular slots) moved later by ``shift`` slots, a fraction of a
    slot included (a phase turn of each harmonic; the ripple below zero clipped away)."""
    if shift == 0:
        return profiles
    n_slots = profiles.shape[-1]
    return _through_spectrum(profiles, np.exp(-2j * np.pi * np.arange(n_slots // 2 + 1) * shift / n_slots))


def _log_posterior(weights: np.ndarray, activity: np.ndarray, opened: np.ndarray | None, sends: np.ndarray | None,
                   shapes: np.ndarray, open_rates: np.ndarray, prior: np.ndarray,
                   background: np.ndarray | None = None) -> np.ndarray:
    """Each user's log posterior at their mix (the objective :func:`_weight_step` climbs)."""
    engagement = weights @ shapes
    if background is not None:
        engagement = (1.0 - background.sum()) * engagement + background
    out = (activity * np.log(engagement + _TINY)).sum(axis=1) + (prior * np.log(weights + _TINY)).sum(axis=1)
    if opened is not None:
        rate = weights @ open_rates
        out += (opened * np.log(rate + _TINY)).sum(axis=1) - opened.sum(axis=1) * np.log((sends * rate).sum(axis=1) + _TINY)
    return out


def _rhythm_over_shifts(basis: RhythmBasis, activity: np.ndarray, sends: np.ndarray | None, opened: np.ndarray | None,
                        iterations: int, shifts: tuple[float, ...], shift_iterations: int) -> tuple[np.ndarray, np.ndarray]:
    """(engagement share, open rhythm (mean 1)) of each user, (n, n_slots) each: averaged over
    the starts and, within a start, over the user's posterior of a personal shift of the whole
    basis (``shifts``, in slots, a flat prior over them): people keep the same few rhythms a
    little earlier or later, which a basis learned at whole slots blurs. The unshifted mix is
    found first; each shifted one starts from it and takes ``shift_iterations`` steps."""
    n, n_slots = activity.shape
    share = np.zeros((n, n_slots))
    rhythm = np.zeros((n, n_slots))
    order = sorted(shifts, key=abs)
    for m in range(basis.n_starts):
        prior = basis.prior[m]
        totals = _totals(activity, opened, prior)
        # nobody's rhythm: the same for every user, so it is not shifted
        background = _background_of(basis, m)
        # the shifts' posterior weights as a running log-sum, so only one shift's arrays are held
        start = top = mass = share_m = rhythm_m = None
        for shift in order:
            shapes = _shifted(basis.shapes[m], shift)
            shapes = shapes / shapes.sum(axis=1, keepdims=True)
            open_rates = _shifted(basis.open_rates[m], shift)
            if start is None:
                w = _climb(_prior_mix(prior, n), iterations, activity, sends, opened, shapes, open_rates, prior, totals,
                           background)
            else:
                w = _climb(start.copy(), shift_iterations, activity, sends, opened, shapes, open_rates, prior, totals,
                           background)
            one = w @ open_rates
            one /= one.mean(axis=1, keepdims=True) + _TINY
            if start is None:
                start, share_m, rhythm_m = w, w @ shapes, one
                if len(order) > 1:
                    top, mass = _log_posterior(w, activity, opened, sends, shapes, open_rates, prior, background), np.ones(n)
                continue
            log_post = _log_posterior(w, activity, opened, sends, shapes, open_rates, prior, background)
            new_top = np.maximum(top, log_post)
            old, this = np.exp(top - new_top)[:, None], np.exp(log_post - new_top)[:, None]
            mass = mass * old[:, 0] + this[:, 0]
            share_m = share_m * old + this * (w @ shapes)
            rhythm_m = rhythm_m * old + this * one
            top = new_top
        if mass is not None:
            share_m /= mass[:, None]
            rhythm_m /= mass[:, None]
        share += share_m
        rhythm += rhythm_m
    return share * (n_slots / basis.n_starts), rhythm / basis.n_starts


def rhythm_families(basis: RhythmBasis, activity: np.ndarray, sends: np.ndarray | None = None,
                    opened: np.ndarray | None = None, slot_prior_strength: float = 4.0,
                    user_prior_strength: float = 8.0, iterations: int = 20, block: int = 5_000,
                    keep: tuple[str, ...] | None = None, shifts: tuple[float, ...] = (0.0,),
                    shift_iterations: int = 6, threads: int = 1,
                    level_strength: float | None = None) -> dict[str, np.ndarray]:
    """The :data:`RHYTHM_FAMILIES` of each user (float32, (n_users, n_slots)), or those in
    ``keep``, a block of users at a time on ``threads`` threads (float64 temporaries the size
    of a block, not of the population). Each user's numbers do not depend on the block or the
    threads: small blocks keep the temporaries in cache, and one BLAS thread per block keeps
    OpenBLAS from spinning two threads on products this small (at 1M users with shifts: 32 s
    -> 14 s of wall time, 64 -> 27 s of CPU, on 2 cores).

    Engagement profile and open rhythm are averaged over the starts and over each user's
    posterior of a personal shift of the basis by one of ``shifts`` slots ((0.0,): none).
    ``rhythm_rate``: the user's open level (opened over the sends' expected share under the
    rhythm, shrunk toward the population's rate by ``user_prior_strength`` pseudo-sends, or,
    where the basis has send-volume groups, toward the user's group's rate by
    ``level_strength`` pseudo-sends when given) x
    the rhythm (``rhythm_expected``), pooled with the user's own sends and opens in the slot
    (``slot_prior_strength`` pseudo-sends), as the per-slot empirical-Bayes rates are.
    Without sends both are the rhythm alone."""
    n, n_slots = len(activity), basis.shapes.shape[2]
    unknown = sorted(set(keep or ()) - set(RHYTHM_FAMILIES))
    if unknown:
        raise ValueError(f"unknown rhythm families {unknown}; choose from {', '.join(RHYTHM_FAMILIES)}")
    if 0.0 not in shifts:
        raise ValueError(f"rhythm shifts {tuple(shifts)} must include 0.0 (the unshifted basis)")
    out = {name: np.empty((n, n_slots), dtype=np.float32) for name in RHYTHM_FAMILIES
           if keep is None or name in keep}
    use_sends = sends is not None and opened is not None and basis.overall_rate > 0
    grouped = basis.level_rates is not None and level_strength is not None
    strength = level_strength if grouped else user_prior_strength

    def one_block(start: int) -> None:
        part = slice(start, min(start + block, n))
        a = np.asarray(activity[part], dtype=np.float64)
        s = np.asarray(sends[part], dtype=np.float64) if use_sends else None
        o = np.asarray(opened[part], dtype=np.float64) if use_sends else None
        share, rhythm = _rhythm_over_shifts(basis, a, s, o, iterations, tuple(shifts), shift_iterations)
        if use_sends:
            exposure = (s * rhythm).sum(axis=1, keepdims=True)
            toward = basis.level_prior(s) if grouped else basis.overall_rate
            level = (o.sum(axis=1, keepdims=True) + strength * toward) / (exposure + strength)
            expected = np.clip(level * rhythm, 1e-4, 0.999)
            rate = (o + slot_prior_strength * expected) / (s + slot_prior_strength)
        else:
            expected = rate = rhythm
        values = {"rhythm_share": share, "rhythm_open": rhythm, "rhythm_expected": expected, "rhythm_rate": rate}
        for name, array in out.items():
            array[part] = _rank(rate) if name == "rhythm_rank" else values[name]

    # numpy releases the GIL in its loops; the blocks write disjoint rows of ``out``
    with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(max(1, threads)) as pool:
        list(pool.map(one_block, range(0, n, block)))
    return out
