"""Committed world checkpoints: they load, their hashes match their metadata, and damage gives a clear error."""

import json
import shutil

import pytest
import torch

from flowbp_core.world.assets import (
    CheckpointError,
    content_sha256,
    file_sha256,
    load_checkpoint,
    manifest_path,
    save_checkpoint,
)
from flowbp_core.world.base_model import BASE_CHECKPOINT, BASE_REGENERATE, load_base_transformer
from flowbp_core.world.preference import PREFERENCE_CHECKPOINT, PREFERENCE_REGENERATE
from flowbp_core.world.reward import RECOGNISER_CHECKPOINT, RECOGNISER_REGENERATE, load_recogniser

COMMITTED = [(BASE_CHECKPOINT, BASE_REGENERATE), (RECOGNISER_CHECKPOINT, RECOGNISER_REGENERATE),
             (PREFERENCE_CHECKPOINT, PREFERENCE_REGENERATE)]
IDS = ["base", "recogniser", "preference"]


@pytest.mark.parametrize("path,regen", COMMITTED, ids=IDS)
def test_committed_checkpoint_hashes_match_metadata(path, regen):
    assert path.stat().st_size < 30 * 2**20, "committed checkpoints stay under 30 MB"
    manifest = json.loads(manifest_path(path).read_text())
    assert manifest["sha256"] == file_sha256(path)
    tensors, meta = load_checkpoint(path, regenerate=regen)
    assert meta["content_sha256"] == content_sha256(tensors) == manifest["content_sha256"]
    assert int(meta["data_seed"]) == manifest["data_seed"]
    # the command each file was trained with, as typed then (weights older than services/entrypoints/world name
    # the module path the command had at the time)
    assert meta["config"] and meta["command"].startswith(("python -m services.entrypoints.world.train_",
                                                          "python -m flowbp_core.world.train_"))


def test_committed_models_load():
    model, meta = load_base_transformer()
    assert sum(p.numel() for p in model.parameters()) > 1_000_000 and not model.training
    rec, _ = load_recogniser()
    out = rec(torch.zeros(2, 3, 32, 32))
    assert out["pair_count"].shape == (2, 6, 3, 4)


def _copy(tmp_path, path):
    dst = tmp_path / path.name
    shutil.copy(path, dst)
    shutil.copy(manifest_path(path), manifest_path(dst))
    return dst


@pytest.mark.parametrize("path,regen", COMMITTED, ids=IDS)
def test_corrupt_checkpoint_names_file_and_command(tmp_path, path, regen):
    dst = _copy(tmp_path, path)
    data = bytearray(dst.read_bytes())
    data[len(data) // 2] ^= 0xFF  # flip one byte in the tensor data
    dst.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(dst, regenerate=regen)
    assert str(dst) in str(e.value) and regen in str(e.value) and "corrupt" in str(e.value)


def test_corruption_without_manifest_is_caught_by_content_hash(tmp_path):
    dst = _copy(tmp_path, RECOGNISER_CHECKPOINT)
    manifest_path(dst).unlink()
    data = bytearray(dst.read_bytes())
    data[-5] ^= 0x01
    dst.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="tensor contents hash"):
        load_checkpoint(dst, regenerate=RECOGNISER_REGENERATE)


def test_missing_checkpoint_names_file_and_command(tmp_path):
    missing = tmp_path / "transformer.safetensors"
    with pytest.raises(CheckpointError) as e:
        load_base_transformer(missing)
    assert str(missing) in str(e.value) and BASE_REGENERATE in str(e.value)


def test_missing_default_checkpoint_through_the_backbone_registry(tmp_path, monkeypatch):
    from flowbp_core import backbones
    import flowbp_core.world.base_model as bm

    monkeypatch.setattr(bm, "BASE_CHECKPOINT", tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="train_base"):
        backbones.build("embedded")


def test_save_then_load_round_trip(tmp_path):
    t = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(2, dtype=torch.float16)}
    digest = save_checkpoint(t, tmp_path / "m.safetensors", config={"a": 1}, data_seed=3, command="python -m x")
    assert digest == file_sha256(tmp_path / "m.safetensors")
    back, meta = load_checkpoint(tmp_path / "m.safetensors", regenerate="python -m x")
    assert meta["config"] == {"a": 1} and all(torch.equal(back[k], t[k]) for k in t)


def test_publish_base_rehashes_and_records_provenance(tmp_path):
    from flowbp_core.world.publish import publish_base

    src = tmp_path / "run"
    src.mkdir()
    ema = {"w": torch.ones(2, 2, dtype=torch.float16)}
    save_checkpoint(ema, src / "transformer.safetensors", config={"model": {"num_layers": 1}}, data_seed=5,
                    command="python -m services.entrypoints.world.train_base --out x", extra={"steps": 3})
    (src / "train_log.jsonl").write_text('{"step": 3}\n')
    torch.save({"model": {"w": torch.full((2, 2), 2.0)}, "step": 3}, src / "train_state.pt")
    dst = tmp_path / "assets"
    publish_base(src, "raw", dst)
    tensors, meta = load_checkpoint(dst / "transformer.safetensors", regenerate="x")
    assert float(tensors["w"][0, 0]) == 2.0 and meta["published_weights"] == "raw" and meta["data_seed"] == "5"
    assert meta["config"]["text"]["max_tokens"] == 16 and (dst / "train_log.jsonl").is_file()
    assert (json.loads(manifest_path(dst / "transformer.safetensors").read_text())["sha256"]
            == file_sha256(dst / "transformer.safetensors"))
    assert "note" not in meta
    publish_base(src, "ema", dst, note="trained on a lent GPU")
    _, meta = load_checkpoint(dst / "transformer.safetensors", regenerate="x")
    assert meta["note"] == "trained on a lent GPU" and meta["published_weights"] == "ema"
