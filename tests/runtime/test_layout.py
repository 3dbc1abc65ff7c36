"""The README's table of what a 64-GPU step moves is what `services.runtime.layout` computes, and the computation
agrees with the sizes it is built from."""

from __future__ import annotations

from pathlib import Path

import pytest

from flowbp_core.config import load_config
from services.runtime import layout
from services.runtime.weight_sync import IN_FLIGHT

REPO = Path(__file__).resolve().parents[2]


def test_readme_table_is_the_computed_one():
    readme = (REPO / "services/runtime/README.md").read_text()
    section = readme.split("## How a 64-GPU run is laid out", 1)[1].split("\n## ", 1)[0]
    assert layout.table(layout.DEPLOY_CONFIGS) in section, "regenerate with: python -m services.runtime.layout"


def test_step_bytes_add_up_from_their_parts():
    cfg = load_config(REPO / "deploy/configs/flux1.yaml")
    roles = layout.Roles()
    lora = layout.step_bytes(cfg, 512, roles, lora_rank=64)
    # FLUX.1: distilled guidance, no shared negative embedding: the step is the batch times one sample.
    assert lora.cache_step == cfg.train.batch_size * lora.cache_per_sample
    # Each piece crosses to the one learner node that reads it; a rank fetches its 64 / 16 samples alone.
    assert lora.cache_network == lora.cache_step and lora.weights_network == 5 * lora.weights
    # Full weights: at most a copy for each of the 40 rollout workers; rank 0's store pins at most the in-flight
    # buckets of the publisher, its server and each worker, not the model (23.8 GB).
    full = layout.step_bytes(cfg, 512, roles)
    assert full.weights_network == 40 * full.weights
    assert full.weights_store == 42 * IN_FLIGHT * cfg.runtime.weight_sync_bucket_mb * 2**20
    assert full.weights_store < full.weights / 4 and lora.weights_store == 2 * lora.weights
    assert lora.cache_per_rank == cfg.train.batch_size // roles.learners * lora.cache_per_sample
    assert lora.weights == pytest.approx(418e6, rel=0.01)  # the FLUX LoRA r64 the issue quotes at ~420 MB
    assert layout.step_bytes(cfg, 1024, roles).reward_per_rank == 4 * 16 * 128 * 128 * 4
