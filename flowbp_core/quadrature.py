"""Integration weights for a leap z_s -> z_e: Euler, Lagrange quadrature of order p, or uniform.

A leap predicts z_e = z_s + sum_m w_m v_m from velocities at support nodes m. Lagrange weights are the integrals
of the Lagrange basis polynomials in sigma over [sigma_s, sigma_e], so a velocity that is a polynomial of degree
<= p-1 in sigma is integrated exactly, the weights sum to sigma_e - sigma_s, and p = 1 is the Euler leap.
Everything here is float64 (sigma differences of order 1e-2 and small Vandermonde-like products); callers cast.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from flowbp_core.errors import ConfigError

WEIGHT_SCHEMES = ("euler", "lagrange", "uniform")
SUPPORT_MODES = ("start", "midpoint", "all")


def support_indices(s: int, e: int, order: int) -> list[int]:
    """p support nodes spread over [s, e-1]; s always first, the target e never a node.

    If the interval has at most p steps, every step is a node. Otherwise nodes are I[round(q)] for q in
    linspace(0, |I|-1, p) (round half to even, as numpy does), deduplicated.
    """
    if order < 1:
        raise ConfigError("order", order, "an integer >= 1")
    if not 0 <= s < e:
        raise ValueError(f"leap [{s}, {e}) is empty: need 0 <= s < e")
    span = list(range(s, e))
    if len(span) <= order:
        return span
    qs = np.linspace(0.0, len(span) - 1, order)
    nodes = [span[int(round(float(q)))] for q in qs]
    nodes[0] = s
    out: list[int] = []
    for m in nodes:
        if m not in out:
            out.append(m)
    return out


def lagrange_weights(node_sigmas: Sequence[float], sigma_s: float, sigma_e: float) -> np.ndarray:
    """w_m = integral_{sigma_s}^{sigma_e} ell_m(sigma) d sigma, float64.

    Gauss-Legendre with p points integrates the degree p-1 basis exactly, and avoids forming monomial
    coefficients (ill-conditioned when nodes cluster near sigma = 0).
    """
    x = np.asarray(node_sigmas, dtype=np.float64)
    p = x.size
    if p == 0:
        raise ValueError("a leap needs at least one support node")
    if np.unique(x).size != p:
        raise ValueError(f"support sigmas must be distinct, got {x.tolist()}")
    gx, gw = np.polynomial.legendre.leggauss(max(p, 1))
    half = 0.5 * (sigma_e - sigma_s)
    t = sigma_s + half * (gx + 1.0)  # Gauss points mapped to [sigma_s, sigma_e] (oriented)
    w = np.empty(p, dtype=np.float64)
    for m in range(p):
        ell = np.ones_like(t)
        for n in range(p):
            if n != m:
                ell *= (t - x[n]) / (x[m] - x[n])
        w[m] = half * float(np.dot(gw, ell))
    return w


def leap_weights(scheme: str, nodes: Sequence[int], sigmas: Sequence[float], s: int, e: int) -> np.ndarray:
    """Weights for the nodes of leap [s, e) under a scheme, float64.

    euler: h_i = sigma_{i+1} - sigma_i for each node (nodes must be the consecutive steps s..e-1);
    lagrange: integrals of the Lagrange basis; uniform: (sigma_e - sigma_s) / |nodes|.
    """
    sig = [float(v) for v in sigmas]
    if scheme == "euler":
        if list(nodes) != list(range(s, e)):
            raise ValueError(f"euler weights need every step of [{s}, {e}) as a node, got {list(nodes)}")
        return np.array([sig[i + 1] - sig[i] for i in nodes], dtype=np.float64)
    if scheme == "lagrange":
        return lagrange_weights([sig[m] for m in nodes], sig[s], sig[e])
    if scheme == "uniform":
        return np.full(len(nodes), (sig[e] - sig[s]) / len(nodes), dtype=np.float64)
    raise ConfigError("weights", scheme, f"one of {list(WEIGHT_SCHEMES)}")


def select_active_supports(nodes: Sequence[int], mode: str, max_active: int) -> list[int]:
    """Which supports are re-forwarded with grad: start = {s}; midpoint = the first two; all; capped."""
    if mode not in SUPPORT_MODES:
        raise ConfigError("support_mode", mode, f"one of {list(SUPPORT_MODES)}")
    if max_active < 1:
        raise ConfigError("max_active_supports", max_active, "an integer >= 1")
    count = {"start": 1, "midpoint": 2, "all": len(nodes)}[mode]
    return list(nodes)[: min(count, max_active, len(nodes))]
