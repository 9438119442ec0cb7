"""The scheduler's HTTP routes: a FastAPI app that the BentoML service mounts at ``/``.

BentoML serves it (process management, ``/livez``, ``/readyz``, live reloads in the
service), but the routes answer through plain ASGI instead of BentoML's IO layer, which
cost more per request than the look-up itself. The request models carry every limit the
service enforces, so the published OpenAPI schema (``/openapi.json``, page at ``/docs``)
states them; a 4xx is ``{"detail": ..., "field": ...}`` and one log line without user ids.

``guard`` is the ASGI middleware in front of every route (BentoML's own included, except
``/livez`` and ``/readyz``): bearer token, request-body limit before parsing, and load
shedding with 503 + Retry-After.
"""

import hashlib
import hmac
import json
import logging
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from functools import lru_cache
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

import numpy as np
import orjson
import pandas as pd
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictStr, StringConstraints, ValidationError, field_validator

from configs import Config

__all__ = ["ErrorBody", "Guard", "build_app", "hash_id"]

log = logging.getLogger(__name__)

OPEN_PATHS = ("/livez", "/readyz")
# window starts are dates of years 1970 to 2200 (as written): the schema says so, the parser checks
YEARS_1970_2200 = r"^(19[7-9][0-9]|2[01][0-9]{2}|2200)-"


def hash_id(user_id: str) -> str:
    """What logs say instead of a user id."""
    return hashlib.sha256(user_id.encode()).hexdigest()[:12]


class ErrorBody(BaseModel):
    detail: str = Field(description="what was wrong, naming the field")
    field: str | None = Field(default=None, description="the request field at fault, if one")


class Result(BaseModel):
    user_id: str = Field(description="the user asked about")
    slot_open_probs: list[float] | None = Field(
        description="predicted open probability of a message sent in each slot (local hour 0-23, or hour of "
                    "week when configured); null when no open model is champion or nothing is known")
    best_slot: int | None = Field(description="the slot with the highest open probability; null when none")
    send_at: str | None = Field(description="recommended send time inside the window, ISO 8601 UTC")
    send_at_open_prob: float | None = Field(description="open probability at send_at")
    churn_prob: float | None = Field(description="probability of no engagement within the churn horizon")
    churn_tier: str | None = Field(description="low / medium / high, by the configured thresholds or shares")
    cold_start: bool = Field(description="true when the user has no history and a population prior was used")
    unsubscribed: bool = Field(description="true when the user unsubscribed after their last send: every "
                                           "slot's probability is 0 and there is no send_at")
    timezone: str = Field(description="the IANA zone the local slots are in")
    timezone_assumed: bool = Field(description="true when the snapshot did not know the user and the request "
                                               "gave no zone: the configured default zone was assumed")
    model_versions: dict[str, str | None] = Field(description="registered versions used, by task")


class RecommendResponse(BaseModel):
    results: list[Result] = Field(description="one result per user id, in the order asked")


class ModelsResponse(BaseModel):
    model_versions: dict[str, str | None]
    missing_tasks: dict[str, str]
    feature_snapshot_as_of: str
    refresh_id: str
    n_users: int
    scores_from: str = Field(description="'tags': the nightly job's numbers; 'rescored': the champions moved "
                                         "since, every user was scored again at load")
    reloads: int = Field(description="times this server swapped in a newer refresh or champion")
    last_reload_error: str = Field(description="why the last reload failed (the old state serves); empty if none")


def _number(value: Any) -> Any:
    # JSON numbers only: true/false and "0.5" are not coerced
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError("must be a JSON number")
    return value


def _whole(value: Any) -> int:
    # 24 and 24.0 are the same JSON Schema integer; 2.5, true and "24" are not
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            isinstance(value, float) and not value.is_integer()):
        raise ValueError("must be a whole JSON number")
    return int(value)


Number = Annotated[float, BeforeValidator(_number)]
Whole = Annotated[int, BeforeValidator(_whole)]


def whole(low: int, high: int) -> Any:
    """A whole number in [low, high]; the bounds first, so the schema states them."""
    return Annotated[int, Field(ge=low, le=high), BeforeValidator(_whole)]


def number(low: float, high: float) -> Any:
    return Annotated[float, Field(ge=low, le=high), BeforeValidator(_number)]


@lru_cache(maxsize=1)
def _zone_names() -> tuple[str, ...]:
    names = []
    for zone in sorted(available_timezones()):
        try:
            ZoneInfo(zone)
            names.append(zone)
        except (ZoneInfoNotFoundError, ValueError):
            pass
    return tuple(names)


def _zone_type() -> Any:
    # the schema lists every zone the service accepts, so a schema-valid zone is never refused
    return Literal[_zone_names()]  # type: ignore[valid-type]


def _request_model(cfg: Config, max_ids: int, name: str) -> type[BaseModel]:
    s = cfg.serving
    # ids are opaque: any non-empty string up to the limit (an unknown id is a cold start)
    UserId = Annotated[StrictStr, StringConstraints(min_length=1, max_length=s.max_user_id_chars)]
    Zone = _zone_type()

    class RecommendRequest(BaseModel):
        model_config = ConfigDict(extra="forbid", title=name)
        user_ids: list[UserId] = Field(min_length=1, max_length=max_ids,
                                       description=f"users to recommend for (1 to {max_ids} ids, each 1 to "
                                                   f"{s.max_user_id_chars} characters, not blank)")
        window_start: StrictStr | None = Field(
            default=None, json_schema_extra={"format": "date-time", "pattern": YEARS_1970_2200},
            description="start of the sending window, ISO 8601 between 1970 and 2200 (naive means UTC; "
                        "default now)")
        window_hours: whole(1, s.max_window_hours) | None = Field(
            default=None,
            description=f"length of the window in whole hours, 1 to {s.max_window_hours} "
                        f"(default {s.default_window_hours})")
        timezones: dict[UserId, Zone] | None = Field(
            default=None, max_length=max_ids,
            description="IANA zones of users the snapshot may not know yet (a signup since the last refresh), "
                        "by user id; the snapshot's own zone wins for users it knows")
        attributes: dict[UserId, dict[StrictStr, StrictStr]] | None = Field(
            default=None, max_length=max_ids,
            description="attributes of such users (as in users.parquet), for a more specific prior")

    return RecommendRequest


def _plan_model(cfg: Config) -> type[BaseModel]:
    s, p = cfg.serving, cfg.plan
    UserId = Annotated[StrictStr, StringConstraints(min_length=1, max_length=s.max_user_id_chars)]
    Zone = _zone_type()

    class PlanRequest(BaseModel):
        model_config = ConfigDict(extra="forbid", title="PlanRequest")
        user_ids: list[UserId] = Field(min_length=1, max_length=p.max_user_ids,
                                       json_schema_extra={"uniqueItems": True},
                                       description=f"the audience (1 to {p.max_user_ids} distinct ids)")

        @field_validator("user_ids")
        @classmethod
        def _distinct(cls, ids: list[str]) -> list[str]:
            # a second copy of a user would be planned without the first one's send counting
            if len(set(ids)) != len(ids):
                raise ValueError("ids must be distinct")
            return ids
        window_start: StrictStr | None = Field(default=None,
                                               json_schema_extra={"format": "date-time", "pattern": YEARS_1970_2200},
                                               description="start of the campaign window, ISO 8601 (default: "
                                                           "this hour)")
        window_hours: whole(1, s.max_window_hours) | None = Field(default=None,
                                               description=f"1 to {s.max_window_hours} (default "
                                                           f"{p.default_window_hours})")
        channel: Annotated[StrictStr, StringConstraints(min_length=1, max_length=32)] | None = Field(
            default=None, description=f"the campaign's channel (default {p.default_channel})")
        capacity_per_hour: whole(0, 10_000_000) | None = Field(default=None,
                                                    description="sends a UTC hour; 0 means no limit")
        explore: number(0, 1) | None = Field(default=None, description="share sent at a random allowed "
                                                                              "hour, with logged propensities")
        min_open_prob: number(0, 1) | None = Field(default=None,
                                            description="skip users whose best expected open probability is lower")
        seed: Whole = Field(default=0, ge=0, le=2**31 - 1, description="the exploration's random seed")
        timezones: dict[UserId, Zone] | None = Field(default=None, max_length=p.max_user_ids,
                                                     description="IANA zones of users the snapshot may not know")

    return PlanRequest


def _bad(detail: str, field: str | None, status: int = 400) -> JSONResponse:
    log.info("%d %s", status, detail)
    return JSONResponse({"detail": detail, "field": field}, status_code=status)


def _window_start(text: str | None) -> datetime | None:
    if text is None:
        return None
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError("window_start: not an ISO 8601 time (for example 2026-01-05T00:00:00Z)") from None
    value = value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value
    # the window and every zone's local time must stay representable, pandas' too
    if not 1970 <= value.year <= 2200:
        raise ValueError("window_start: out of range (years 1970 to 2200)")
    return value


def _json(payload: Any) -> Response:
    # orjson: encoding 2,400 floats of a 100-user answer cost json.dumps more than the look-up
    return Response(orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json")


def _missing(value: Any) -> bool:
    return value is None or (not isinstance(value, (str, bytes, list, dict)) and bool(pd.isna(value)))


def build_app(cfg: Config, state: Callable[[], Any], plan: Callable[[FastAPI], None] | None = None,
              app: FastAPI | None = None, extra_models: tuple[type[BaseModel], ...] = ()) -> FastAPI:
    """The routes, over ``state()``: the live recommender (a :class:`serving.live.LiveRecommender`).

    ``app``: an app created earlier (BentoML mounts it at import) to add the routes to.
    """
    s = cfg.serving
    app = app or FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    app.title, app.version = "sendtime", "1"
    app.description = ("When to send to each person, and whom to target. Every endpoint but /livez and /readyz "
                       "needs `Authorization: Bearer <token>` when the service has a token.")
    Single = _request_model(cfg, s.max_user_ids, "RecommendRequest")
    Bulk = _request_model(cfg, s.max_bulk_user_ids, "BulkRecommendRequest")
    errors = {400: {"model": ErrorBody, "description": "a malformed request; `field` names the field"},
              401: {"model": ErrorBody, "description": "missing or wrong bearer token"},
              413: {"model": ErrorBody, "description": f"body over {s.max_body_bytes} bytes"},
              503: {"model": ErrorBody, "description": "shedding load: retry after the Retry-After header"}}

    def invalid(problems: list[dict]) -> JSONResponse:
        first = problems[0] if problems else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        # the location names the field; a key inside a map is a user id: never echo it
        field = loc[0] if loc else "body"
        if first.get("type") == "json_invalid" or not loc:
            field, msg = "body", "not a JSON object with the documented fields"
        elif first.get("type") == "literal_error":
            msg = "not an IANA time zone (the schema lists them)"   # not the 600 names
        else:
            msg = first.get("msg", "invalid")
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        return _bad(f"{field}: {msg}{more}", field)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return invalid(list(exc.errors()))

    async def parse(request: Request, model: type[BaseModel]) -> BaseModel | JSONResponse:
        # pydantic-core parses and validates the raw body in one pass: FastAPI's own body
        # handling cost more than the look-up it guards
        try:
            return model.model_validate_json(await request.body())
        except ValidationError as exc:
            return invalid(exc.errors(include_input=False))

    def ask(current: Any, body: BaseModel, ids: list[str]) -> list[dict]:
        """One recommend call for ``ids`` of a validated body (the single and the bulk route)."""
        zones, attrs = body.timezones or {}, body.attributes or {}
        hours = s.default_window_hours if body.window_hours is None else body.window_hours
        return current.recommend(ids, _window_start(body.window_start), hours,
                                 zones=[zones.get(u) for u in ids] if zones else None,
                                 attributes=[attrs.get(u) for u in ids] if attrs else None)

    @app.post("/recommend", response_model=RecommendResponse, responses=errors, openapi_extra=_body(Single),
              summary="Per user: open probability per slot, the best send time in the window, churn risk")
    async def recommend(request: Request) -> Response:
        body = await parse(request, Single)
        if isinstance(body, JSONResponse):
            return body
        try:
            return _json({"results": ask(state().current, body, list(body.user_ids))})
        except ValueError as exc:
            return _bad(str(exc), str(exc).split(":")[0])

    @app.post("/recommend/bulk", responses={200: {"content": {"application/x-ndjson": {}},
                                                   "description": "one JSON result per line, in the order asked"},
                                             **errors}, openapi_extra=_body(Bulk),
              summary=f"The same for large audiences (up to {s.max_bulk_user_ids} ids), streamed as JSON lines")
    async def recommend_bulk(request: Request) -> Response:
        body = await parse(request, Bulk)
        if isinstance(body, JSONResponse):
            return body
        try:
            _window_start(body.window_start)   # a bad window is a 400 before the stream starts
        except ValueError as exc:
            return _bad(str(exc), str(exc).split(":")[0])
        ids = list(body.user_ids)
        current = state().current   # one state for the whole answer, even across a reload

        def lines() -> Iterator[bytes]:
            for i in range(0, len(ids), s.max_user_ids):
                for r in ask(current, body, ids[i:i + s.max_user_ids]):
                    yield orjson.dumps(r, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_APPEND_NEWLINE)

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    Plan = _plan_model(cfg)

    @app.post("/plan", responses={200: {"description": "one row per asked user (the send plan's columns) and "
                                                       "a summary"}, **errors},
              openapi_extra=_body(Plan),
              summary=f"A send plan for up to {cfg.plan.max_user_ids} users under the campaign rules and capacity")
    async def plan_route(request: Request) -> Response:
        body = await parse(request, Plan)
        if isinstance(body, JSONResponse):
            return body
        from serving.plan import plan_users

        try:
            start = _window_start(body.window_start) or datetime.now(timezone.utc).replace(minute=0, second=0,
                                                                                          microsecond=0)
            zones = (body.timezones or {})
            current = state().current
            ids = list(body.user_ids)
            found = current.lookup(ids, [zones.get(u) for u in ids] if zones else None)
            slot = found.slot if found.slot is not None else np.full((len(ids), current.matrix.n_slots), np.nan)
            # the optimiser may take a while: off the event loop, so health checks still answer
            result = await run_in_threadpool(
                plan_users, ids, slot, list(found.zones), start, cfg, window_hours=body.window_hours,
                history=current.plan_history, unsubscribed=found.unreachable, channel=body.channel,
                capacity_per_hour=body.capacity_per_hour, explore=body.explore,
                min_open_prob=body.min_open_prob, seed=body.seed)
        except ValueError as exc:
            field = str(exc).split(":")[0].lstrip("-").replace("-", "_")
            return _bad(str(exc), field)
        rows = []
        for record in result.rows.to_dict("records"):
            record = {k: (None if _missing(v) else v) for k, v in record.items()}
            if record["send_at"] is not None:
                record["send_at"] = pd.Timestamp(record["send_at"]).strftime("%Y-%m-%dT%H:%M:%SZ")
            rows.append(record)
        summary = {k: v for k, v in result.summary.items() if isinstance(v, (int, float, str, bool)) or v is None}
        return _json({"rows": rows, "summary": summary,
                      "history_as_of": current.manifest["as_of"] if current.plan_history is not None else None})

    def models_payload() -> dict:
        live = state()
        r = live.current
        return {"model_versions": r.champions.versions(), "missing_tasks": r.champions.missing,
                "feature_snapshot_as_of": r.manifest["as_of"], "refresh_id": r.manifest.get("refresh_id", ""),
                "n_users": len(r.matrix), "scores_from": r.board.source, "reloads": live.reloads,
                "last_reload_error": live.last_error or ""}

    @app.api_route("/models", methods=["GET", "POST"], response_model=ModelsResponse,
                   responses={401: errors[401]},
                   summary="Which model versions and which feature snapshot this server answers with")
    async def models() -> Response:
        return _json(models_payload())

    if plan is not None:
        plan(app)
    app.openapi_url, app.docs_url = "/openapi.json", "/docs"
    app.openapi = lambda: _openapi(app, [Single, Bulk, Plan, *extra_models])
    app.setup()   # the schema and docs routes, now that the routes exist
    return app


def _body(model: type[BaseModel]) -> dict:
    """The request body's place in the OpenAPI schema (the route reads the raw body)."""
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model.model_config.get('title') or model.__name__}"}}}}}


def _openapi(app: FastAPI, models: list[type[BaseModel]]) -> dict:
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        spec = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        schemas = spec.setdefault("components", {}).setdefault("schemas", {})
        for model in models:
            schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(schema.pop("$defs", {}))
            schemas[model.model_config.get("title") or model.__name__] = schema
        app.openapi_schema = spec
    return app.openapi_schema



class Guard:
    """ASGI middleware in front of every route but /livez and /readyz: the bearer token,
    the body limit (413 before the body is read in full) and load shedding (503)."""

    def __init__(self, app: Any, token: str = "", max_body_bytes: int = 2_000_000,
                 max_concurrent: int = 64) -> None:
        self.app, self.token = app, token.encode()
        self.max_body, self.max_concurrent = max_body_bytes, max_concurrent
        self.in_flight = 0

    async def _send_error(self, send: Callable, status: int, detail: str, field: str | None,
                          headers: list[tuple[bytes, bytes]] | None = None) -> None:
        body = json.dumps({"detail": detail, "field": field}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()), *(headers or [])]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "websocket" and self.token:
            # no websocket routes exist; should one appear, it is not a way around the token
            return await send({"type": "websocket.close", "code": 1008})
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.token:
            scheme, _, given = headers.get(b"authorization", b"").partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self.token):
                log.info("401 %s", scope["path"])
                return await self._send_error(send, 401, "Authorization: a valid bearer token is required",
                                              "Authorization", [(b"www-authenticate", b"Bearer")])
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            log.info("413 %s", scope["path"])
            return await self._send_error(send, 413, f"body: over {self.max_body} bytes", "body")
        if self.in_flight >= self.max_concurrent:
            log.info("503 %s: %d requests in flight", scope["path"], self.in_flight)
            return await self._send_error(send, 503, "busy: retry shortly", None, [(b"retry-after", b"1")])
        self.in_flight += 1
        try:
            # read the body here, up to the limit, before any route parses it: a chunked body
            # without a length is cut off at the limit with 413, not read in full
            chunks, size, more = [], 0, True
            while more:
                message = await receive()
                if message["type"] != "http.request":
                    return
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > self.max_body:
                    log.info("413 %s", scope["path"])
                    return await self._send_error(send, 413, f"body: over {self.max_body} bytes", "body")
                chunks.append(chunk)
                more = message.get("more_body", False)
            body = b"".join(chunks)
            replayed = False

            async def replay() -> dict:
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            await self.app(scope, replay, send)
        finally:
            self.in_flight -= 1


class _BodyTooLarge(Exception):
    pass
