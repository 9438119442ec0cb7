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
    warm = tags.loc[~tags["cold_start"], "user_id"].head(3).tolist()
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
    spec = httpx.get(f"{url}/docs.json", timeout=10).json()
    text = str(spec)
    for field in ("user_ids", "window_start", "window_hours", "send_at", "cold_start", "churn_tier"):
        assert field in text, field
    models = httpx.post(f"{url}/models", json={}, timeout=10).json()
    assert models["model_versions"]["open"] and models["n_users"] > 0


def test_importing_the_service_does_not_load_training():
    code = ("import sys, serving.service; "
            "bad = [m for m in sys.modules if m == 'training' or m.startswith('training.')]; "
            "print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
