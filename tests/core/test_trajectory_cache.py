import json
import struct

import pytest
import torch

from flowbp_core.cache import FORMAT_VERSION, CacheNeeds, TrajectoryCache
from flowbp_core.sampling import rollout
from flowbp_core.schedules import make_schedule


def _field(dim=6):
    g = torch.Generator().manual_seed(1)
    a = torch.randn(dim, dim, generator=g) * 0.3
    b = torch.randn(dim, generator=g)
    return lambda x, sigma: (x.float() @ a.T + sigma * b).to(x.dtype)


def _cache(n=6, b=3, dtype=torch.bfloat16, **kw):
    noise = torch.randn(b, 6, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(5)
    cond = {"prompt_embeds": torch.randn(b, 4, 5, generator=g), "negative": torch.randn(1, 4, 5, generator=g)}
    return rollout(_field(), noise, make_schedule("sd3", n).sigmas, seed=7, policy_version=3, cond=cond,
                   prompts=[f"p{i}" for i in range(b)], state_dtype=dtype, meta={"run": "x"}, **kw)


def _same(a: TrajectoryCache, b: TrajectoryCache):
    assert torch.equal(a.noise, b.noise) and a.noise.dtype == b.noise.dtype
    assert torch.equal(a.final, b.final) and torch.equal(a.sigmas, b.sigmas)
    assert a.states.keys() == b.states.keys() and a.velocities.keys() == b.velocities.keys()
    for i in a.states:
        assert torch.equal(a.states[i], b.states[i]) and a.states[i].dtype == b.states[i].dtype
    for i in a.velocities:
        assert torch.equal(a.velocities[i], b.velocities[i])
    assert a.cond.keys() == b.cond.keys()
    for k in a.cond:
        assert torch.equal(a.cond[k], b.cond[k])
    assert (a.seed, a.policy_version, a.prompts, a.meta) == (b.seed, b.policy_version, b.prompts, b.meta)


def test_bytes_roundtrip_is_exact_and_versioned():
    c = _cache()
    blob = c.to_bytes()
    (hlen,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + hlen])
    assert header["__metadata__"]["format_version"] == FORMAT_VERSION
    back = TrajectoryCache.from_bytes(blob)
    _same(c, back)
    assert back.final.dtype == torch.float32 and back.states[1].dtype == torch.bfloat16
    assert back.sigmas.dtype == torch.float64


def test_unknown_format_version_is_refused():
    blob = bytearray(_cache().to_bytes())
    s = bytes(blob).replace(b'"format_version":"1"', b'"format_version":"9"')
    assert s != bytes(blob)
    with pytest.raises(ValueError, match="format_version"):
        TrajectoryCache.from_bytes(s)


def test_nbytes_counts_every_tensor():
    c = _cache(n=6, b=3)
    lat = 3 * 6 * 2  # bf16 latent
    expected = lat + 7 * 8 + 3 * 6 * 4 + 5 * lat + 6 * lat + (3 * 20 + 20) * 4
    assert c.nbytes() == expected


def test_state_and_velocity_access():
    c = _cache(n=6)
    assert c.n_steps == 6 and c.batch_size == 3
    assert c.state(0) is c.noise and c.state(6) is c.final
    assert torch.equal(c.state(3), c.states[3])
    with pytest.raises(IndexError):
        c.velocity(6)
    with pytest.raises(IndexError):
        c.state(7)


def test_compact_keeps_exactly_what_is_needed():
    c = _cache(n=6)
    small = c.compact(CacheNeeds(states=frozenset({0, 2, 6}), velocities=frozenset({1, 4})))
    assert sorted(small.states) == [2] and sorted(small.velocities) == [1, 4]
    assert small.nbytes() < c.nbytes()
    with pytest.raises(KeyError, match=r"z_3 was not kept"):
        small.state(3)
    with pytest.raises(KeyError, match=r"velocities \[2\]"):
        small.compact(CacheNeeds(states=None, velocities=frozenset({2})))
    assert small.compact(CacheNeeds()).states.keys() == small.states.keys()
    _same(TrajectoryCache.from_bytes(small.to_bytes()), small)


def test_rollout_with_needs_equals_compacted_full_rollout():
    needs = CacheNeeds(states=frozenset({3}), velocities=frozenset({0, 5}))
    _same(_cache(needs=needs), _cache().compact(needs))


def test_split_and_to():
    c = _cache(b=5)
    parts = c.split(2)
    assert [p.batch_size for p in parts] == [2, 2, 1]
    assert parts[2].prompts == ["p4"] and parts[2].meta["batch_offset"] == "4"
    assert torch.equal(parts[1].states[2], c.states[2][2:4])
    assert parts[1].cond["prompt_embeds"].shape[0] == 2 and parts[1].cond["negative"].shape[0] == 1
    _same(TrajectoryCache.from_bytes(parts[1].to_bytes()), parts[1])
    moved = c.to("cpu")
    _same(moved, c)


def test_construction_validates_shapes_and_dtypes():
    c = _cache()
    with pytest.raises(ValueError, match="final must be float32"):
        TrajectoryCache(noise=c.noise, states={}, velocities={}, sigmas=c.sigmas, final=c.final.bfloat16())
    with pytest.raises(ValueError, match="states key 0"):
        TrajectoryCache(noise=c.noise, states={0: c.noise}, velocities={}, sigmas=c.sigmas, final=c.final)
    with pytest.raises(ValueError, match="prompts"):
        TrajectoryCache(noise=c.noise, states={}, velocities={}, sigmas=c.sigmas, final=c.final, prompts=["a"])
