"""Fast checks of the runtime's pieces without a Ray cluster (seconds)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from services.runtime import metric_names
from services.runtime.layout import rank_pieces, shard_bounds
from services.runtime.learner import concat_caches
from services.runtime.weight_sync import BucketedSync

REPO = Path(__file__).resolve().parents[2]


def test_metric_names_are_exactly_the_documented_ones():
    text = (REPO / "docs/interfaces.md").read_text()
    section = text.split("### Runtime metric names", 1)[1].split("###", 1)[0]
    documented = set(re.findall(r"`(flowbp_[a-z_]+)`", section))
    assert documented, "could not find the runtime metric list in docs/interfaces.md"
    assert set(metric_names.ALL) == documented
    assert len(metric_names.ALL) == len(set(metric_names.ALL))
    assert metric_names.PROMETHEUS_PREFIX == "ray_"


def test_boundary_types_are_keyword_only_and_document_every_field():
    import dataclasses

    from flowbp_core.cache import TrajectoryCache
    from flowbp_core.plan import Plan, SegmentPlan
    from flowbp_core.step import StepResult
    from services.reward_serve.engine import DecoderSpec, RewardServiceSpec
    from services.reward_serve.protocol import RewardRequest, RewardResponse
    from services.runtime import payloads

    types = [Plan, SegmentPlan, TrajectoryCache, StepResult, payloads.WeightsHandle, payloads.BucketStream,
             payloads.RolloutRequest, payloads.RolloutStats, payloads.LearnerWork, payloads.StepOutcome,
             payloads.LearnerHello, RewardRequest, RewardResponse, DecoderSpec, RewardServiceSpec]
    for t in types:
        fields = dataclasses.fields(t)
        assert all(f.kw_only for f in fields), f"{t.__name__} takes positional arguments"
        doc = t.__doc__.split("Attributes:", 1)
        assert len(doc) == 2, f"{t.__name__} has no Attributes: block"
        missing = [f.name for f in fields if not re.search(rf"\b{f.name}\b", doc[1])]
        assert not missing, f"{t.__name__}'s Attributes: block leaves out {missing}"
    with pytest.raises(TypeError):
        SegmentPlan(3, 4, (3,))


# ------------------------------------------------------------------------------------------ sharding
@pytest.mark.parametrize("batch, parts", [(2, 2), (5, 2), (1, 3), (8, 3)])
def test_shard_bounds_cover_the_batch_once(batch, parts):
    b = shard_bounds(batch, parts)
    assert b[0][0] == 0 and b[-1][1] == batch
    assert all(a < e for a, e in b) and all(b[i][1] == b[i + 1][0] for i in range(len(b) - 1))
    assert max(e - a for a, e in b) - min(e - a for a, e in b) <= 1


@pytest.mark.parametrize("batch, workers, learners", [(2, 1, 2), (6, 4, 2), (64, 40, 16), (64, 5, 8), (12, 12, 3)])
def test_rollout_pieces_cover_each_learner_rank_exactly(batch, workers, learners):
    """Every rollout shard cut at the learner bounds: rank r's pieces, in batch order, are exactly its rows."""
    owned: dict[int, list[tuple[int, int]]] = {}
    for a, b in shard_bounds(batch, workers):
        pieces = rank_pieces(a, b, batch, learners)
        assert pieces[0][0] == a and pieces[-1][1] == b and all(s < e for s, e, _ in pieces)
        assert all(pieces[i][1] == pieces[i + 1][0] for i in range(len(pieces) - 1))
        for s, e, r in pieces:
            owned.setdefault(r, []).append((s, e))
    for r, (a, b) in enumerate(shard_bounds(batch, learners)):
        rows = [i for s, e in owned[r] for i in range(s, e)]
        assert rows == list(range(a, b))


def test_concat_of_split_shards_is_the_original_cache():
    from flowbp_core.sampling import rollout

    noise = torch.randn(5, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    sig = torch.tensor([1.0, 0.6, 0.3, 0.0], dtype=torch.float64)
    cache = rollout(lambda x, s: -x * s, noise, sig, cond={"emb": torch.randn(5, 3), "neg": torch.randn(1, 3)},
                    prompts=list("abcde"))
    joined = concat_caches(cache.split(2))
    assert torch.equal(joined.final, cache.final) and torch.equal(joined.noise, cache.noise)
    assert joined.prompts == cache.prompts and set(joined.states) == set(cache.states)
    for i in cache.states:
        assert torch.equal(joined.states[i], cache.states[i])
    assert torch.equal(joined.cond["emb"], cache.cond["emb"]) and joined.cond["neg"].shape[0] == 1


def test_buckets_hold_every_tensor_once_and_respect_the_size():
    sync = BucketedSync(bucket_mb=0.001)  # ~1 KiB
    state = {f"w{i}": torch.zeros(100 + 50 * i) for i in range(6)}  # 400..1400 bytes each
    buckets = sync.buckets(state)
    keys = [k for b in buckets for k in b]
    assert sorted(keys) == sorted(state)
    for b in buckets:
        size = sum(t.numel() * t.element_size() for t in b.values())
        assert size <= sync.bucket_bytes or len(b) == 1
