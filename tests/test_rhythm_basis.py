"""The rhythm basis (features.rhythm_basis): shapes learned from a population, each user's
posterior mix, and the per-slot values, on small populations drawn from known shapes."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from features.rhythm_basis import (
    RHYTHM_FAMILIES,
    RhythmBasis,
    fit_rhythm_basis,
    fit_rows,
    rhythm_families,
    rhythm_weights,
)

N_SLOTS = 24
PEAKS = (8.0, 13.0, 21.0)          # the planted components' peak hours


def bump(peak: float, width: float = 1.5, n_slots: int = N_SLOTS) -> np.ndarray:
    slots = np.arange(n_slots)
    gap = np.abs(slots - peak)
    gap = np.minimum(gap, n_slots - gap)
    shape = np.exp(-0.5 * (gap / width) ** 2) + 0.02
    return shape / shape.sum()


def population(n: int = 1500, seed: int = 0, sessions: float = 40.0, sends: float = 30.0) -> dict:
    """Users mixing three known shapes: sessions by slot, and sends at every slot (few at
    most) opened with a rate that follows the user's mix."""
    rng = np.random.default_rng(seed)
    shapes = np.vstack([bump(p) for p in PEAKS])
    mix = rng.dirichlet(np.full(len(PEAKS), 0.4), n)
    profile = mix @ shapes
    activity = rng.poisson(sessions * profile).astype(float)
    sent = rng.poisson(sends / N_SLOTS, (n, N_SLOTS)).astype(float)
    rate = np.clip(0.15 * profile * N_SLOTS, 0, 0.95)
    opened = rng.binomial(sent.astype(int), rate).astype(float)
    return {"shapes": shapes, "mix": mix, "profile": profile, "activity": activity, "sends": sent, "opened": opened}


@pytest.fixture(scope="module")
def planted():
    data = population()
    basis = fit_rhythm_basis(data["activity"], data["sends"], data["opened"], n_components=3)
    return data, basis


def test_basis_recovers_the_planted_shapes(planted):
    data, basis = planted
    assert basis.shapes.shape == (basis.n_starts, 3, N_SLOTS) and np.allclose(basis.shapes.sum(axis=2), 1.0)
    planted_unit = data["shapes"] / np.linalg.norm(data["shapes"], axis=1, keepdims=True)
    for m in range(basis.n_starts):
        fitted = basis.shapes[m] / np.linalg.norm(basis.shapes[m], axis=1, keepdims=True)
        cos = planted_unit @ fitted.T
        assert cos.max(axis=1).min() > 0.95, cos
        # the components' open rates peak where their engagement does
        assert (np.abs(basis.open_rates[m].argmax(axis=1) - basis.shapes[m].argmax(axis=1)) <= 1).all()
    assert basis.prior.shape == (basis.n_starts, 3) and (basis.prior > 0).all()


def test_posterior_finds_each_users_best_slot(planted):
    data, basis = planted
    families = rhythm_families(basis, data["activity"], data["sends"], data["opened"])
    assert set(families) == set(RHYTHM_FAMILIES)
    for values in families.values():
        assert values.shape == data["activity"].shape and values.dtype == np.float32
        assert np.isfinite(values).all()
    best = data["profile"].argmax(axis=1)
    true_at = data["profile"][np.arange(len(best)), families["rhythm_open"].argmax(axis=1)]
    # nearly the whole of the best slot's weight, and far more than the busiest raw slot
    captured = true_at.mean() / data["profile"].max(axis=1).mean()
    raw = data["profile"][np.arange(len(best)), data["activity"].argmax(axis=1)].mean() / data["profile"].max(axis=1).mean()
    assert captured > 0.95 and captured > raw
    assert (families["rhythm_rank"].min(axis=1) == 0).all()
    assert np.allclose(families["rhythm_open"].mean(axis=1), 1.0, atol=1e-4)


def test_unopened_sends_move_the_mix(planted):
    """Same sessions (none), sends at 8 and 21: the user who opened at 8 and not at 21 leans
    morning, the one who opened at 21 and not at 8 leans evening."""
    _, basis = planted
    activity = np.zeros((2, N_SLOTS))
    sends = np.zeros((2, N_SLOTS))
    sends[:, [8, 21]] = 10.0
    opened = np.zeros((2, N_SLOTS))
    opened[0, 8], opened[1, 21] = 4.0, 4.0
    rhythm = rhythm_families(basis, activity, sends, opened)["rhythm_open"]
    assert rhythm[0, 8] > rhythm[0, 21] and rhythm[1, 21] > rhythm[1, 8]
    # without the outcomes both are the population's mix
    same = rhythm_families(basis, activity, sends, np.zeros_like(opened))["rhythm_open"]
    assert np.allclose(same[0], same[1])


def test_a_user_without_evidence_gets_the_prior_mix(planted):
    data, basis = planted
    weights = rhythm_weights(basis, np.zeros((1, N_SLOTS)), np.zeros((1, N_SLOTS)), np.zeros((1, N_SLOTS)))
    assert weights.shape == (basis.n_starts, 1, 3)
    assert np.allclose(weights[:, 0], basis.prior / basis.prior.sum(axis=1, keepdims=True))
    heavy = rhythm_weights(basis, data["activity"], data["sends"], data["opened"])
    assert np.allclose(heavy.sum(axis=2), 1.0) and (heavy >= 0).all()


@pytest.mark.parametrize("shifts", [(0.0,), (-0.5, 0.0, 0.5)])
def test_deterministic_and_independent_of_the_other_users(planted, shifts):
    data, basis = planted
    again = fit_rhythm_basis(data["activity"], data["sends"], data["opened"], n_components=3, threads=3)
    assert np.array_equal(basis.shapes, again.shapes) and np.array_equal(basis.prior, again.prior)
    assert np.array_equal(basis.open_rates, again.open_rates)
    everyone = rhythm_families(basis, data["activity"], data["sends"], data["opened"], shifts=shifts)
    some = np.array([5, 17, 400, 1499])
    alone = rhythm_families(basis, data["activity"][some], data["sends"][some], data["opened"][some], shifts=shifts)
    blocks = rhythm_families(basis, data["activity"], data["sends"], data["opened"], block=700, shifts=shifts)
    threaded = rhythm_families(basis, data["activity"], data["sends"], data["opened"], block=300, shifts=shifts,
                               threads=3)
    for name in RHYTHM_FAMILIES:   # bit for bit: a partitioned or threaded build must give the one-machine numbers
        assert np.array_equal(alone[name], everyone[name][some]), name
        assert np.array_equal(blocks[name], everyone[name]), name
        assert np.array_equal(threaded[name], everyone[name]), name


def test_round_trip_through_a_dict(planted):
    _, basis = planted
    back = RhythmBasis.from_dict(basis.to_dict())
    assert np.array_equal(back.shapes, basis.shapes) and np.array_equal(back.open_rates, basis.open_rates)
    assert np.array_equal(back.prior, basis.prior) and back.overall_rate == basis.overall_rate


def test_a_log_without_sends_and_other_slot_counts():
    """A purchases-only log: the open rhythm is the engagement profile. Hour-of-week slots work alike."""
    rng = np.random.default_rng(3)
    n_slots = 168
    shapes = np.vstack([bump(p, 4.0, n_slots) for p in (20.0, 90.0, 140.0)])
    mix = rng.dirichlet(np.full(3, 0.4), 800)
    activity = rng.poisson(60 * mix @ shapes).astype(float)
    basis = fit_rhythm_basis(activity, None, None, n_components=3, n_starts=2)
    assert basis.overall_rate == 0.0
    families = rhythm_families(basis, activity)
    assert families["rhythm_open"].shape == (800, n_slots)
    assert np.allclose(families["rhythm_open"], families["rhythm_share"], rtol=1e-4, atol=1e-5)
    assert np.array_equal(families["rhythm_rate"], families["rhythm_open"])
    assert np.array_equal(families["rhythm_expected"], families["rhythm_open"])


def test_the_basis_reads_only_its_fit_users():
    """At most ``max_fit_users`` users, evenly spaced without ids, lowest id hashes with ids:
    the basis is the one fitted on those users alone, whoever else is in the population."""
    data = population(n=600, seed=1)
    args = dict(n_components=3, n_starts=2, iterations=30)
    capped = fit_rhythm_basis(data["activity"], data["sends"], data["opened"], max_fit_users=200, **args)
    rows = np.linspace(0, 599, 200).round().astype(int)
    alone = fit_rhythm_basis(data["activity"][rows], data["sends"][rows], data["opened"][rows], **args)
    assert np.array_equal(capped.shapes, alone.shapes) and np.array_equal(capped.prior, alone.prior)
    assert capped.overall_rate == alone.overall_rate
    ids = np.array([f"u{i:04d}" for i in range(600)], dtype=object)
    by_id = fit_rhythm_basis(data["activity"], data["sends"], data["opened"], max_fit_users=200, user_ids=ids, **args)
    rows = fit_rows(data["activity"].sum(axis=1) + data["opened"].sum(axis=1), 200, ids)
    alone = fit_rhythm_basis(data["activity"][rows], data["sends"][rows], data["opened"][rows], **args)
    assert np.array_equal(by_id.open_rates, alone.open_rates) and np.array_equal(by_id.prior, alone.prior)


def test_the_fit_users_by_id_are_the_same_across_partitions():
    """Each partition's lowest id hashes, merged, are the whole population's fit users."""
    rng = np.random.default_rng(5)
    ids = np.array([f"u{i:05d}" for i in range(2000)], dtype=object)
    evidence = rng.poisson(3.0, 2000).astype(float)
    whole = ids[fit_rows(evidence, 300, ids)]
    assert len(whole) == 300 and (evidence[fit_rows(evidence, 300, ids)] > 0).all()
    parts = [slice(0, 700), slice(700, 1500), slice(1500, 2000)]
    candidates = np.concatenate([ids[p][fit_rows(evidence[p], 300, ids[p])] for p in parts])
    ev = np.concatenate([evidence[p][fit_rows(evidence[p], 300, ids[p])] for p in parts])
    merged = np.sort(candidates[fit_rows(ev, 300, candidates)])
    assert np.array_equal(merged, np.sort(whole))


@pytest.mark.parametrize("n_users", [0, 1, 3])
def test_a_population_with_little_or_no_evidence(n_users):
    """A new log: nobody (or a user or three) to learn from; flat or finite rhythms, no error."""
    activity = np.zeros((5, N_SLOTS))
    sends = np.zeros((5, N_SLOTS))
    opened = np.zeros((5, N_SLOTS))
    activity[:n_users, 9] = 2.0
    sends[:n_users, 9] = 1.0
    basis = fit_rhythm_basis(activity, sends, opened, n_components=3)
    families = rhythm_families(basis, activity, sends, opened)
    for values in families.values():
        assert np.isfinite(values).all()
    if n_users == 0:
        assert np.allclose(families["rhythm_open"], 1.0) and np.allclose(families["rhythm_share"], 1.0)


def test_only_the_asked_families(planted):
    data, basis = planted
    some = rhythm_families(basis, data["activity"], data["sends"], data["opened"], keep=("rhythm_expected",))
    every = rhythm_families(basis, data["activity"], data["sends"], data["opened"])
    assert list(some) == ["rhythm_expected"]
    assert np.array_equal(some["rhythm_expected"], every["rhythm_expected"])
    with pytest.raises(ValueError, match="rhythm_nope"):
        rhythm_families(basis, data["activity"], keep=("rhythm_nope",))


def test_a_personal_shift_moves_the_rhythm(planted):
    """Users who keep the first planted rhythm half a slot later (earlier): with shifts the
    rhythm follows them; a user on the planted rhythm itself stays put."""
    _, basis = planted
    peak = PEAKS[0]
    activity = 400.0 * np.vstack([bump(peak + 0.5), bump(peak - 0.5), bump(peak)])
    plain = rhythm_families(basis, activity)["rhythm_open"]
    moved = rhythm_families(basis, activity, shifts=(-0.5, 0.0, 0.5))["rhythm_open"]
    after, before = int(peak) + 1, int(peak) - 1

    def lean(r: np.ndarray) -> np.ndarray:
        return r[:, after] / r[:, before]

    assert lean(moved)[0] > lean(plain)[0] and lean(moved)[1] < lean(plain)[1]
    assert np.allclose(moved[2], plain[2], rtol=0.05)
    assert np.allclose(moved.mean(axis=1), 1.0, atol=1e-4)


def test_the_shifts_must_include_the_unshifted_basis(planted):
    data, basis = planted
    with pytest.raises(ValueError, match="0.0"):
        rhythm_families(basis, data["activity"], shifts=(-0.5, 0.5))


def test_open_rates_keep_a_days_low_harmonics():
    """Sends at three hours only: a free rate per slot rests on almost nothing elsewhere; with
    ``harmonics`` each component's open rates are smooth (nothing above the kept harmonics but
    the clipped ripple), without it they are not."""
    data = population(n=800, seed=3)
    sends = np.zeros_like(data["sends"])
    sends[:, [8, 12, 20]] = data["sends"][:, [8, 12, 20]] * 8
    opened = np.minimum(data["opened"], sends)

    def high_share(basis: RhythmBasis, kept: int) -> float:
        spectrum = np.abs(np.fft.rfft(basis.open_rates, axis=-1)) ** 2
        return float(spectrum[..., kept + 1:].sum() / spectrum[..., 1:].sum())

    smooth = fit_rhythm_basis(data["activity"], sends, opened, n_components=3, harmonics=3)
    free = fit_rhythm_basis(data["activity"], sends, opened, n_components=3)
    assert high_share(smooth, 3) < 0.01 < high_share(free, 3)
    # the engagement shapes are the same kind of fit either way
    assert np.allclose(smooth.shapes.sum(axis=2), 1.0)


GENERIC = np.array([0.2, 0.1, 0.05, 0.05, 0.05, 0.1, 0.3, 0.6, 0.8, 0.9, 1.0, 1.0,
                    1.1, 1.0, 0.9, 0.9, 1.0, 1.0, 1.1, 1.2, 1.3, 1.2, 0.9, 0.5])


def with_generic_use(data: dict, share: float = 0.5, sessions: float = 40.0, seed: int = 1) -> dict:
    """The same users when ``share`` of their sessions follow one app-wide daily shape instead
    of their own rhythm, and the sender tries everyone at three house hours only (their opens
    still follow their own rhythm)."""
    rng = np.random.default_rng(seed)
    profile = (1 - share) * data["profile"] + share * GENERIC / GENERIC.sum()
    sends = np.zeros_like(data["sends"])
    sends[:, [9, 12, 19]] = rng.poisson(8.0, (len(sends), 3))
    rate = np.clip(0.15 * data["profile"] * N_SLOTS, 0, 0.95)
    return {"activity": rng.poisson(sessions * profile).astype(float), "sends": sends,
            "opened": rng.binomial(sends.astype(int), rate).astype(float)}


def test_a_background_share_learns_the_generic_use_and_reads_the_rhythm_past_it(planted):
    data, _ = planted
    seen = with_generic_use(data)
    evidence = (seen["activity"], seen["sends"], seen["opened"])
    plain = fit_rhythm_basis(*evidence, n_components=3, harmonics=5)
    shared = fit_rhythm_basis(*evidence, n_components=3, harmonics=5, background_share=0.5)
    assert plain.background is None and shared.background.shape == (shared.n_starts, N_SLOTS)
    assert np.allclose(shared.background.sum(axis=1), 0.5)
    generic = GENERIC / np.linalg.norm(GENERIC)
    learned = shared.background / np.linalg.norm(shared.background, axis=1, keepdims=True)
    assert (learned @ generic > 0.95).all(), learned @ generic

    def capture(basis: RhythmBasis) -> float:
        rhythm = rhythm_families(basis, *evidence)["rhythm_open"]
        chosen = data["profile"][np.arange(len(rhythm)), rhythm.argmax(axis=1)]
        return float(chosen.mean() / data["profile"].max(axis=1).mean())

    # away from the house hours a rhythm is read from the sessions: the users' own hours come
    # out better when the app-wide use is not read as theirs (0.626 -> 0.659 when written)
    assert capture(shared) > capture(plain) + 0.01, (capture(shared), capture(plain))
    again = RhythmBasis.from_dict(shared.to_dict())
    assert np.array_equal(again.background, shared.background)
    assert RhythmBasis.from_dict({k: v for k, v in plain.to_dict().items() if k != "background"}).background is None


def test_no_background_without_sends():
    data = population(n=300)
    basis = fit_rhythm_basis(data["activity"], None, None, n_components=3, n_starts=1, background_share=0.5)
    assert basis.background is None


def sent_by_tier(n: int = 3000, seed: int = 2) -> dict:
    """Users the sender sends to 3, 9 or 27 times, whose open levels are 0.04, 0.10 and 0.25
    (a CRM tier the log does not name), each with one of the planted rhythms."""
    rng = np.random.default_rng(seed)
    data = population(n=n, seed=seed)
    tier = rng.integers(0, 3, n)
    volume, level = np.array([3.0, 9.0, 27.0])[tier], np.array([0.04, 0.10, 0.25])[tier]
    sends = rng.poisson(volume[:, None] / N_SLOTS, (n, N_SLOTS)).astype(float)
    rate = np.clip(level[:, None] * data["profile"] * N_SLOTS, 0, 0.95)
    return {**data, "sends": sends, "opened": rng.binomial(sends.astype(int), rate).astype(float), "level": level}


def test_level_groups_shrink_each_user_toward_users_sent_to_as_often():
    data = sent_by_tier()
    evidence = (data["activity"], data["sends"], data["opened"])
    plain = fit_rhythm_basis(*evidence, n_components=3)
    grouped = fit_rhythm_basis(*evidence, n_components=3, level_groups=6)
    assert plain.level_rates is None and len(grouped.level_rates) == len(grouped.level_edges) + 1
    # the heaviest-sent users' pooled rate is the highest, the lightest-sent's the lowest
    assert grouped.level_rates[-1] > 2 * grouped.level_rates[0]

    def level_error(basis: RhythmBasis, strength: float | None) -> float:
        expected = rhythm_families(basis, *evidence, level_strength=strength)["rhythm_expected"]
        return float(np.abs(np.log(expected.mean(axis=1) / data["level"])).mean())

    # a user with a handful of sends is pulled toward users like them, not toward everyone
    # (mean |log| error of the level 0.22 against 0.63 when written)
    assert level_error(grouped, 16.0) < 0.5 * level_error(plain, None), (level_error(grouped, 16.0), level_error(plain, None))
    # without a strength the groups are not used: the population's rate, as before them
    ungrouped = dataclasses.replace(grouped, level_edges=None, level_rates=None)
    assert np.array_equal(rhythm_families(grouped, *evidence)["rhythm_expected"],
                          rhythm_families(ungrouped, *evidence)["rhythm_expected"])
    again = RhythmBasis.from_dict(grouped.to_dict())
    assert np.array_equal(again.level_rates, grouped.level_rates) and np.array_equal(again.level_edges, grouped.level_edges)
    assert RhythmBasis.from_dict({k: v for k, v in plain.to_dict().items() if not k.startswith("level")}).level_rates is None
