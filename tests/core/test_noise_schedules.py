import math

import pytest
import torch

from flowbp_core.errors import ConfigError
from flowbp_core.schedules import (
    Schedule,
    base_sigmas,
    dynamic_shift,
    flux1_mu,
    flux2_empirical_mu,
    make_schedule,
    static_shift,
)


def test_base_sigmas_are_linspace_in_float64():
    s = base_sigmas(4)
    assert s.dtype == torch.float64
    assert s.tolist() == [1.0, 0.75, 0.5, 0.25]


@pytest.mark.parametrize("kind", ["linear", "sd3", "flux1", "flux2"])
@pytest.mark.parametrize("n", [1, 10, 25])
def test_schedules_are_valid(kind, n):
    sch = make_schedule(kind, n)
    assert sch.sigmas.dtype == torch.float64
    assert sch.n_steps == n and sch.sigmas.numel() == n + 1
    assert sch.sigmas[0] == 1.0 and sch.sigmas[-1] == 0.0
    assert (sch.h < 0).all()
    assert torch.allclose(sch.h.sum(), torch.tensor(-1.0, dtype=torch.float64))
    assert sch.timesteps.numel() == n


def test_timestep_scales():
    assert make_schedule("sd3", 5).timestep_scale == 1000.0
    assert make_schedule("flux1", 5).timestep_scale == 1.0
    assert make_schedule("flux2", 5).timestep_scale == 1.0
    sch = make_schedule("sd3", 5)
    assert torch.equal(sch.timesteps, sch.sigmas[:-1] * 1000.0)


def test_sd3_shift_matches_documented_example():
    # algorithms.md section 4: SD3.5 (shift 3, N = 25): sigma_18 = .539, sigma_23 = .207, sigma_24 = .111
    s = make_schedule("sd3", 25).sigmas
    assert abs(float(s[18]) - 0.539) < 1e-3  # the doc rounds 0.5385 up
    assert round(float(s[23]), 3) == 0.207
    assert round(float(s[24]), 3) == 0.111


def test_flux1_mu_and_schedule_at_512():
    assert round(flux1_mu(1024), 2) == 0.63
    s = make_schedule("flux1", 25, image_seq_len=1024).sigmas
    assert round(float(s[18]), 3) == 0.422
    assert round(float(s[24]), 3) == 0.073


def test_shifts_match_diffusers_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    n = 25
    sd3 = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sd3.set_timesteps(sigmas=base_sigmas(n).numpy().astype("float32"))
    ours = make_schedule("sd3", n)
    assert torch.allclose(sd3.sigmas.double(), ours.sigmas, atol=1e-6)
    assert torch.allclose(sd3.timesteps.double(), ours.timesteps, atol=1e-3)

    fl = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    mu = flux1_mu(1024)
    fl.set_timesteps(sigmas=base_sigmas(n).numpy().astype("float32"), mu=mu)
    assert torch.allclose(fl.sigmas.double(), make_schedule("flux1", n).sigmas, atol=1e-6)


def test_flux2_empirical_mu_is_linear_in_steps_below_4300_tokens():
    a = flux2_empirical_mu(1024, 10)
    b = flux2_empirical_mu(1024, 200)
    assert math.isclose(a, 8.73809524e-05 * 1024 + 1.89833333, rel_tol=1e-9)
    assert math.isclose(b, 0.00016927 * 1024 + 0.45666666, rel_tol=1e-9)
    assert flux2_empirical_mu(5000, 10) == flux2_empirical_mu(5000, 50)


def test_shift_endpoints_fixed():
    x = torch.tensor([1.0, 0.0], dtype=torch.float64)
    assert static_shift(x, 3.0).tolist() == [1.0, 0.0]
    assert dynamic_shift(x, 0.7).tolist() == [1.0, 0.0]


def test_bad_schedules_raise_config_error_naming_the_field():
    with pytest.raises(ConfigError, match=r"sigmas\[2\].*strictly decreasing"):
        Schedule(torch.tensor([1.0, 0.5, 0.5, 0.0], dtype=torch.float64))
    with pytest.raises(ConfigError, match=r"sigmas\[-1\]"):
        Schedule(torch.tensor([1.0, 0.5, 0.1], dtype=torch.float64))
    with pytest.raises(ConfigError, match=r"sigmas\[1\]"):
        Schedule(torch.tensor([1.0, 1.2, 0.0], dtype=torch.float64))
    with pytest.raises(ConfigError, match="schedule.kind"):
        make_schedule("ddim", 10)
    with pytest.raises(ConfigError, match="n_steps"):
        make_schedule("sd3", 0)
