"""A Dask cluster for ``--cluster``: the address of a running scheduler, or ``local:N`` for a
``distributed.LocalCluster`` of N worker processes started for one command and closed after it.

The workers share the file system with the client. What travels is small: a log's path and a
user partition's number, the configuration, the population priors, the champions; what comes
back is each partition's result (sums, a matrix, scores), never the log. Each partition is
pinned to one worker, which keeps the partition's opened log between the rounds of a command
(:func:`worker_cached`); a partition that lands elsewhere (a worker lost) opens it again.
"""

from __future__ import annotations

import importlib.util
import logging
import re
import threading
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from configs import Config, SendtimeError

__all__ = ["ClusterError", "ClusterTarget", "Partitions", "clear_worker_cache", "cluster_client",
           "parse_cluster", "plan_partitions", "run_partitions", "submit_partitions", "worker_cached",
           "worker_popped", "worker_resources"]

log = logging.getLogger(__name__)

# packages whose versions must agree between the client and every worker: DuckDB assigns
# users to partitions by its hash, the boosters must read each other's models
_SAME_VERSIONS = ("duckdb", "numpy", "pandas", "lightgbm", "xgboost")
_ADDRESS = re.compile(r"^([a-z]+://)?[^\s:/]+(:\d+)?$")


class ClusterError(SendtimeError, ValueError):
    """A ``--cluster`` value that names no cluster, or a cluster that cannot run the job."""


@dataclass(frozen=True)
class ClusterTarget:
    """A running scheduler's address, or the number of local workers to start."""

    address: str | None = None
    local_workers: int | None = None

    def describe(self) -> str:
        return f"a local cluster of {self.local_workers} workers" if self.local_workers else self.address or ""


def parse_cluster(text: str) -> ClusterTarget:
    """``local:N`` or a scheduler address such as ``tcp://host:8786``."""
    value = (text or "").strip()
    if value.startswith("local:"):
        n = value[len("local:"):]
        if not n.isdigit() or int(n) < 1:
            raise ClusterError(f"--cluster {text!r}: local:N needs a number of workers N >= 1, e.g. local:2")
        return ClusterTarget(local_workers=int(n))
    if not value or not _ADDRESS.match(value):
        raise ClusterError(f"--cluster {text!r}: expected a scheduler address such as tcp://host:8786, "
                           "or local:N for N local worker processes")
    return ClusterTarget(address=value if "://" in value else f"tcp://{value}")


@contextmanager
def cluster_client(text: str, cfg: Config) -> Iterator[Any]:
    """A connected ``distributed.Client`` for the command; a local cluster is closed after it."""
    import dask
    from distributed import Client, LocalCluster

    target = parse_cluster(text)
    cluster = None
    c = cfg.cluster
    # Dask's own progress lines are for its operators: a sendtime job says what it does
    chatter = logging.getLogger("distributed")
    level = chatter.level
    chatter.setLevel(max(level, logging.WARNING))
    try:
        if target.local_workers:
            dashboard = c.dashboard_address if c.dashboard_address and _has_dashboard() else None
            environ = {**dask.config.get("distributed.nanny.pre-spawn-environ", {}),
                       "DASK_LOGGING__DISTRIBUTED": "warning"}
            with dask.config.set({"distributed.nanny.pre-spawn-environ": environ}):
                cluster = LocalCluster(n_workers=target.local_workers, threads_per_worker=1, processes=True,
                                       memory_limit=c.local_memory_limit, dashboard_address=dashboard)
            client = Client(cluster)
            log.info("started %s (processes, 1 thread each, memory limit %s each); dashboard: %s",
                     target.describe(), c.local_memory_limit,
                     client.dashboard_link if dashboard else "off (install bokeh to see it)")
        else:
            try:
                client = Client(target.address, timeout=f"{c.connect_timeout_seconds}s")
            except OSError as exc:
                raise ClusterError(f"--cluster {text}: no scheduler answered within "
                                   f"{c.connect_timeout_seconds:g} s ({exc})") from exc
            log.info("connected to the scheduler at %s; dashboard: %s", target.address, client.dashboard_link)
    except BaseException:
        if cluster is not None:
            cluster.close()
        chatter.setLevel(level)
        raise
    try:
        _check_workers(client, c.connect_timeout_seconds)
        yield client
    finally:
        try:
            client.run(clear_worker_cache)
        except Exception:  # a cache on a lost worker is gone with it
            log.debug("could not clear the workers' caches", exc_info=True)
        client.close()
        if cluster is not None:
            cluster.close()
        chatter.setLevel(level)


def _has_dashboard() -> bool:
    return importlib.util.find_spec("bokeh") is not None


def _versions() -> dict[str, str | None]:
    import importlib.metadata as md

    out: dict[str, str | None] = {}
    for name in _SAME_VERSIONS:
        out[name] = None
        for dist in (name, f"{name}-cpu"):   # xgboost ships as xgboost-cpu too
            try:
                out[name] = md.version(dist)
                break
            except md.PackageNotFoundError:
                continue
    return out


def _check_workers(client: Any, timeout: float) -> None:
    try:
        client.wait_for_workers(1, timeout=timeout)
    except TimeoutError:
        raise ClusterError(f"the cluster at {client.scheduler.address} has no workers "
                           f"(waited {timeout:g} s)") from None
    mine = _versions()
    for address, theirs in client.run(_versions).items():
        wrong = [f"{name} {theirs.get(name)} (here {mine[name]})" for name in _SAME_VERSIONS
                 if theirs.get(name) != mine[name]]
        if wrong:
            raise ClusterError(f"worker {address} runs other versions: {', '.join(wrong)}; every worker needs "
                               "the client's (DuckDB's hash assigns users to partitions)")


# ---------------------------------------------------------------- partitions and workers

@dataclass(frozen=True)
class Partitions:
    """User partitions 0..n_parts-1, each pinned to one worker (round robin)."""

    n_parts: int
    workers: tuple[str, ...]

    def worker_of(self, part: int) -> str:
        return self.workers[part % len(self.workers)]


def plan_partitions(client: Any, cfg: Config) -> Partitions:
    """``cluster.partitions_per_worker`` partitions per worker. Each reads the whole log to
    find its users, so a worker takes one at a time with all its threads (DuckDB's)."""
    workers = tuple(sorted(client.scheduler_info(n_workers=-1)["workers"]))
    return Partitions(n_parts=len(workers) * cfg.cluster.partitions_per_worker, workers=workers)


def submit_partitions(client: Any, parts: Partitions, func: Callable[..., Any], *args: Any,
                      only: Sequence[int] | None = None, **kwargs: Any) -> list[Any]:
    """Futures of ``func((part, n_parts), *args, **kwargs)``, each on its partition's worker."""
    wanted = range(parts.n_parts) if only is None else only
    return [client.submit(func, (int(part), parts.n_parts), *args, **kwargs, workers=[parts.worker_of(part)],
                          allow_other_workers=True, pure=False, key=f"{func.__name__}-{part}-{_token()}")
            for part in wanted]


def run_partitions(client: Any, parts: Partitions, func: Callable[..., Any], *args: Any,
                   only: Sequence[int] | None = None, **kwargs: Any) -> list[Any]:
    """The results of :func:`submit_partitions`, in partition order."""
    futures = submit_partitions(client, parts, func, *args, only=only, **kwargs)
    try:
        return client.gather(futures)
    finally:
        for future in futures:
            future.release()


def _token() -> str:
    import uuid

    return uuid.uuid4().hex[:8]


# ---------------------------------------------------------------- worker side

_CACHE: dict[Hashable, Any] = {}
_CACHE_LOCK = threading.Lock()


def worker_cached(key: Hashable, make: Callable[[], Any]) -> Any:
    """What this worker process made for ``key`` earlier in the command, else ``make()``."""
    with _CACHE_LOCK:
        if key in _CACHE:
            return _CACHE[key]
    value = make()
    with _CACHE_LOCK:
        return _CACHE.setdefault(key, value)


def worker_popped(key: Hashable) -> Any:
    """What this worker process kept for ``key``, forgotten here (None when nothing)."""
    with _CACHE_LOCK:
        return _CACHE.pop(key, None)


def clear_worker_cache() -> int:
    """Forget (and close) what this worker kept; returns how many entries there were."""
    with _CACHE_LOCK:
        values = list(_CACHE.values())
        _CACHE.clear()
    for value in values:
        close = getattr(value, "close", None)
        if callable(close):
            try:
                close()
            except Exception:  # closing is best effort
                log.debug("closing a cached value failed", exc_info=True)
    return len(values)


def worker_resources() -> tuple[int, int | None]:
    """(threads, memory limit in bytes or None) of the worker running the calling task;
    (1, None) outside a worker."""
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):
        return 1, None
    limit = getattr(getattr(worker, "memory_manager", None), "memory_limit", None)
    return int(worker.state.nthreads), int(limit) if limit else None
