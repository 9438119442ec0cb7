"""Compiled trees (boosters.compiled): the booster's numbers bit for bit (tolerance: none)
for every champion flavour, through the scoring core too, on users with missing values and
an unseen category; a damaged cache entry is compiled again, never loaded; a model that
cannot be compiled is scored by its booster, and the log says why."""

import hashlib
import json
import logging

import numpy as np
import pandas as pd
import pytest
import xgboost as xgb

from boosters import adapter
from boosters.compiled import CompilationError, compile_lightgbm, probe_rows
from features.matrix import UserMatrix
from features.rows import ModelRows
from features.snapshot import read_snapshot
from serving.core import ScoringCore, churn_probabilities, slot_probabilities
from serving.models import Champions
from serving.predictor import LoadedModel, load_registered_model
from serving.tagstore import current_refresh

pytestmark = pytest.mark.integration

FLAVOURS = [("open", "lightgbm"), ("churn", "lightgbm"), ("open", "xgboost"), ("churn", "xgboost")]


@pytest.fixture(scope="module")
def matrix(trained):
    """The refresh's snapshot plus three users: one with missing values, one of a level of
    an attribute no model saw, one with both."""
    m, _ = read_snapshot(current_refresh(trained["cfg"].serving.serving_dir).root)
    scalars = m.scalars
    warm = np.flatnonzero((scalars["has_history"].to_numpy() > 0) & (scalars["unreachable"].to_numpy() == 0))[:3]
    odd = scalars.iloc[warm].copy()
    odd.index = pd.Index([f"odd-user-{i}" for i in range(len(odd))], name=scalars.index.name)
    numeric = [c for c in odd.columns if pd.api.types.is_float_dtype(odd[c]) and c not in ("has_history", "unreachable")]
    for i in (0, 2):
        odd.iloc[i, odd.columns.get_indexer(numeric[::2])] = np.nan
    odd.iloc[1, odd.columns.get_indexer(numeric[1::4])] = 1e-36   # LightGBM reads these as 0
    attribute = next(a for a in m.attributes if a != "timezone")
    odd[attribute] = odd[attribute].astype(object)
    odd.iloc[1:, odd.columns.get_loc(attribute)] = "a-level-nobody-has"
    slots = {}
    for family, values in m.slots.items():
        extra = values[warm].copy()
        extra[[0, 2], ::3] = np.nan
        extra[1, 1] = -1e-37
        slots[family] = np.vstack([values, extra])
    whole = pd.concat([scalars.astype({attribute: object}), odd])
    return UserMatrix(as_of=m.as_of, n_slots=m.n_slots, scalars=whole, slots=slots, attributes=m.attributes)


def _xgboost_churn(lightgbm_churn: LoadedModel, matrix: UserMatrix) -> LoadedModel:
    """A real XGBoost churn model on the churn rows (its label: long silence), unregistered."""
    rows = ModelRows(lightgbm_churn.spec, matrix, np.arange(len(matrix) - 3), per_slot=False)
    x = rows.build(0, len(rows))
    silence = x[:, list(lightgbm_churn.spec.names).index("days_since_engagement")]
    y = (np.nan_to_num(silence, nan=1e3) > np.nanmedian(silence)).astype(float)
    booster = xgb.train({"objective": "binary:logistic", "max_depth": 4, "eta": 0.3, "nthread": 2, "verbosity": 0},
                        xgb.DMatrix(x, y, feature_names=list(lightgbm_churn.spec.names)), num_boost_round=20)
    return LoadedModel(task="churn", library=adapter("xgboost"), name="xgboost-churn-test", version="0", run_id="",
                       spec=lightgbm_churn.spec, calibrator={"kind": "none"}, booster=booster)


@pytest.fixture(scope="module")
def models(trained, matrix):
    """Each flavour's model, loaded anew on each call (compiling changes a loaded model)."""
    cfg, results = trained["cfg"], trained["results"]

    def load(task: str, library: str) -> LoadedModel:
        if (task, library) == ("churn", "xgboost"):
            return _xgboost_churn(load(task, "lightgbm"), matrix)
        return load_registered_model(cfg.tracking.resolved_uri(), cfg.tracking.model_name(task),
                                     version=results[(task, library)].version)

    return load


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("compiled")


def _numbers(model: LoadedModel, matrix: UserMatrix) -> np.ndarray:
    everyone = np.arange(len(matrix))
    if model.task == "open":
        return slot_probabilities(model, matrix, everyone)
    return churn_probabilities(model, matrix, everyone)


@pytest.mark.parametrize("task,library", FLAVOURS)
def test_compiled_trees_give_the_boosters_numbers_bit_for_bit(task, library, models, matrix, cache_dir):
    model = models(task, library)
    rows = ModelRows(model.spec, matrix, np.arange(len(matrix) - 3, len(matrix)), per_slot=task == "open")
    odd = rows.build(0, len(rows))
    assert np.isnan(odd).any()                                   # missing values reach the trees
    attribute = next(a for a in matrix.attributes if a != "timezone" and a in model.spec.categories)
    assert np.isnan(odd[rows.n_slots:, list(model.spec.names).index(attribute)]).all()   # the unseen level
    booster = _numbers(model, matrix)
    compiled = model.compile(cache_dir)
    assert compiled == (library == "lightgbm")
    if library == "xgboost":
        assert "inplace_predict" in model.compile_error        # XGBoost keeps its own predictor
    np.testing.assert_array_equal(_numbers(model, matrix), booster)
    if compiled:
        probe = probe_rows(model.booster.model_to_string(), model.booster.num_feature(), 20000, seed=1)
        np.testing.assert_array_equal(model.compiled.predict(probe, threads=2), model.booster.predict(probe))


def test_the_core_scores_with_compiled_trees_and_gives_the_same_numbers(trained, models, matrix, cache_dir):
    cfg = trained["cfg"]
    on = cfg.with_overrides(serving={"compiled_min_rows": 0, "compiled_cache_dir": str(cache_dir)})
    off = cfg.with_overrides(serving={"compiled_trees": False})
    fast = Champions(open=models("open", "lightgbm"), churn=models("churn", "lightgbm"), missing={})
    plain = Champions(open=models("open", "lightgbm"), churn=models("churn", "lightgbm"), missing={})
    everyone = np.arange(len(matrix))
    slot_fast, churn_fast = ScoringCore(fast, matrix, on).model_scores(everyone)
    assert fast.open.compiled is not None and fast.churn.compiled is not None
    slot_plain, churn_plain = ScoringCore(plain, matrix, off).model_scores(everyone)
    assert plain.open.compiled is None
    np.testing.assert_array_equal(slot_fast, slot_plain)
    np.testing.assert_array_equal(churn_fast, churn_plain)
    # only users with history are predicted; the unreachable get no slot prediction
    history = matrix.scalars["has_history"].to_numpy() > 0
    assert np.isnan(slot_fast[~history]).all() and np.isnan(churn_fast[~history]).all()
    assert (slot_fast[history & (matrix.scalars["unreachable"].to_numpy() > 0)] == 0).all()


def test_a_damaged_cache_entry_is_compiled_again_not_loaded(models, matrix, tmp_path, caplog):
    booster = models("churn", "lightgbm").booster
    first = compile_lightgbm(booster, tmp_path)
    obj, side = tmp_path / f"{first.key}.o", tmp_path / f"{first.key}.json"
    good = obj.read_bytes()
    obj.write_bytes(good[: len(good) // 2] + bytes(len(good) - len(good) // 2))   # a torn write
    with caplog.at_level(logging.WARNING, logger="boosters.compiled"):
        again = compile_lightgbm(booster, tmp_path)
    assert "damaged" in caplog.text
    assert json.loads(side.read_text())["sha256"] == hashlib.sha256(obj.read_bytes()).hexdigest()
    x = ModelRows(models("churn", "lightgbm").spec, matrix, np.arange(len(matrix)), per_slot=False).build(0, len(matrix))
    np.testing.assert_array_equal(again.predict(x), booster.predict(x))
    side.write_text("{not json")                                 # a damaged sidecar: compiled again too
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="boosters.compiled"):
        compile_lightgbm(booster, tmp_path)
    assert "damaged" in caplog.text


def test_a_model_that_cannot_be_compiled_is_scored_by_its_booster(models, matrix, tmp_path, caplog):
    model = models("open", "lightgbm")
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the cache should be")
    booster = _numbers(model, matrix)
    with caplog.at_level(logging.INFO, logger="serving.predictor"):
        assert not model.compile(blocked)
    assert "scoring with the lightgbm booster" in caplog.text and str(blocked) in caplog.text
    np.testing.assert_array_equal(_numbers(model, matrix), booster)
    with pytest.raises(CompilationError):
        compile_lightgbm(model.booster, blocked)


def test_a_compiled_model_travels_without_its_native_code(models, matrix, cache_dir):
    """A Dask worker gets a pickled copy: it scores with the booster until it compiles again
    (from the disk cache), with the same numbers."""
    import pickle

    model = models("churn", "lightgbm")
    assert model.compile(cache_dir)
    copy = pickle.loads(pickle.dumps(model))
    assert copy.compiled is None
    np.testing.assert_array_equal(_numbers(copy, matrix), _numbers(model, matrix))
    assert copy.compile(cache_dir)
    np.testing.assert_array_equal(_numbers(copy, matrix), _numbers(model, matrix))


def test_churn_reasons_from_shared_tree_contributions_are_lightgbms(trained, models, matrix):
    """boosters.treeshap: each tree explained once per distinct way rows meet it gives
    LightGBM's own TreeSHAP values up to the order of additions (stated tolerance: 1e-12
    absolute), on real rows and on rows at every threshold, NaN and zero; the reasons ranked
    from them are the same."""
    from boosters.treeshap import DEDUPE_MIN_ROWS, contributions_by_tree
    from features.families import feature_catalog
    from serving.reasons import rank_reasons

    model = models("churn", "lightgbm")
    real = ModelRows(model.spec, matrix, np.arange(len(matrix)), per_slot=False).build(0, len(matrix))
    probe = probe_rows(model.booster.model_to_string(), model.booster.num_feature(), 3000, seed=2)
    x = np.vstack([real, probe])
    assert len(x) >= DEDUPE_MIN_ROWS
    lightgbm = model.booster.predict(x, pred_contrib=True)
    for threads in (1, 2):
        shared = contributions_by_tree(model.booster, x, threads)
        np.testing.assert_allclose(shared, lightgbm, rtol=0, atol=1e-12)
    names, catalog = list(model.spec.names), feature_catalog(trained["cfg"])
    n = len(real)
    assert (rank_reasons(shared[:n], real, names, 3, catalog, model.spec.categories).lists()
            == rank_reasons(lightgbm[:n], real, names, 3, catalog, model.spec.categories).lists())


@pytest.mark.parametrize("tasks", [("open", "churn"), ("open",), ("churn",)])
def test_the_tag_table_built_from_arrays_is_the_frame_path_table(tasks):
    """serving.refresh.tags_table (Arrow columns from the arrays) equals the contract's table
    through pandas (tags_frame), with a task missing, users with neither a score nor a prior,
    unreachable users and reasons for some users (one of them with none)."""
    import pyarrow as pa

    from serving.core import Scores, churn_tier
    from serving.reasons import Reasons
    from serving.refresh import TAG_SCHEMA, tags_frame, tags_table

    rng = np.random.default_rng(4)
    n = 50
    slot = rng.random((n, 24)) if "open" in tasks else None
    if slot is not None:
        slot[3] = np.nan                                   # neither a score nor a prior
    churn = rng.random(n) if "churn" in tasks else np.full(n, np.nan)
    churn[7] = np.nan
    best = np.full(n, -1) if slot is None else np.where(np.isnan(slot).all(axis=1), -1, np.nan_to_num(slot, nan=-1).argmax(1))
    gone = np.zeros(n, dtype=bool)
    gone[[5, 9]] = True
    best[gone] = -1
    scores = Scores(slot_probs=slot, churn_prob=churn, churn_tier=churn_tier(churn, {"medium": 0.3, "high": 0.6}),
                    unreachable=gone, cold_start=np.arange(n) % 7 == 0, best_slot=best, cutoffs={})
    explained = np.array([1, 4, 8, 20])
    words = np.array([["a", "b", None], [None, None, None], ["c", None, None], ["d", "e", "f"]], dtype=object)
    reasons = Reasons(words=words, counts=np.array([2, 0, 1, 3]))
    versions = {"open": "3" if "open" in tasks else None, "churn": "5" if "churn" in tasks else None}
    stamp = pd.Timestamp("2026-04-15T01:02:03.456789Z").to_pydatetime()
    listed: list = [None] * n
    for i, r in zip(explained, reasons.lists()):
        listed[i] = r
    frame = pa.Table.from_pandas(tags_frame(pd.Index([f"u{i}" for i in range(n)]), scores, versions, stamp, listed),
                                 schema=TAG_SCHEMA, preserve_index=False)
    table = tags_table(pd.Index([f"u{i}" for i in range(n)]), scores, versions, stamp, explained, reasons)
    assert table.schema.equals(TAG_SCHEMA)
    for name in TAG_SCHEMA.names:
        assert table[name].to_pylist() == frame[name].to_pylist(), name
