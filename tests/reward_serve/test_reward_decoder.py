"""The reward side decodes latents with the VAE alone: from a pipeline folder it loads no transformer and no text
encoder (a replica of the real SD3.5-M or FLUX.1 would otherwise hold gigabytes it never calls)."""

from __future__ import annotations

import torch


def test_reward_decoder_loads_the_vae_alone_and_decodes_as_the_backbone(tmp_path, monkeypatch):
    import diffusers
    import transformers

    from flowbp_core import backbones
    from services.reward_serve.engine import DecoderSpec, build_decoder

    torch.set_num_threads(1)
    bb = backbones.build("sd3", tiny=True)
    folder = tmp_path / "sd3"
    bb.pipeline().save_pretrained(str(folder))

    def refuse(*args, **kwargs):
        raise AssertionError("the reward side loaded a module it never calls")

    for cls in (diffusers.SD3Transformer2DModel, transformers.CLIPTextModelWithProjection,
                transformers.T5EncoderModel):
        monkeypatch.setattr(cls, "from_pretrained", refuse)
    spec = DecoderSpec(backbone="sd3", path=str(folder), tiny=False,
                       kwargs={"dtype": "float32", "device": "cpu", "local_files_only": True})
    decode = build_decoder(spec)
    z = torch.randn(2, *bb.latent_shape(1)[1:], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(decode(z), bb.decode(z))
