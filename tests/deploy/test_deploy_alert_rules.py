"""The alert rules pass `promtool check rules` and their own unit tests (`promtool test rules`)."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml
from deploy_helpers import REPO

RULES = REPO / "deploy" / "prometheus" / "flowbp-alerts.yaml"
RULE_TESTS = REPO / "deploy" / "prometheus" / "tests" / "flowbp-alerts.test.yaml"
REQUIRED = {"FlowBPJobStalled", "FlowBPRewardNaNStreak", "FlowBPStalenessOverLimit", "FlowBPControllerHigh5xxRate",
            "FlowBPRedisDown", "FlowBPControllerScrapeDown"}

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (make setup installs Debian's prometheus package)")


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60)


def test_the_required_alerts_exist_with_severity_and_text():
    rules = yaml.safe_load(RULES.read_text())
    alerts = {r["alert"]: r for g in rules["groups"] for r in g["rules"] if "alert" in r}
    assert REQUIRED <= set(alerts)
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name


@needs_promtool
def test_promtool_check_rules():
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {sum(len(g['rules']) for g in yaml.safe_load(RULES.read_text())['groups'])} rules found" \
        in result.stdout


@needs_promtool
def test_promtool_unit_tests_of_every_alert():
    tests = yaml.safe_load(RULE_TESTS.read_text())
    tested = {a["alertname"] for t in tests["tests"] for a in t["alert_rule_test"] if a["exp_alerts"]}
    assert REQUIRED | {"FlowBPRayAPIUnreachable"} <= tested
    result = promtool("test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_rejects_a_broken_rule(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text(RULES.read_text().replace("max by (run_id) (ray_flowbp_staleness) > 4",
                                                "max by (run_id) (ray_flowbp_staleness > 4"))
    assert promtool("check", "rules", str(broken)).returncode != 0
