"""The base model's training data stream: the same batches whatever the number of render workers, and a
resume continues the stream where it stopped (each step's batch is seeded by (seed, step))."""

import itertools

import pytest
import torch

from flowbp_core.world.data import batch_stream, prompt_pool


def _take(stream, n):
    return list(itertools.islice(stream, n))


def _same(a, b):
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("index", "drop", "x", "noise", "sigma"))


def test_workers_and_resume_give_the_same_batches():
    pool = prompt_pool("train", 50, seed=3)
    inline = _take(batch_stream(pool, 3, 0, 4, workers=0), 5)
    workers = _take(batch_stream(pool, 3, 0, 4, workers=2), 5)
    resumed = _take(batch_stream(pool, 3, 2, 4, workers=0), 3)
    assert all(_same(a, b) for a, b in zip(inline, workers))
    assert all(_same(a, b) for a, b in zip(inline[2:], resumed))
    assert not _same(inline[0], inline[1])  # steps draw different data
    assert inline[0].x.shape == (4, 3, 32, 32) and inline[0].x.min() >= -1 and inline[0].x.max() <= 1


def test_bad_device_and_workers_are_refused_by_name(capsys):
    from services.entrypoints.world.train_base import main

    for args, needle in ((["--device", "tpu"], "device='tpu'"), (["--workers", "-1"], "workers=-1")):
        with pytest.raises(SystemExit):
            main(["--out", "/tmp/never-written"] + args)
        assert needle in capsys.readouterr().err


def test_minilm_path_override_is_checked(tmp_path, monkeypatch):
    from flowbp_core.world import text

    monkeypatch.setenv("FLOWBP_MINILM_PATH", str(tmp_path))
    with pytest.raises(RuntimeError, match="FLOWBP_MINILM_PATH=.*no config.json"):
        text.model_path()
    (tmp_path / "config.json").write_text("{}")
    assert text.model_path() == str(tmp_path)
