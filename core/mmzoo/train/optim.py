"""AdamW, learning-rate schedules with warmup, and freezing parameter groups."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from mmzoo.config import TrainConfig
from mmzoo.errors import MmzooError, nearest
from mmzoo.lora.attach import is_adapter


def freeze(model: nn.Module, groups: Sequence[str], freeze_groups: Mapping[str, Sequence[str]]) -> None:
    """Turn off gradients for every parameter under the named groups' prefixes."""
    for group in groups:
        if group not in freeze_groups:
            raise MmzooError(
                f"model.freeze: unknown group '{group}'{nearest(group, freeze_groups)}; "
                f"groups: {', '.join(freeze_groups)}"
            )
        prefixes = tuple(freeze_groups[group])
        for name, param in model.named_parameters():
            if name.startswith(prefixes):
                param.requires_grad_(False)


def trainable_summary(model: nn.Module, freeze_groups: Mapping[str, Sequence[str]]) -> list[str]:
    """One line per group: parameters, how many train; LoRA adapters when attached; and the total
    (of every parameter, also those in no group) with the trainable count and share."""
    lines = []
    for group, prefixes in freeze_groups.items():
        params = [p for n, p in model.named_parameters() if n.startswith(tuple(prefixes))]
        count = sum(p.numel() for p in params)
        train = sum(p.numel() for p in params if p.requires_grad)
        state = "trainable" if train == count else "frozen" if train == 0 else "partly frozen"
        lines.append(f"  {group:<10} {count / 1e6:>10.2f}M  {state}")
    adapters = [(n, p) for n, p in model.named_parameters() if is_adapter(n)]
    if adapters:
        count = sum(p.numel() for _, p in adapters)
        layers = len({n.partition(".lora_")[0] for n, _ in adapters})
        lines.append(
            f"  {'lora':<10} {count / 1e6:>10.2f}M  adapters on {layers} layers (in the groups above)"
        )
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    share = 100 * trainable / max(total, 1)
    lines.append(f"  {'total':<10} {total / 1e6:>10.2f}M  ({trainable / 1e6:.2f}M trainable, {share:.2f}%)")
    return lines


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over trainable parameters; no weight decay on biases and norms; fused/foreach when possible."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 else decay).append(param)
    if not decay and not no_decay:
        raise MmzooError("nothing to train: every parameter is frozen (check model.freeze)")
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, **fast)


def lr_factor(step: int, total: int, warmup: int, schedule: str, floor: float) -> float:
    """Multiplier of the peak learning rate at ``step`` (0-based): linear warmup, then decay to ``floor``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
    return floor + (1 - floor) * decay


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    """A LambdaLR following :func:`lr_factor`; ``warmup`` below 1 is a fraction of ``total_steps``."""
    warmup = round(cfg.warmup * total_steps) if cfg.warmup < 1 else int(cfg.warmup)
    floor = cfg.min_lr / cfg.lr if cfg.lr else 0.0
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warmup, cfg.schedule, floor)
    )
