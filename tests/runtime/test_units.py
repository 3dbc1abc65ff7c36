"""Fast checks of the runtime's pieces without a Ray cluster (seconds)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch

from services.reward_serve.client import served_reward
from services.reward_serve.engine import RewardEngine, RewardServiceSpec
from services.reward_serve.protocol import RewardRequest, RewardResponse, WireError
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


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside a function."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
    return out


def test_reward_serve_imports_nothing_from_the_runtime():
    files = sorted((REPO / "services/reward_serve").glob("*.py"))
    assert len(files) > 3
    bad = {f.name: sorted(m for m in imported_modules(f) if m.startswith("services.runtime"))
           for f in files}
    assert not {k: v for k, v in bad.items() if v}, "services/runtime imports services/reward_serve, not back"


def test_boundary_types_are_keyword_only_and_document_every_field():
    import dataclasses

    from flowbp_core.cache import TrajectoryCache
    from flowbp_core.plan import Plan, SegmentPlan
    from flowbp_core.step import StepResult
    from services.runtime import payloads

    types = [Plan, SegmentPlan, TrajectoryCache, StepResult, payloads.WeightsHandle, payloads.RolloutRequest,
             payloads.RolloutStats, payloads.LearnerWork, payloads.StepOutcome, payloads.LearnerHello]
    for t in types:
        fields = dataclasses.fields(t)
        assert all(f.kw_only for f in fields), f"{t.__name__} takes positional arguments"
        doc = t.__doc__.split("Attributes:", 1)
        assert len(doc) == 2, f"{t.__name__} has no Attributes: block"
        missing = [f.name for f in fields if not re.search(rf"\b{f.name}\b", doc[1])]
        assert not missing, f"{t.__name__}'s Attributes: block leaves out {missing}"
    with pytest.raises(TypeError):
        SegmentPlan(3, 4, (3,))


# ------------------------------------------------------------------------------------------ wire format
def test_request_and_response_round_trip_as_safetensors():
    x = torch.randn(2, 4, 8, 8)
    req = RewardRequest(x, ("a cat", "a dog"), "latents", True)
    blob = req.to_bytes()
    assert not blob.startswith(b"\x80"), "pickle protocol header: payloads must be safetensors"
    back = RewardRequest.from_bytes(blob)
    assert torch.equal(back.input, x) and back.prompts == ("a cat", "a dog") and back.want_grad
    resp = RewardResponse(torch.tensor([0.5, 1.5]), torch.ones(2, 4, 8, 8), "dep")
    r2 = RewardResponse.from_bytes(resp.to_bytes())
    assert torch.equal(r2.rewards, resp.rewards) and torch.equal(r2.grad, resp.grad) and r2.deployment == "dep"


@pytest.mark.parametrize("bad, match", [
    (b"short", "not a safetensors blob"),
    (RewardResponse(torch.zeros(1), None).to_bytes(), "expected a reward_request"),
])
def test_bad_payloads_are_rejected_with_a_reason(bad, match):
    with pytest.raises(WireError, match=match):
        RewardRequest.from_bytes(bad)


def test_unknown_version_is_rejected():
    blob = RewardRequest(torch.zeros(1, 3, 4, 4), ("x",), "images").to_bytes()
    tampered = blob.replace(b'"format_version":"1"', b'"format_version":"9"')
    assert tampered != blob
    with pytest.raises(WireError, match="format_version='9'"):
        RewardRequest.from_bytes(tampered)


def test_request_validation_names_the_problem():
    with pytest.raises(WireError, match="2 inputs but 1 prompts"):
        RewardRequest(torch.zeros(2, 3, 4, 4), ("x",), "images")
    with pytest.raises(WireError, match="kind='pixels'"):
        RewardRequest(torch.zeros(1, 3, 4, 4), ("x",), "pixels")


# ------------------------------------------------------------------------------------------ engine
def _engine():
    return RewardEngine(RewardServiceSpec((("saturation", 0.6), ("contrast", 0.4)), name="t"))


def test_engine_batches_requests_and_returns_per_sample_gradients():
    eng = _engine()
    g = torch.Generator().manual_seed(0)
    xs = [torch.rand(n, 3, 8, 8, generator=g) for n in (1, 3)]
    prompts = [("a",), ("b", "c", "d")]
    out = eng.run([RewardRequest(x, p, "images") for x, p in zip(xs, prompts)])
    for x, p, o in zip(xs, prompts, out):
        for b in range(x.shape[0]):
            xb = x[b : b + 1].clone().requires_grad_(True)
            r = eng.reward(xb, [p[b]])
            (gb,) = torch.autograd.grad(r.sum(), xb)
            torch.testing.assert_close(o.rewards[b], r.detach()[0])
            torch.testing.assert_close(o.grad[b], gb[0])


def test_engine_without_decoder_refuses_latents():
    with pytest.raises(WireError, match="has no decoder"):
        _engine().run([RewardRequest(torch.zeros(1, 4, 8, 8), ("x",), "latents")])


class _InProcessClient:
    """The real engine behind the client interface (what a Serve replica runs), without Serve."""

    def __init__(self, engine):
        self.engine = engine

    def call(self, x, prompts, want_grad=True):
        req = RewardRequest.from_bytes(RewardRequest(x.detach(), tuple(prompts), "images", want_grad).to_bytes())
        return RewardResponse.from_bytes(self.engine.run([req])[0].to_bytes())


def test_served_reward_function_seeds_the_backward_like_autograd():
    eng = _engine()
    w = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3), requires_grad=True)
    prompts = ["p", "q"]
    weights = torch.tensor([0.3, -1.7])

    def images():
        return torch.sigmoid(w * 2.0)

    (g_direct,) = torch.autograd.grad((weights * eng.reward(images(), prompts)).sum(), w)
    (g_served,) = torch.autograd.grad((weights * served_reward(images(), prompts, _InProcessClient(eng))).sum(), w)
    torch.testing.assert_close(g_served, g_direct)


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


def test_entrypoint_parses_overrides_and_rejects_stray_arguments(capsys):
    from services.entrypoints.train import main, parse_args

    args, ov = parse_args(["--config", "x.yaml", "--method.k=3", "--train.steps=2"])
    assert args.config == "x.yaml" and ov == ["method.k=3", "train.steps=2"]
    with pytest.raises(SystemExit):
        parse_args(["--config", "x.yaml", "stray"])
    assert main(["--config", str(REPO / "deploy/configs/tiny.yaml"), "--train.steps=0"]) == 2
    assert "train.steps" in capsys.readouterr().err
