"""What the rhythm's background share costs: the basis fit and every user's rhythm families with
``features.rhythm_background_share`` as configured, beside the same calls without it (share 0),
alternating, on synthetic per-slot evidence shaped like a simulated log's.

    .venv/bin/python benchmarks/bench_rhythm.py [--users 200000] [--repeats 3] [--config C]

Prints the best wall time of each over the repeats and their ratio (machines are shared and
noisy: the ratio of alternating runs is the figure to read).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from configs import load_config
from features.events import process_cores
from features.matrix import configured_rhythm_families, fit_rhythm


def _evidence(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sessions (about 50 a user, from a few daily peaks plus everyone's hours) and sends at three
    house hours (about 60 a user, 12 % opened where the user's peak is), float32 as the state's."""
    rng = np.random.default_rng(seed)
    hours = np.arange(24)
    peaks = rng.choice([8.0, 12.5, 17.0, 21.0, 23.5], size=(n, 2))
    gap = np.abs(hours[None, None, :] - peaks[:, :, None])
    own = np.exp(-0.5 * (np.minimum(gap, 24 - gap) / 1.5) ** 2).sum(axis=1) + 0.05
    own /= own.sum(axis=1, keepdims=True)
    profile = 0.6 * own + 0.4 / 24
    activity = rng.poisson(50 * profile).astype(np.float32)
    sends = np.zeros((n, 24), dtype=np.float32)
    sends[:, [9, 12, 19]] = rng.poisson(20, (n, 3))
    opened = rng.binomial(sends.astype(np.int64), np.clip(0.12 * own * 24, 0, 0.9)).astype(np.float32)
    return activity, sends, opened


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--config", default=None)
    args = parser.parse_args()
    cfg = load_config(args.config)
    f = cfg.features
    if f.rhythm_background_share <= 0:
        raise SystemExit("features.rhythm_background_share is 0 in this configuration: nothing to compare")
    activity, sends, opened = _evidence(args.users)
    threads = f.rhythm_threads or process_cores()
    fit_times: dict[float, list[float]] = {}
    family_times: dict[float, list[float]] = {}
    for _ in range(args.repeats):
        for share in (0.0, f.rhythm_background_share):
            shared_cfg = cfg.model_copy(update={"features": f.model_copy(update={"rhythm_background_share": share})})
            started = time.perf_counter()
            basis = fit_rhythm(activity, sends, opened, None, shared_cfg)
            fitted = time.perf_counter()
            configured_rhythm_families(basis, activity, sends, opened, shared_cfg, tuple(f.rhythm_families))
            fit_times.setdefault(share, []).append(fitted - started)
            family_times.setdefault(share, []).append(time.perf_counter() - fitted)
    base, shared = 0.0, f.rhythm_background_share
    print(f"{args.users:,} users, {threads} threads, best of {args.repeats} (alternating)")
    for name, times in (("basis fit (at most rhythm_max_fit_users)", fit_times),
                        ("every user's rhythm families", family_times)):
        print(f"{name}: share 0 {min(times[base]):.2f} s, share {shared:g} {min(times[shared]):.2f} s, "
              f"ratio {min(times[shared]) / min(times[base]):.2f}")


if __name__ == "__main__":
    main()
