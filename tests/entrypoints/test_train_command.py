"""The training command's own argument handling (`python -m services.entrypoints.train`), without a cluster."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_entrypoint_parses_overrides_and_rejects_stray_arguments(capsys):
    from services.entrypoints.train import main, parse_args

    args, ov = parse_args(["--config", "x.yaml", "--method.k=3", "--train.steps=2"])
    assert args.config == "x.yaml" and ov == ["method.k=3", "train.steps=2"]
    with pytest.raises(SystemExit):
        parse_args(["--config", "x.yaml", "stray"])
    assert main(["--config", str(REPO / "deploy/configs/tiny.yaml"), "--train.steps=0"]) == 2
    assert "train.steps" in capsys.readouterr().err
