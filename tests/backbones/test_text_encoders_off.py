"""`text_encoders=False` (a learner's build): no transformers model is constructed, from tiny configs or from a
saved pipeline folder, and the transformer and VAE are those of a build with the encoders."""

from __future__ import annotations

import pytest
import torch

from flowbp_core import backbones

FAMILIES = ("sd3", "flux1", "flux2")


def _assert_same_modules(a, b) -> None:
    for mod_a, mod_b in ((a.transformer, b.transformer), (a.vae, b.vae)):
        sd_b = mod_b.state_dict()
        for k, v in mod_a.state_dict().items():
            assert torch.equal(v, sd_b[k]), k


@pytest.mark.parametrize("name", FAMILIES)
def test_tiny_without_text_encoders_builds_none_and_the_same_transformer(name, constructed_models):
    full = backbones.build(name, tiny=True)
    assert constructed_models, "the counter sees the encoders of a full build"
    rng_after_full = torch.get_rng_state()
    constructed_models.clear()
    bare = backbones.build(name, tiny=True, text_encoders=False)
    assert constructed_models == []
    assert torch.equal(torch.get_rng_state(), rng_after_full)  # a LoRA init drawn next is the same
    _assert_same_modules(bare, full)
    with pytest.raises(RuntimeError, match="holds no text encoder"):
        bare.encode_prompts(["a red cube"])


@pytest.mark.parametrize("name", FAMILIES)
def test_pretrained_without_text_encoders_loads_none(name, saved_folder, tiny_cache, constructed_models):
    path = saved_folder(name)
    constructed_models.clear()
    bare = backbones.build(name, str(path), local_files_only=True, text_encoders=False)
    assert constructed_models == []
    _assert_same_modules(bare, tiny_cache(name))


def test_embedded_without_text_encoders_loads_no_minilm():
    from flowbp_core.backbones.adapter import NoTextEncoder

    bare = backbones.build("embedded", text_encoders=False)
    assert isinstance(bare.text_encoder, NoTextEncoder)
    full = backbones.build("embedded")
    for k, v in full.transformer.state_dict().items():
        assert torch.equal(bare.transformer.state_dict()[k], v), k
