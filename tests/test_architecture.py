"""The house's arrows, checked on the source: rooms never import the front door, serving
never imports training, nobody imports another module's private names; and the one scoring
core gives the same numbers on every path, whoever else is in the call."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from configs import PACKAGES

ROOT = Path(__file__).resolve().parents[1]
ROOMS = ("configs", "features", "boosters", "training", "serving", "simulator")


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) of every absolute import in a file, nested ones included."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.module, [a.name for a in node.names]))
    return out


def _files(*folders: str) -> list[Path]:
    return [f for folder in folders for f in (ROOT / folder).rglob("*.py")]


def test_the_rooms_are_the_declared_packages():
    assert set(ROOMS) | {"sendtime"} == set(PACKAGES)
    for room in PACKAGES:
        doc = ast.get_docstring(ast.parse((ROOT / room / "__init__.py").read_text())) or ""
        assert len(doc) > 40 and "placeholder" not in doc, room


def test_no_room_imports_the_front_door():
    bad = [f"{f.relative_to(ROOT)} -> {m}" for f in _files(*ROOMS) for m, _ in _imports(f)
           if m.split(".")[0] == "sendtime"]
    assert bad == []


def test_configs_imports_no_room_and_serving_never_imports_training():
    bad = [f"{f.relative_to(ROOT)} -> {m}" for f in _files("configs") for m, _ in _imports(f)
           if m.split(".")[0] in PACKAGES and m.split(".")[0] != "configs"]
    bad += [f"{f.relative_to(ROOT)} -> {m}" for f in _files("serving", "features", "boosters")
            for m, _ in _imports(f) if m.split(".")[0] == "training"]
    assert bad == []


def test_no_file_imports_a_private_name_from_another_module():
    bad = [f"{f.relative_to(ROOT)}: from {m} import {n}"
           for f in _files(*PACKAGES, "tests", "benchmarks") for m, names in _imports(f)
           for n in names if n.startswith("_") and not n.startswith("__")]
    assert bad == []


# ---------------------------------------------------------------- one core, the same numbers

def test_a_users_features_do_not_depend_on_who_else_is_in_the_call(trained):
    """The train/serve skew: priors came from whichever users were asked about."""
    from features.matrix import build_matrix
    from serving.core import PriorTable, ScoringCore
    from serving.models import load_champions

    cfg, log = trained["cfg"], trained["log"]
    as_of = log.max_ts()
    everyone, priors_all = build_matrix(log, as_of, cfg)
    active = everyone.user_ids[everyone.scalars["has_history"].to_numpy() > 0]
    few = pd.Index([active[3], active[len(active) // 2]])
    alone, priors_alone = build_matrix(log, as_of, cfg, user_ids=few)
    np.testing.assert_array_equal(priors_alone.slot_rate, priors_all.slot_rate)
    np.testing.assert_array_equal(priors_alone.profile_basis, priors_all.profile_basis)
    rows = everyone.user_ids.get_indexer(few)
    pd.testing.assert_frame_equal(alone.scalars, everyone.scalars.iloc[rows])
    for family, values in everyone.slots.items():
        np.testing.assert_array_equal(alone.slots[family], values[rows], err_msg=family)
    champions = load_champions(cfg)
    empty = PriorTable(pd.DataFrame(columns=["level", "key", "slot_open_probs", "churn_prob"]))
    best_alone = ScoringCore(champions, alone, cfg).score(np.arange(len(few)), empty).best_slot
    best_inside = ScoringCore(champions, everyone, cfg).score(rows, empty).best_slot
    np.testing.assert_array_equal(best_alone, best_inside)


def test_refresh_recommend_and_compare_give_the_same_numbers(trained):
    from serving.models import load_champions
    from serving.recommend import Recommender
    from training.compare import truth_matrix, version_slot_probabilities

    cfg, log = trained["cfg"], trained["log"]
    tags = pd.read_parquet(trained["tags"]).set_index("user_id")
    warm = tags.index[~tags["cold_start"] & ~tags["unsubscribed"]][:25].tolist()
    gone = tags.index[tags["unsubscribed"]][:3].tolist()
    cold = tags.index[tags["cold_start"]][:3].tolist()
    asked = warm + gone + cold + ["a-user-nobody-has-seen"]
    answers = {a["user_id"]: a for a in Recommender.load(cfg).recommend(asked, None, 24)}
    matrix = truth_matrix(log, cfg, pd.Series(warm + gone))
    from_compare = version_slot_probabilities(load_champions(cfg).open, matrix)
    for i, user in enumerate(matrix.user_ids):
        in_tags = np.asarray(tags.loc[user, "slot_open_probs"], dtype=np.float32)
        np.testing.assert_array_equal(from_compare[i].astype(np.float32), in_tags, err_msg=user)
        # the service answers the tags' float32 numbers, rounded to 6 decimals
        expected = np.round(from_compare[i].astype(np.float32).astype(np.float64), 6).tolist()
        assert answers[user]["slot_open_probs"] == expected
    for user in warm + gone + cold:
        a, t = answers[user], tags.loc[user]
        assert a["cold_start"] == t["cold_start"] and a["unsubscribed"] == t["unsubscribed"]
        assert a["best_slot"] == (None if pd.isna(t["best_slot"]) else int(t["best_slot"]))
        assert a["churn_prob"] == pytest.approx(t["churn_prob"], abs=0, rel=1e-12)
        assert a["churn_tier"] == t["churn_tier"]
    # an unknown user is cold start with the prior of the default zone
    assert answers["a-user-nobody-has-seen"]["cold_start"]


def test_the_gate_refuses_when_it_cannot_compare(trained):
    from mlflow import MlflowClient

    from training.registry import PromotionRefused, promote_champion

    cfg = trained["cfg"]
    client = MlflowClient(tracking_uri=cfg.tracking.resolved_uri())
    name = cfg.tracking.model_name("open")
    champion = str(client.get_model_version_by_alias(name, "champion").version)
    other = next(r for (t, _), r in trained["results"].items() if t == "open" and r.version != champion)
    holdout = Path(client.get_run(other.run_id).data.tags["holdout_path"])
    hidden = holdout.with_name(holdout.name + ".hidden")
    holdout.rename(hidden)
    try:
        with pytest.raises(PromotionRefused, match="holdout is missing"):
            promote_champion(cfg, "open", version=other.version)
        assert str(client.get_model_version_by_alias(name, "champion").version) == champion
    finally:
        hidden.rename(holdout)
