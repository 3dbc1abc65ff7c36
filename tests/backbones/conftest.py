"""Tiny backbones built once per session (each takes ~1 s to build on a 2-core machine), and their saved folders."""

from __future__ import annotations

import pytest
import torch

from flowbp_core import backbones


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models on a shared 2-core machine: one thread is faster and leaves the other core to the rest."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_cache():
    built: dict[tuple[str, int], object] = {}

    def get(name: str, seed: int = 0):
        """A shared frozen tiny backbone (do not modify it: build a fresh one with `fresh`)."""
        if (name, seed) not in built:
            bb = backbones.build(name, tiny=True, seed=seed)
            bb.freeze()
            built[(name, seed)] = bb
        return built[(name, seed)]

    return get


@pytest.fixture(scope="session")
def saved_folder(tmp_path_factory, tiny_cache):
    """Each family's tiny model written with save_pretrained (a diffusers pipeline folder), once."""
    folders: dict[str, object] = {}

    def get(name: str):
        if name not in folders:
            path = tmp_path_factory.mktemp(f"{name}_pipe")
            tiny_cache(name).save_pretrained(path)
            folders[name] = path
        return folders[name]

    return get
