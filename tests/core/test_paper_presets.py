"""The run files reproduce the paper's setup as flowbp_core/presets.py states it, and the README's preset table is
the one that module generates (one place for each fact)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flowbp_core import presets
from flowbp_core.config import load_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("preset", ["sd35", "flux1", "flux2"])
def test_run_file_is_the_papers_setup(preset):
    cfg = load_config(ROOT / f"deploy/configs/{preset}.yaml")
    pb = presets.paper_backbone(preset)
    method = cfg.method.name
    assert cfg.method_preset() == preset and not cfg.method.params  # method values come from the preset
    assert (cfg.backbone.name, cfg.backbone.pretrained, cfg.backbone.finetune) == (pb.backbone, pb.pretrained, "full")
    t = cfg.train
    assert (t.lr, t.steps, t.weight_decay, t.grad_clip, t.ema_decay) == (
        presets.LR, presets.STEPS, presets.WEIGHT_DECAY, presets.GRAD_CLIP, presets.EMA_DECAY)
    assert t.batch_size == presets.global_batch(preset, method)
    assert (cfg.sampling.n_steps, cfg.sampling.eval_n_steps) == (presets.N_STEPS, pb.eval_n_steps)
    assert presets.reference_file(preset, method).endswith(f"{method}.yaml")


def test_paper_batches_and_models():
    assert presets.global_batch("sd35", "flowbp_sparse") == 64 and presets.global_batch("sd35", "draft_lv") == 32
    assert [presets.global_batch("flux1", m) for m in ("flowbp_lagrange", "flowbp_bridge", "leapalign")] == [64] * 3
    assert [presets.global_batch("flux1", m) for m in ("flowbp_sparse", "refl", "drtune", "draft_lv")] == [32] * 4
    assert {presets.global_batch("flux2", m) for m in presets.PAPER_METHODS} == {32}
    assert presets.paper_backbone("flux2").pretrained.endswith("klein-base-9B")
    assert (presets.eval_steps("sd3"), presets.eval_steps("flux1"), presets.eval_steps("embedded")) == (40, 50, None)


def test_readme_preset_table_is_generated_from_the_presets():
    assert presets.markdown_table() in (ROOT / "README.md").read_text()


def test_offline_eval_scores_the_ema_weights_by_default(tmp_path):
    from flowbp_core.backbones.base import LoRAConfig
    from flowbp_core.checkpoint import CheckpointState, save_checkpoint
    from flowbp_core.eval import load_backbone

    bb = load_backbone("sd3", None, None, tiny=True, seed=42)
    bb.apply_lora(LoRAConfig(rank=2))
    live = {k: v + 0.5 for k, v in bb.trainable_state_dict().items()}
    ema_values = [v - 0.5 for v in live.values()]
    save_checkpoint(tmp_path, CheckpointState(step=1, policy_version=1, trainable=live,
                                              ema={f"ema.{i}": v for i, v in enumerate(ema_values)},
                                              config={"backbone": {"finetune": "lora", "lora": {"rank": 2}}}))
    for ema, want in ((None, ema_values), (False, list(live.values()))):
        weights = dict(load_backbone("sd3", None, str(tmp_path), tiny=True, seed=42, ema=ema)
                       .transformer.named_parameters())  # loaded frozen: read them by name
        got = [weights[name] for name in live]
        assert len(got) == len(want) == 30 and all(torch.equal(a, b) for a, b in zip(got, want)), ema
