"""HPSv2.1 (OpenCLIP checkpoint through the key mapping), PickScore and CLIPScore on tiny real CLIP models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flowbp_core.rewards import build
from flowbp_core.rewards.hpsv2 import hps_pipeline
from flowbp_core.rewards.openclip_convert import openclip_to_hf
from flowbp_core.rewards.preprocess import ImagePipeline
from rewards_helpers import TINY_IMAGE, assert_pixel_grad, make_tiny_clip

PROMPTS = ["a photo of a cat", "a red car on a street", "an oil painting of a lake"]


def hf_to_openclip(model) -> dict[str, torch.Tensor]:
    """The INVERSE of the loader's mapping, written independently: what OpenCLIP's own state_dict() would hold for
    the same network (fused [q;k;v] in_proj, [width, embed] projections, resblocks naming)."""
    sd = model.state_dict()
    out: dict[str, torch.Tensor] = {
        "visual.conv1.weight": sd["vision_model.embeddings.patch_embedding.weight"],
        "visual.class_embedding": sd["vision_model.embeddings.class_embedding"],
        "visual.positional_embedding": sd["vision_model.embeddings.position_embedding.weight"],
        "visual.ln_pre.weight": sd["vision_model.pre_layrnorm.weight"],
        "visual.ln_pre.bias": sd["vision_model.pre_layrnorm.bias"],
        "visual.ln_post.weight": sd["vision_model.post_layernorm.weight"],
        "visual.ln_post.bias": sd["vision_model.post_layernorm.bias"],
        "visual.proj": sd["visual_projection.weight"].T.clone(),
        "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
        "ln_final.weight": sd["text_model.final_layer_norm.weight"],
        "ln_final.bias": sd["text_model.final_layer_norm.bias"],
        "text_projection": sd["text_projection.weight"].T.clone(),
        "logit_scale": sd["logit_scale"],
        # OpenCLIP keeps its causal mask as a buffer in older checkpoints; the loader must ignore it.
        "attn_mask": torch.full((16, 16), float("-inf")).triu(1),
    }
    for tower, oc_prefix in (("vision_model", "visual.transformer"), ("text_model", "transformer")):
        n_layers = model.config.vision_config.num_hidden_layers if tower == "vision_model" \
            else model.config.text_config.num_hidden_layers
        for i in range(n_layers):
            hf = f"{tower}.encoder.layers.{i}."
            oc = f"{oc_prefix}.resblocks.{i}."
            for kind in ("weight", "bias"):
                out[oc + f"attn.in_proj_{kind}"] = torch.cat(
                    [sd[hf + f"self_attn.{p}_proj.{kind}"] for p in ("q", "k", "v")], dim=0)
                out[oc + f"attn.out_proj.{kind}"] = sd[hf + f"self_attn.out_proj.{kind}"]
                out[oc + f"ln_1.{kind}"] = sd[hf + f"layer_norm1.{kind}"]
                out[oc + f"ln_2.{kind}"] = sd[hf + f"layer_norm2.{kind}"]
                out[oc + f"mlp.c_fc.{kind}"] = sd[hf + f"mlp.fc1.{kind}"]
                out[oc + f"mlp.c_proj.{kind}"] = sd[hf + f"mlp.fc2.{kind}"]
    return {k: v.clone() for k, v in out.items()}


def reference_similarity(model, tok, pipe: ImagePipeline, images, prompts) -> torch.Tensor:
    """Score computed straight from the source transformers model (the OpenCLIP/HPSv2 recipe)."""
    with torch.no_grad():
        img = model.get_image_features(pixel_values=pipe(images)).pooler_output
        ids = tok(prompts, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
        txt = model.get_text_features(**ids).pooler_output
    return (F.normalize(img, dim=-1) * F.normalize(txt, dim=-1)).sum(-1)


@pytest.fixture(scope="module")
def hps_checkpoint(tmp_path_factory):
    model, tok = make_tiny_clip(seed=1)
    d = tmp_path_factory.mktemp("hps")
    # HPSv2's file wraps the state dict: {"state_dict": ...}, saved from DDP with a "module." prefix.
    torch.save({"state_dict": {"module." + k: v for k, v in hf_to_openclip(model).items()}}, d / "HPS_tiny.pt")
    return d / "HPS_tiny.pt", model, tok


def test_mapping_is_a_bijection_on_names():
    model, _ = make_tiny_clip(seed=2)
    sd = {k: v for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    back = openclip_to_hf(hf_to_openclip(model))
    assert set(back) == set(sd)
    for k in sd:
        assert torch.equal(back[k], sd[k]), k


def test_hpsv2_loads_openclip_checkpoint_and_matches_source(hps_checkpoint, clip_tokenizer_dir):
    path, model, tok = hps_checkpoint
    reward = build("hpsv2", checkpoint=path, tokenizer=clip_tokenizer_dir, vision_heads=4, text_heads=4)
    cfg = reward.model.config
    assert (cfg.vision_config.image_size, cfg.vision_config.patch_size, cfg.text_config.num_hidden_layers) == \
        (TINY_IMAGE, 8, 2)
    torch.manual_seed(0)
    images = torch.rand(3, 3, 40, 56)  # not square: exercises resize-longest + pad
    got = reward(images, PROMPTS)
    want = reference_similarity(model, tok, hps_pipeline(TINY_IMAGE), images, PROMPTS)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    # Different prompts give different scores (the text tower is really used).
    other = reward(images, PROMPTS[::-1])
    assert not torch.allclose(other, got)
    assert_pixel_grad(reward, images, PROMPTS)


def test_hpsv2_missing_checkpoint_names_the_file(tmp_path, clip_tokenizer_dir):
    with pytest.raises(FileNotFoundError, match="HPS_v2.1_compressed.pt"):
        build("hpsv2", checkpoint=tmp_path / "HPS_v2.1_compressed.pt", tokenizer=clip_tokenizer_dir)


def test_hpsv2_rejects_a_non_clip_state_dict(tmp_path, clip_tokenizer_dir):
    torch.save({"state_dict": {"fc.weight": torch.zeros(2, 2)}}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="lacks 'visual.conv1.weight'"):
        build("hpsv2", checkpoint=tmp_path / "x.pt", tokenizer=clip_tokenizer_dir)


def test_pickscore_matches_model_card_formula(tiny_clip_dir):
    from transformers import CLIPModel

    reward = build("pickscore", path=tiny_clip_dir)
    src = CLIPModel.from_pretrained(tiny_clip_dir, local_files_only=True).eval()
    _, tok = make_tiny_clip()
    torch.manual_seed(1)
    images = torch.rand(3, 3, 48, 40)
    got = reward(images, PROMPTS)
    pipe = ImagePipeline(size=TINY_IMAGE, fit="crop")
    want = src.logit_scale.exp() * reference_similarity(src, tok, pipe, images, PROMPTS)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert abs(reward.scale - 100.0) < 1e-3
    assert_pixel_grad(reward, images, PROMPTS)


def test_clipscore_is_100_cos_and_frozen(tiny_clip_dir):
    reward = build("clipscore", path=tiny_clip_dir)
    assert not reward.training and not any(p.requires_grad for p in reward.parameters())
    reward.train()  # a parent's .train() must not unfreeze or un-eval it
    assert not reward.training
    torch.manual_seed(2)
    images = torch.rand(2, 3, 64, 64)
    r = assert_pixel_grad(reward, images, PROMPTS[:2])
    assert (r.abs() <= 100.0 + 1e-4).all()


def test_text_features_are_cached_and_batch_order_is_kept(tiny_clip_dir):
    reward = build("clipscore", path=tiny_clip_dir)
    images = torch.rand(3, 3, 32, 32)
    a = reward(images, PROMPTS)
    assert set(reward._text_cache) == set(PROMPTS)
    b = reward(images[[2, 0, 1]], [PROMPTS[2], PROMPTS[0], PROMPTS[1]])
    torch.testing.assert_close(b, a[[2, 0, 1]], rtol=1e-5, atol=1e-6)


def test_wrong_model_type_in_folder(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "blip"}')
    with pytest.raises(ValueError, match="model_type='blip'.*expected clip"):
        build("pickscore", path=tmp_path)


def test_missing_folder_says_what_was_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        build("clipscore", path=tmp_path / "nope")


def test_bfloat16_dtype_argument(tiny_clip_dir):
    reward = build("clipscore", path=tiny_clip_dir, dtype="bfloat16")
    assert reward.dtype == torch.bfloat16
    r = assert_pixel_grad(reward, torch.rand(2, 3, 32, 32), PROMPTS[:2])
    assert r.dtype == torch.float32
