"""Noise schedules for flow-matching samplers (SD3 static shift, FLUX.1 / FLUX.2 dynamic shift).

Index convention (docs/interfaces.md): steps i = 0..N-1, sigma_0 = 1 > ... > sigma_N = 0,
h_i = sigma_{i+1} - sigma_i < 0, z_{i+1} = z_i + h_i v_i. Sigmas are always float64 so that Lagrange weights and
step sizes are computed exactly once and then cast; the model sees `timesteps` on the scale its backbone expects.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from flowbp_core.errors import ConfigError

SCHEDULE_KINDS = ("linear", "sd3", "sd3_pipeline", "flux1", "flux2")
# the training grid of diffusers' FlowMatchEulerDiscreteScheduler: timesteps 1..1000
NUM_TRAIN_TIMESTEPS = 1000

# FLUX.1 `calculate_shift` defaults (diffusers FluxPipeline).
FLUX1_BASE_SEQ = 256
FLUX1_MAX_SEQ = 4096
FLUX1_BASE_SHIFT = 0.5
FLUX1_MAX_SHIFT = 1.15
# 512x512 pixels -> 64x64 latents -> 32x32 packed 2x2 tokens: the paper's training resolution.
DEFAULT_IMAGE_SEQ_LEN = 1024


def base_sigmas(n: int) -> torch.Tensor:
    """linspace(1, 1/n, n) in float64: the unshifted sigmas the diffusers pipelines pass (no terminal 0)."""
    if not isinstance(n, int) or n < 1:
        raise ConfigError("n_steps", n, "an integer >= 1")
    return torch.linspace(1.0, 1.0 / n, n, dtype=torch.float64)


def static_shift(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3 shift: s*sigma / (1 + (s-1)*sigma). Maps 1 -> 1 and 0 -> 0, pushes mass toward high noise for s > 1."""
    if not shift > 0:
        raise ConfigError("shift", shift, "a value > 0")
    s = torch.as_tensor(sigmas, dtype=torch.float64)
    return shift * s / (1.0 + (shift - 1.0) * s)


def dynamic_shift(sigmas: torch.Tensor, mu: float) -> torch.Tensor:
    """FLUX exponential time shift: e^mu / (e^mu + (1/sigma - 1)). sigma = 0 maps to 0 (the limit)."""
    s = torch.as_tensor(sigmas, dtype=torch.float64)
    e = math.exp(mu)
    out = torch.zeros_like(s)
    pos = s > 0
    out[pos] = e / (e + (1.0 / s[pos] - 1.0))
    return out


def flux1_mu(
    image_seq_len: int,
    base_seq_len: int = FLUX1_BASE_SEQ,
    max_seq_len: int = FLUX1_MAX_SEQ,
    base_shift: float = FLUX1_BASE_SHIFT,
    max_shift: float = FLUX1_MAX_SHIFT,
) -> float:
    """Linear interpolation of mu in the number of packed image tokens (FLUX.1 `calculate_shift`)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return float(image_seq_len * m + b)


def flux2_empirical_mu(image_seq_len: int, n: int) -> float:
    """FLUX.2's empirical mu(L, N): a line in N fitted between N = 10 and N = 200 (diffusers `compute_empirical_mu`)."""
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666
    if image_seq_len > 4300:
        return float(a2 * image_seq_len + b2)
    m_200 = a2 * image_seq_len + b2
    m_10 = a1 * image_seq_len + b1
    a = (m_200 - m_10) / 190.0
    b = m_200 - 200.0 * a
    return float(a * n + b)


@dataclass(frozen=True)
class Schedule:
    """A sampler schedule: float64 sigmas of length N+1 ending in 0, and the model's timestep scale.

    SD3 takes timesteps on 0..1000 (scale 1000); FLUX.1/FLUX.2 transformers take sigma itself (scale 1).
    """

    sigmas: torch.Tensor
    timestep_scale: float = 1000.0

    def __post_init__(self) -> None:
        s = torch.as_tensor(self.sigmas)
        if s.dtype != torch.float64:
            s = s.to(torch.float64)
        object.__setattr__(self, "sigmas", s)
        validate_sigmas(s)

    @property
    def n_steps(self) -> int:
        return int(self.sigmas.numel()) - 1

    @property
    def timesteps(self) -> torch.Tensor:
        return self.sigmas[:-1] * self.timestep_scale

    @property
    def h(self) -> torch.Tensor:
        """Euler step sizes h_i = sigma_{i+1} - sigma_i (negative), float64, length N."""
        return self.sigmas[1:] - self.sigmas[:-1]


def validate_sigmas(sigmas: torch.Tensor, field: str = "sigmas") -> None:
    """Raise ConfigError unless `sigmas` is 1-D, length >= 2, strictly decreasing, in (0, 1] and ending in 0."""
    s = torch.as_tensor(sigmas)
    if s.dim() != 1 or s.numel() < 2:
        raise ConfigError(f"{field}.shape", tuple(s.shape), "a 1-D tensor of length N+1 >= 2")
    if not torch.isfinite(s).all():
        raise ConfigError(field, s.tolist(), "finite values")
    if float(s[-1]) != 0.0:
        raise ConfigError(f"{field}[-1]", float(s[-1]), "0.0 (the schedule ends at sigma_N = 0)")
    d = s[1:] - s[:-1]
    if not bool((d < 0).all()):
        bad = int(torch.nonzero(d >= 0)[0])
        raise ConfigError(
            f"{field}[{bad + 1}]",
            float(s[bad + 1]),
            f"a value < {field}[{bad}]={float(s[bad])!r}: "
            "sigmas must be strictly decreasing (sigma_0 > ... > sigma_N = 0)",
        )
    if float(s[0]) > 1.0:
        raise ConfigError(f"{field}[0]", float(s[0]), "a value in (0, 1]")


def sd3_pipeline_sigmas(n: int, shift: float) -> torch.Tensor:
    """The SD3 pipeline's default spacing (it passes no sigmas): linspace(1, shifted 1/1000, n), shifted again.

    diffusers' scheduler spaces the timesteps between its shifted training-grid ends and then applies the shift
    to them; this is the schedule the reference evaluates SD3.5 with (its trainers pass linspace(1, 1/n, n)).
    """
    if not isinstance(n, int) or n < 1:
        raise ConfigError("n_steps", n, "an integer >= 1")
    low = float(static_shift(torch.tensor([1.0 / NUM_TRAIN_TIMESTEPS], dtype=torch.float64), shift)[0])
    return static_shift(torch.linspace(1.0, low, n, dtype=torch.float64), shift)


def _with_terminal(sig: torch.Tensor) -> torch.Tensor:
    return torch.cat([sig, torch.zeros(1, dtype=torch.float64)])


def make_schedule(kind: str, n_steps: int, *, shift: float = 3.0, image_seq_len: int | None = None) -> Schedule:
    """Build the schedule a backbone family samples with.

    linear: base sigmas, timesteps x1000. sd3: static shift (default 3.0), timesteps x1000. sd3_pipeline: the
    SD3 pipeline's default spacing (`sd3_pipeline_sigmas`), timesteps x1000.
    flux1: dynamic shift with mu = flux1_mu(L), timesteps = sigma. flux2: dynamic shift with the empirical
    mu(L, N), timesteps = sigma. L (`image_seq_len`, packed image tokens) defaults to 1024 (512x512).
    """
    if kind not in SCHEDULE_KINDS:
        raise ConfigError("schedule.kind", kind, f"one of {list(SCHEDULE_KINDS)}")
    base = base_sigmas(n_steps)
    seq = DEFAULT_IMAGE_SEQ_LEN if image_seq_len is None else int(image_seq_len)
    if seq < 1:
        raise ConfigError("image_seq_len", image_seq_len, "an integer >= 1")
    if kind == "linear":
        return Schedule(_with_terminal(base), 1000.0)
    if kind == "sd3":
        return Schedule(_with_terminal(static_shift(base, shift)), 1000.0)
    if kind == "sd3_pipeline":
        return Schedule(_with_terminal(sd3_pipeline_sigmas(n_steps, shift)), 1000.0)
    if kind == "flux1":
        return Schedule(_with_terminal(dynamic_shift(base, flux1_mu(seq))), 1.0)
    return Schedule(_with_terminal(dynamic_shift(base, flux2_empirical_mu(seq, n_steps))), 1.0)
