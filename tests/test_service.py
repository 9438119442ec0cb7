"""The real BentoML server on a free loopback port: good and bad requests."""

import subprocess
import sys

import httpx
import pytest

from sendtime.demo import free_port, start_server, stop_server, wait_ready

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server(trained):
    port = free_port()
    proc = start_server(port, config=trained["config_path"])
    try:
        wait_ready(port, proc, timeout=120)
        yield f"http://127.0.0.1:{port}", trained
    finally:
        stop_server(proc)


def test_recommend_answers_in_order_with_send_times(server):
    url, trained = server
    import pandas as pd

    tags = pd.read_parquet(trained["tags"])
    # users with history a message reaches (an unsubscribed user has no send time)
    warm = tags.loc[~tags["cold_start"] & ~tags["unsubscribed"], "user_id"].head(3).tolist()
    body = {"user_ids": warm + ["nobody-knows-me"], "window_start": "2026-06-01T00:00:00Z", "window_hours": 24}
    r = httpx.post(f"{url}/recommend", json=body, timeout=30)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["user_id"] for x in results] == body["user_ids"]
    for x in results[:3]:
        assert len(x["slot_open_probs"]) == 24 and not x["cold_start"]
        assert "2026-06-01T00:00:00Z" <= x["send_at"] < "2026-06-02T00:00:00Z"
        assert x["churn_tier"] in {"low", "medium", "high"}
        assert x["model_versions"]["open"] and x["model_versions"]["churn"]
    assert results[3]["cold_start"] is True and results[3]["send_at"] is not None
    # the service agrees with the nightly tags for the same users
    by_user = tags.set_index("user_id")
    for x in results[:3]:
        assert x["best_slot"] == by_user.loc[x["user_id"], "best_slot"]


def test_send_at_respects_a_narrow_window(server):
    url, _ = server
    r = httpx.post(f"{url}/recommend", json={"user_ids": ["u0000001"], "window_start": "2026-06-01T10:00:00Z",
                                             "window_hours": 3}, timeout=30)
    assert r.status_code == 200
    send_at = r.json()["results"][0]["send_at"]
    assert "2026-06-01T10:00:00Z" <= send_at < "2026-06-01T13:00:00Z"


@pytest.mark.parametrize("body, field", [
    ({}, "user_ids"),
    ({"user_ids": "u1"}, "user_ids"),
    ({"user_ids": []}, "user_ids"),
    ({"user_ids": ["u1"], "window_start": "next tuesday"}, "window_start"),
    ({"user_ids": ["u1"], "window_hours": "many"}, "window_hours"),
    ({"user_ids": ["u1"], "window_hours": 0}, "window_hours"),
    ({"user_ids": [f"u{i}" for i in range(5000)]}, "user_ids"),
    # mistyped, not coerced
    ({"user_ids": ["u1"], "window_start": 12345}, "window_start"),
    ({"user_ids": ["u1"], "window_hours": "24"}, "window_hours"),
    ({"user_ids": ["u1"], "window_hours": True}, "window_hours"),
    ({"user_ids": ["u1"], "window_hours": 2.5}, "window_hours"),
    ({"user_ids": [1, 2]}, "user_ids"),
    ({"user_ids": ["u1"], "window_start": "9999-12-31T23:00:00Z"}, "window_start"),
])
def test_bad_requests_get_4xx_naming_the_field(server, body, field):
    url, _ = server
    r = httpx.post(f"{url}/recommend", json=body, timeout=30)
    assert 400 <= r.status_code < 500, (body, r.status_code, r.text)
    assert field in r.text
    # and the service keeps serving
    assert httpx.post(f"{url}/recommend", json={"user_ids": ["u1"]}, timeout=30).status_code == 200


def test_health_openapi_and_models(server):
    url, trained = server
    assert httpx.get(f"{url}/readyz", timeout=10).status_code == 200
    assert httpx.get(f"{url}/livez", timeout=10).status_code == 200
    spec = httpx.get(f"{url}/openapi.json", timeout=10).json()
    text = str(spec)
    for field in ("user_ids", "window_start", "window_hours", "send_at", "cold_start", "churn_tier",
                  "timezone_assumed", "/recommend/bulk", "/plan"):
        assert field in text, field
    # the schema states the limits the service enforces
    request = spec["components"]["schemas"]["RecommendRequest"]["properties"]
    assert request["user_ids"]["maxItems"] == 1000 and request["user_ids"]["minItems"] == 1
    assert request["window_hours"]["anyOf"][0]["maximum"] == 168
    models = httpx.post(f"{url}/models", json={}, timeout=10).json()
    assert models["model_versions"]["open"] and models["n_users"] > 0


def test_importing_the_service_does_not_load_training():
    code = ("import sys, serving.service; "
            "bad = [m for m in sys.modules if m == 'training' or m.startswith('training.')]; "
            "print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_unknown_users_with_and_without_a_zone(server):
    url, _ = server
    body = {"user_ids": ["signed-up-today", "also-new"], "window_start": "2026-06-01T00:00:00Z",
            "timezones": {"signed-up-today": "Asia/Shanghai"}}
    a, b = httpx.post(f"{url}/recommend", json=body, timeout=30).json()["results"]
    assert a["cold_start"] and a["timezone"] == "Asia/Shanghai" and not a["timezone_assumed"]
    assert b["cold_start"] and b["timezone"] == "UTC" and b["timezone_assumed"]
    # the local best hour is scheduled in the user's zone: Shanghai is UTC+8
    assert (int(a["send_at"][11:13]) + 8) % 24 == a["best_slot"]
    bad = httpx.post(f"{url}/recommend", json={**body, "timezones": {"x": "Mars/Base"}}, timeout=30)
    assert bad.status_code == 400 and bad.json()["field"] == "timezones"


def test_limits_apply_before_parsing_and_4xx_name_the_field(server):
    url, _ = server
    too_long = httpx.post(f"{url}/recommend", json={"user_ids": ["x" * 10_000]}, timeout=30)
    assert too_long.status_code == 400 and too_long.json()["field"] == "user_ids"
    assert "x" * 200 not in too_long.text          # the id is not echoed
    huge = b'{"user_ids": [' + b",".join(b'"u%07d"' % i for i in range(500_000)) + b"]}"
    r = httpx.post(f"{url}/recommend", content=huge, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 413 and r.json()["field"] == "body"
    multipart = httpx.post(f"{url}/recommend", content=b"x", headers={"content-type": "multipart/form-data"},
                           timeout=30)
    assert multipart.status_code == 400

    def chunked():   # no content-length: cut off at the limit
        yield b'{"user_ids": ['
        for i in range(500_000):
            yield b'"u%07d",' % i
        yield b'"u"]}'

    r = httpx.post(f"{url}/recommend", content=chunked(), headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 413 and r.json()["field"] == "body"
    bad_zone = httpx.post(f"{url}/recommend", json={"user_ids": ["n"], "timezones": {"n": "Mars/Base"}}, timeout=30)
    assert bad_zone.status_code == 400 and len(bad_zone.text) < 300
    assert httpx.post(f"{url}/recommend", json={"user_ids": ["u1"]}, timeout=30).status_code == 200


def test_bulk_answers_stream_one_line_per_user(server):
    url, trained = server
    import json

    import pandas as pd

    ids = pd.read_parquet(trained["tags"])["user_id"].head(2500).tolist()
    r = httpx.post(f"{url}/recommend/bulk", json={"user_ids": ids, "window_start": "2026-06-01T00:00:00Z"},
                   timeout=60)
    assert r.status_code == 200
    lines = [json.loads(x) for x in r.text.splitlines()]
    assert [x["user_id"] for x in lines] == ids


def test_plan_endpoint_gives_every_user_a_row(server):
    url, trained = server
    import pandas as pd

    ids = pd.read_parquet(trained["tags"])["user_id"].head(40).tolist() + ["brand-new"]
    r = httpx.post(f"{url}/plan", json={"user_ids": ids, "window_start": "2026-06-01T00:00:00Z",
                                        "capacity_per_hour": 3}, timeout=60)
    assert r.status_code == 200, r.text
    rows = r.json()["rows"]
    assert [x["user_id"] for x in rows] == ids
    planned = [x for x in rows if x["reason"] is None]
    assert planned and all(x["send_at"] and 0 < x["propensity"] <= 1 for x in planned)
    # capacity is per hour of the window: a :00 and a :30 send (Kolkata) share an hour
    per_hour = pd.to_datetime(pd.Series([x["send_at"] for x in planned])).dt.floor("h").value_counts()
    assert per_hour.max() <= 3
    dup = httpx.post(f"{url}/plan", json={"user_ids": ids[:2] + ids[:1]}, timeout=30)
    assert dup.status_code == 400 and dup.json()["field"] == "user_ids"
    assert {x["reason"] for x in rows} <= {None, "unsubscribed", "quota", "frequency_cap", "silenced",
                                            "quiet_hours", "capacity", "low_value", "no_prediction"}


@pytest.fixture(scope="module")
def guarded_server(trained):
    port = free_port()
    proc = start_server(port, env={"SENDTIME_API_TOKEN": "s3cret-token"}, config=trained["config_path"])
    try:
        wait_ready(port, proc, timeout=120)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_server(proc)


def test_a_token_guards_every_endpoint_but_health(guarded_server):
    url = guarded_server
    body = {"user_ids": ["u0000001"]}
    assert httpx.post(f"{url}/recommend", json=body, timeout=30).status_code == 401
    wrong = httpx.post(f"{url}/recommend", json=body, headers={"Authorization": "Bearer nope"}, timeout=30)
    assert wrong.status_code == 401 and wrong.json()["field"] == "Authorization"
    ok = httpx.post(f"{url}/recommend", json=body, headers={"Authorization": "Bearer s3cret-token"}, timeout=30)
    assert ok.status_code == 200
    for path in ("/models", "/openapi.json", "/docs", "/docs.json", "/"):
        assert httpx.get(f"{url}{path}", timeout=30).status_code == 401, path
    assert httpx.get(f"{url}/livez", timeout=30).status_code == 200
    assert httpx.get(f"{url}/readyz", timeout=30).status_code == 200


def test_serve_refuses_to_bind_beyond_loopback_without_a_token(trained):
    from typer.testing import CliRunner

    from sendtime.cli import app

    result = CliRunner().invoke(app, ["--config", str(trained["config_path"]), "serve", "--host", "0.0.0.0"],
                                env={"SENDTIME_API_TOKEN": None})
    assert result.exit_code != 0 and "without a token" in result.output
