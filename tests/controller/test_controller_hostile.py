"""Hostile numbers against a real controller (uvicorn process, real Redis, loopback): every float and integer
field of the job request, found by walking the models, gets NaN, +-Infinity, 1e999, "nan", "inf", true and a
huge integer; each is a 422 naming the field, on a connection that stays open for the next, valid, request.
The same fields get the same values through `flowbp submit --set`, YAML run files and the controller's
FLOWBP_* settings.
"""

from __future__ import annotations

import http.client
import json
import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import pytest
import yaml
from pydantic import BaseModel

from controller_helpers import AUTH, TOKEN, ControllerProcess, controller_env, settings_from_env
from services.localproc import free_port

pytestmark = pytest.mark.integration

HUGE = "1" + "0" * 40  # beyond int64, float32 and every field's ceiling
# JSON text, sent as written: Python's json module reads NaN, Infinity and 1e999 (as inf) without complaint.
JSON_VALUES = ["NaN", "Infinity", "-Infinity", "1e999", '"nan"', '"inf"', "true", HUGE]
# YAML scalars as a run file or `--set` writes them (YAML 1.1's .nan/.inf, plain words, a quoted number).
YAML_VALUES = [".nan", ".inf", "-.inf", ".NaN", "1e999", "nan", "inf", "true", "'3'", HUGE]


def numeric_fields(model: type[BaseModel], prefix: tuple = ()) -> list[tuple[tuple, str]]:
    """(path, "int" | "float") of every number in `model` and the models, lists and tuples inside it."""
    found = []
    for name, info in model.model_fields.items():
        found += _numbers_in(info.annotation, (*prefix, name))
    return found


def _numbers_in(tp: Any, path: tuple) -> list[tuple[tuple, str]]:
    origin, args = get_origin(tp), get_args(tp)
    if origin is Annotated:
        return _numbers_in(args[0], path)
    if origin in (Union, types.UnionType):
        kept = [a for a in args if a is not type(None)]
        # a union of several scalars (reward kwargs) is free-form text or number by design: not a number field
        return _numbers_in(kept[0], path) if len(kept) == 1 else []
    if origin is Literal:
        return [(path, "int")] if all(type(a) is int for a in args) else []
    if origin is list:
        return _numbers_in(args[0], (*path, 0))
    if origin is tuple:
        return [f for i, a in enumerate(args) for f in _numbers_in(a, (*path, i))]
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return numeric_fields(tp, path)
    if tp is bool or origin is dict:
        return []
    if tp is int:
        return [(path, "int")]
    if tp is float:
        return [(path, "float")]
    return []


def valid_request() -> dict:
    """The whole request as JSON, every section present, so any path in it can be replaced."""
    from flowbp_core.config import RunConfig, TrainSpec
    from services.controller.spec import JobSubmitRequest

    req = JobSubmitRequest(name="hostile", max_resubmits=1, config=RunConfig(train=TrainSpec(steps=2)))
    return req.model_dump(mode="json")


def dump_yaml(data: dict) -> str:
    return yaml.dump(data, Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper))


def with_raw(data: dict, path: tuple, raw: str, dump) -> str:
    """`data` serialised by `dump` with the value at `path` replaced by the raw text `raw`."""
    marker = "HOSTILE-VALUE-MARKER"
    node = data = json.loads(json.dumps(data))
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = marker
    text = dump(data)
    assert text.count(marker) == 1
    return text.replace(f'"{marker}"', raw).replace(marker, raw)


def test_walk_finds_every_number_of_the_schema():
    """The walk is the test's coverage: it must see fields at every depth, in lists and tuples, and Optionals."""
    from services.controller.spec import JobSubmitRequest

    paths = {".".join(map(str, p)): kind for p, kind in numeric_fields(JobSubmitRequest)}
    for path, kind in [("max_resubmits", "int"), ("config.schema_version", "int"), ("config.train.steps", "int"),
                       ("config.train.lr", "float"), ("config.train.betas.1", "float"),
                       ("config.reward.terms.0.weight", "float"), ("config.reward.served.num_cpus", "float"),
                       ("config.backbone.lora.alpha", "float"), ("config.sampling.guidance_scale", "float"),
                       ("config.eval.seed", "int")]:
        assert paths.get(path) == kind, (path, sorted(paths))
    assert not any(p.endswith(("use_gpu", "resume", "tiny", ".kwargs")) for p in paths)  # bools and free-form


@pytest.fixture
def controller(redis_server, tmp_path):
    env = controller_env(redis_server.url, f"http://127.0.0.1:{free_port()}", tmp_path,
                         FLOWBP_RECONCILER_ENABLED="false", FLOWBP_MAX_ACTIVE_JOBS="0", FLOWBP_LOG_LEVEL="warning")
    proc = ControllerProcess(env, tmp_path / "controller.log").start()
    try:
        yield proc
    finally:
        proc.stop()


def test_every_number_field_rejects_hostile_json_and_the_connection_stays_open(controller, tmp_path, capsys):
    """One controller for all of it: raw JSON on one keep-alive connection, then `flowbp submit`."""
    from services.controller.spec import JobSubmitRequest

    fields = numeric_fields(JobSubmitRequest)
    good = valid_request()
    good_text = json.dumps(good)
    conn = http.client.HTTPConnection("127.0.0.1", controller.port, timeout=30)
    conn.connect()
    sock = conn.sock
    headers = {**AUTH, "Content-Type": "application/json"}

    def post(text: str) -> tuple[int, Any]:
        conn.request("POST", "/v1/jobs", body=text.encode(), headers=headers)
        r = conn.getresponse()
        body = r.read()
        # http.client drops its socket when the server closes (a 500 from uvicorn does): it must not
        assert conn.sock is sock and not r.will_close, (r.status, body[:300])
        return r.status, json.loads(body)

    sent = 0
    for path, kind in fields:
        for raw in JSON_VALUES:
            status, body = post(with_raw(good, path, raw, json.dumps))
            sent += 1
            loc = ("body", *path)
            assert status == 422, (loc, raw, status, body)
            hits = [d for d in body["detail"] if tuple(d["loc"][:len(loc)]) == loc]
            assert hits and hits[0]["msg"], (loc, raw, body)
        # every response above came back on the one socket; after each field a valid submit is accepted on it
        status, body = post(good_text)
        assert status == 201, (path, body)
    assert sent == len(fields) * len(JSON_VALUES) and len(fields) >= 40, sent

    # reward kwargs are free-form scalars (a path, a flag, a number), but a number there must still be finite
    for raw in ("NaN", "Infinity", "-Infinity", "1e999"):
        status, body = post(with_raw(good, ("config", "reward", "terms", 0, "kwargs", "x"), raw, json.dumps))
        assert status == 422 and body["detail"][0]["loc"][:6] == ["body", "config", "reward", "terms", 0, "kwargs"]
    # method parameters are extra keys of `method`: checked for finite numbers by the schema itself
    for raw in ("NaN", "Infinity", "1e999", HUGE, "[1, NaN]"):
        status, body = post(with_raw(good, ("config", "method", "k"), raw, json.dumps))
        assert status == 422 and body["detail"][0]["loc"][:3] == ["body", "config", "method"], (raw, body)
    # non-finite numbers where a string, a mapping or the whole body belongs: a 422, never an echo that fails
    for text, loc in [("NaN", ["body"]), ("[Infinity]", ["body"]), ('{"name": NaN}', ["body", "name"]),
                      ('{"name": "a", "labels": {"x": 1e999}}', ["body", "labels", "x"]),
                      ('{"name": "a", "config": {"train": NaN}}', ["body", "config", "train"]),
                      ('{"name": "a", "config": {"train": {"prompts": {"prompts": [NaN]}}}}',
                       ["body", "config", "train", "prompts", "prompts", 0])]:
        status, body = post(text)
        assert status == 422 and body["detail"][0]["loc"] == loc, (text, body)
    # a non-finite number that reached a run's metrics (a NaN step) is served as null, not as a 500
    job = json.loads(json.dumps(post(good_text)[1]))
    run = tmp_path / "runs" / job["run_id"]
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": NaN, "reward": Infinity}\n')
    conn.request("GET", f"/v1/jobs/{job['id']}/metrics", headers=AUTH)
    r = conn.getresponse()
    assert r.status == 200 and json.loads(r.read())["latest"] == {"step": 1, "loss": None, "reward": None}
    conn.close()
    flowbp_submit_walk(controller.url, tmp_path, capsys)


def _cli(capsys, url: str, *args: str) -> tuple[int, str]:
    from services.controller.cli import main

    rc = main(["--url", url, "--token", TOKEN, *args])
    out = capsys.readouterr()
    return rc, out.out + out.err


def flowbp_submit_walk(url: str, tmp_path, capsys) -> None:
    """Each number field once through `flowbp submit --set` (a CLI call costs ~0.1 s: its HTTP client), and run
    files holding YAML's .nan/.inf: rc 1 and `rejected (422)` with the field's path, never a traceback."""
    from flowbp_core.config import RunConfig

    config = valid_request()["config"]
    run_file = tmp_path / "run.yaml"
    run_file.write_text(dump_yaml(config))
    for i, (path, kind) in enumerate(numeric_fields(RunConfig)):
        dotted = ".".join(map(str, path))
        raw = YAML_VALUES[i % len(YAML_VALUES)]
        rc, out = _cli(capsys, url, "submit", str(run_file), "--set", f"{dotted}={raw}")
        assert rc == 1 and "rejected (422)" in out and f"config.{dotted}" in out, (dotted, raw, out)
    bad_file = tmp_path / "bad.yaml"
    for raw in (".nan", ".inf", "-.inf"):
        bad_file.write_text(with_raw(config, ("reward", "clip"), raw, dump_yaml))
        rc, out = _cli(capsys, url, "submit", str(bad_file))
        assert rc == 1 and "config.reward.clip" in out and "Traceback" not in out, out
    rc, out = _cli(capsys, url, "submit", str(run_file), "--set", "train.lr=1e-5")
    assert rc == 0 and "pending" in out, out


def test_set_values_and_run_files_reject_hostile_numbers(tmp_path):
    """Every number field of the run schema, every YAML spelling, through `--set` and through a run file: a
    ConfigError naming the field, from the loader the training entrypoint and the CLI share."""
    from flowbp_core.config import RunConfig, config_from_dict, load_config
    from flowbp_core.errors import ConfigError

    config = valid_request()["config"]
    bad_file = tmp_path / "bad.yaml"
    fields = numeric_fields(RunConfig)
    tried = 0
    for path, kind in fields:
        dotted = ".".join(map(str, path))
        for raw in YAML_VALUES:
            with pytest.raises(ConfigError) as err:
                config_from_dict(config, [f"{dotted}={raw}"], check_registries=False)
            assert err.value.field.startswith(dotted), (dotted, raw, err.value)
            bad_file.write_text(with_raw(config, path, raw, dump_yaml))
            with pytest.raises(ConfigError) as err:
                load_config(bad_file, check_registries=False)
            assert err.value.field.startswith(dotted), (dotted, raw, err.value)
            tried += 2
    assert tried == len(fields) * len(YAML_VALUES) * 2 and len(fields) >= 40
    with pytest.raises(ConfigError, match=r"^reward\.clip=nan is not allowed: expected a finite number$"):
        config_from_dict(config, ["reward.clip=.nan"], check_registries=False)


SETTINGS_STRINGS = ["nan", "NaN", "inf", "-inf", "Infinity", "1e999", "true", HUGE]


def test_controller_settings_reject_hostile_numbers_from_the_environment(monkeypatch):
    """Settings arrive as strings: each float and integer setting refuses every hostile spelling, naming the
    variable and the value, and a plain number in text is still read."""
    from services.controller.settings import ControllerSettings, Limits

    fields = numeric_fields(ControllerSettings)
    assert len(fields) >= 15 and (("limits", "max_body_bytes"), "int") in fields
    for path, kind in fields:
        key = "FLOWBP_" + "_".join(path).upper()
        for raw in SETTINGS_STRINGS:
            with pytest.raises(SystemExit) as err:
                settings_from_env(monkeypatch, {key: raw})
            assert f"{key}={raw!r}: " in str(err.value), (key, raw, err.value)
    for raw in ('{"env_vars": {"X": NaN}}', '{"a": [Infinity]}', '{"a": 1e999}'):  # the JSON-valued setting
        with pytest.raises(SystemExit, match="FLOWBP_RUNTIME_ENV=.*expected a JSON object of finite numbers"):
            settings_from_env(monkeypatch, {"FLOWBP_RUNTIME_ENV": raw})
    with pytest.raises(SystemExit, match="FLOWBP_RUNTIME_ENV=.*inf is not a finite number"):  # given in code too
        ControllerSettings.from_env(runtime_env={"env_vars": {"X": float("inf")}})
    s = settings_from_env(monkeypatch, {"FLOWBP_RAY_TIMEOUT_S": "2.5", "FLOWBP_PORT": "8001",
                                        "FLOWBP_LIMITS_MAX_LABELS": "3"})
    assert (s.ray_timeout_s, s.port, s.limits) == (2.5, 8001, Limits(max_labels=3))
