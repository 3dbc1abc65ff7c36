"""benchmarks/pack_minilm.py: the encoder copy that travels to a GPU machine keeps exactly the caption rows."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "pack_minilm.py"


def _load():
    spec = importlib.util.spec_from_file_location("pack_minilm", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_half_copy_keeps_only_the_listed_embedding_rows(tmp_path):
    from transformers import BertConfig, BertModel

    mod = _load()
    src = tmp_path / "src"
    cfg = BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)
    BertModel(cfg).save_pretrained(src, safe_serialization=True)
    (src / "vocab.txt").write_text("\n".join(f"w{i}" for i in range(50)))
    full = load_file(str(src / "model.safetensors"))
    dst = tmp_path / "packed"
    mod.write_half_copy(str(src), dst, torch.tensor([0, 3, 7]))
    packed = load_file(str(dst / "model.safetensors"))
    assert (dst / "config.json").is_file() and (dst / "vocab.txt").is_file()
    assert set(packed) == set(full)
    assert all(v.dtype == torch.float16 for v in packed.values() if v.is_floating_point())
    table, original = packed[mod.EMBED], full[mod.EMBED].half()
    kept = torch.zeros(50, dtype=torch.bool)
    kept[[0, 3, 7]] = True
    assert torch.equal(table[kept], original[kept]) and not table[~kept].any()
    other = next(k for k in full if k != mod.EMBED and full[k].is_floating_point())
    assert torch.equal(packed[other], full[other].half())


def test_kept_word_pieces_cover_every_caption_train_base_encodes():
    from transformers import AutoTokenizer

    from flowbp_core.world.text import model_path

    mod = _load()
    texts, checked = mod.caption_texts()
    assert set(checked) <= set(texts) and "" in checked and len(checked) == 6001
    tok = AutoTokenizer.from_pretrained(model_path(), local_files_only=True)
    kept = {i for row in tok(texts, max_length=16, truncation=True)["input_ids"] for i in row}
    used = {i for row in tok(checked, max_length=16, truncation=True)["input_ids"] for i in row}
    assert used <= kept and len(kept) < 200  # the grammar's words: a small table, hence the small archive
