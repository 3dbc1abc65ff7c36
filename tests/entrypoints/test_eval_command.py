"""The evaluation command: prompt sets, the scoring/report half on its own, and end to end on a tiny backbone."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from flowbp_core.errors import ConfigError
from flowbp_core.eval import evaluate_images, load_backbone, make_grid, parse_reward_args, score_batch
from flowbp_core.rewards import build
from flowbp_core.run import load_prompts
from services.entrypoints.eval import main


def test_shipped_prompt_sets():
    hp = load_prompts("hpdv2")
    ge = load_prompts("geneval")
    assert len(hp) == 400 and len(ge) == 553
    assert ge[0] == "a photo of a bench"
    assert all(p.strip() == p and p for p in hp + ge)
    assert load_prompts("hpdv2", limit=7) == hp[:7]
    world = load_prompts("world_heldout", limit=3)
    assert len(world) == 3 and all(isinstance(p, str) and p for p in world)


def test_prompt_files(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n\n  a dog  \n")
    assert load_prompts(str(tmp_path / "p.txt")) == ["a cat", "a dog"]
    (tmp_path / "p.jsonl").write_text('{"prompt": "x"}\n{"prompt": "y", "tag": "t"}\n')
    assert load_prompts(str(tmp_path / "p.jsonl")) == ["x", "y"]
    (tmp_path / "bad.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(ConfigError, match="line 1.*prompt"):
        load_prompts(str(tmp_path / "bad.jsonl"))
    with pytest.raises(ConfigError, match="hpdv2"):
        load_prompts("nope")


def test_reward_args():
    got = parse_reward_args(["hpsv2.checkpoint=/m/hps.pt", "clipscore.scale=2.5"], ["hpsv2", "clipscore"])
    assert got == {"hpsv2": {"checkpoint": "/m/hps.pt"}, "clipscore": {"scale": 2.5}}
    with pytest.raises(ConfigError, match="NAME.KEY=VALUE"):
        parse_reward_args(["hpsv2"], ["hpsv2"])
    with pytest.raises(ConfigError, match="among the --rewards"):
        parse_reward_args(["pickscore.path=x"], ["hpsv2"])


def test_scoring_half_writes_table_json_and_grid(tmp_path):
    torch.manual_seed(0)
    rewards = {"saturation": build("saturation"), "contrast": build("contrast")}
    imgs = torch.rand(5, 3, 24, 24)
    imgs[0] = 0.5  # a flat grey image: saturation and contrast ~0
    prompts = [f"p{i}" for i in range(5)]
    batches = [(imgs[:2], prompts[:2], [0, 1]), (imgs[2:], prompts[2:], [2, 3, 4])]
    rep = evaluate_images(batches, rewards, tmp_path, prompts_name="test", total=5, seed=3, grid_size=4,
                          progress=False)
    data = json.loads((tmp_path / "scores.json").read_text())
    assert data["n_prompts"] == 5 and data["rewards"] == ["saturation", "contrast"]
    sat = [s["scores"]["saturation"] for s in data["samples"]]
    assert sat[0] < 1e-3 < min(sat[1:])
    assert data["summary"]["saturation"]["mean"] == pytest.approx(np.mean(sat))
    assert [s["seed"] for s in data["samples"]] == [3, 4, 5, 6, 7]
    md = (tmp_path / "scores.md").read_text()
    assert "| saturation |" in md and "| 4 | p4 |" in md
    grid = np.array(Image.open(tmp_path / "grid.png"))
    assert grid.shape == (2 + 24 + 2, 4 * 24 + 5 * 2, 3)  # 4 images in one row, 2 px gutters
    assert len(list((tmp_path / "images").glob("*.png"))) == 5
    assert rep.summary["contrast"].n == 5


def test_non_finite_reward_is_an_error():
    class Broken:
        name = "broken"

        def __call__(self, images, prompts):
            return torch.tensor([0.0, float("nan")])

    with pytest.raises(ValueError, match="broken.*non-finite.*'b'"):
        score_batch(torch.zeros(2, 3, 4, 4), ["a", "b"], {"broken": Broken()})


def test_grid_tiles_rows():
    ims = [np.full((4, 6, 3), i, dtype=np.uint8) for i in range(5)]
    g = make_grid(ims, columns=2, pad=1)
    assert g.shape == (3 * 4 + 4, 2 * 6 + 3, 3)
    assert (g[1:5, 8:14] == 1).all() and (g[11:15, 1:7] == 4).all()


# ----------------------------------------------------------------------------------- end to end, tiny model
@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("prompts") / "p.txt"
    p.write_text("a photo of a banana\na red sports car\na pizza\n")
    return p


def run_cli(out, prompt_file, *extra):
    return main(["--backbone", "sd3", "--tiny", "--prompts", str(prompt_file), "--rewards",
                 "saturation,sharpness", "--out", str(out), "--steps", "2", "--no-progress", *extra])


def test_end_to_end_on_tiny_sd3_and_seed_per_prompt(tmp_path, prompt_file):
    assert run_cli(tmp_path / "a", prompt_file, "--batch-size", "3") == 0
    assert run_cli(tmp_path / "b", prompt_file, "--batch-size", "2", "--no-images") == 0
    a = json.loads((tmp_path / "a" / "scores.json").read_text())
    b = json.loads((tmp_path / "b" / "scores.json").read_text())
    assert a["backbone"] == "sd3" and a["steps"] == 2 and a["n_prompts"] == 3
    # Same seed, different batch size: the same noise per prompt, so the same images and scores.
    for sa, sb in zip(a["samples"], b["samples"]):
        assert sa["prompt"] == sb["prompt"]
        for k in ("saturation", "sharpness"):
            assert sa["scores"][k] == pytest.approx(sb["scores"][k], rel=1e-4, abs=1e-6)
    assert (tmp_path / "a" / "grid.png").is_file() and len(list((tmp_path / "a" / "images").glob("*.png"))) == 3
    assert not (tmp_path / "b" / "images").exists()
    # Another seed, other images.
    assert run_cli(tmp_path / "c", prompt_file, "--seed", "7", "--no-images") == 0
    c = json.loads((tmp_path / "c" / "scores.json").read_text())
    assert c["samples"][0]["scores"]["sharpness"] != a["samples"][0]["scores"]["sharpness"]


def test_lora_checkpoint_changes_the_images(tmp_path, prompt_file):
    from flowbp_core.backbones.base import LoRAConfig
    from flowbp_core.checkpoint import CheckpointState, save_checkpoint

    bb = load_backbone("sd3", None, None, tiny=True, seed=42)
    bb.apply_lora(LoRAConfig(rank=2))
    torch.manual_seed(0)
    trained = {k: v + 0.5 * torch.randn_like(v) for k, v in bb.trainable_state_dict().items()}
    run = tmp_path / "run"
    save_checkpoint(run, CheckpointState(step=3, policy_version=3, trainable=trained,
                                         config={"backbone": {"finetune": "lora", "lora": {"rank": 2}}}))
    assert run_cli(tmp_path / "base", prompt_file, "--no-images", "--limit", "1") == 0
    assert run_cli(tmp_path / "tuned", prompt_file, "--no-images", "--limit", "1", "--lora", str(run)) == 0
    base = json.loads((tmp_path / "base" / "scores.json").read_text())["samples"][0]["scores"]
    tuned = json.loads((tmp_path / "tuned" / "scores.json").read_text())
    assert tuned["checkpoint"] == str(run)
    assert tuned["samples"][0]["scores"]["sharpness"] != pytest.approx(base["sharpness"], rel=1e-6)
    # The EMA flag on a checkpoint without EMA, and a missing checkpoint, fail with a message (exit code 2).
    assert run_cli(tmp_path / "x", prompt_file, "--lora", str(run), "--ema") == 2
    assert run_cli(tmp_path / "y", prompt_file, "--lora", str(tmp_path / "missing")) == 2


def test_cli_rejects_unknown_reward(tmp_path, prompt_file, capsys):
    assert main(["--backbone", "sd3", "--tiny", "--prompts", str(prompt_file), "--rewards", "hps9",
                 "--out", str(tmp_path)]) == 2
    assert "hps9" in capsys.readouterr().err
