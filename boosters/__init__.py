"""One adapter per gradient-boosting library, below training and serving.

Each adapter (``boosters.lightgbm_adapter``, ``boosters.xgboost_adapter``) says how its
library fits with early stopping, reports each round, predicts, explains (SHAP
contributions), measures and stores a model as an MLflow flavour. Training fits and
logs through it; serving loads and predicts through it. A third library is one new
file that subclasses :class:`BoosterLibrary` and one line in ``_ADAPTERS``.
"""

from __future__ import annotations

from boosters.base import BoosterLibrary, Fitted
from boosters.calibration import apply_calibration, blend_input
from configs import Library

__all__ = ["BoosterLibrary", "Fitted", "adapter", "adapter_for_flavors", "apply_calibration", "blend_input"]


def _adapters() -> dict[Library, BoosterLibrary]:
    from boosters.lightgbm_adapter import LightGBMLibrary
    from boosters.xgboost_adapter import XGBoostLibrary

    return {Library.LIGHTGBM: LightGBMLibrary(), Library.XGBOOST: XGBoostLibrary()}


def adapter(library: str | Library) -> BoosterLibrary:
    """The adapter of ``library`` (``"lightgbm"`` or ``"xgboost"``)."""
    try:
        return _adapters()[Library(library)]
    except ValueError:
        raise ValueError(f"unknown model library {library!r}; choose one of "
                         f"{', '.join(m.value for m in Library)}") from None


def adapter_for_flavors(flavors: dict) -> BoosterLibrary | None:
    """The adapter whose MLflow flavour a logged model carries, if any."""
    for candidate in _adapters().values():
        if candidate.flavor in flavors:
            return candidate
    return None
