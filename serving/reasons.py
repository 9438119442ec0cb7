"""Why a user is at risk, in words a CRM team acts on: the features that push each user's
churn score up the most (SHAP contributions computed by the tree libraries themselves),
phrased from the user's own values."""

from __future__ import annotations

import numpy as np

__all__ = ["top_reasons", "phrase"]


def _days(v: float) -> str:
    return f"{v:.0f} day{'s' if round(v) != 1 else ''}"


_PHRASES = {
    "days_since_session": lambda v: f"no session for {_days(v)}" if v == v else "never had a session",
    "days_since_open": lambda v: f"no open for {_days(v)}" if v == v else "never opened a message",
    "days_since_engagement": lambda v: f"no activity for {_days(v)}" if v == v else "never active",
    "days_since_purchase": lambda v: f"no purchase for {_days(v)}" if v == v else "never purchased",
    "days_since_first_event": lambda v: f"first seen {_days(v)} ago",
    "open_rate_trend": lambda v: f"open rate at {v:.0%} of its 90-day level",
    "session_trend": lambda v: f"sessions at {v:.0%} of their 90-day pace",
    "open_trend": lambda v: f"opens at {v:.0%} of their 90-day pace",
    "consecutive_unopened": lambda v: f"{v:.0f} messages in a row unopened",
    "sends_last_168h": lambda v: f"{v:.0f} messages received in the last week",
    "sends_last_24h": lambda v: f"{v:.0f} messages received in the last 24 h",
    "unsubscribed": lambda v: "unsubscribed" if v > 0 else "subscribed",
    "unreachable": lambda v: "unsubscribed since the last message" if v > 0 else "still receives messages",
    "user_open_rate": lambda v: f"opens {v:.0%} of messages",
    "tenure_days": lambda v: f"signed up {_days(v)} ago",
}


def phrase(feature: str, value: float, categories: tuple[str, ...] | None = None) -> str:
    if categories is not None:   # a categorical input arrives as its code
        level = categories[int(value)] if value == value and 0 <= int(value) < len(categories) else "unknown"
        return f"{feature.replace('_', ' ')}: {level}"
    if feature in _PHRASES:
        return _PHRASES[feature](float(value))
    for prefix, noun in (("sessions_", "sessions"), ("opens_", "opens"), ("purchases_", "purchases"),
                         ("clicks_", "clicks"), ("active_days_", "active days"), ("sends_", "messages")):
        if feature.startswith(prefix) and feature.endswith("d"):
            return f"{value:.0f} {noun} in the last {feature[len(prefix):-1]} days"
    if feature.startswith("open_rate_"):
        return f"open rate {value:.0%} over the last {feature[len('open_rate_'):-1]} days"
    return f"{feature.replace('_', ' ')} = {value:.3g}"


def top_reasons(contributions: np.ndarray, x: np.ndarray, names: list[str], k: int,
                categories: dict[str, tuple[str, ...]] | None = None) -> list[list[str]]:
    """For each row, the k features with the largest positive contribution, phrased.

    ``contributions`` is (n_rows, n_features [+ bias]) from pred_contrib; only pushes
    toward churn count as reasons.
    """
    contrib = contributions[:, : len(names)]
    order = np.argsort(-contrib, axis=1)[:, :k]
    out = []
    for i, row in enumerate(order):
        out.append([phrase(names[j], x[i, j], (categories or {}).get(names[j]))
                    for j in row if contrib[i, j] > 0])
    return out
