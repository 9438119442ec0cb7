"""The champion pair the service and the nightly job score with."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from configs import Config
from serving.predictor import LoadedModel, NoChampionError, load_registered_model

__all__ = ["Champions", "load_champions"]

log = logging.getLogger(__name__)


@dataclass
class Champions:
    open: LoadedModel | None
    churn: LoadedModel | None
    missing: dict[str, str]

    def versions(self) -> dict[str, str | None]:
        return {"open": self.open.version if self.open else None,
                "churn": self.churn.version if self.churn else None}


def load_champions(cfg: Config) -> Champions:
    """Both tasks' champions; a task without one is reported, not fatal, unless both are."""
    models, missing = {}, {}
    for task in ("open", "churn"):
        try:
            models[task] = load_registered_model(
                cfg.tracking.resolved_uri(), cfg.tracking.model_name(task), alias=cfg.tracking.champion_alias)
        except NoChampionError as exc:
            models[task] = None
            missing[task] = str(exc)
            log.warning("%s: no champion (%s); its columns stay empty", task, exc)
    if not any(models.values()):
        raise NoChampionError(
            "no champion model for either task: run `sendtime train` and `sendtime promote` first ("
            + "; ".join(missing.values()) + ")")
    return Champions(open=models["open"], churn=models["churn"], missing=missing)
