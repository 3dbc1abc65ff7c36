"""Types every method shares: the sampled Plan, the Endpoint the reward is computed on, its Diagnostics, and
the Method protocol. A Plan is plain data (ints, floats, tuples) so that the rollout worker and the learner can
agree on it across processes (`Plan.to_json`, e.g. in `TrajectoryCache.meta["plan"]`)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Protocol, runtime_checkable

import torch

from flowbp_core.cache import CacheNeeds, TrajectoryCache
from flowbp_core.sampling import VelocityFn



@dataclass(frozen=True)
class SegmentPlan:
    """One connector piece z_start -> z_end: z_hat_end = z_start + sum_m w_m V_m over `nodes`.

    quadrature: "euler" (nodes = every step of [start, end), w = h_i), "lagrange" or "uniform" (support nodes).
    active: (node, beta) pairs re-forwarded with grad; each enters as sg(u) + beta*g*(u - sg(u)).
    bridge_alpha > 0: the start node is re-forwarded on the pinned incoming state sg(z) + alpha*(z - sg(z)),
    the one nested path through a state Jacobian; 0 keeps every model input detached.
    pin: the end is straight-through pinned to the cached true state (False only for a posterior-mean leap).
    lam: Euler/Lagrange blend z_eul + lam*(z_lag - z_eul) (the reference's anchor_lambda).
    window: nodes whose |w| count as the trainable mass in the gradient rescale (None = all nodes).
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


@dataclass(frozen=True)
class Plan:
    """What one learner step will do, sampled once per step (same generator seed -> same plan on every rank).

    Surrogate methods fill `segments`; the chained references set `chain_start` (backprop through the true Euler
    chain from that step on) and optionally `chain_active` (the chain steps whose velocity carries gradient; the
    others add their cached velocity, so their factor is the identity; None = every step from chain_start).
    `renoise` > 0 adds DRaFT-LV's re-noised copies of the last step.
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


@dataclass
class Diagnostics:
    """Per-step facts about the gradient path, logged every step.

    residual_j / residual_0: per-sample mean |true - surrogate| at the first intermediate pin and at the end
    (for an unpinned posterior-mean endpoint: distance of the scored value from the true sample).
    jacobian_factors: from the plan (tests verify it against the graph). grad_norm: filled by the trainer.
    """

    active: list[int]
    anchors: tuple[int, int] | None
    residual_j: torch.Tensor | None
    residual_0: torch.Tensor | None
    jacobian_factors: int
    grad_norm: float | None = None
    extra: dict[str, float] = field(default_factory=dict)


@dataclass
class Endpoint:
    """value[b] is scored for prompt cache.prompts[sample_index[b]] with per-row weight weights[b] (detached)."""

    value: torch.Tensor
    weights: torch.Tensor
    sample_index: torch.Tensor
    diagnostics: Diagnostics


@runtime_checkable
class Method(Protocol):
    name: str

    def plan(self, n_steps: int, generator: torch.Generator) -> Plan: ...

    def needs(self, plan: Plan, n_steps: int) -> CacheNeeds: ...

    def endpoint(
        self,
        cache: TrajectoryCache,
        velocity: VelocityFn,
        generator: torch.Generator | None = None,
        plan: Plan | None = None,
    ) -> Endpoint: ...
