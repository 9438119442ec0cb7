"""The BentoML service the message scheduler queries.

Started by ``sendtime serve`` (or ``bentoml serve serving.service:Sendtime``). It loads
the champions and the latest feature snapshot once, in ``__init__``; requests only gather
rows and run the trees. Configuration comes from ``SENDTIME_CONFIG`` (a TOML overlay) and
``SENDTIME_SERVING_DIR``, read when the service starts, never on import.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta, timezone
from typing import Annotated, Optional

import bentoml
from bentoml.exceptions import InvalidArgument
from pydantic import BaseModel, Field, StrictInt, StrictStr

from configs import load_config
from serving.live import LiveRecommender

__all__ = ["Sendtime", "RecommendResult", "RecommendResponse"]


class RecommendResult(BaseModel):
    user_id: str = Field(description="the user asked about")
    slot_open_probs: Optional[list[float]] = Field(
        description="predicted open probability of a message sent in each slot (local hour 0-23, "
                    "or hour of week when configured); null when no open model is champion")
    best_slot: Optional[int] = Field(description="the slot with the highest open probability")
    send_at: Optional[str] = Field(description="recommended send time inside the window, ISO 8601 UTC")
    send_at_open_prob: Optional[float] = Field(description="open probability at send_at")
    churn_prob: Optional[float] = Field(description="probability of no engagement within the churn horizon")
    churn_tier: Optional[str] = Field(description="low / medium / high, by the configured thresholds")
    cold_start: bool = Field(description="true when the user has no history and a population prior was used")
    unsubscribed: bool = Field(
        default=False, description="true when the user unsubscribed after their last send: every slot's "
                                   "probability is 0 and there is no send_at")
    model_versions: dict[str, Optional[str]] = Field(description="registered versions used, by task")


class RecommendResponse(BaseModel):
    results: list[RecommendResult] = Field(description="one result per user id, in the order asked")


class ModelsResponse(BaseModel):
    model_versions: dict[str, Optional[str]]
    missing_tasks: dict[str, str]
    feature_snapshot_as_of: str
    refresh_id: str
    n_users: int
    reloads: int = Field(description="times this server swapped in a newer refresh or champion")
    last_reload_error: Optional[str] = Field(description="why the last reload failed (the old state serves)")


@bentoml.service(
    name="sendtime",
    traffic={"timeout": 30},
    # the access log costs 5-8 % throughput; the scheduler's own logs record requests
    logging={"access": {"enabled": False}},
)
class Sendtime:
    def __init__(self) -> None:
        self.cfg = load_config(os.environ.get("SENDTIME_CONFIG") or None)
        self.live = LiveRecommender(self.cfg, os.environ.get("SENDTIME_SERVING_DIR") or None,
                                    check_seconds=self.cfg.serving.reload_check_seconds)

    @bentoml.api(route="/recommend")
    def recommend(
        self,
        user_ids: Annotated[list[StrictStr], Field(min_length=1, description="users to recommend for")],
        # a string parsed here, not a lax datetime: pydantic would read 12345 as 1970-01-01
        window_start: Annotated[Optional[StrictStr], Field(
            description="start of the sending window, ISO 8601 (naive means UTC; default now)",
            json_schema_extra={"format": "date-time"})] = None,
        window_hours: Annotated[Optional[StrictInt], Field(
            description="length of the window in whole hours (default 24)")] = None,
    ) -> RecommendResponse:
        """Per user: open probability per slot, the best send time in the window, churn risk."""
        serving = self.cfg.serving
        if len(user_ids) > serving.max_user_ids:
            raise InvalidArgument(f"user_ids: at most {serving.max_user_ids} ids per request, got {len(user_ids)}")
        bad = [i for i, u in enumerate(user_ids) if not u.strip()]
        if bad:
            raise InvalidArgument(f"user_ids: empty id at position(s) {bad[:5]}")
        hours = serving.default_window_hours if window_hours is None else window_hours
        if not 1 <= hours <= serving.max_window_hours:
            raise InvalidArgument(f"window_hours: must be between 1 and {serving.max_window_hours}, got {hours}")
        start = _parse_window_start(window_start)
        results = self.live.current.recommend(list(user_ids), start, hours)
        return RecommendResponse(results=[RecommendResult(**r) for r in results])

    @bentoml.api(route="/models")
    def models(self) -> ModelsResponse:
        """Which model versions and which feature snapshot this server answers with."""
        r = self.live.current
        return ModelsResponse(
            model_versions=r.champions.versions(), missing_tasks=r.champions.missing,
            feature_snapshot_as_of=r.manifest["as_of"], refresh_id=r.manifest["refresh_id"],
            n_users=len(r.matrix), reloads=self.live.reloads, last_reload_error=self.live.last_error,
        )


def _parse_window_start(text: str | None) -> datetime | None:
    if text is None:
        return None
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        raise InvalidArgument(f"window_start: {text!r} is not an ISO 8601 time "
                              "(for example 2026-01-05T00:00:00Z)") from None
    value = value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value
    try:
        # the window and every zone's local time must stay representable
        value.astimezone(timezone.utc) + timedelta(days=30)
        value.astimezone(timezone.utc) - timedelta(days=2)
    except OverflowError:
        raise InvalidArgument(f"window_start: {text!r} is out of range") from None
    return value
