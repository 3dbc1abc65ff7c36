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
    assert summary["reward"] == "world_preference" and summary["eval"] == {"per_task": 2, "seeds": 1}
    assert (summary["config"]["train"]["steps"], summary["config"]["train"]["batch_size"]) == (3, 4)
    for k in ("base", "aligned"):  # the rater's score is the mean of its two parts
        r = summary[k]["rater"]
        assert 0.0 <= r["score"] <= 100.0 and abs(r["score"] - (r["global"] + r["local"]) / 2) < 1e-6
    lo, hi = summary["delta_rater_95ci"]
    assert lo <= summary["delta_rater"] <= hi
    assert summary["lora"] and (Path(summary["lora"]) / "pytorch_lora_weights.safetensors").is_file()
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3


def test_demo_rejects_bad_run_overrides_and_demo_flags_by_name(tmp_path, capsys):
    import pytest

    from services.entrypoints import demo

    for args, needle in ((["--train.steps=0"], "train.steps=0"), (["--train.batch_size=0"], "train.batch_size=0"),
                         (["--sampling.n_steps=0"], "sampling.n_steps=0"), (["--train.lr=nan"], "train.lr="),
                         (["--trian.steps=3"], "trian"), (["--eval-seeds", "0"], "eval_seeds=0"),
                         (["--eval-per-task", "65"], "eval_per_task=65")):
        assert demo.main(["--quick", "--out", str(tmp_path)] + args) == 2, args
        assert needle in capsys.readouterr().err, args
    assert list(tmp_path.iterdir()) == []  # refused before a run folder is made
    for args, needle in ((["--threads", "0"], "--threads=0"), (["steps"], "unrecognised argument 'steps'")):
        with pytest.raises(SystemExit) as e:
            demo.main(["--quick", "--out", str(tmp_path)] + args)
        assert e.value.code == 2 and needle in capsys.readouterr().err


def test_demo_config_is_the_run_file_with_the_named_overrides(tmp_path):
    from services.entrypoints import demo

    default = demo.demo_config([], out_root=tmp_path, run_id="r")
    assert [(t.name, t.weight) for t in default.reward.terms] == [("world_preference", 1.0), ("world_attributes", 1.0)]
    assert default.reward.loss == "neg_mean"
    assert (default.train.steps, default.train.batch_size, default.train.lr, default.train.velocity_penalty,
            default.sampling.n_steps, default.backbone.lora.rank, default.method.preset) == (40, 8, 1.5e-3, 0.0, 10, 8,
                                                                                            "sd35")
    assert (default.checkpoint.every, default.checkpoint.dir, default.run_id) == (40, str(tmp_path), "r")
    quick = demo.demo_config(demo.QUICK, out_root=tmp_path, run_id="r")
    assert (quick.train.steps, quick.train.batch_size, quick.backbone.lora.rank, quick.checkpoint.every) == (3, 4, 4, 3)
    from services.entrypoints.demo_report import reward_label

    assert reward_label(default.reward.terms) == "world_preference + 1 x world_attributes"
    assert reward_label(quick.reward.terms[:1]) == "world_preference"
    two = demo.demo_config([], out_root=tmp_path, run_id="r", threads=2)  # sync roles take turns: each gets both
    assert (two.runtime.rollout_num_cpus, two.runtime.learner_num_cpus, two.runtime.mode) == (2.0, 2.0, "sync")
    assert demo.local_ray_cpus(two) == 2.0 + 2.0 + two.reward.served.num_cpus
    from services.runtime.learner import eval_steps

    # the demo evaluates itself: no in-run eval, so the Ray run starts no score app
    assert default.eval.limit == 0 and eval_steps(default) == set()
    kw = "reward.terms.0.kwargs"
    cfg = demo.demo_config([*demo.REWARDS["attributes"], "backbone.pretrained=/x/transformer.safetensors",
                            f"{kw}.smoothing_sigma=0.1", f"{kw}.contrastive_negatives=24", "train.lr=3e-3"],
                           out_root=tmp_path, run_id="r")
    assert cfg.backbone.pretrained == "/x/transformer.safetensors" and cfg.train.lr == 3e-3
    assert cfg.train.velocity_penalty == 0
    assert (cfg.reward.loss, cfg.reward.clip) == ("hinge", -0.05)
    assert cfg.reward.terms[0].kwargs == {"aesthetic_weight": 0.0, "smoothing_sigma": 0.1, "contrastive_negatives": 24}


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

    from flowbp_core.world.rater import RaterReport
    from services.entrypoints import demo_report

    judge = SimpleNamespace(overall=80.0, per_task={"colours": 80.0}, diversity=None)
    rated = {k: RaterReport(score=25.0, global_part=20.0, local_part=30.0, ratings=[]) for k in ("base", "aligned")}
    rows = [{"reward": 1.0}] * 5 + [{"reward": 6.0}] * 5  # the learned reward rose ...

    def summary(rater_ci, judge_ci):
        return {"delta_rater": 0.0, "delta_rater_95ci": rater_ci, "delta_overall": 0.0, "delta_overall_95ci": judge_ci,
                "delta_rater_parts_95ci": {"global": [-1, 1], "local": [-1, 1]}, "reward": "world_preference",
                "base": {"placement_diversity": None}, "aligned": {"placement_diversity": None}}

    demo_report.print_report(summary([-3.0, 2.0], [-1.0, 1.0]), judge, judge, rated, rows, 1, 1)  # ... the rater not
    assert "gaming the learned model" in capsys.readouterr().out
    demo_report.print_report(summary([5.0, 9.0], [-9.0, -4.0]), judge, judge, rated, rows, 1, 1)
    assert "prompt following fell" in capsys.readouterr().out
    demo_report.print_report(summary([5.0, 9.0], [-1.0, 1.0]), judge, judge, rated, rows, 1, 1)
    assert "warning" not in capsys.readouterr().out
