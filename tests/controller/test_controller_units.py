"""Controller pieces that need no server: state machine, tokens, settings, run folders, metric names, CLI."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from controller_helpers import settings_from_env

from services.controller import metric_names
from services.controller.auth import TokenError, TokenStore
from services.controller.cli import _explain, build_parser, table
from services.controller.models import TRANSITIONS, InvalidTransition, JobRecord, JobState
from services.controller.runs import run_folder
from services.controller.settings import ControllerSettings, redact_url
from services.controller.spec import JobSubmitRequest, SpecError, check_spec

REPO = Path(__file__).resolve().parents[2]


def _rec() -> JobRecord:
    now = time.time()
    return JobRecord(id="job-1", name="n", run_id="job-1", created_at=now, updated_at=now, config={},
                     max_resubmits=1)


def test_state_machine_happy_path_records_history():
    r = _rec()
    for s in (JobState.submitted, JobState.running, JobState.submitted, JobState.running, JobState.succeeded):
        r.transition(s, f"to {s.value}")
    assert [t.state for t in r.history] == [JobState.submitted, JobState.running, JobState.submitted,
                                            JobState.running, JobState.succeeded]
    assert r.reason == "to succeeded"
    assert all(a.at <= b.at for a, b in zip(r.history, r.history[1:]))


@pytest.mark.parametrize("terminal", [JobState.succeeded, JobState.failed, JobState.cancelled])
def test_terminal_states_are_final(terminal):
    r = _rec()
    r.transition(JobState.submitted, "on ray")
    r.transition(terminal, "done")
    for s in JobState:
        with pytest.raises(InvalidTransition, match="terminal"):
            r.transition(s, "again")


def test_pending_cannot_skip_to_running_or_succeeded():
    for bad in (JobState.running, JobState.succeeded, JobState.pending):
        with pytest.raises(InvalidTransition, match="pending -> "):
            _rec().transition(bad, "x")
    assert TRANSITIONS[JobState.pending] == {JobState.submitted, JobState.failed, JobState.cancelled}


def test_token_store_env_file_rotation_and_rules(tmp_path):
    f = tmp_path / "tokens"
    f.write_text("# ops\nfile-token-aaaaaaaaaaaa\n")
    ts = TokenStore("T", f, env={"T": "env-token-bbbbbbbbbbbb, env-token-cccccccccccc"})
    assert ts.check("env-token-bbbbbbbbbbbb") and ts.check("env-token-cccccccccccc")
    assert ts.check("file-token-aaaaaaaaaaaa")
    assert not ts.check("env-token-bbbbbbbbbbb") and not ts.check("") and not ts.check("x" * 5000)
    time.sleep(0.01)
    f.write_text("rotated-token-dddddddddddd\n")
    import os
    os.utime(f, (time.time() + 5, time.time() + 5))  # a new mtime even on coarse-clock filesystems
    assert ts.check("rotated-token-dddddddddddd") and not ts.check("file-token-aaaaaaaaaaaa")
    with pytest.raises(TokenError, match="no bearer token"):
        TokenStore("T", None, env={})
    with pytest.raises(TokenError) as e:
        TokenStore("T", None, env={"T": "good-token-eeeeeeeeeeee,tiny9"})
    assert "tiny9" not in str(e.value) and "#2" in str(e.value)  # the message names the position, never the token


def test_settings_from_env_and_errors(monkeypatch):
    env = {"FLOWBP_REDIS_URL": "redis://h:1/2", "FLOWBP_MAX_ACTIVE_JOBS": "7",
           "FLOWBP_RUNTIME_ENV": '{"env_vars": {"A": "1"}}', "FLOWBP_LIMITS_MAX_PROMPTS": "5"}
    s = settings_from_env(monkeypatch, env)
    assert (s.redis_url, s.max_active_jobs, s.runtime_env, s.limits.max_prompts) == (
        "redis://h:1/2", 7, {"env_vars": {"A": "1"}}, 5)
    assert settings_from_env(monkeypatch, env, max_active_jobs=2).max_active_jobs == 2  # code wins over the env
    assert settings_from_env(monkeypatch, {}) == ControllerSettings()  # the defaults, with no variable set
    with pytest.raises(SystemExit, match=r"FLOWBP_MAX_ACTIVE_JOBS='-1': Input should be greater than or equal to 0"):
        settings_from_env(monkeypatch, {"FLOWBP_MAX_ACTIVE_JOBS": "-1"})
    with pytest.raises(SystemExit, match=r"FLOWBP_RUNTIME_ENV='\{nope': .*expected a JSON object"):
        settings_from_env(monkeypatch, {"FLOWBP_RUNTIME_ENV": "{nope"})
    with pytest.raises(SystemExit, match="FLOWBP_LIMITS=.*valid dictionary"):  # one limit per variable, no JSON
        settings_from_env(monkeypatch, {"FLOWBP_LIMITS": '{"max_labels": 3}'})
    with pytest.raises(SystemExit, match="FLOWBP_LOG_LEVEL='loud'"):
        settings_from_env(monkeypatch, {"FLOWBP_LOG_LEVEL": "loud"})
    assert redact_url("redis://:s3cret@h:6379/0") == "redis://:***@h:6379/0"
    assert "s3cret" not in redact_url("redis://user:s3cret@h/0")


def test_controller_limits_checked_with_field_path():
    from services.controller.settings import Limits

    req = JobSubmitRequest(name="a", config={"train": {"prompts": {"prompts": ["a red circle", "x" * 50]}}})
    with pytest.raises(SpecError) as e:
        check_spec(req, Limits(max_prompt_chars=20), check_registries=False)
    assert e.value.detail()["loc"] == ["body", "config", "train", "prompts", "prompts", 1]
    with pytest.raises(SpecError, match="2 prompts given; at most 1"):
        check_spec(req, Limits(max_prompts=1), check_registries=False)
    check_spec(req, Limits(), check_registries=False)


def test_run_folder_sees_only_complete_checkpoints(tmp_path):
    run = tmp_path / "r1"
    for n, complete in ((1, True), (2, True), (3, False)):
        d = run / f"step_{n}"
        d.mkdir(parents=True)
        if complete:
            (d / "COMPLETE").write_text("")
            (d / "pytorch_lora_weights.safetensors").write_bytes(b"x")
    (run / "step_4.tmp-123").mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n{"step": 3, "lo')
    f = run_folder(tmp_path, "r1")
    assert [(c.step, c.complete) for c in f.checkpoints()] == [(1, True), (2, True), (3, False)]
    assert f.latest_complete().step == 2
    assert [m.step for m in f.metrics()] == [1, 2]  # the torn last line is skipped
    assert f.lora_file()[1].parent.name == "step_2" and f.lora_file()[2] == "diffusers"
    (run / "metrics.jsonl").unlink()  # a Ray runtime run: step rows of events.jsonl instead
    (run / "events.jsonl").write_text('{"event": "hello", "step": 0}\n{"event": "step", "step": 1, "loss": 0.3}\n'
                                      '{"event": "eval", "step": 1}\n{"event": "step", "step": 2, "loss": 0.2}\n')
    assert [(m.step, m.loss) for m in f.metrics()] == [(1, 0.3), (2, 0.2)]
    (run / "step_2" / "pytorch_lora_weights.safetensors").unlink()
    (run / "step_2" / "trainable.safetensors").write_bytes(b"y")
    assert f.lora_file()[1:] == (run / "step_2" / "trainable.safetensors", "trainable_state_dict")
    assert f.lora_file(lora_run=False) is None  # a full fine-tune has no LoRA to offer
    with pytest.raises(ValueError):
        run_folder(tmp_path, "../etc")


def test_metric_names_match_the_interface_doc():
    doc = (REPO / "docs" / "interfaces.md").read_text()
    section = doc.split("### Controller metric names", 1)[1]
    documented = set(re.findall(r"`(flowbp_controller_[a-z_]+)`", section))
    assert set(metric_names.ALL) == documented
    assert len(metric_names.ALL) == len(set(metric_names.ALL))


def test_cli_table_and_error_rendering():
    out = table([["job-1", "a", "running"], ["job-22", "bb", "failed"]], ["ID", "NAME", "STATE"])
    lines = out.splitlines()
    assert lines[0].split() == ["ID", "NAME", "STATE"] and lines[2].split() == ["job-1", "a", "running"]
    assert len({line.index("STATE") for line in lines[:1]}) == 1

    class R:
        status_code = 422

        def json(self):
            return {"detail": [{"loc": ["body", "config", "method", "k"], "msg": "too big", "input": 99}]}

    assert _explain(R()) == "rejected (422):\n  config.method.k: too big (got 99)"
    a = build_parser().parse_args(["submit", "x.yaml", "--set", "method.k=4", "--set", "train.steps=2"])
    assert a.set == ["method.k=4", "train.steps=2"]
