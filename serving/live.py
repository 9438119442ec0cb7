"""Keep a running service on the newest refresh and the current champions.

The nightly job publishes a new refresh (``current`` moves) and an ML engineer may move a
``champion`` alias; a long-running server should pick both up without a restart. A
daemon thread looks every few seconds; when something moved it loads a complete new
:class:`Recommender` beside the old one and swaps the reference, so requests never see
a half-loaded state. A load that fails keeps the old one serving; the same state is not
tried again until something moves (a newer refresh, another champion).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np

from configs import Config, Task
from serving.predictor import alias_version
from serving.recommend import Recommender
from serving.tagstore import current_refresh

__all__ = ["LiveRecommender"]

log = logging.getLogger(__name__)


def _champion_versions(cfg: Config) -> dict[str, str | None]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=cfg.tracking.resolved_uri())
    return {task.value: alias_version(client, cfg.tracking.model_name(task), cfg.tracking.champion_alias)
            for task in Task}


class LiveRecommender:
    def __init__(self, cfg: Config, serving_dir: str | Path | None = None, check_seconds: float = 0,
                 on_swap: Callable[[], None] | None = None) -> None:
        self.cfg = cfg
        self.serving_dir = Path(serving_dir or cfg.serving.serving_dir)
        self._seen = self._signature()
        self._current = Recommender.load(cfg, self.serving_dir)
        # the same check as a reload's: the champions score this snapshot (and the libraries'
        # one-time buffers are allocated now, not at the first swap)
        _smoke_test(self._current)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.reloads = 0
        self.on_swap = on_swap
        self.last_error: str | None = None
        if check_seconds > 0:
            thread = threading.Thread(target=self._watch, args=(check_seconds,), name="sendtime-reload",
                                      daemon=True)
            thread.start()

    @property
    def current(self) -> Recommender:
        return self._current

    def _signature(self) -> tuple:
        paths = current_refresh(self.serving_dir)
        return (paths.root if paths else None, tuple(sorted(_champion_versions(self.cfg).items())))

    def stale(self) -> bool:
        """Has a newer refresh been published, or a champion alias moved, since the last
        load (or the last failed one: a state that failed is not retried until it moves)?"""
        return self._signature() != self._seen

    def check(self) -> bool:
        """Reload when stale; True when a new state is now serving."""
        with self._lock:
            try:
                if not self.stale():
                    return False
                seen = self._signature()
                self._seen = seen
                # a nightly refresh with the same champions reuses the loaded models: reloading
                # the boosters every night cost time and left their old buffers resident
                same = dict(seen[1]) == self._current.champions.versions()
                fresh = Recommender.load(self.cfg, self.serving_dir,
                                         champions=self._current.champions if same else None)
                _smoke_test(fresh)
            except Exception as exc:  # noqa: BLE001 - whatever broke, the old state keeps serving
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("reload failed, still serving refresh %s: %s",
                            self._current.manifest.get("refresh_id"), self.last_error)
                return False
            old_state = self._current
            old = old_state.manifest.get("refresh_id"), old_state.champions.versions()
            self._current = fresh
            del old_state
            self.reloads += 1
            if self.on_swap is not None:
                self.on_swap()
            self.last_error = None
            log.info("reloaded: refresh %s -> %s, models %s -> %s", old[0], fresh.manifest.get("refresh_id"),
                     old[1], fresh.champions.versions())
            return True

    def _watch(self, every: float) -> None:
        while not self._stop.wait(every):
            self.check()

    def close(self) -> None:
        self._stop.set()


def _smoke_test(recommender: Recommender) -> None:
    """Score one user with history with the models themselves and answer one unknown before
    serving: a champion that cannot score this snapshot (a feature it lacks) fails here,
    not on every request or at the next champion move."""
    warm = np.flatnonzero(recommender.has_history)[:1]
    if len(warm):
        recommender.core.model_scores(warm)
    recommender.recommend([str(u) for u in recommender.matrix.user_ids[warm]] + ["sendtime-smoke-test-unknown-user"],
                          None, 24)
