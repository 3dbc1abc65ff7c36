"""Save / load offline, errors that say what was expected, and exports that diffusers itself loads."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from flowbp_core import backbones
from flowbp_core.backbones import LoRAConfig
from flowbp_core.errors import ConfigError
from flowbp_core.export import LORA_FILE, MANIFEST

FAMILIES = ("sd3", "flux1", "flux2")
PROMPTS = ["a red cube", "two blue spheres"]


def _velocity(bb, seed=7):
    cond = bb.encode_prompts(PROMPTS)
    x = torch.randn(bb.latent_shape(2), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return bb.velocity(x, 0.55, cond)


@pytest.mark.parametrize("name", FAMILIES)
def test_save_and_load_back_offline(name, tiny_cache, saved_folder):
    path = saved_folder(name)
    loaded = backbones.build(name, str(path), local_files_only=True)
    assert type(loaded) is type(tiny_cache(name))
    assert loaded.finetune_mode == "full"  # trainable by default, as the paper fine-tunes all weights
    torch.testing.assert_close(_velocity(loaded), _velocity(tiny_cache(name)), rtol=1e-5, atol=1e-6)


def test_missing_path_says_what_was_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist: expected a local diffusers pipeline folder"):
        backbones.build("sd3", str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="has no model_index.json"):
        backbones.build("flux1", str(tmp_path))


def test_hub_id_not_in_the_cache_fails_offline():
    with pytest.raises(FileNotFoundError, match="FluxPipeline"):
        backbones.build("flux1", "no-such-org/no-such-model", local_files_only=True)


@pytest.mark.parametrize("folder,name", [("sd3", "flux1"), ("flux1", "flux2"), ("flux2", "sd3")])
def test_wrong_model_type_in_folder(folder, name, saved_folder):
    found = json.loads((saved_folder(folder) / "model_index.json").read_text())["_class_name"]
    with pytest.raises(ConfigError, match=f"backbone.path.*checkpoint for backbone '{name}'.*{found}"):
        backbones.build(name, str(saved_folder(folder)))


def test_unknown_backbone_name_lists_the_known_ones():
    with pytest.raises(ConfigError, match=r"backbone.name='sdxl'.*'flux1'.*'flux2'.*'sd3'"):
        backbones.build("sdxl", tiny=True)
    assert {"sd3", "flux1", "flux2"} <= set(backbones.names())


def _pipeline_image(pipe, bb, seed=3):
    """The pipeline's own sampler from fixed noise, 2 steps, as a tensor."""
    from flowbp_core.backbones.flux1 import pack

    noise = torch.randn(bb.latent_shape(1), generator=torch.Generator().manual_seed(seed))
    kw = dict(num_inference_steps=2, output_type="pt", sigmas=list(np.linspace(1.0, 0.5, 2)),
              max_sequence_length=bb.text_encoder.max_sequence_length, guidance_scale=bb.preset.guidance.scale)
    if bb.name == "sd3":
        return pipe(PROMPTS[:1], latents=noise, **kw).images
    if bb.name == "flux1":
        return pipe(PROMPTS[:1], latents=pack(noise), height=bb.height, width=bb.width, **kw).images
    return pipe(prompt=PROMPTS[:1], latents=noise, height=bb.height, width=bb.width, **kw).images


def _load_pipeline(name, path):
    import diffusers

    cls = getattr(diffusers, backbones.get(name).pipeline_class_name)
    return cls.from_pretrained(str(path), local_files_only=True)


@pytest.mark.parametrize("name", FAMILIES)
def test_lora_export_loads_with_diffusers_load_lora_weights(name, saved_folder, tmp_path):
    base = saved_folder(name)
    bb = backbones.build(name, str(base))
    bb.apply_lora(LoRAConfig(rank=4, alpha=8.0))
    with torch.no_grad():  # stands in for training: any non-zero B makes the adapter visible
        for n, p in bb.transformer.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(n)))
    res = bb.export(tmp_path / "lora")
    assert res.kind == "lora" and LORA_FILE in res.files and (tmp_path / "lora" / MANIFEST).is_file()

    pipe = _load_pipeline(name, base)
    before = _pipeline_image(pipe, bb)
    pipe.load_lora_weights(str(tmp_path / "lora"))
    after = _pipeline_image(pipe, bb)
    assert (after - before).abs().max() > 1e-3, "the exported LoRA did not change the generated image"
    # ... and diffusers' LoRA model is exactly ours (rank, alpha and every key survived the round trip)
    x = torch.randn(bb.latent_shape(1), generator=torch.Generator().manual_seed(8))
    cond = bb.encode_prompts(PROMPTS[:1])
    ours = _velocity_with(bb, bb.transformer, x, cond)
    theirs = _velocity_with(bb, pipe.transformer, x, cond)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-6)


def _velocity_with(bb, transformer, x, cond):
    own = bb.transformer
    bb.transformer = transformer
    try:
        with torch.no_grad():
            return bb.velocity(x, 0.5, cond)
    finally:
        bb.transformer = own


@pytest.mark.parametrize("name", FAMILIES)
def test_full_export_loads_with_save_pretrained_layout(name, saved_folder, tmp_path):
    import diffusers

    base = saved_folder(name)
    bb = backbones.build(name, str(base))
    with torch.no_grad():
        for p in bb.trainable_parameters()[:6]:
            p.add_(0.05)
    res = bb.export(tmp_path / "full")
    assert res.kind == "full" and any(f.startswith("transformer/") for f in res.files)
    tcls = type(bb.transformer)
    loaded = tcls.from_pretrained(str(tmp_path / "full"), subfolder="transformer", local_files_only=True)
    pipe = getattr(diffusers, bb.pipeline_class_name).from_pretrained(str(base), transformer=loaded,
                                                                      local_files_only=True)
    base_pipe = _load_pipeline(name, base)
    assert (_pipeline_image(pipe, bb) - _pipeline_image(base_pipe, bb)).abs().max() > 1e-4
    x = torch.randn(bb.latent_shape(1), generator=torch.Generator().manual_seed(9))
    cond = bb.encode_prompts(PROMPTS[:1])
    torch.testing.assert_close(_velocity_with(bb, pipe.transformer, x, cond),
                               _velocity_with(bb, bb.transformer, x, cond))


def test_export_refuses_the_wrong_kind(tmp_path):
    from flowbp_core.export import export_full, export_lora

    bb = backbones.build("sd3", tiny=True)
    with pytest.raises(ValueError, match="no LoRA adapter"):
        export_lora(bb.transformer, bb.pipeline_class_name, tmp_path / "a")
    bb.apply_lora(LoRAConfig(rank=2))
    with pytest.raises(ValueError, match="carries a LoRA adapter"):
        export_full(bb.transformer, bb.pipeline_class_name, tmp_path / "b")
