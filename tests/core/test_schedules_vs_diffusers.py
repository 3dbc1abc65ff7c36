"""Our sampler schedules equal diffusers' FlowMatchEulerDiscreteScheduler built from each real model's config.

The configs are the models' `scheduler/scheduler_config.json`, written here because the hubs are unreachable:
- SD3.5-Medium: stabilityai/stable-diffusion-3.5-medium, commit 94b13cc "SD3.5 Medium Public Release" (read from the
  mirror huggingface.co/frankjoshua/stable-diffusion-3.5-medium at 9e00742): num_train_timesteps 1000, shift 3.0;
  no dynamic shifting, no shift_terminal.
- FLUX.1-dev: black-forest-labs/FLUX.1-dev (read from its duplicate huggingface.co/multimodalart/FLUX.1-dev2pro-full,
  "Duplicate from ChuckMcSneed/FLUX.1-dev"): base_image_seq_len 256, base_shift 0.5, max_image_seq_len 4096,
  max_shift 1.15, num_train_timesteps 1000, shift 3.0, use_dynamic_shifting true.
- FLUX.2-Klein: Klein's own file was not in the stores we can search; the FLUX.2 family's diffusers config
  (huggingface.co/diffusers/flux2-bnb-4bit-modular and diffusers/FLUX.2-dev-bnb-4bit) reads base_image_seq_len 256,
  base_shift 0.5, max_image_seq_len 4096, max_shift 1.15, num_train_timesteps 1000, shift 3.0, shift_terminal
  null, time_shift_type "exponential", use_dynamic_shifting true. The Klein pipeline passes its own empirical mu,
  so only the last four matter.

How each is set: the reference trainers (RuoyuWang-2077/FlowBP, every `_prepare_timesteps`) and the FLUX
pipelines pass sigmas = linspace(1, 1/N, N) and mu; the SD3 pipeline passes neither (its own default spacing,
the schedule the reference evaluates SD3.5 with), which is `make_schedule("sd3_pipeline", N)` here.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from flowbp_core.schedules import make_schedule

SD35_MEDIUM = {"num_train_timesteps": 1000, "shift": 3.0}
FLUX1_DEV = {"base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
             "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True}
FLUX2_KLEIN = {**FLUX1_DEV, "shift_terminal": None, "time_shift_type": "exponential"}

STEPS = (10, 25, 28, 40, 50)
PIXELS = (512, 1024)


def _scheduler(config: dict):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_config(config)


def _tokens(px: int) -> int:
    """Image tokens of a FLUX.1 / FLUX.2 latent: 2x2-packed 1/8 latents = one token per 16x16 pixels."""
    return (px // 16) ** 2


def _assert_same(ours, sched) -> None:
    torch.testing.assert_close(ours.sigmas, sched.sigmas.double(), rtol=0, atol=2e-6)
    # diffusers' timesteps are sigma * 1000; a model that takes sigma itself has timestep_scale 1
    torch.testing.assert_close(ours.timesteps * (1000.0 / ours.timestep_scale), sched.timesteps.double(),
                               rtol=0, atol=2e-3)


def _linspace(n: int) -> np.ndarray:
    return np.linspace(1.0, 1 / n, n)


@pytest.mark.parametrize("n", STEPS)
def test_sd35_training_schedule_equals_diffusers_with_the_trainers_sigmas(n):
    sched = _scheduler(SD35_MEDIUM)
    sched.set_timesteps(n, sigmas=_linspace(n))
    _assert_same(make_schedule("sd3", n), sched)


@pytest.mark.parametrize("n", STEPS)
def test_sd35_pipeline_schedule_equals_diffusers_default_spacing(n):
    sched = _scheduler(SD35_MEDIUM)
    sched.set_timesteps(n)
    _assert_same(make_schedule("sd3_pipeline", n), sched)


@pytest.mark.parametrize("px", PIXELS)
@pytest.mark.parametrize("n", STEPS)
def test_flux1_schedule_equals_diffusers(n, px):
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    c = FLUX1_DEV
    mu = calculate_shift(_tokens(px), c["base_image_seq_len"], c["max_image_seq_len"], c["base_shift"],
                         c["max_shift"])
    sched = _scheduler(c)
    sched.set_timesteps(n, sigmas=_linspace(n), mu=mu)
    _assert_same(make_schedule("flux1", n, image_seq_len=_tokens(px)), sched)


@pytest.mark.parametrize("px", PIXELS)
@pytest.mark.parametrize("n", STEPS)
def test_flux2_schedule_equals_diffusers(n, px):
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

    sched = _scheduler(FLUX2_KLEIN)
    sched.set_timesteps(n, sigmas=_linspace(n), mu=compute_empirical_mu(_tokens(px), n))
    _assert_same(make_schedule("flux2", n, image_seq_len=_tokens(px)), sched)


def test_sd3_backbone_evaluates_on_the_pipeline_spacing_and_trains_on_linspace():
    from flowbp_core.backbones import build
    from flowbp_core.backbones.base import eval_schedule

    bb = build("sd3", tiny=True)
    torch.testing.assert_close(eval_schedule(bb, 40).sigmas, make_schedule("sd3_pipeline", 40).sigmas)
    torch.testing.assert_close(bb.schedule(25).sigmas, make_schedule("sd3", 25).sigmas)
    flux = make_schedule("flux1", 10)
    assert torch.equal(eval_schedule(SimpleNamespace(schedule=lambda n: flux), 10).sigmas, flux.sigmas)
