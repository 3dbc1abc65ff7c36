"""On-policy reward data: the generator's own samples (sample_pool), labelled by the detector
(recogniser.detected_labels), mixed into the recogniser's training (train_reward --generated)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from flowbp_core.world.data import prompt_pool
from flowbp_core.world.recogniser import detected_labels, scene_labels
from flowbp_core.world.scenes import render_batch, sample_free_scene


def test_detected_labels_agree_with_ground_truth_on_renders():
    rng = np.random.default_rng(3)
    scenes = [sample_free_scene(rng) for _ in range(200)]
    truth, found = scene_labels(scenes), detected_labels(render_batch(scenes))
    exact = (truth["pair_count"] == found["pair_count"]).flatten(1).all(1).float().mean()
    assert exact >= 0.95, exact
    # Regions from the detected centroid vs the drawn centre: a triangle's centroid sits off its box centre, so
    # objects near a region border can differ (measured 0.94 on these scenes).
    present = truth["pair_count"] > 0
    assert (truth["pair_pos"][present] == found["pair_pos"][present]).all(-1).float().mean() >= 0.9


def test_detected_labels_of_a_blank_image_are_empty():
    lab = detected_labels(np.full((1, 3, 32, 32), 0.5, dtype=np.float32))
    assert int(lab["pair_count"].sum()) == 0 and int(lab["pair_pos"].sum()) == 0


def test_sample_pool_writes_training_prompt_images(tmp_path):
    from safetensors import safe_open

    from services.entrypoints.world.sample_pool import main

    out = tmp_path / "pool.safetensors"
    assert main(["--out", str(out), "--n", "6", "--batch", "4", "--threads", "1"]) == 0
    with safe_open(str(out), "pt") as f:
        images, meta = f.get_tensor("images"), f.metadata()
    assert images.dtype == torch.uint8 and tuple(images.shape) == (6, 3, 32, 32)
    prompts = json.loads(meta["prompts"])
    assert prompts == [it.text for it in prompt_pool("train", 6, seed=10_007)] and meta["policy"] == "base"
    assert images.float().std() > 5  # not blank


def test_sample_pool_names_a_bad_policy_folder(tmp_path):
    from services.entrypoints.world.sample_pool import main

    with pytest.raises(FileNotFoundError, match="trainable.safetensors"):
        main(["--out", str(tmp_path / "p.safetensors"), "--n", "2", "--policy", str(tmp_path)])


def test_train_reward_mixes_generated_images_and_reports_their_accuracy(tmp_path, capsys):
    from safetensors.torch import save_file

    from services.entrypoints.world.train_reward import main

    rng = np.random.default_rng(0)
    scenes = [sample_free_scene(rng) for _ in range(40)]
    pool = tmp_path / "pool.safetensors"
    save_file({"images": torch.from_numpy((render_batch(scenes) * 255).round().astype(np.uint8))}, str(pool))
    out = tmp_path / "rec"
    assert main(["--out", str(out), "--max-steps", "2", "--batch", "8", "--threads", "1",
                 "--generated", str(pool), "--generated-frac", "0.5"]) == 0
    final = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["final"]
    assert {"generated_pair_count", "generated_scene_exact"} <= set(final)
    assert (out / "recogniser.safetensors").exists()
    with pytest.raises(FileNotFoundError, match="sample_pool"):
        main(["--out", str(out), "--max-steps", "1", "--generated", str(tmp_path / "missing.safetensors")])


def test_input_blur_hides_patch_period_textures_from_the_recogniser():
    from dataclasses import replace

    from flowbp_core.world.recogniser import Recogniser
    from flowbp_core.world.reward import load_recogniser

    sharp, _ = load_recogniser()
    blurred = Recogniser(replace(sharp.cfg, input_blur=1.5))
    blurred.load_state_dict(sharp.state_dict())  # same weights: only the front end differs
    sharp = Recogniser(replace(sharp.cfg, input_blur=0.0))
    sharp.load_state_dict(blurred.state_dict())
    rng = np.random.default_rng(1)
    x = torch.from_numpy(render_batch([sample_free_scene(rng) for _ in range(8)]))
    i = torch.arange(32, dtype=torch.float32)
    wave = torch.cos(2 * torch.pi * i / 4)  # zero-mean texture with the transformer's 4-px patch period
    grid = 0.15 * wave.view(1, 1, 32, 1) * wave.view(1, 1, 1, 32)

    def change(m):
        with torch.no_grad():
            a, b = m(x), m(x + grid)  # unclamped: clamping at black/white would add a mean shift
        return sum(float((a[k] - b[k]).abs().mean()) for k in a)

    assert change(blurred) < 0.3 * change(sharp)


def test_train_reward_records_input_blur_and_the_reward_loads_it(tmp_path, capsys):
    from flowbp_core.world.reward import load_recogniser
    from services.entrypoints.world.train_reward import main

    out = tmp_path / "rec"
    assert main(["--out", str(out), "--max-steps", "1", "--batch", "4", "--threads", "1", "--input-blur", "1.5"]) == 0
    model, meta = load_recogniser(out / "recogniser.safetensors")
    assert model.cfg.input_blur == 1.5 and meta["config"]["model"]["input_blur"] == 1.5
    with pytest.raises(SystemExit):
        main(["--out", str(out), "--max-steps", "1", "--input-blur", "-1"])
    assert "input_blur=-1.0" in capsys.readouterr().err


def test_adversarial_examples_stay_in_the_ball_and_raise_the_loss():
    from flowbp_core.world.recogniser import recogniser_loss
    from flowbp_core.world.reward import load_recogniser
    from flowbp_core.world.train_reward import adversarial

    model, _ = load_recogniser()
    rng = np.random.default_rng(2)
    scenes = [sample_free_scene(rng) for _ in range(8)]
    x = torch.from_numpy(render_batch(scenes))
    lab = scene_labels(scenes)
    x_adv = adversarial(model, x, lab, eps=1.0, steps=3)
    assert not x_adv.requires_grad and bool(((x_adv >= 0) & (x_adv <= 1)).all())
    assert float((x_adv - x).flatten(1).norm(dim=1).max()) <= 1.0 + 1e-4
    with torch.no_grad():
        assert float(recogniser_loss(model(x_adv), lab)) > float(recogniser_loss(model(x), lab)) + 0.1


def test_train_reward_adversarial_training_logs_accuracy_under_attack(tmp_path, capsys):
    from services.entrypoints.world.train_reward import main

    out = tmp_path / "rec"
    assert main(["--out", str(out), "--max-steps", "1", "--batch", "4", "--threads", "1",
                 "--adversarial-eps", "0.5", "--adversarial-steps", "2"]) == 0
    assert (out / "recogniser.safetensors").exists()
    for bad in (["--adversarial-eps", "-1"], ["--adversarial-eps", "1", "--adversarial-steps", "0"]):
        with pytest.raises(SystemExit):
            main(["--out", str(out), "--max-steps", "1", *bad])
    err = capsys.readouterr().err
    assert "adversarial_eps=-1.0" in err and "adversarial_steps=0" in err
