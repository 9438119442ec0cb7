"""The BentoML service the message scheduler queries.

Started by ``sendtime serve`` (or ``bentoml serve serving.service:Sendtime``). BentoML
runs the server, its health endpoints and the service's life cycle; the routes are the
FastAPI app of :mod:`serving.api`, mounted at ``/``, behind :class:`serving.api.Guard`.
The champions and the latest snapshot are loaded once, in ``__init__``, every user's
numbers computed once per state; a request only looks its users up. Configuration comes
from ``SENDTIME_CONFIG`` (a TOML overlay) and ``SENDTIME_SERVING_DIR``, read when the
service starts, never on import.
"""

from __future__ import annotations

import ctypes
import gc
import os

import bentoml
from fastapi import FastAPI

from configs import load_config
from serving.api import Guard, build_app
from serving.live import LiveRecommender

__all__ = ["Sendtime"]

def _cancel_request_timers() -> None:
    """BentoML's TimeoutMiddleware runs each request in a task of its own and arms a 30-second
    timer it never cancels: at 2,000 requests/s some 60,000 live timers and futures pile up,
    and the cyclic collector's passes over them stalled the event loop for tens of
    milliseconds (the p99). Same behaviour (504 when no response started within the
    timeout), on the request's own task, the deadline dropped when the response starts."""
    import asyncio

    from bentoml._internal.server.http import traffic

    class CancellingTimeoutMiddleware(traffic.TimeoutMiddleware):
        async def __call__(self, scope, receive, send) -> None:
            if scope["type"] not in ("http", "websocket"):
                return await self.app(scope, receive, send)
            started = False
            # no task and no future per request: a deadline on the request's own task,
            # dropped once the response has started (BentoML's semantics)
            try:
                async with asyncio.timeout(self.timeout) as deadline:
                    async def _send(message) -> None:
                        nonlocal started
                        if not started:
                            started = True
                            deadline.reschedule(None)
                        await send(message)

                    await self.app(scope, receive, _send)
                return
            except TimeoutError:
                if started:
                    raise
            from starlette.responses import JSONResponse

            await JSONResponse({"detail": f"no answer within {self.timeout} s", "field": None},
                               status_code=504)(scope, receive, send)

    if not getattr(traffic.TimeoutMiddleware, "_sendtime_cancels", False):
        CancellingTimeoutMiddleware._sendtime_cancels = True
        traffic.TimeoutMiddleware = CancellingTimeoutMiddleware


_cancel_request_timers()

# the routes are added when the service starts (they carry the configured limits); BentoML
# mounts this app at import, before any request
routes = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)


def _settle_memory() -> None:
    """After a state is loaded (at start and after each live swap): free what the old state
    left, give the memory back to the system, and freeze what remains. The snapshot's
    millions of objects live until the next swap: the cyclic collector need not walk them
    (its full passes stalled the event loop for ~0.4 s under load)."""
    gc.unfreeze()
    gc.collect()
    import pyarrow

    pyarrow.default_memory_pool().release_unused()   # Parquet reads keep a pool of their own
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass   # not glibc: the allocator keeps its pages
    gc.freeze()


class _ConfiguredGuard(Guard):
    """The guard with the token and limits of the configuration the service starts with."""

    def __init__(self, app) -> None:
        serving = load_config(os.environ.get("SENDTIME_CONFIG") or None).serving
        super().__init__(app, token=serving.resolved_token(), max_body_bytes=serving.max_body_bytes,
                         max_concurrent=serving.max_concurrent_requests)


@bentoml.service(
    name="sendtime",
    traffic={"timeout": 30},
    # the access log costs 5-8 % throughput; the scheduler's own logs record requests, and
    # the service's 4xx lines carry no user ids
    logging={"access": {"enabled": False}},
    metrics={"enabled": False},
    # no tracing exporter is configured: skip building a span per request on the hot routes
    tracing={"excluded_urls": ["/recommend", "/recommend/bulk", "/models", "/plan"]},
    # `sendtime serve --workers` sets this, else serving.workers; fixed before the service loads
    workers=int(os.environ.get("SENDTIME_WORKERS") or load_config(os.environ.get("SENDTIME_CONFIG") or None).serving.workers),
)
@bentoml.asgi_app(routes, path="/")
class Sendtime:
    def __init__(self) -> None:
        self.cfg = load_config(os.environ.get("SENDTIME_CONFIG") or None)
        self.live = LiveRecommender(self.cfg, os.environ.get("SENDTIME_SERVING_DIR") or None,
                                    check_seconds=self.cfg.serving.reload_check_seconds, on_swap=_settle_memory)
        build_app(self.cfg, lambda: self.live, app=routes)
        _settle_memory()


Sendtime.add_asgi_middleware(_ConfiguredGuard)
