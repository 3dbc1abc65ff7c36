"""The paper's run setup per (backbone, method): the one table behind deploy/configs and the README's preset table.

Method hyperparameters stay with their methods (`flowbp_core.methods`, e.g. `surrogate.SPARSE`); this table holds
what the reference's final configs (RuoyuWang-2077/FlowBP `configs/final/<backbone>/*.yaml`) set around them:
the model, global batch (8 GPUs x train_batch_size x gradient_accumulation_steps), learning rate, optimizer
steps, EMA and evaluation. The run files are checked against it and the README table is generated from it
(tests/core/test_paper_presets.py), so a value changes here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass

from flowbp_core.errors import ConfigError

PAPER_METHODS = ("flowbp_sparse", "flowbp_bridge", "flowbp_lagrange", "leapalign", "refl", "drtune", "draft_lv")


@dataclass(frozen=True, kw_only=True)
class PaperBackbone:
    """Attributes:
        backbone (str): registered backbone name (`backbone.name` in a run file).
        pretrained (str): the hub id the paper fine-tunes.
        eval_n_steps (int): sampling steps of the evaluation (40 for SD3.5, 50 for FLUX).
        batch (dict[str, int]): global batch (prompts per optimizer step) per method.
        ref_prefix (str): reference config path before the method name.
    """

    backbone: str
    pretrained: str
    eval_n_steps: int
    batch: dict[str, int]
    ref_prefix: str


# shared by every final config: full fine-tuning (FSDP), AdamW lr 1e-5, wd 1e-4, clip 1.0, 300 steps, EMA 0.995,
# 512 px, N = 25 rollout steps
FINETUNE = "full"
LR = 1.0e-5
WEIGHT_DECAY = 1.0e-4
GRAD_CLIP = 1.0
STEPS = 300
EMA_DECAY = 0.995
N_STEPS = 25
RESOLUTION = 512

PAPER = {
    "sd35": PaperBackbone(
        backbone="sd3", pretrained="stabilityai/stable-diffusion-3.5-medium", eval_n_steps=40,
        batch={**{m: 64 for m in PAPER_METHODS}, "draft_lv": 32},  # DRaFT-LV: 4 per GPU (3 rows each)
        ref_prefix="configs/final/sd35/sd3_5_"),
    "flux1": PaperBackbone(
        backbone="flux1", pretrained="black-forest-labs/FLUX.1-dev", eval_n_steps=50,
        batch={**{m: 32 for m in PAPER_METHODS}, "flowbp_lagrange": 64, "flowbp_bridge": 64, "leapalign": 64},
        ref_prefix="configs/final/flux1/flux1_"),
    "flux2": PaperBackbone(
        backbone="flux2", pretrained="black-forest-labs/FLUX.2-klein-base-9B", eval_n_steps=50,
        batch={m: 32 for m in PAPER_METHODS},  # DRaFT-LV: 2 per GPU x 2 accumulation steps
        ref_prefix="configs/final/flux2/flux2_klein_base_9b_"),
}


def paper_backbone(preset: str) -> PaperBackbone:
    if preset not in PAPER:
        raise ConfigError("method.preset", preset, f"one of {sorted(PAPER)}")
    return PAPER[preset]


def eval_steps(backbone: str) -> int | None:
    """The paper's evaluation sampling steps for a registered backbone name (None for one the paper has not)."""
    return next((pb.eval_n_steps for pb in PAPER.values() if pb.backbone == backbone), None)


def global_batch(preset: str, method: str) -> int:
    pb = paper_backbone(preset)
    if method not in pb.batch:
        raise ConfigError("method.name", method, f"one of the paper's methods {list(PAPER_METHODS)}")
    return pb.batch[method]


def reference_file(preset: str, method: str) -> str:
    global_batch(preset, method)  # validates both names
    return f"{paper_backbone(preset).ref_prefix}{method}.yaml"


SHOWN = {  # the parameters each method's row lists (all of them, default or not)
    "flowbp_sparse": ("k", "late_bias", "gamma"),
    "flowbp_bridge": ("k", "late_bias", "gamma", "alpha", "jk_mode"),
    "flowbp_lagrange": ("order", "alpha", "tau", "gamma", "beta", "lam", "jk_mode", "dirichlet", "max_j_rev",
                        "tail_ratio", "cfg_grad_norm_compensate"),
    "leapalign": ("alpha", "tau", "jk_mode", "detach_negative"),
    "refl": ("last_n",),
    "drtune": ("k", "stop_frac"),
    "draft_lv": ("n",),
}


def method_values(preset: str, method: str) -> dict:
    """The listed parameters of `method` as built for this backbone preset (overrides none)."""
    from flowbp_core import methods

    params = methods.build(method, backbone=preset).params
    return {name: getattr(params, name) for name in SHOWN[method]}


def markdown_table() -> str:
    """The README's preset table: one row per (backbone, method), generated from this module and the methods."""
    lines = ["| backbone | method | global batch | method preset | reference file |",
             "|---|---|---|---|---|"]
    for preset, pb in PAPER.items():
        for m in PAPER_METHODS:
            vals = ", ".join(f"{k}={_fmt(v)}" for k, v in method_values(preset, m).items())
            lines.append(f"| {preset} | `{m}` | {pb.batch[m]} | {vals} | `{reference_file(preset, m)}` |")
    return "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, tuple):
        return "(" + ", ".join(_fmt(x) for x in v) + ")"
    return repr(v) if isinstance(v, str) else str(v)
