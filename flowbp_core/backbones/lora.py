"""Trainable-weight plumbing shared by every family: LoRA through peft, full fine-tuning, and the named
state dict that weight sync and checkpoints move between processes.

Why names, not positions: a rollout worker and a learner each build their own model; the only thing they agree
on is the parameter names (both applied the same `LoRAConfig`), so `load_trainable` checks names and shapes and
says exactly which ones differ instead of copying into the wrong tensor.
"""

from __future__ import annotations

import torch

from flowbp_core.backbones.base import LoRAConfig
from flowbp_core.errors import ConfigError

ADAPTER = "default"


def has_lora(model: torch.nn.Module) -> bool:
    return bool(getattr(model, "peft_config", None))


def lora_targets(model: torch.nn.Module, cfg: LoRAConfig, default_targets: tuple[str, ...]) -> list[str]:
    """The Linear layers an adapter of `cfg` adapts, in module order: those named by a target or ending in
    "." + a target (peft's rule)."""
    targets = list(cfg.target_modules or default_targets)
    linear_names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    matched = [n for n in linear_names if any(n == t or n.endswith("." + t) for t in targets)]
    if not matched:
        raise ConfigError("lora.target_modules", targets,
                          f"names of Linear layers of {type(model).__name__}, e.g. {sorted(linear_names)[:6]}")
    return matched


def apply_lora(model: torch.nn.Module, cfg: LoRAConfig, default_targets: tuple[str, ...]) -> list[str]:
    """Freeze `model`, add one LoRA adapter (diffusers' `add_adapter`, i.e. peft), make only it trainable.

    Adapter weights are float32 whatever the base dtype (see LoRAConfig). Returns the adapted module names.
    """
    from peft import LoraConfig

    if has_lora(model):
        raise ValueError("a LoRA adapter is already applied to this backbone; build a fresh backbone to change it")
    targets = list(cfg.target_modules or default_targets)
    matched = lora_targets(model, cfg, default_targets)
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.dropout,
                                 target_modules=targets, init_lora_weights=cfg.init), adapter_name=ADAPTER)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = p.data.to(torch.float32)
            p.requires_grad_(True)
    return sorted(matched)


def trainable_named(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Detached views of the trainable weights (aliases of the live tensors: copy before the next optimizer
    step if you keep them)."""
    return {n: p.detach() for n, p in trainable_named(model).items()}


@torch.no_grad()
def load_trainable(model: torch.nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Copy `sd` into the trainable weights; the key sets and shapes must match exactly."""
    params = trainable_named(model)
    check_state(sd, {n: tuple(p.shape) for n, p in params.items()})
    for n, p in params.items():
        p.copy_(sd[n].to(device=p.device, dtype=p.dtype))


def check_state(sd: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]]) -> None:
    """Raise, naming what differs, unless `sd` has exactly the keys of `shapes` with those shapes."""
    missing = sorted(set(shapes) - set(sd))
    unexpected = sorted(set(sd) - set(shapes))
    if missing or unexpected:
        raise ValueError(
            f"trainable state dict does not match this backbone: {len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}). Expected the keys of trainable_state_dict() "
            "of a backbone with the same LoRA / full fine-tuning setup")
    for n, shape in shapes.items():
        if tuple(sd[n].shape) != shape:
            raise ValueError(f"trainable state dict entry {n!r} has shape {tuple(sd[n].shape)}, expected {shape}")


class MergedLoRA:
    """Synced LoRA states folded into a plain (adapter-free) model: each adapted Linear's weight becomes
    W0 + (alpha / r) B A, computed in float32 and rounded once to the weight's dtype. A rollout worker samples
    with it, so its forward is the plain model's (peft's unmerged adapters run two extra matmuls a layer).

    Why from a kept copy of W0: merging each sync's delta onto the last one (or unmerging the old delta first)
    adds a rounding every sync in bf16; W0 + delta makes a sync replace the previous delta, bitwise the same as
    the first sync of that state. The copy costs the adapted layers' base weights once more, on their device.

    `shapes` are the keys and shapes of the adapter's `trainable_state_dict()` (peft's names, adapter "default"),
    in the learner's parameter order.
    """

    def __init__(self, model: torch.nn.Module, cfg: LoRAConfig, default_targets: tuple[str, ...]):
        if has_lora(model):
            raise ValueError("MergedLoRA folds deltas into a plain model; this one carries a peft adapter")
        modules = dict(model.named_modules())
        self.layers = {n: modules[n] for n in lora_targets(model, cfg, default_targets)}
        self.scale = cfg.lora_alpha / cfg.rank
        self.base = {n: m.weight.detach().clone() for n, m in self.layers.items()}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for n, m in self.layers.items():
            self.shapes[f"{n}.lora_A.{ADAPTER}.weight"] = (cfg.rank, m.in_features)
            self.shapes[f"{n}.lora_B.{ADAPTER}.weight"] = (m.out_features, cfg.rank)
        model.requires_grad_(False)

    @torch.no_grad()
    def load(self, sd: dict[str, torch.Tensor]) -> None:
        """Set every adapted weight to W0 + scale * B A for the adapter state `sd` (keys checked first)."""
        check_state(sd, self.shapes)
        for n, m in self.layers.items():
            w = m.weight
            a = sd[f"{n}.lora_A.{ADAPTER}.weight"].to(device=w.device, dtype=torch.float32)
            b = sd[f"{n}.lora_B.{ADAPTER}.weight"].to(device=w.device, dtype=torch.float32)
            w.copy_(torch.addmm(self.base[n].float(), b, a, alpha=self.scale).to(w.dtype))


def lora_state_for_diffusers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights with peft's adapter name stripped: the key format `load_lora_weights` reads."""
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(model, adapter_name=ADAPTER).items()}


def lora_metadata(model: torch.nn.Module) -> dict:
    """The LoraConfig as a dict, stored beside the weights so that rank/alpha survive the export."""
    return model.peft_config[ADAPTER].to_dict()
