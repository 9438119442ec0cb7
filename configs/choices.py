"""The typed choices every room agrees on: event names, tasks and model libraries.

Validated once at the edge (the CLI's options are these enums), then passed as values.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["EVENT_NAMES", "PACKAGES", "Library", "Task"]

# the rooms of the house, bottom to top: configs <- features <- boosters <- training <- serving;
# the simulator beside them; sendtime is the front door. Logging and the import-boundary
# tests read this list.
PACKAGES: tuple[str, ...] = ("configs", "features", "boosters", "training", "serving", "simulator", "sendtime")

# the event names of the contract's log (section 1)
EVENT_NAMES: tuple[str, ...] = ("send", "open", "click", "purchase", "session", "unsubscribe")


class Task(StrEnum):
    """What a model predicts: the open probability of a send in a slot, or churn."""

    OPEN = "open"
    CHURN = "churn"


class Library(StrEnum):
    """The gradient-boosting library a model is trained with (one adapter each)."""

    LIGHTGBM = "lightgbm"
    XGBOOST = "xgboost"
