"""Configuration: loaded from TOML once, at the CLI's edge, validated, then passed as data.

Every number of the labels, features, models and serving lives in ``configs/*.toml``;
these models only say what shape it must have. Nothing here touches the file system
except :func:`load_config`, and only when called.
"""

from __future__ import annotations

import math
import os
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from configs.choices import EVENT_NAMES
from configs.errors import SendtimeError

__all__ = [
    "Config",
    "ConfigError",
    "SlotConfig",
    "LabelConfig",
    "FeatureConfig",
    "DatasetConfig",
    "ModelConfig",
    "TrackingConfig",
    "TuningConfig",
    "ServingConfig",
    "SimulateConfig",
    "PlanConfig",
    "ClusterConfig",
    "DriftConfig",
    "BtydConfig",
    "load_config",
    "DEFAULT_CONFIG_ENV",
]

DEFAULT_CONFIG_ENV = "SENDTIME_CONFIG"


class ConfigError(SendtimeError, ValueError):
    """A configuration file that does not have the expected shape."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SlotConfig(_Frozen):
    kind: Literal["hour_of_day", "hour_of_week"]
    default_timezone: str

    @field_validator("default_timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown IANA time zone {value!r}") from exc
        return value

    @property
    def n_slots(self) -> int:
        return 24 if self.kind == "hour_of_day" else 168


class LabelConfig(_Frozen):
    open_attribution_hours: float = Field(gt=0)
    churn_lookback_days: int = Field(gt=0)
    churn_horizon_days: int = Field(gt=0)
    engagement_events: tuple[str, ...]

    @field_validator("engagement_events")
    @classmethod
    def _known_events(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [e for e in value if e not in EVENT_NAMES]
        if unknown or not value:
            raise ValueError(f"engagement_events: {unknown or 'empty'}; choose from {', '.join(EVENT_NAMES)}")
        return value

    def engagement_sql(self) -> str:
        """The engagement events as a SQL list, e.g. ``'open', 'click'`` (names are validated)."""
        return ", ".join(f"'{e}'" for e in self.engagement_events)


class FeatureConfig(_Frozen):
    history_days: int = Field(gt=0)
    frequency_windows_days: tuple[int, ...]
    fatigue_windows_hours: tuple[int, ...]
    slot_prior_strength: float = Field(gt=0)
    user_prior_strength: float = Field(gt=0)
    circular_kernel: tuple[float, ...]
    session_kernel: tuple[float, ...]
    profile_rank: int = Field(ge=0, le=24)
    decay_half_lives_days: tuple[float, ...] = ()
    slot_half_life_days: float = Field(default=0.0, ge=0)
    rhythm_components: int = Field(default=0, ge=0, le=24)
    rhythm_starts: int = Field(default=4, ge=1)
    rhythm_max_fit_users: int = Field(default=50_000, gt=0)
    rhythm_fit_iterations: int = Field(default=60, gt=0)
    rhythm_iterations: int = Field(default=20, gt=0)
    rhythm_min_evidence: float = Field(default=30.0, ge=0)
    rhythm_harmonics: int = Field(default=0, ge=0, le=11)
    rhythm_background_share: float = Field(default=0.0, ge=0, lt=1)
    rhythm_level_groups: int = Field(default=0, ge=0, le=1000)
    rhythm_level_strength: float = Field(default=8.0, gt=0)
    rhythm_shifts: tuple[float, ...] = (0.0,)
    rhythm_shift_iterations: int = Field(default=3, gt=0)
    rhythm_threads: int = Field(default=0, ge=0)
    rhythm_families: tuple[str, ...] = ("rhythm_open", "rhythm_expected", "rhythm_rate")
    materialize_max_rows: int = Field(ge=0)
    duckdb_memory_limit: str = ""
    validation_cache: bool = True
    validation_cache_dir: str = ""
    max_attribute_levels: int = Field(gt=1)

    @field_validator("frequency_windows_days", "fatigue_windows_hours", "decay_half_lives_days")
    @classmethod
    def _windows_once_each(cls, value: tuple, info) -> tuple:
        if not all(math.isfinite(v) and v > 0 for v in value):
            raise ValueError(f"features.{info.field_name} must be positive numbers; got {list(value)}")
        # each names a column as its number reads with :g (purchases_30d, opens_decayed_60d):
        # two that read the same would be one column, counted twice over when the feature
        # state moves forward
        names = [f"{v:g}" for v in value]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"features.{info.field_name} names {twice} more than once "
                             f"(as columns read them); got {list(value)}")
        return value

    @field_validator("rhythm_shifts")
    @classmethod
    def _shifts_include_none(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        # each shifted mix starts from the unshifted one: it must be among them
        if 0.0 not in value:
            raise ValueError(f"features.rhythm_shifts must include 0.0 (the unshifted basis); got {list(value)}")
        return value


class DatasetConfig(_Frozen):
    open_snapshot_every_days: int = Field(gt=0)
    open_train_snapshots: int = Field(gt=1)
    open_rows_days: int = Field(gt=0)
    churn_snapshot_every_days: int = Field(gt=0)
    churn_train_snapshots: int = Field(ge=0)   # 0: as many as the log's span allows
    calibration: Literal["isotonic", "sigmoid", "none"]
    calibration_bins: int = Field(gt=1)
    cache_entries: int = Field(default=2, ge=0)   # training sets kept between commands; 0: none

    @field_validator("churn_train_snapshots")
    @classmethod
    def _two_or_all(cls, value: int) -> int:
        if value == 1:
            raise ValueError("churn_train_snapshots: 0 (as many as the log's span allows) or at least 2")
        return value


class ModelConfig(_Frozen):
    num_boost_round: int = Field(gt=0)
    early_stopping_rounds: int = Field(gt=0)
    seed: int
    threads: int = Field(gt=0)
    lightgbm: dict[str, Any]
    xgboost: dict[str, Any]
    open_rhythm_blend: float = Field(default=0.0, ge=0, lt=1)


class TrackingConfig(_Frozen):
    tracking_uri: str
    artifact_root: str
    experiment: str
    model_prefix: str
    champion_alias: str
    previous_alias: str
    gate_relative_margin: float = Field(ge=0)

    def resolved_uri(self) -> str:
        """``MLFLOW_TRACKING_URI`` wins over the file, as MLflow users expect."""
        return os.environ.get("MLFLOW_TRACKING_URI") or self.tracking_uri

    def model_name(self, task: str) -> str:
        return f"{self.model_prefix}-{task}"

    def artifact_location(self, experiment: str) -> str:
        """A new experiment's artifact folder (file URI): beside the SQLite database when
        MLFLOW_TRACKING_URI moves it, else under ``artifact_root`` (training's rule)."""
        uri = self.resolved_uri()
        if os.environ.get("MLFLOW_TRACKING_URI") and uri.startswith("sqlite:///"):
            root = Path(uri[len("sqlite:///"):]).parent / "artifacts"
        else:
            root = Path(self.artifact_root)
        return (root.resolve() / experiment).as_uri()


class TuningConfig(_Frozen):
    trials: int = Field(gt=0)
    storage: str
    startup_trials: int = Field(ge=0)


class ChurnTiers(_Frozen):
    mode: Literal["thresholds", "share"]
    medium: float = Field(gt=0, lt=1)
    high: float = Field(gt=0, lt=1)
    high_share: float = Field(gt=0, lt=1)
    medium_share: float = Field(gt=0, lt=1)

    @model_validator(mode="after")
    def _ordered(self) -> "ChurnTiers":
        if not self.medium < self.high:
            raise ValueError("churn_tiers: medium must be below high")
        if self.high_share + self.medium_share >= 1:
            raise ValueError("churn_tiers: high_share + medium_share must be below 1")
        return self


class ServingConfig(_Frozen):
    serving_dir: str
    keep_refreshes: int = Field(ge=1)
    host: str
    port: int = Field(gt=0, lt=65536)
    max_user_ids: int = Field(gt=0)
    max_window_hours: int = Field(gt=0)
    default_window_hours: int = Field(gt=0)
    score_batch_users: int = Field(gt=0)
    churn_reasons: int = Field(ge=0, le=10)
    churn_reasons_min_tier: Literal["low", "medium", "high"]
    churn_tiers: ChurnTiers
    # how often a running service looks for a newer refresh or a moved champion; 0: never
    reload_check_seconds: float = Field(default=30.0, ge=0)
    # the bulk path takes this many ids a call, answered as a stream of JSON lines
    max_bulk_user_ids: int = Field(default=20000, gt=0)
    # a user id longer than this is refused (ids are opaque, often hashes)
    max_user_id_chars: int = Field(default=128, gt=0)
    # request bodies over this many bytes get 413 before they are read in full
    max_body_bytes: int = Field(default=4_000_000, gt=0)
    # requests answered at once; beyond it the service sheds load with 503 + Retry-After
    max_concurrent_requests: int = Field(default=64, gt=0)
    # the bearer token every endpoint but /livez and /readyz asks for; SENDTIME_API_TOKEN wins.
    # Empty: no token (then `serve` binds only to loopback unless told otherwise)
    api_token: str = ""
    # server processes; each holds its own copy of the snapshot's scores
    workers: int = Field(default=2, gt=0)
    # LightGBM champions as native code (boosters.compiled) for scoring calls of at least
    # compiled_min_rows model rows; compiled once per model into compiled_cache_dir
    # (empty: <serving_dir>/compiled)
    compiled_trees: bool = True
    compiled_min_rows: int = Field(default=500_000, ge=0)
    compiled_cache_dir: str = ""
    # PostgreSQL tag store (postgresql://...); SENDTIME_TAG_STORE_URL wins. Empty: the
    # embedded DuckDB store of each refresh only
    tag_store_url: str = ""

    def resolved_token(self) -> str:
        """``SENDTIME_API_TOKEN`` wins over the file, like MLFLOW_TRACKING_URI."""
        return os.environ.get("SENDTIME_API_TOKEN") or self.api_token

    @field_validator("tag_store_url")
    @classmethod
    def _postgres_url(cls, value: str) -> str:
        return _check_tag_store_url(value, "serving.tag_store_url")

    def resolved_tag_store_url(self, override: str | None = None) -> str:
        """The PostgreSQL tag store's URL, or "" for the embedded DuckDB store: ``override``
        (a command-line flag) wins over ``SENDTIME_TAG_STORE_URL``, which wins over the file."""
        if override:
            return _check_tag_store_url(override, "--tag-store")
        from_env = os.environ.get(TAG_STORE_URL_ENV)
        if from_env:
            return _check_tag_store_url(from_env, TAG_STORE_URL_ENV)
        return self.tag_store_url


TAG_STORE_URL_ENV = "SENDTIME_TAG_STORE_URL"


def _check_tag_store_url(value: str, source: str) -> str:
    """Empty, or a URL libpq takes (postgresql:// or postgres://); the error names where the
    value came from and never echoes it (it may hold a password)."""
    value = value.strip()
    if value and value.split("://", 1)[0].lower() not in ("postgresql", "postgres") or value.endswith("://"):
        raise ConfigError(f"{source}: the tag store must be a postgresql:// URL "
                          "(e.g. postgresql://user@host:5432/db), or empty for the embedded DuckDB store")
    return value


class SimChannelConfig(_Frozen):
    """One channel of the simulated sends: how often it is used and how it is answered."""

    share: float = Field(ge=0)                  # of the sends
    open_factor: float = Field(default=1.0, gt=0)  # x the user's open probability
    open_delay_minutes: float = Field(default=40.0, gt=0)  # mean, for opens within the day


class SimulateConfig(_Frozen):
    users: int = Field(gt=0)
    days: int = Field(gt=0)
    seed: int
    start: str
    timezones: dict[str, float]
    sender_timezone: str
    house_hours: tuple[int, ...]
    exploration: float = Field(ge=0, le=1)
    send_rate: float = Field(gt=0)
    fatigue_per_recent_send: float = Field(ge=0, lt=1)
    cold_start_share: float = Field(ge=0, lt=1)
    fade_share: float = Field(ge=0, le=1)
    fade_days_mean: float = Field(gt=0)
    sessions_per_day: float = Field(ge=0)
    session_rhythm_share: float = Field(ge=0, le=1)
    base_open_rate: float = Field(gt=0, lt=1)
    purchase_per_session: float = Field(ge=0, le=1)
    click_per_open: float = Field(ge=0, le=1)
    unsubscribe_per_send: float = Field(ge=0, le=1)
    # "house": the historical sender above (the default data); "logged": a sender that obeys
    # the [plan] rules, explores uniformly over the allowed local hours with probability
    # `exploration`, logs each send's `propensity` and writes send_truth.parquet
    sender: Literal["house", "logged"] = "house"
    # the harder setting's mechanisms (configs/harder_setting.toml); each is off at its default
    channels: dict[str, SimChannelConfig]
    truth_channel: str = "push"   # truth.parquet's open probabilities are for this channel
    unsubscribe_per_channel: bool = False
    rhythm_drift_hours_per_30_days: float = Field(default=0.0, ge=0)
    rhythm_switch_share: float = Field(default=0.0, ge=0, le=1)
    late_open_share: float = Field(default=0.0, ge=0, le=1)
    purchase_per_open: float = Field(default=0.0, ge=0, le=1)
    purchase_after_open_hours_mean: float = Field(default=18.0, gt=0)
    winback_share: float = Field(default=0.0, ge=0, le=1)
    winback_after_days_mean: float = Field(default=30.0, gt=0)
    segment_sends_per_week: tuple[float, ...] = ()   # () or (high_value, potential, silent)

    @model_validator(mode="after")
    def _sim_channels(self) -> "SimulateConfig":
        if sum(c.share for c in self.channels.values()) <= 0:
            raise ValueError("simulate.channels: shares must add up to more than 0")
        if self.truth_channel not in self.channels:
            raise ValueError(f"simulate.truth_channel: {self.truth_channel!r} is not one of simulate.channels "
                             f"({', '.join(self.channels)})")
        if len(self.segment_sends_per_week) not in (0, 3) or any(v < 0 for v in self.segment_sends_per_week):
            raise ValueError("simulate.segment_sends_per_week: empty, or three rates >= 0 "
                             "(high_value, potential, silent)")
        return self

    @field_validator("timezones")
    @classmethod
    def _zones(cls, value: dict[str, float]) -> dict[str, float]:
        for zone, share in value.items():
            try:
                ZoneInfo(zone)
            except (ZoneInfoNotFoundError, ValueError) as exc:
                raise ValueError(f"simulate.timezones: unknown time zone {zone!r}") from exc
            if share < 0:
                raise ValueError(f"simulate.timezones: negative share for {zone!r}")
        if sum(value.values()) <= 0:
            raise ValueError("simulate.timezones: shares must add up to more than 0")
        return value


class PlanConfig(_Frozen):
    """The campaign rules of ``sendtime plan`` and POST /plan (contract: "Send plan")."""

    # no sends in [quiet_start_hour, quiet_end_hour) of the user's local day (wraps midnight)
    quiet_start_hour: int = Field(ge=0, le=23)
    quiet_end_hour: int = Field(ge=0, le=23)
    max_sends_per_local_day: int = Field(ge=1)
    new_user_days: float = Field(ge=0)
    new_user_max_sends: int = Field(ge=1)
    after_new_user_max_per_local_day: int = Field(ge=1)
    silence_after_unopened: int = Field(ge=1)
    silence_hours: float = Field(ge=0)
    degrade_after_unopened: int = Field(ge=1)
    degraded_max_sends: int = Field(ge=1)
    degraded_days: float = Field(gt=0)
    quota_channels: tuple[str, ...]
    quota_per_month: int = Field(ge=0)
    quota_per_day: int = Field(ge=0)
    rules_count_all_channels: bool
    default_channel: str
    default_window_hours: int = Field(gt=0)
    explore: float = Field(ge=0, le=1)
    min_open_prob: float = Field(ge=0, lt=1)
    capacity_per_hour: int = Field(ge=0)
    streak_lookback_days: int = Field(gt=0)
    max_user_ids: int = Field(gt=0)
    solver_exact_max_vars: int = Field(ge=0)
    solver_gap_tolerance: float = Field(ge=0)
    log_to_mlflow: bool
    ope_min_propensity: float = Field(gt=0, lt=1)
    ope_min_effective_sends: float = Field(gt=0)

    @model_validator(mode="after")
    def _rules_agree(self) -> "PlanConfig":
        if self.degrade_after_unopened < self.silence_after_unopened:
            raise ValueError("plan: degrade_after_unopened must not be below silence_after_unopened")
        return self

    def quiet_hours(self) -> tuple[bool, ...]:
        """For each local hour 0-23: inside the quiet window (which may wrap midnight)?"""
        start, end = self.quiet_start_hour, self.quiet_end_hour
        if start == end:
            return (False,) * 24
        if start < end:
            return tuple(start <= h < end for h in range(24))
        return tuple(h >= start or h < end for h in range(24))


class DriftConfig(_Frozen):
    """Each refresh's population stability index (PSI) against the champion's reference."""

    enabled: bool
    experiment: str
    psi_warn: float = Field(gt=0)
    bins: int = Field(ge=2, le=100)
    top_features: int = Field(ge=0)
    key_columns: tuple[str, ...]
    max_levels: int = Field(ge=1)
    reference_users: int = Field(gt=0)
    sample_users: int = Field(gt=0)
    epsilon: float = Field(gt=0, lt=0.01)
    seed: int


class BtydConfig(_Frozen):
    """The BG/NBD model fitted at each snapshot (features.btyd)."""

    enabled: bool = True
    # lifetimes' L2 penalty on the parameters (time scaled so the oldest user's age is 1)
    penalizer: float = Field(default=0.0, ge=0)
    # the fit runs on at most this many engaged users, sampled by a hash of the user id
    max_fit_users: int = Field(default=200_000, gt=0)
    # fewer engaged users, or fewer with a second active day, and no fit (the columns are missing)
    min_fit_users: int = Field(default=50, gt=0)
    min_fit_repeaters: int = Field(default=10, gt=0)


class ClusterConfig(_Frozen):
    """``--cluster``: a Dask cluster for features, train and score."""

    local_memory_limit: str
    partitions_per_worker: int = Field(ge=1)
    duckdb_memory_share: float = Field(gt=0, le=1)
    dashboard_address: str = ""
    connect_timeout_seconds: float = Field(gt=0)


ActiveHoursKernel = Literal["none", "circular", "session"]


class ActiveHoursConfig(_Frozen):
    """Active hours from any engagement, where no open model exists (``sendtime active-hours``,
    the tags' ``active_hours``): the candidates and the earlier months they are chosen on."""

    half_lives_days: tuple[float, ...] = Field(min_length=1)   # 0: no fading
    prior_strengths: tuple[float, ...] = Field(min_length=1)
    kernels: tuple[ActiveHoursKernel, ...] = Field(min_length=1)
    check_days: int = Field(gt=0)
    selection_splits: int = Field(ge=0)
    min_check_events: int = Field(ge=1)
    selection_max_users: int = Field(gt=0)
    default_half_life_days: float = Field(ge=0)
    default_prior_strength: float = Field(ge=0)
    default_kernel: ActiveHoursKernel
    top_k: int = Field(ge=1, le=24)

    @field_validator("half_lives_days", "prior_strengths")
    @classmethod
    def _not_negative(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if any(v < 0 for v in value):
            raise ValueError(f"negative values {[v for v in value if v < 0]}")
        return value


class Config(_Frozen):
    slots: SlotConfig
    labels: LabelConfig
    features: FeatureConfig
    datasets: DatasetConfig
    models: ModelConfig
    tracking: TrackingConfig
    tuning: TuningConfig
    serving: ServingConfig
    simulate: SimulateConfig
    plan: PlanConfig
    cluster: ClusterConfig
    drift: DriftConfig
    btyd: BtydConfig = BtydConfig()
    active_hours: ActiveHoursConfig

    def with_overrides(self, **sections: dict[str, Any]) -> "Config":
        """A copy with some fields of some sections replaced, validated again."""
        data = self.model_dump()
        for section, fields in sections.items():
            data[section].update({k: v for k, v in fields.items() if v is not None})
        return Config.model_validate(data)


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _default_toml() -> dict[str, Any]:
    text = resources.files("configs").joinpath("default.toml").read_text(encoding="utf-8")
    return tomllib.loads(text)


def load_config(path: str | Path | None = None) -> Config:
    """Load the default config, overlaid by ``path`` (or ``$SENDTIME_CONFIG``) if given.

    An overlay file only needs the keys it changes.
    """
    data = _default_toml()
    path = path or os.environ.get(DEFAULT_CONFIG_ENV)
    if path:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = _deep_merge(data, tomllib.loads(path.read_text(encoding="utf-8")))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    try:
        return Config.model_validate(data)
    except Exception as exc:  # pydantic's message names the field; keep it whole
        raise ConfigError(f"invalid configuration{f' in {path}' if path else ''}:\n{exc}") from exc
