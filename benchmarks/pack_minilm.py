"""Pack the embedded world's MiniLM encoder small enough to travel to a lent GPU machine (benchmarks/gpu_checks.sh).

The device transfer holds 64 MiB in all and the repository is already ~33 MB (the committed base), so the
package's 88 MB float32 folder cannot go as it is. This writes `<out>/minilm.tar.gz`: the model folder in
float16 with every word-embedding row that the world's captions never use set to zero (about half of the
model's bytes are the 30,522-row embedding table; zero rows compress to nothing). It then checks, here, that
the packed encoder gives the captions exactly the token states of the unpacked float16 copy, and how far both
lie from the float32 original, and refuses to write the archive otherwise.

    python benchmarks/pack_minilm.py --out .gpu          # then carry .gpu; there: tar -xzf .gpu/minilm.tar.gz

Which captions: every training pool the base can be trained on with its default seed and --pool up to 20,000,
the held-out evaluation set, and 50,000 captions of each split drawn with other seeds (the grammar's words
make only 77 word pieces). A caption with a word piece outside the kept set would silently change
its states, so the check covers the exact captions train_base encodes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from flowbp_core.world.data import heldout_prompts, prompt_pool  # noqa: E402
from flowbp_core.world.text import MiniLMEncoder, model_path  # noqa: E402

EMBED = "embeddings.word_embeddings.weight"


def caption_texts() -> tuple[list[str], list[str]]:
    """(all captions whose word pieces are kept, the exact captions checked: train_base's default pool)."""
    checked = [it.text for it in prompt_pool("train", 6000, seed=0)] + [""]
    texts = set(checked)
    texts.update(it.text for it in prompt_pool("train", 20000, seed=0))
    texts.update(it.text for it in heldout_prompts())
    for split in ("train", "heldout"):
        for seed in (1, 2, 3, 4, 5):
            texts.update(it.text for it in prompt_pool(split, 10000, seed=seed))
    return sorted(texts), checked


def write_half_copy(src: str, dst: Path, keep_rows: torch.Tensor | None) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for name in os.listdir(src):
        if name.endswith((".json", ".txt")):
            shutil.copy(os.path.join(src, name), dst / name)
    weights_file = next(n for n in os.listdir(src) if n.endswith(".safetensors"))
    tensors = {k: v.to(torch.float16) if v.is_floating_point() else v
               for k, v in load_file(os.path.join(src, weights_file)).items()}
    if keep_rows is not None:
        table = tensors[EMBED]
        kept = torch.zeros_like(table)
        kept[keep_rows] = table[keep_rows]
        tensors[EMBED] = kept
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})


def states_with(path: Path | None, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    old = os.environ.pop("FLOWBP_MINILM_PATH", None)
    try:
        if path is not None:
            os.environ["FLOWBP_MINILM_PATH"] = str(path)
        out = MiniLMEncoder().encode(texts)
    finally:
        os.environ.pop("FLOWBP_MINILM_PATH", None)
        if old is not None:
            os.environ["FLOWBP_MINILM_PATH"] = old
    return out["prompt_embeds"], out["pooled_prompt_embeds"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / ".gpu", help="folder that receives minilm.tar.gz")
    a = ap.parse_args(argv)
    src = model_path()
    texts, checked = caption_texts()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src, local_files_only=True)
    ids = tok(texts, padding="max_length", truncation=True, max_length=16)["input_ids"]
    keep = torch.tensor(sorted({i for row in ids for i in row} | set(tok.all_special_ids)))
    print(f"{len(texts)} distinct captions use {len(keep)} of {tok.vocab_size} word pieces")

    with tempfile.TemporaryDirectory() as tmp:
        half, packed = Path(tmp) / "half", Path(tmp) / "minilm"
        write_half_copy(src, half, None)
        write_half_copy(src, packed, keep)
        s_half, p_half = states_with(half, checked)
        s_pack, p_pack = states_with(packed, checked)
        s_full, p_full = states_with(None, checked)
        same = torch.equal(s_half, s_pack) and torch.equal(p_half, p_pack)
        drift = {"states_max_abs": float((s_half - s_full).abs().max()),
                 "pooled_cosine_min": float(torch.nn.functional.cosine_similarity(p_half, p_full, dim=-1).min())}
        print(f"packed == float16 copy on the {len(checked)} captions train_base encodes: {same}; "
              f"float16 vs float32 original: {json.dumps(drift)}")
        if not same:
            print("refusing to write: a caption uses a word piece that was dropped", file=sys.stderr)
            return 1
        a.out.mkdir(parents=True, exist_ok=True)
        target = a.out / "minilm.tar.gz"
        with tarfile.open(target, "w:gz", compresslevel=9) as tar:
            tar.add(packed, arcname="minilm")
    print(f"wrote {target} ({target.stat().st_size / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
