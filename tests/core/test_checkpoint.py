"""Atomic checkpoints: only complete folders count, crashes leave nothing half-read, pruning keeps the newest."""

import pytest
import torch

from flowbp_core.checkpoint import (COMPLETE, CheckpointState, latest_complete, list_complete, load_checkpoint,
                                    save_checkpoint)


def _state(step):
    return CheckpointState(step=step, policy_version=step, trainable={"w": torch.full((3,), float(step))},
                           optimizer={"state": {}, "param_groups": [{"lr": 0.1}]},
                           ema={"ema.0": torch.zeros(3)}, config={"run_id": "r"}, metrics={"loss": 0.5})


def test_round_trip_and_latest(tmp_path):
    for s in (1, 2, 10):
        save_checkpoint(tmp_path, _state(s))
    assert [c.step for c in list_complete(tmp_path)] == [1, 2, 10]  # numeric, not lexicographic
    back = load_checkpoint(latest_complete(tmp_path))
    assert back.step == 10 and torch.equal(back.trainable["w"], torch.full((3,), 10.0))
    assert back.optimizer["param_groups"][0]["lr"] == 0.1 and back.config == {"run_id": "r"}


def test_incomplete_and_temp_folders_are_ignored(tmp_path):
    save_checkpoint(tmp_path, _state(1))
    (tmp_path / "step_5").mkdir()  # renamed but never marked complete (crash between rename and marker)
    (tmp_path / "step_6.tmp-999999-1").mkdir()  # a writer that died mid-write
    assert latest_complete(tmp_path).name == "step_1"
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        load_checkpoint(tmp_path / "step_5")
    save_checkpoint(tmp_path, _state(5))  # the leftover is replaced by a complete one
    assert latest_complete(tmp_path).name == "step_5"


def test_failed_write_leaves_no_folder(tmp_path):
    def boom(_tmp):
        raise OSError("disk full")

    with pytest.raises(OSError):
        save_checkpoint(tmp_path, _state(3), extra_writer=boom)
    assert list(tmp_path.iterdir()) == []


def test_prune_keeps_newest(tmp_path):
    for s in range(1, 6):
        save_checkpoint(tmp_path, _state(s), keep=2)
    assert [c.step for c in list_complete(tmp_path)] == [4, 5]
    assert all((tmp_path / f"step_{s}" / COMPLETE).exists() for s in (4, 5))


def test_existing_complete_checkpoint_is_never_overwritten(tmp_path):
    save_checkpoint(tmp_path, _state(2))
    st = _state(2)
    st.trainable = {"w": torch.zeros(3)}
    save_checkpoint(tmp_path, st)
    assert torch.equal(load_checkpoint(tmp_path / "step_2").trainable["w"], torch.full((3,), 2.0))
