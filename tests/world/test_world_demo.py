"""`make demo QUICK=1` and the benchmark's quick mode run end to end and write what they promise."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quick_demo_runs_and_writes_the_run_folder(tmp_path):
    from services.entrypoints import demo

    assert demo.main(["--quick", "--runtime", "core", "--out", str(tmp_path)]) == 0
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    for name in ("metrics.jsonl", "reward_curve.png", "before_after.png", "demo_summary.json"):
        assert (run_dir / name).stat().st_size > 0, name
    summary = json.loads((run_dir / "demo_summary.json").read_text())
    assert summary["runtime"] == "core" and set(summary["base"]["per_task"]) == set(summary["aligned"]["per_task"])
    assert summary["settings"]["reward"] == "preference"
    for k in ("base", "aligned"):  # the rater's score is the mean of its two parts
        r = summary[k]["rater"]
        assert 0.0 <= r["score"] <= 100.0 and abs(r["score"] - (r["global"] + r["local"]) / 2) < 1e-6
    lo, hi = summary["delta_rater_95ci"]
    assert lo <= summary["delta_rater"] <= hi
    assert summary["lora"] and (Path(summary["lora"]) / "pytorch_lora_weights.safetensors").is_file()
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == demo.QUICK.steps


def test_demo_rejects_bad_steps(tmp_path, capsys):
    from services.entrypoints import demo

    try:
        demo.main(["--quick", "--steps", "0", "--out", str(tmp_path)])
    except SystemExit as e:
        assert e.code == 2
    assert "--steps=0" in capsys.readouterr().err


def test_demo_rejects_bad_reward_and_base_options_by_name(tmp_path, capsys):
    import pytest

    from services.entrypoints import demo

    for args, needle in ((["--smoothing", "0.9"], "--smoothing=0.9"), (["--contrastive", "-2"], "--contrastive=-2"),
                         (["--gradient-blur", "9"], "--gradient-blur=9.0"),
                         (["--sampling-steps", "1"], "--sampling-steps=1: allowed range is 2..100"),
                         (["--batch", "0"], "--batch=0: allowed range is 1..256"),
                         (["--base", str(tmp_path / "nope")], "no transformer.safetensors")):
        with pytest.raises(SystemExit) as e:
            demo.main(["--quick", "--out", str(tmp_path)] + args)
        assert e.value.code == 2 and needle in capsys.readouterr().err


def test_demo_config_carries_the_chosen_base_and_reward_options(tmp_path):
    from services.entrypoints import demo

    default = demo.demo_config(demo.FULL, tmp_path, "r")
    assert [t.name for t in default.reward.terms] == ["world_preference"] and default.reward.loss == "neg_mean"
    two = demo.demo_config(demo.FULL, tmp_path, "r", threads=2)  # sync roles take turns: each gets both threads
    assert (two.runtime.rollout_num_cpus, two.runtime.learner_num_cpus, two.runtime.mode) == (2.0, 2.0, "sync")
    assert demo.local_ray_cpus(two) == 2.0 + 2.0 + two.reward.served.num_cpus
    from services.runtime.learner import eval_steps

    # the demo evaluates itself: no in-run eval, so the Ray run starts no score app
    assert default.eval.limit == 0 and eval_steps(default) == set()
    s = demo.DemoSettings(**{**demo.QUICK.__dict__, "base": "/x/transformer.safetensors", "smoothing": 0.1,
                             "contrastive": 24, "gradient_blur": 1.5, "reward": "attributes"})
    cfg = demo.demo_config(s, tmp_path, "r")
    assert cfg.backbone.pretrained == "/x/transformer.safetensors"
    assert cfg.reward.terms[0].kwargs == {"aesthetic_weight": 0.0, "smoothing_sigma": 0.1, "contrastive_negatives": 24,
                                            "gradient_blur": 1.5}


def test_sample_efficiency_quick_writes_table_and_plot(tmp_path):
    out = tmp_path / "se"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sample_efficiency.py"), "--quick",
                           "--methods", "flowbp_sparse,refl", "--out", str(out)],
                          capture_output=True, text=True, timeout=1200, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.with_suffix(".json").read_text())
    assert {r["method"] for r in data["rows"]} == {"flowbp_sparse", "refl"}
    assert all(r["saved_mb"] > 0 and r["step_s_mean"] > 0 for r in data["rows"])
    assert out.with_suffix(".png").stat().st_size > 0 and "| flowbp_sparse |" in out.with_suffix(".md").read_text()


def test_demos_started_in_the_same_second_get_their_own_run_folders(tmp_path):
    from services.entrypoints import demo

    a = demo.new_run_dir(tmp_path / "runs", "demo-20261201-120000")
    b = demo.new_run_dir(tmp_path / "runs", "demo-20261201-120000")
    assert a.is_dir() and b.is_dir() and a != b
    assert (a.name, b.name) == ("demo-20261201-120000", "demo-20261201-120000-2")


def test_demo_says_when_the_policy_games_the_preference_model(capsys):
    from types import SimpleNamespace

    from services.entrypoints import demo
    from flowbp_core.world.rater import RaterReport

    judge = SimpleNamespace(overall=80.0, per_task={"colours": 80.0}, diversity=None)
    rated = {k: RaterReport(score=25.0, global_part=20.0, local_part=30.0, ratings=[]) for k in ("base", "aligned")}
    rows = [{"reward": 1.0}] * 5 + [{"reward": 6.0}] * 5  # the learned reward rose ...

    def summary(rater_ci, judge_ci):
        return {"delta_rater": 0.0, "delta_rater_95ci": rater_ci, "delta_overall": 0.0, "delta_overall_95ci": judge_ci,
                "delta_rater_parts_95ci": {"global": [-1, 1], "local": [-1, 1]}, "settings": {"reward": "preference"},
                "base": {"placement_diversity": None}, "aligned": {"placement_diversity": None}}

    demo.print_report(summary([-3.0, 2.0], [-1.0, 1.0]), judge, judge, rated, rows, 1, 1)  # ... the rater did not
    assert "gaming the learned model" in capsys.readouterr().out
    demo.print_report(summary([5.0, 9.0], [-9.0, -4.0]), judge, judge, rated, rows, 1, 1)
    assert "prompt following fell" in capsys.readouterr().out
    demo.print_report(summary([5.0, 9.0], [-1.0, 1.0]), judge, judge, rated, rows, 1, 1)
    assert "warning" not in capsys.readouterr().out
