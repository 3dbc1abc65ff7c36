"""Session fixtures for the reward tests (helpers live in rewards_helpers.py, importable from the tests)."""

from __future__ import annotations

import json

import pytest

from rewards_helpers import clip_processor_config, clip_tokenizer, make_tiny_clip


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    """A transformers CLIP folder (model, tokenizer, preprocessor_config.json) like a PickScore snapshot."""
    d = tmp_path_factory.mktemp("tiny_clip")
    model, tok = make_tiny_clip(seed=0)
    model.save_pretrained(d)
    tok.save_pretrained(d)
    (d / "preprocessor_config.json").write_text(json.dumps(clip_processor_config()))
    return d


@pytest.fixture(scope="session")
def clip_tokenizer_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("clip_tok")
    clip_tokenizer().save_pretrained(d)
    return d
