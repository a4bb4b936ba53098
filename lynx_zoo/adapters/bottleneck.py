"""Lynx's bottleneck adapters, attached to decoder layers of a frozen HF LLM without forking its code.

Each adapter becomes a child ``adapter`` of its decoder layer (so base weight names stay those of the
HF checkpoint) and runs on the layer's output (:func:`~lynx_zoo.llm.layers.attach_block`), i.e. after the
MLP residual:
``h + s * Up(SiLU(Down(LayerNorm(h))))``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from lynx_zoo.llm.layers import InsertedBlock, LayerPlacement, attach_block, decoder_layers


@dataclass
class AdapterConfig(LayerPlacement):
    """Where the adapters go and how big they are.

    Placement: ``layers`` (an explicit list) if given, else every ``every``-th layer from ``start``;
    ``every: null`` with no ``layers`` means no adapters. Lynx's released config: every 2nd layer from 0.

    Args:
        every: put an adapter on every ``every``-th decoder layer (1 = all layers).
        start: the first layer that gets one when placing by ``every``.
        layers: explicit layer indices (overrides ``every``/``start``).
        bottleneck: hidden size of the adapter (default: half the LLM width, Lynx's 4096 -> 2048).
        init_std: std of the normal init of the down/up weights (biases start at 0).
        init_scale: initial value of the learnable output scale ``s``.
    """

    section: ClassVar[str] = "adapters"

    bottleneck: int | None = None
    init_std: float = 0.02
    init_scale: float = 1.0


class BottleneckAdapter(InsertedBlock):
    """``h + s * Up(SiLU(Down(LayerNorm(h))))`` with a learnable scalar ``s``."""

    def __init__(self, width: int, bottleneck: int, init_std: float = 0.02, init_scale: float = 1.0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.down = nn.Linear(width, bottleneck)
        self.up = nn.Linear(bottleneck, width)
        self.act = nn.SiLU()
        self.scale = nn.Parameter(torch.tensor(float(init_scale)))
        for linear in (self.down, self.up):
            nn.init.normal_(linear.weight, std=init_std)
            nn.init.zeros_(linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # the adapter keeps its own (fp32) weights beside a low-precision frozen LLM
        update = self.up(self.act(self.down(self.norm(hidden.to(self.down.weight.dtype)))))
        return hidden + (self.scale * update).to(hidden.dtype)


def insert_adapters(llm: nn.Module, config: AdapterConfig, width: int) -> dict[int, BottleneckAdapter]:
    """Attach a :class:`BottleneckAdapter` to the decoder layers chosen by ``config``; returns them by layer index."""
    layers = decoder_layers(llm)
    bottleneck = config.bottleneck or width // 2
    adapters = {}
    for i in config.layer_indices(len(layers)):
        adapters[i] = BottleneckAdapter(width, bottleneck, config.init_std, config.init_scale)
        attach_block(layers[i], "adapter", adapters[i], before=False)
    return adapters
