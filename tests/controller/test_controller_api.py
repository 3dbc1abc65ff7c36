"""The REST surface against a real Redis (in-process app, reconciler off, Ray unreachable on purpose)."""

from __future__ import annotations

import json
import logging

import pytest

from controller_helpers import AUTH, TOKEN

pytestmark = pytest.mark.integration

GOOD = {"name": "unit", "config": {"train": {"steps": 2}}}


def submit(api, body=None, **kw):
    return api.post("/v1/jobs", json=GOOD if body is None else body, headers={**AUTH, **kw.pop("headers", {})}, **kw)


def test_every_route_but_health_needs_a_token(api):
    assert api.get("/healthz").status_code == 200
    assert api.get("/readyz").status_code == 503  # Ray is unreachable in this fixture; no token needed
    for method, path in [("GET", "/v1/jobs"), ("POST", "/v1/jobs"), ("GET", "/v1/jobs/x"),
                         ("POST", "/v1/jobs/x/cancel"), ("GET", "/v1/jobs/x/logs"), ("GET", "/v1/jobs/x/metrics"),
                         ("GET", "/v1/jobs/x/checkpoints"), ("GET", "/v1/jobs/x/lora"), ("GET", "/metrics"),
                         ("GET", "/openapi.json")]:
        for headers in ({}, {"Authorization": "Bearer wrong-token-000000000000"}, {"Authorization": TOKEN},
                        {"Authorization": f"Basic {TOKEN}"}):
            r = api.request(method, path, headers=headers, json=GOOD if method == "POST" else None)
            assert r.status_code == 401, (method, path, headers, r.status_code)
            assert r.headers["www-authenticate"] == "Bearer"
            assert TOKEN not in r.text
    assert api.get("/openapi.json", headers=AUTH).status_code == 200


BAD_SPECS = [
    ({"config": {}}, ("body", "name"), "missing"),
    ({"name": "has space", "config": {}}, ("body", "name"), "string_pattern_mismatch"),
    ({"name": "a", "config": {}, "priority": 3}, ("body", "priority"), "extra_forbidden"),
    ({"name": "a", "config": {"trian": {}}}, ("body", "config", "trian"), "extra_forbidden"),
    ({"name": "a", "config": {"train": {"steps": 0}}}, ("body", "config", "train", "steps"), "greater_than_equal"),
    ({"name": "a", "config": {"train": {"lr": "fast"}}}, ("body", "config", "train", "lr"), "float_type"),
    ({"name": "a", "config": {"backbone": {"dtype": "int8"}}}, ("body", "config", "backbone", "dtype"),
     "literal_error"),
    ({"name": "a", "config": {"backbone": {"device": "tpu"}}}, ("body", "config", "backbone", "device"),
     "value_error"),
    ({"name": "a", "config": {"runtime": {"mode": "sync", "max_staleness": 2}}}, ("body", "config", "runtime"),
     "value_error"),
    ({"name": "a", "config": {"sampling": {"n_steps": 4}, "method": {"k": 9}}}, ("body", "config"), "value_error"),
    ({"name": "a", "config": {"train": {"prompts": {"prompts": []}}}},
     ("body", "config", "train", "prompts", "prompts"), "value_error"),
    ({"name": "a", "config": {"train": {"prompts": {"prompts": ["x" * 1001]}}}},
     ("body", "config", "train", "prompts", "prompts"), "value_error"),
    ({"name": "a", "config": {"eval": {"prompts": {"prompts": ["a"], "set": "world_heldout"}}}},
     ("body", "config", "eval", "prompts"), "value_error"),
    ({"name": "a", "labels": {"bad key!": "v"}, "config": {}}, ("body", "labels"), "value_error"),
    ({"name": "a", "max_resubmits": 1000, "config": {}}, ("body", "max_resubmits"), "less_than_equal"),
    ({"name": "a", "config": {"run_id": "../../etc"}}, ("body", "config", "run_id"), "string_pattern_mismatch"),
    ({"name": "a", "config": {"method": {"k": {"nested": 1}}}}, ("body", "config", "method"), "value_error"),
    ({"name": "a", "config": {"schema_version": 2}}, ("body", "config", "schema_version"), "literal_error"),
]


@pytest.mark.parametrize("body,loc,kind", BAD_SPECS, ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD_SPECS)])
def test_bad_specs_get_422_with_field_path_and_rule(api, body, loc, kind):
    r = submit(api, body)
    assert r.status_code == 422, r.text
    errors = r.json()["detail"]
    match = [e for e in errors if tuple(e["loc"][:len(loc)]) == loc and e["type"] == kind]
    assert match, errors
    assert match[0]["msg"]  # the rule, in words
    assert api.get("/v1/jobs", headers=AUTH).json()["jobs"] == []  # nothing was stored


def test_malformed_json_and_controller_limits_get_422(api, redis_server, tmp_path, token_env):
    r = api.post("/v1/jobs", content=b'{"name": "a", "config": {', headers={**AUTH, "content-type": "application/json"})
    assert r.status_code == 422 and r.json()["detail"][0]["type"] == "json_invalid"

    from fastapi.testclient import TestClient

    from controller_helpers import settings_for
    from services.controller.app import create_app
    from services.controller.settings import Limits

    strict = create_app(settings_for(redis_server.url, tmp_path, limits=Limits(max_prompts=2, max_prompt_chars=10,
                                                                               max_labels=1)))
    with TestClient(strict) as c:
        body = {"name": "a", "config": {"train": {"prompts": {"prompts": ["a", "b", "c"]}}}}
        d = c.post("/v1/jobs", json=body, headers=AUTH).json()["detail"][0]
        assert d["type"] == "too_many_prompts" and d["loc"] == ["body", "config", "train", "prompts", "prompts"]
        body = {"name": "a", "config": {"eval": {"prompts": {"prompts": ["ok", "far too long a prompt"]}}}}
        d = c.post("/v1/jobs", json=body, headers=AUTH).json()["detail"][0]
        assert d["type"] == "prompt_too_long" and d["loc"][-1] == 1
        d = c.post("/v1/jobs", json={"name": "a", "labels": {"a": "1", "b": "2"}}, headers=AUTH).json()
        assert d["detail"][0]["type"] == "too_many_labels"


def test_registry_names_and_method_parameters_get_422(redis_server, tmp_path, token_env):
    """Names and method parameters are checked by the registries themselves (check_registries=True)."""
    from fastapi.testclient import TestClient

    from controller_helpers import settings_for
    from services.controller.app import create_app

    with TestClient(create_app(settings_for(redis_server.url, tmp_path, check_registries=True))) as c:
        cases = [({"method": {"name": "nope"}}, ["body", "config", "method", "name"]),
                 ({"method": {"name": "flowbp_sparse", "k": 0}}, ["body", "config", "method", "k"]),
                 ({"backbone": {"name": "sdxl"}}, ["body", "config", "backbone", "name"]),
                 ({"reward": {"terms": [{"name": "vibes"}]}}, ["body", "config", "reward", "terms", "0", "name"])]
        for config, loc in cases:
            r = c.post("/v1/jobs", json={"name": "a", "config": config}, headers=AUTH)
            assert r.status_code == 422, r.text
            d = r.json()["detail"][0]
            assert d["loc"] == loc and d["type"] == "not_registered" and "expected" in d["msg"], d
        assert c.post("/v1/jobs", json={"name": "a", "config": {"method": {"name": "flowbp_sparse", "k": 2}}},
                      headers=AUTH).status_code == 201


def test_body_size_limit_declared_and_chunked(api):
    big = json.dumps({"name": "a", "config": {}, "labels": {"k": "x" * 2_000_000}}).encode()
    r = api.post("/v1/jobs", content=big, headers={**AUTH, "content-type": "application/json"})
    assert r.status_code == 413 and "limit" in r.json()["detail"]

    def chunks():
        yield b'{"name": "a", "labels": {"k": "'
        for _ in range(40):
            yield b"x" * 50_000
        yield b'"}}'

    r = api.post("/v1/jobs", content=chunks(), headers={**AUTH, "content-type": "application/json"})
    assert r.status_code == 413


def test_submit_get_list_filter_page_cancel(api):
    ids = []
    for i in range(5):
        r = submit(api, {"name": f"job{i}", "labels": {"team": "a" if i % 2 else "b"}, "config": {}})
        assert r.status_code == 201, r.text
        j = r.json()
        assert j["state"] == "pending" and j["run_id"] == j["id"] and j["history"][0]["state"] == "pending"
        assert j["config"]["checkpoint"]["dir"].endswith("runs")  # the controller decides where checkpoints go
        ids.append(j["id"])
    assert api.get(f"/v1/jobs/{ids[0]}", headers=AUTH).json()["name"] == "job0"

    page = api.get("/v1/jobs", params={"limit": 2}, headers=AUTH).json()
    assert [j["id"] for j in page["jobs"]] == ids[::-1][:2] and page["next_cursor"] == 2
    seen = []
    cursor = 0
    while cursor is not None:
        page = api.get("/v1/jobs", params={"limit": 2, "cursor": cursor}, headers=AUTH).json()
        seen += [j["id"] for j in page["jobs"]]
        cursor = page["next_cursor"]
    assert seen == ids[::-1]
    team_a = api.get("/v1/jobs", params={"label": "team=a"}, headers=AUTH).json()["jobs"]
    assert sorted(j["id"] for j in team_a) == sorted([ids[1], ids[3]])
    assert api.get("/v1/jobs", params={"label": "team"}, headers=AUTH).status_code == 422

    r = api.post(f"/v1/jobs/{ids[0]}/cancel", headers=AUTH)
    assert r.status_code == 200 and r.json()["state"] == "cancelled" and r.json()["cancel_requested"]
    r = api.post(f"/v1/jobs/{ids[0]}/cancel", headers=AUTH)
    assert r.status_code == 409 and "terminal" in r.json()["detail"]
    cancelled = api.get("/v1/jobs", params={"state": "cancelled"}, headers=AUTH).json()["jobs"]
    assert [j["id"] for j in cancelled] == [ids[0]]
    both = api.get("/v1/jobs", params=[("state", "cancelled"), ("state", "pending")], headers=AUTH).json()["jobs"]
    assert len(both) == 5
    for path in ("", "/cancel", "/logs", "/metrics", "/checkpoints", "/lora", "/lora/download"):
        method = "POST" if path == "/cancel" else "GET"
        r = api.request(method, f"/v1/jobs/job-nope{path}", headers=AUTH)
        assert r.status_code == 404 and "job-nope" in r.json()["detail"], (path, r.text)


def test_idempotency_key_returns_the_first_job(api):
    key = {"Idempotency-Key": "ci-run-4711"}
    first = submit(api, headers=key)
    assert first.status_code == 201
    again = submit(api, headers=key)
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    reordered = {"config": {"train": {"steps": 2}}, "name": "unit"}  # same content, other key order
    assert submit(api, reordered, headers=key).json()["id"] == first.json()["id"]
    other = submit(api, {"name": "other", "config": {}}, headers=key)
    assert other.status_code == 409 and first.json()["id"] in other.json()["detail"]
    assert submit(api).json()["id"] != first.json()["id"]  # no key: a new job each time
    assert len(api.get("/v1/jobs", headers=AUTH).json()["jobs"]) == 2


def test_one_active_job_per_run_id(api):
    body = {"name": "a", "config": {"run_id": "shared-run"}}
    first = submit(api, body)
    assert first.status_code == 201
    busy = submit(api, body)
    assert busy.status_code == 409 and first.json()["id"] in busy.json()["detail"] and "shared-run" in busy.text
    api.post(f"/v1/jobs/{first.json()['id']}/cancel", headers=AUTH)
    again = submit(api, body)  # the first job ended: continuing its run is allowed
    assert again.status_code == 201 and again.json()["run_id"] == "shared-run"


def test_run_views_metrics_checkpoints_and_lora(api, tmp_path):
    j = submit(api).json()
    run = tmp_path / "runs" / j["run_id"]
    for n in (1, 2):
        (run / f"step_{n}").mkdir(parents=True)
        (run / f"step_{n}" / "pytorch_lora_weights.safetensors").write_bytes(bytes([n]) * 100)
        (run / f"step_{n}" / "COMPLETE").write_text("")
    (run / "step_3").mkdir()  # being written: no COMPLETE
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1 / s}) + "\n" for s in (1, 2, 3)))
    m = api.get(f"/v1/jobs/{j['id']}/metrics", headers=AUTH).json()
    assert m["latest"] == {"step": 3, "loss": 1 / 3} and [p["step"] for p in m["history"]] == [1, 2, 3]
    c = api.get(f"/v1/jobs/{j['id']}/checkpoints", headers=AUTH).json()
    assert [(x["step"], x["complete"]) for x in c["checkpoints"]] == [(1, True), (2, True), (3, False)]
    assert c["latest_complete"]["step"] == 2
    link = api.get(f"/v1/jobs/{j['id']}/lora", headers=AUTH).json()
    assert link["step"] == 2 and link["bytes"] == 100 and link["url"].endswith(f"/v1/jobs/{j['id']}/lora/download")
    body = api.get(link["url"], headers=AUTH)
    assert body.status_code == 200 and body.content == bytes([2]) * 100
    assert api.get(link["url"]).status_code == 401
    logs = api.get(f"/v1/jobs/{j['id']}/logs", headers=AUTH).json()
    assert logs == {"job_id": j["id"], "ray_submission_id": None, "text": "", "offset": 0}


def test_metrics_endpoint_exports_the_documented_names(api):
    from services.controller import metric_names

    submit(api)
    api.get("/v1/jobs", headers=AUTH)
    api.get("/readyz")
    text = api.get("/metrics", headers=AUTH).text
    for name in metric_names.ALL:
        assert f"# TYPE {name.removesuffix('_total')}" in text, name
    assert 'flowbp_controller_jobs{state="pending"} 1.0' in text
    assert 'flowbp_controller_requests_total{code="201",method="POST",route="/v1/jobs"} 1.0' in text
    assert "flowbp_controller_ray_up 0.0" in text and "flowbp_controller_redis_up 1.0" in text


def test_redis_outage_gives_503_then_recovers_with_every_record(api, redis_server):
    ids = [submit(api, {"name": f"r{i}", "config": {}}).json()["id"] for i in range(20)]
    api.post(f"/v1/jobs/{ids[0]}/cancel", headers=AUTH)
    before = {i: api.get(f"/v1/jobs/{i}", headers=AUTH).json() for i in ids}
    redis_server.stop()
    for r in (api.get(f"/v1/jobs/{ids[1]}", headers=AUTH), api.get("/v1/jobs", headers=AUTH), submit(api),
              api.post(f"/v1/jobs/{ids[2]}/cancel", headers=AUTH)):
        assert r.status_code == 503, r.text
        assert "Redis is unavailable" in r.json()["detail"] and r.headers["retry-after"] == "2"
    ready = api.get("/readyz")
    assert ready.status_code == 503 and ready.json()["checks"]["redis"] != "ok"
    assert "flowbp_controller_redis_up 0.0" in api.get("/metrics", headers=AUTH).text  # /metrics still answers
    redis_server.start()
    after = {i: api.get(f"/v1/jobs/{i}", headers=AUTH) for i in ids}
    assert all(r.status_code == 200 for r in after.values())
    assert {i: r.json() for i, r in after.items()} == before
    assert submit(api).status_code == 201


def test_no_token_in_any_log_line_or_response(api, caplog):
    caplog.set_level(logging.DEBUG)
    bodies = [submit(api).text, api.get("/v1/jobs", headers=AUTH).text, api.get("/metrics", headers=AUTH).text,
              api.get("/openapi.json", headers=AUTH).text, api.get("/readyz").text,
              api.get("/v1/jobs", headers={"Authorization": "Bearer " + TOKEN[:-1]}).text]
    assert all(TOKEN not in b and TOKEN[:-1] not in b for b in bodies)
    assert caplog.records and not any(TOKEN[:12] in r.getMessage() for r in caplog.records)
