"""What one learner step will do, as plain data: the `Plan` a method samples, its `SegmentPlan` pieces, and the
`CacheNeeds` the rollout keeps for it. The issuer of a rollout samples the plan once; the rollout compacts the
cache to `plan.needs()` and carries the plan in `TrajectoryCache.plan`, so the learner (every rank) runs exactly
the plan the cache was kept for. Plain ints, floats and tuples, so `to_json` / `from_json` round-trip bitwise."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Iterable


@dataclass(frozen=True)
class CacheNeeds:
    """Which cached states / velocities a method will read. None means all of them.

    Attributes:
        states (frozenset[int] | None): indices i of the kept intermediate states z_i, 1 <= i <= N-1.
        velocities (frozenset[int] | None): indices i of the kept velocities v_i, 0 <= i <= N-1.
    """

    states: frozenset[int] | None = None
    velocities: frozenset[int] | None = None

    @staticmethod
    def of(states: Iterable[int] | None, velocities: Iterable[int] | None) -> "CacheNeeds":
        return CacheNeeds(
            None if states is None else frozenset(int(i) for i in states),
            None if velocities is None else frozenset(int(i) for i in velocities),
        )


@dataclass(frozen=True, kw_only=True)
class SegmentPlan:
    """One connector piece z_start -> z_end: z_hat_end = z_start + sum_m w_m V_m over `nodes`.

    Attributes:
        start (int), end (int): the piece's step indices, 0 <= start < end <= N.
        nodes (tuple[int, ...]): the velocity nodes summed (every step of [start, end) for "euler", the support
            nodes otherwise).
        quadrature (str): "euler" (w = h_i), "lagrange" or "uniform" (weights over the support nodes).
        active (tuple[tuple[int, float], ...]): (node, beta) pairs re-forwarded with grad; each enters as
            sg(u) + beta*g*(u - sg(u)).
        bridge_alpha (float): > 0 re-forwards the start node on the pinned incoming state sg(z) + alpha*(z - sg(z)),
            the one nested path through a state Jacobian; 0 keeps every model input detached.
        pin (bool): the end is straight-through pinned to the cached true state (False only for a posterior-mean
            leap).
        lam (float): Euler/Lagrange blend z_eul + lam*(z_lag - z_eul) (the reference's anchor_lambda).
        window (tuple[int, ...] | None): nodes whose |w| count as the trainable mass in the gradient rescale
            (None = all nodes).
    """

    start: int
    end: int
    nodes: tuple[int, ...]
    quadrature: str = "euler"
    active: tuple[tuple[int, float], ...] = ()
    bridge_alpha: float = 0.0
    pin: bool = True
    lam: float = 1.0
    window: tuple[int, ...] | None = None

    @property
    def active_nodes(self) -> tuple[int, ...]:
        return tuple(m for m, _ in self.active)


@dataclass(frozen=True, kw_only=True)
class Plan:
    """What one learner step will do, sampled once per step by whoever issues the rollout.

    Attributes:
        method (str): the registered name of the method that sampled it (its endpoint refuses another's plan).
        n_steps (int): N, the rollout's number of steps.
        segments (tuple[SegmentPlan, ...]): a surrogate method's connector pieces, in order from z_0 or z_k to z_N.
        chain_start (int | None): a chained reference backprops through the true Euler chain from this step on.
        chain_active (tuple[int, ...] | None): the chain steps whose velocity carries gradient (the others add their
            cached velocity, a factor of identity); None = every step from chain_start.
        anchors (tuple[int, int] | None): the sampled split points (k, j) of a two-anchor surrogate, for logs.
        gamma (float): the gradient rescale exponent (0 = no rescale).
        rescale (str): "global" or "segment": the trainable mass the rescale divides by.
        sample_weight (str): "ones" or "traj_sim" (1 / sum of the pinned connectors' residuals, floored at tau).
        tau (float): the floor of a residual in "traj_sim" weights.
        renoise (int): DRaFT-LV's re-noised copies of the last step (0 = none).
        noise_seed (int): the seed of DRaFT-LV's re-noising draws.
    """

    method: str
    n_steps: int
    segments: tuple[SegmentPlan, ...] = ()
    chain_start: int | None = None
    chain_active: tuple[int, ...] | None = None
    anchors: tuple[int, int] | None = None
    gamma: float = 0.0
    rescale: str = "global"
    sample_weight: str = "ones"
    tau: float = 0.1
    renoise: int = 0
    noise_seed: int = 0

    @property
    def active(self) -> list[int]:
        if self.chain_start is not None:
            return list(self.chain_steps)
        return sorted({m for s in self.segments for m in s.active_nodes})

    @property
    def chain_steps(self) -> tuple[int, ...]:
        """The grad-carrying steps of a chain plan (empty for a surrogate plan)."""
        if self.chain_start is None:
            return ()
        if self.chain_active is None:
            return tuple(range(self.chain_start, self.n_steps))
        return self.chain_active

    @property
    def jacobian_factors(self) -> int:
        """The most state-Jacobian factors on any gradient path, from the plan's structure alone.

        A chain has one per grad-carrying step after its first (from step a with every step active: N-a-1;
        inactive steps add a cached velocity and contribute the identity). A surrogate gets one
        per bridged segment whose incoming state already carries gradient (some earlier segment has an active
        node) and whose bridge is open (alpha > 0); the re-noised copies of DRaFT-LV use detached inputs.
        """
        if self.chain_start is not None:
            return max(len(self.chain_steps) - 1, 0)
        depth, grad_in = 0, False
        for seg in self.segments:
            if seg.bridge_alpha > 0 and grad_in and seg.start in seg.active_nodes:
                depth += 1
            if seg.active:
                grad_in = True
        return depth

    def needs(self) -> CacheNeeds:
        """Exactly the cached states / velocities the endpoint reads (the rollout keeps nothing else)."""
        if self.chain_start is not None:
            idle = frozenset(range(self.chain_start, self.n_steps)) - set(self.chain_steps)
            return CacheNeeds(frozenset({self.chain_start}) - {0}, idle)
        states: set[int] = set()
        vels: set[int] = set()
        for i, seg in enumerate(self.segments):
            if i == 0:
                states.add(seg.start)
            if seg.pin or i + 1 < len(self.segments):
                states.add(seg.end)
            act = set(seg.active_nodes)
            for m in act:
                if not (m == seg.start and seg.bridge_alpha > 0 and i > 0):
                    states.add(m)
            vels |= set(seg.nodes) - act
            if seg.lam != 1.0 and seg.start not in act:
                vels.add(seg.start)
        # z_0 and z_N always travel (noise, final); they are not "kept states"
        return CacheNeeds(frozenset(states - {0, self.n_steps}), frozenset(vels))

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @staticmethod
    def from_json(text: str) -> "Plan":
        d = json.loads(text)
        segs = tuple(
            SegmentPlan(
                start=s["start"],
                end=s["end"],
                nodes=tuple(s["nodes"]),
                quadrature=s["quadrature"],
                active=tuple((int(m), float(b)) for m, b in s["active"]),
                bridge_alpha=s["bridge_alpha"],
                pin=s["pin"],
                lam=s["lam"],
                window=None if s["window"] is None else tuple(s["window"]),
            )
            for s in d.pop("segments")
        )
        anchors = d.pop("anchors")
        chain_active = d.pop("chain_active", None)
        return Plan(segments=segs, anchors=None if anchors is None else tuple(anchors),
                    chain_active=None if chain_active is None else tuple(chain_active), **d)
