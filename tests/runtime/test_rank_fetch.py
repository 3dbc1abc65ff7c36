"""Each learner rank fetches only its rows of a step (issue 18, item 5): the rollout shards come back cut at the
learner ranks' bounds, rank r reads its pieces alone, as views into the object store, and the bytes it fetched
are its pieces' bytes. Real rollouts of the tiny SD3 put in a real local Ray; no learner group (tests/runtime/
test_ray_runtime.py runs two gloo ranks end to end and checks the same bytes there)."""

from __future__ import annotations

import hashlib

import pytest
import torch

from tests.tiny_runs import PROMPTS, tiny_cfg

pytestmark = pytest.mark.integration

BATCH, WORKERS, LEARNERS = 6, 4, 2  # shards [0,2) [2,4) [4,5) [5,6); ranks [0,3) [3,6): shard [2,4) is cut


def _cache_tensors(c) -> dict[str, torch.Tensor]:
    return {"noise": c.noise, "final": c.final, "sigmas": c.sigmas, **{f"s{i}": t for i, t in c.states.items()},
            **{f"v{i}": t for i, t in c.velocities.items()}, **{f"c.{k}": t for k, t in c.cond.items()}}


def _assert_same(a, b) -> None:
    ta, tb = _cache_tensors(a), _cache_tensors(b)
    assert set(ta) == set(tb)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k
    assert a.prompts == b.prompts and a.plan == b.plan and a.policy_version == b.policy_version


@pytest.fixture(scope="module")
def step(ray_client, tmp_path_factory):
    """One step's pieces from 4 rollout shards put in the object store, and the same shards uncut."""
    import ray

    from flowbp_core.step import step_plan
    from services.runtime.layout import rank_pieces, shard_bounds
    from services.runtime.payloads import LearnerWork, RolloutRequest
    from services.runtime.rollout import RolloutCore

    torch.set_num_threads(1)
    cfg = tiny_cfg(tmp_path_factory.mktemp("fetch"), "fetch", train={"batch_size": BATCH},
                   runtime={"learners": LEARNERS, "rollout_workers": WORKERS})
    core = RolloutCore(cfg)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(BATCH)]
    plan = step_plan(core.comp.method, core.comp.n_steps, 0, 3)

    def req(a, b):
        return RolloutRequest(step=3, seed=0, prompts=tuple(prompts[a:b]), weights=None, total_batch=BATCH, plan=plan)

    rank_refs: list[list] = [[] for _ in range(LEARNERS)]
    rank_bytes = [0] * LEARNERS
    uncut = []
    for a, b in shard_bounds(BATCH, WORKERS):
        cut = rank_pieces(a, b, BATCH, LEARNERS)
        pieces, stats = core.run(req(a, b), a, tuple((s, e) for s, e, _ in cut))
        assert stats.piece_nbytes == tuple(p.nbytes for p in pieces)
        for (_, _, r), p in zip(cut, pieces):
            rank_refs[r].append(ray.put(p))
            rank_bytes[r] += p.nbytes
        uncut.append(core.run(req(a, b), a)[0][0])
    work = LearnerWork(step=3, rank_refs=tuple(tuple(r) for r in rank_refs), rollout_policy_version=0)
    return cfg, work, rank_bytes, uncut


def test_each_rank_fetches_exactly_its_pieces_and_rows(step):
    """Rank r's fetched bytes are its pieces' bytes (each rank well under the step's) and its rows are rows
    [3r, 3r + 3) of the uncut shards joined, tensor for tensor."""
    from flowbp_core.cache import TrajectoryCache
    from services.runtime.learner import concat_caches, fetch_rows

    cfg, work, rank_bytes, uncut = step
    ref = concat_caches([TrajectoryCache.from_bytes(u.tobytes()) for u in uncut])
    share = BATCH // LEARNERS
    fetched = []
    for r in range(LEARNERS):
        cache, nbytes = fetch_rows(work, r, LEARNERS, BATCH)
        fetched.append(nbytes)
        _assert_same(cache, ref.rows(r * share, (r + 1) * share))
    assert fetched == rank_bytes
    # Together the ranks read the step once; alone each reads its share (the shared conditioning once a piece).
    assert all(n < 0.75 * sum(rank_bytes) for n in fetched), (fetched, rank_bytes)


def test_a_piece_is_read_without_a_copy_and_training_leaves_it_untouched(step, tmp_path):
    """`ray.get` of a piece maps the object store (a read-only numpy view) and every cache tensor lies inside
    that buffer; a learner step on it leaves the object's bytes as they were (nothing writes into the views)."""
    import ray

    from services.runtime.learner import LearnerRank, read_pieces

    cfg, _, _, uncut = step
    ref = ray.put(uncut[0])
    (buf,) = ray.get([ref])
    assert not buf.flags.writeable  # Ray's zero-copy read from shared memory
    cache, nbytes = read_pieces([buf])
    lo, hi = buf.ctypes.data, buf.ctypes.data + buf.nbytes
    for k, t in _cache_tensors(cache).items():
        if t.numel():
            assert lo <= t.data_ptr() and t.data_ptr() + t.numel() * t.element_size() <= hi, k
    assert nbytes == buf.nbytes
    before = hashlib.sha256(buf.tobytes()).hexdigest()
    one = cfg.model_copy(update={"reward": cfg.reward.model_copy(update={"placement": "colocated"}),
                                 "runtime": cfg.runtime.model_copy(update={"learners": 1}),
                                 "checkpoint": cfg.checkpoint.model_copy(update={"dir": str(tmp_path)})})
    res = LearnerRank(one, "untouched").train(3, cache)
    assert not res.skipped
    assert hashlib.sha256(buf.tobytes()).hexdigest() == before
