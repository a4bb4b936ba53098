"""Lynx's bottleneck adapters, attached to decoder layers of a frozen HF LLM without forking its code.

Each adapter becomes a child ``adapter`` of its decoder layer (so base weight names stay those of the
HF checkpoint) and runs on the layer's output (:func:`~lynx_zoo.llm.layers.attach_block`), i.e. after the
MLP residual:
``h + s * Up(SiLU(Down(LayerNorm(h))))``.
"""

from __future__ import annotations

import torch
from torch import nn

from lynx_zoo.adapters.config import AdapterConfig
from lynx_zoo.llm.layers import InsertedBlock, attach_block, decoder_layers


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


def insert_bottleneck_adapters(llm: nn.Module, config: AdapterConfig, width: int) -> dict[int, BottleneckAdapter]:
    """Attach a :class:`BottleneckAdapter` to the decoder layers chosen by ``config``; returns them by layer index."""
    layers = decoder_layers(llm)
    bottleneck = config.bottleneck or width // 2
    adapters = {}
    for i in config.layer_indices(len(layers)):
        adapters[i] = BottleneckAdapter(width, bottleneck, config.init_std, config.init_scale)
        attach_block(layers[i], "adapter", adapters[i], before=False)
    return adapters
