"""The Lynx optimiser: AdamW with a linear warmup and a linear decay to a floor."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lynx_zoo.errors import ConfigError


@dataclass
class OptimizerConfig:
    """AdamW and its schedule (defaults: Lynx stage 1 at 224 px).

    The learning rate rises linearly from ``min_lr`` to ``lr`` over the first ``warmup_ratio`` of the
    steps, then falls linearly back to ``min_lr`` at the last step.
    Biases, norms and scalar gains get no weight decay.
    """

    lr: float = 1e-4
    min_lr: float = 1e-5
    warmup_ratio: float = 0.05
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def __post_init__(self) -> None:
        checks = [
            ("lr", self.lr > 0, "a positive number"),
            ("min_lr", 0 <= self.min_lr <= self.lr, f"a number from 0 to optimizer.lr ({self.lr})"),
            ("warmup_ratio", 0 <= self.warmup_ratio <= 1, "a share of the steps from 0 to 1"),
            ("weight_decay", self.weight_decay >= 0, "a number >= 0"),
            ("betas", len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "two numbers in [0, 1)"),
            ("eps", self.eps > 0, "a positive number"),
        ]
        for key, valid, expected in checks:
            if not valid:
                raise ConfigError(f"optimizer.{key}: expected {expected}, got {getattr(self, key)}")


def lr_factor(step: int, total_steps: int, config: OptimizerConfig) -> float:
    """The learning rate at ``step`` as a fraction of ``config.lr``."""
    floor = config.min_lr / config.lr
    warmup = max(1, round(config.warmup_ratio * total_steps))
    if step < warmup:
        return floor + (1.0 - floor) * step / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return 1.0 + (floor - 1.0) * progress


def build_optimizer(
    named_parameters: list[tuple[str, nn.Parameter]], total_steps: int, config: OptimizerConfig
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over ``named_parameters`` (the trainable ones) and its per-step schedule."""
    if not named_parameters:
        raise ValueError("nothing to train: every parameter is frozen (check the *.trainable options and adapters)")
    decay = [p for _, p in named_parameters if p.ndim >= 2]
    no_decay = [p for _, p in named_parameters if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
        betas=config.betas,
        eps=config.eps,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, config))
    return optimizer, scheduler
