"""Index samplers: late-biased active sets and (k, j) anchors.

Every draw goes through an explicit CPU `torch.Generator`. Seed it identically on every rank (the reference's
`select_idx_seed`) and all ranks pick the same indices, which keeps FSDP graph shapes consistent. Nothing here
touches the global RNG.

Index conventions: forward indices 0..N-1 (0 = noise step). The anchor sampler works in reverse indices
rev = N - i in [min_idx, max_idx) = [1, N+1) by default, as the reference does, and returns forward k < j.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from flowbp_core.errors import ConfigError

JK_MODES = ("uniform", "dirichlet")
DEFAULT_DIRICHLET = (2.5, 6.0, 2.0)


def _check_gen(generator: torch.Generator) -> None:
    if not isinstance(generator, torch.Generator):
        raise TypeError("samplers need an explicit torch.Generator (seed it identically on every rank)")


def tail_start(n_steps: int, tail_ratio: float) -> int:
    """First forward index of the final ceil(rho * N) steps (rho = 1 -> 0)."""
    if not 0.0 < tail_ratio <= 1.0:
        raise ConfigError("tail_ratio", tail_ratio, "a value in (0, 1]")
    return n_steps - math.ceil(tail_ratio * n_steps - 1e-9)


def late_biased(
    indices: Sequence[int], k: int, bias: float, generator: torch.Generator, *, relative: bool = False
) -> list[int]:
    """Draw k distinct indices from `indices` without replacement, P(i) proportional to (i+1)^bias, sorted.

    relative=True weights by (offset+1)^bias, the offset counted from the first index (Bridge segments).
    """
    _check_gen(generator)
    idx = list(indices)
    if k < 0 or k > len(idx):
        raise ConfigError("k", k, f"an integer in [0, {len(idx)}] (the size of the window)")
    if k == 0:
        return []
    base = idx[0] if relative else 0
    w = torch.tensor([float(i - base + 1) ** bias for i in idx], dtype=torch.float64)
    pick = torch.multinomial(w, k, replacement=False, generator=generator)
    return sorted(idx[int(p)] for p in pick)


def evenly_spaced(last: int, k: int, generator: torch.Generator) -> list[int]:
    """k indices in [0, last] with stride floor(T/k), T = last+1, and a start uniform in [0, T-1-(k-1)*stride]
    (DRTune, as the reference draws them): `last` itself is trained whenever the start takes its largest value."""
    _check_gen(generator)
    total = last + 1
    if k < 1 or k > total:
        raise ConfigError("k", k, f"an integer in [1, {total}]")
    if k == total:
        return list(range(total))
    stride = total // k
    max_start = total - 1 - (k - 1) * stride
    start = int(torch.randint(0, max_start + 1, (1,), generator=generator))
    return [start + m * stride for m in range(k)]


def split_budget(k: int, len_pre: int, len_post: int) -> tuple[int, int]:
    """Split K in proportion to segment lengths, each side at least 1 and at most its length (Bridge)."""
    if k < 2:
        raise ConfigError("k", k, "an integer >= 2 (a split trajectory needs one active step on each side)")
    if k > len_pre + len_post:
        raise ConfigError("k", k, f"an integer <= {len_pre + len_post} (the window length)")
    pre = round(k * len_pre / (len_pre + len_post))
    pre = max(1, min(k - 1, pre))
    post = k - pre
    # never ask a side for more than it has; move the excess across
    if pre > len_pre:
        pre, post = len_pre, k - len_pre
    if post > len_post:
        pre, post = k - len_post, len_post
    return pre, post


def _gamma(shape: float, generator: torch.Generator) -> float:
    """One Gamma(shape, 1) draw from the given generator (Marsaglia-Tsang; boosted for shape < 1).

    torch.distributions cannot take a generator, and rank-identical anchors need one.
    """
    if shape < 1.0:
        u = float(torch.rand((), generator=generator, dtype=torch.float64))
        return _gamma(shape + 1.0, generator) * u ** (1.0 / shape)
    d = shape - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    while True:
        x = float(torch.randn((), generator=generator, dtype=torch.float64))
        v = (1.0 + c * x) ** 3
        if v <= 0:
            continue
        u = float(torch.rand((), generator=generator, dtype=torch.float64))
        if math.log(max(u, 1e-300)) < 0.5 * x * x + d - d * v + d * math.log(v):
            return d * v


def dirichlet(alphas: Sequence[float], generator: torch.Generator) -> list[float]:
    _check_gen(generator)
    if len(alphas) < 2 or any(not a > 0 for a in alphas):
        raise ConfigError("dirichlet", list(alphas), "two or more concentrations, each > 0")
    g = [_gamma(float(a), generator) for a in alphas]
    s = sum(g)
    return [x / s for x in g]


def sample_jk(
    n_steps: int,
    generator: torch.Generator,
    mode: str = "uniform",
    *,
    min_idx: int = 1,
    max_idx: int | None = None,
    tail_ratio: float = 1.0,
    dirichlet_alphas: Sequence[float] = DEFAULT_DIRICHLET,
    max_j_rev: int | None = None,
) -> tuple[int, int]:
    """Anchors (k, j) with 0 <= k < j < N (forward indices).

    uniform: two distinct reverse indices uniform in [min_idx, max_idx), sorted; with max_j_rev, j_rev uniform in
    [min_idx, min(max_j_rev, max_idx - 2)] and then k_rev uniform in (j_rev, max_idx) (the reference's cap).
    dirichlet: p ~ Dir(a_A, a_B, a_C) splits the n = max_idx - min_idx reverse steps into three segments
    (`dirichlet_lengths`); j_rev = L_A + min_idx, k_rev = L_A + L_B + min_idx. max_j_rev caps j_rev, moving the
    overflow into segment C. tail_ratio rho restricts both anchors to the final ceil(rho*N) steps.
    """
    _check_gen(generator)
    if mode not in JK_MODES:
        raise ConfigError("jk_mode", mode, f"one of {list(JK_MODES)}")
    hi = n_steps + 1 if max_idx is None else int(max_idx)
    hi = min(hi, n_steps - tail_start(n_steps, tail_ratio) + 1)
    if min_idx < 1:
        raise ConfigError("min_idx", min_idx, "an integer >= 1 (reverse index 0 is the clean sample)")
    n = hi - min_idx
    if mode == "uniform":
        j_rev, k_rev = _uniform_revs(n, min_idx, hi, max_j_rev, n_steps, generator)
    else:
        if n < 3:
            raise ConfigError("n_steps", n_steps, "at least 3 eligible steps for dirichlet anchors")
        if len(dirichlet_alphas) != 3:
            raise ConfigError("dirichlet", list(dirichlet_alphas), "three concentrations (a_A, a_B, a_C)")
        lens = dirichlet_lengths(dirichlet(dirichlet_alphas, generator), n)
        j_rev = lens[0] + min_idx
        if max_j_rev is not None and j_rev > max_j_rev:
            over = min(j_rev - max_j_rev, lens[0] - 1)
            lens[0] -= over
            lens[2] += over
            j_rev = lens[0] + min_idx
        k_rev = lens[0] + lens[1] + min_idx
    k, j = n_steps - k_rev, n_steps - j_rev
    assert 0 <= k < j < n_steps, (k, j, n_steps)
    return k, j


def _uniform_revs(n: int, lo: int, hi: int, max_j_rev: int | None, n_steps: int,
                  generator: torch.Generator) -> tuple[int, int]:
    """(j_rev, k_rev) for uniform anchors in [lo, hi); a cap on j_rev draws j first, then k above it."""
    if n < 2:
        raise ConfigError("n_steps", n_steps, "at least 2 eligible steps for two anchors")
    if max_j_rev is None:
        pick = torch.randperm(n, generator=generator)[:2] + lo
        j_rev, k_rev = sorted(int(p) for p in pick)
        return j_rev, k_rev
    j_hi = min(int(max_j_rev), hi - 2)
    if j_hi < lo:
        raise ConfigError("max_j_rev", max_j_rev, f"an integer in [{lo}, {hi - 2}] for uniform anchors here")
    j_rev = int(torch.randint(lo, j_hi + 1, (1,), generator=generator))
    k_rev = int(torch.randint(j_rev + 1, hi, (1,), generator=generator))
    return j_rev, k_rev


def dirichlet_lengths(p: Sequence[float], n: int) -> list[int]:
    """Segment lengths round(p*n) repaired as the reference does: the deficit goes to argmax(p), every length
    is clamped to >= 1, and what the clamp added comes off argmax(lengths) (first index on ties)."""
    lens = [round(x * n) for x in p]
    lens[_argmax(p)] += n - sum(lens)
    lens = [max(1, x) for x in lens]
    lens[_argmax(lens)] += n - sum(lens)
    return lens


def _argmax(xs: Sequence[float]) -> int:
    return max(range(len(xs)), key=lambda t: (xs[t], -t))
