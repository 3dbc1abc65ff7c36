"""The four-axis surrogate: FlowBP-Sparse, -Bridge, -Lagrange, LeapAlign, and any other combination.

Axes (algorithms.md section 1):
  reward_input  "sample" (straight-through pinned true sample) | "posterior_mean" (last leap z_s - sigma_s v_s)
  active set    anchors "none" (K late-biased steps in one segment) | "j" (split at a sampled j: [0,j), [j,N))
                | "kj" (two leaps [k,j), [j,N)); jk_mode uniform | dirichlet, tail_ratio, max_j_rev
  weights       "euler" (every step) | "lagrange" (order-p supports) | "uniform"
  bridge        alpha in [0, 1] on the pinned intermediate state (0 = no nested path)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flowbp_core.methods import checks
from flowbp_core.methods.base import Plan, SegmentPlan
from flowbp_core.methods.common import EngineMethod, GuidanceParams
from flowbp_core.methods.registry import make_params, register
from flowbp_core.quadrature import SUPPORT_MODES, WEIGHT_SCHEMES, select_active_supports, support_indices
from flowbp_core.methods.indices import DEFAULT_DIRICHLET, JK_MODES, late_biased, sample_jk, split_budget, tail_start

ANCHOR_MODES = ("none", "j", "kj")
REWARD_INPUTS = ("sample", "posterior_mean")
SAMPLE_WEIGHTS = ("ones", "traj_sim")
RESCALE_SCOPES = ("global", "segment")


@dataclass(frozen=True)
class SurrogateParams(GuidanceParams):
    reward_input: str = "sample"
    anchors: str = "none"
    weights: str = "euler"
    k: int = 4  # active budget over Euler segments
    late_bias: float = 1.0
    gamma: float = 0.0  # per-step gradient rescale (grad_rescale)
    alpha: float = 0.0  # bridge coupling
    order: int = 3  # Lagrange / uniform support count per leap
    beta: float = 0.25  # backward scale of non-start active supports (grad_support_scale)
    support_mode: str = "midpoint"
    max_active_supports: int = 2
    lam: float = 1.0  # Euler/Lagrange blend of the first leap (anchor_lambda); later leaps are unblended
    tau: float = 0.1  # trajectory-similarity floor
    sample_weight: str = "ones"
    jk_mode: str = "uniform"
    dirichlet: tuple[float, float, float] = DEFAULT_DIRICHLET
    max_j_rev: int | None = None
    tail_ratio: float = 1.0
    window: int = 0  # first trainable step w0
    rescale: str = "global"
    n_steps: int | None = None  # if given, K <= N is checked at construction

    def validate(self) -> None:
        self.validate_guidance()
        checks.one_of("reward_input", self.reward_input, REWARD_INPUTS)
        checks.one_of("anchors", self.anchors, ANCHOR_MODES)
        checks.one_of("weights", self.weights, WEIGHT_SCHEMES)
        checks.integer("k", self.k, 1)
        checks.in_range("late_bias", self.late_bias, 0.0)
        checks.in_range("gamma", self.gamma, 0.0, 1.0)
        checks.in_range("alpha", self.alpha, 0.0, 1.0)
        checks.integer("order", self.order, 1)
        checks.in_range("beta", self.beta, 0.0)
        checks.one_of("support_mode", self.support_mode, SUPPORT_MODES)
        checks.integer("max_active_supports", self.max_active_supports, 1)
        checks.in_range("lam", self.lam, 0.0, 1.0)
        checks.in_range("tau", self.tau, 0.0, low_open=True)
        checks.one_of("sample_weight", self.sample_weight, SAMPLE_WEIGHTS)
        checks.one_of("jk_mode", self.jk_mode, JK_MODES)
        if len(self.dirichlet) != 3:
            checks.one_of("dirichlet", self.dirichlet, ["three concentrations (a_A, a_B, a_C)"])
        for a in self.dirichlet:
            checks.in_range("dirichlet", a, 0.0, low_open=True)
        if self.max_j_rev is not None:
            checks.integer("max_j_rev", self.max_j_rev, 2)
        checks.in_range("tail_ratio", self.tail_ratio, 0.0, 1.0, low_open=True)
        checks.integer("window", self.window, 0)
        checks.one_of("rescale", self.rescale, RESCALE_SCOPES)
        if self.anchors != "none" and self.weights == "euler":
            checks.integer("k", self.k, 2)  # one active step on each side of the split
        if self.n_steps is not None:
            checks.integer("n_steps", self.n_steps, 1)
            self.check_n(self.n_steps)

    def check_n(self, n: int) -> None:
        if self.weights == "euler":
            checks.k_within(self.k, n - max(self.window, tail_start(n, self.tail_ratio)))
        if self.window >= n:
            checks.integer("window", self.window, 0, n - 1)
        if self.anchors != "none" and n < 3:
            checks.integer("n_steps", n, 3)


class SurrogateMethod(EngineMethod):
    def __init__(self, name: str, params: SurrogateParams):
        self.name = name
        self.params = params

    def __repr__(self) -> str:
        return f"SurrogateMethod({self.name!r}, {self.params})"

    # ---- plan -----------------------------------------------------------------------------------------------
    def plan(self, n_steps: int, generator: torch.Generator) -> Plan:
        p = self.params
        p.check_n(n_steps)
        n = n_steps
        w0 = max(p.window, tail_start(n, p.tail_ratio))
        anchors: tuple[int, int] | None = None
        if p.anchors == "none":
            bounds = [(0, n)]
        else:
            k, j = sample_jk(
                n, generator, p.jk_mode, tail_ratio=p.tail_ratio, dirichlet_alphas=p.dirichlet, max_j_rev=p.max_j_rev
            )
            anchors = (k, j)
            bounds = [(0, j), (j, n)] if p.anchors == "j" else [(k, j), (j, n)]

        nodes = [self._nodes(s, e) for s, e in bounds]
        actives = self._actives(bounds, nodes, w0, generator)
        segs = []
        for idx, ((s, e), nd, act) in enumerate(zip(bounds, nodes, actives)):
            window = tuple(m for m in nd if m >= w0) if p.weights == "euler" else None
            segs.append(
                SegmentPlan(
                    start=s,
                    end=e,
                    nodes=tuple(nd),
                    quadrature=p.weights,
                    active=tuple(act),
                    bridge_alpha=p.alpha if idx > 0 else 0.0,
                    pin=True,
                    lam=p.lam if p.weights != "euler" and idx == 0 else 1.0,  # lam blends the first leap only
                    window=window,
                )
            )
        if p.reward_input == "posterior_mean":
            segs = self._posterior_tail(segs, n)
        return Plan(
            method=self.name,
            n_steps=n,
            segments=tuple(segs),
            anchors=anchors,
            gamma=p.gamma,
            rescale=p.rescale,
            sample_weight=p.sample_weight,
            tau=p.tau,
        )

    def _nodes(self, s: int, e: int) -> list[int]:
        if self.params.weights == "euler":
            return list(range(s, e))
        return support_indices(s, e, self.params.order)

    def _actives(self, bounds, nodes, w0: int, gen: torch.Generator) -> list[list[tuple[int, float]]]:
        p = self.params
        if p.weights != "euler":
            out = []
            for (s, _e), nd in zip(bounds, nodes):
                act = select_active_supports(nd, p.support_mode, p.max_active_supports)
                out.append([(m, 1.0 if m == s else p.beta) for m in act])
            return out
        if len(bounds) == 1:
            idx = late_biased(range(w0, bounds[0][1]), p.k, p.late_bias, gen)
            return [[(i, 1.0) for i in idx]]
        (s0, j), (_, n) = bounds
        pre_lo = max(s0, w0)
        # the anchor of a leap segment is always active: j always; k too when the first segment starts at k
        forced_pre = [s0] if p.anchors == "kj" and s0 >= w0 else []
        len_pre, len_post = max(j - pre_lo, 0), n - j
        if len_pre == 0:
            post = [j] + late_biased(range(j + 1, n), min(p.k, len_post) - 1, p.late_bias, gen, relative=True)
            return [[], [(i, 1.0) for i in post]]
        k_pre, k_post = split_budget(min(p.k, len_pre + len_post), len_pre, len_post)
        k_pre = max(k_pre, len(forced_pre))
        rest_pre = [i for i in range(pre_lo, j) if i not in forced_pre]
        pre = forced_pre + late_biased(rest_pre, min(k_pre - len(forced_pre), len(rest_pre)), p.late_bias, gen,
                                       relative=True)
        post = [j] + late_biased(range(j + 1, n), k_post - 1, p.late_bias, gen, relative=True)
        return [[(i, 1.0) for i in sorted(pre)], [(i, 1.0) for i in post]]

    def _posterior_tail(self, segs: list[SegmentPlan], n: int) -> list[SegmentPlan]:
        """Replace the last segment by an unpinned x0 leap z_s - sigma_s v_s (ReFL/DRTune-style reward input)."""
        last = segs[-1]
        if len(segs) > 1 or last.start > 0:
            s = last.start
            head = segs[:-1]
        else:
            # one segment [0, N): leap from its latest active step; the rest stays an Euler piece up to there
            act = last.active_nodes
            s = max(act)
            keep = tuple((m, b) for m, b in last.active if m < s)
            head = []
            if s > 0:
                nd = tuple(range(0, s))
                head = [SegmentPlan(start=0, end=s, nodes=nd, quadrature="euler", active=keep,
                                    window=tuple(m for m in nd if last.window is None or m in last.window))]
        bridge = last.bridge_alpha if head else 0.0
        leap = SegmentPlan(start=s, end=n, nodes=(s,), quadrature="lagrange", active=((s, 1.0),),
                           bridge_alpha=bridge, pin=False)
        return [*head, leap]


# ---- presets (algorithms.md sections 3 and 5; the reference's final configs) ---------------------------------
SPARSE = {
    None: dict(k=4, late_bias=1.0, gamma=0.5),
    "sd35": dict(k=4, late_bias=1.0, gamma=0.5),
    "flux1": dict(k=3, late_bias=2.0, gamma=1.0),
    "flux2": dict(k=4, late_bias=2.0, gamma=0.0),
}
BRIDGE = {
    None: dict(k=5, late_bias=4.0, gamma=0.0, alpha=0.5),
    "sd35": dict(k=5, late_bias=4.0, gamma=0.0, alpha=0.5),
    "flux1": dict(k=5, late_bias=2.0, gamma=1.0, alpha=0.1),
    "flux2": dict(k=3, late_bias=4.0, gamma=0.5, alpha=1.0),
}
_LAG_COMMON = dict(
    anchors="kj", weights="lagrange", order=3, support_mode="midpoint", beta=0.25, max_active_supports=2, lam=1.0,
    jk_mode="dirichlet", dirichlet=DEFAULT_DIRICHLET, sample_weight="traj_sim", rescale="segment",
)
LAGRANGE = {
    None: dict(_LAG_COMMON, alpha=0.1, tau=0.2, gamma=0.0, max_j_rev=10),
    "sd35": dict(_LAG_COMMON, alpha=0.1, tau=0.2, gamma=0.0, max_j_rev=10),
    "flux1": dict(_LAG_COMMON, alpha=0.1, tau=0.2, gamma=0.5),
    # the FLUX.2 Lagrange config leaves cfg_grad_norm_compensate at its default, true (train_flowbp_flux2.py)
    "flux2": dict(_LAG_COMMON, alpha=0.1, tau=0.1, gamma=0.0, tail_ratio=0.7, cfg_grad_norm_compensate=True),
}
_LEAP = dict(anchors="kj", weights="lagrange", order=1, support_mode="start", alpha=0.3, tau=0.1,
             jk_mode="uniform", sample_weight="traj_sim", rescale="segment")
LEAPALIGN = {b: dict(_LEAP) for b in (None, "sd35", "flux1", "flux2")}
LEAPALIGN["sd35"]["detach_negative"] = False  # sd3_5_leapalign.yaml: cfg_detach_neg false, both branches carry grad


def _factory(name: str, presets: dict, fixed: dict):
    def factory(backbone: str | None, **overrides) -> SurrogateMethod:
        preset = {**fixed, **presets[backbone]}
        return SurrogateMethod(name, make_params(SurrogateParams, preset, overrides))

    factory.__name__ = f"build_{name}"
    return factory


register("flowbp_sparse")(_factory("flowbp_sparse", SPARSE, {}))
register("flowbp_bridge")(_factory("flowbp_bridge", BRIDGE, dict(anchors="j", jk_mode="uniform")))
register("flowbp_lagrange")(_factory("flowbp_lagrange", LAGRANGE, {}))
register("leapalign")(_factory("leapalign", LEAPALIGN, {}))
# any other combination of the axes, from config: everything explicit, generic defaults
register("surrogate")(_factory("surrogate", {b: {} for b in (None, "sd35", "flux1", "flux2")}, {}))
