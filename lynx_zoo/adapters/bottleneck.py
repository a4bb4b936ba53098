"""Lynx's bottleneck adapters, attached to decoder layers of a frozen HF LLM without forking its code.

Each adapter becomes a child ``adapter`` of its decoder layer (so base weight names stay those of the
HF checkpoint) and a forward hook applies it to the layer's output, i.e. after the MLP residual:
``h + s * Up(SiLU(Down(LayerNorm(h))))``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class AdapterConfig:
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

    every: int | None = 2
    start: int = 0
    layers: list[int] | None = None
    bottleneck: int | None = None
    init_std: float = 0.02
    init_scale: float = 1.0

    def layer_indices(self, num_layers: int) -> list[int]:
        """The decoder layers that get an adapter, validated against ``num_layers``."""
        if self.layers is not None:
            bad = [i for i in self.layers if not 0 <= i < num_layers]
            if bad:
                raise ValueError(f"adapters.layers: {bad} out of range for an LLM with {num_layers} layers")
            return sorted(set(self.layers))
        if self.every is None:
            return []
        if self.every < 1:
            raise ValueError(f"adapters.every: expected a positive integer or null, got {self.every}")
        if not 0 <= self.start < num_layers:
            raise ValueError(f"adapters.start: expected 0..{num_layers - 1}, got {self.start}")
        return list(range(self.start, num_layers, self.every))


class BottleneckAdapter(nn.Module):
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
        return hidden + self.scale * self.up(self.act(self.down(self.norm(hidden))))


def _apply_adapter(layer: nn.Module, args: tuple, output: torch.Tensor | tuple) -> torch.Tensor | tuple:
    """Forward hook: run the layer's adapter on its output hidden states."""
    if isinstance(output, tuple):
        return (layer.adapter(output[0]), *output[1:])
    return layer.adapter(output)


def decoder_layers(llm: nn.Module) -> nn.ModuleList:
    """The decoder layers of an HF causal LM (``model.layers`` for the LLaMA family)."""
    decoder = llm.get_decoder() if hasattr(llm, "get_decoder") else llm
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"cannot find the decoder layers of {type(llm).__name__}: expected a `layers` ModuleList")
    return layers


def insert_adapters(llm: nn.Module, config: AdapterConfig, width: int) -> list[int]:
    """Attach a :class:`BottleneckAdapter` to the decoder layers chosen by ``config``; returns their indices."""
    layers = decoder_layers(llm)
    indices = config.layer_indices(len(layers))
    bottleneck = config.bottleneck or width // 2
    for i in indices:
        layer = layers[i]
        param = next(layer.parameters())
        adapter = BottleneckAdapter(width, bottleneck, config.init_std, config.init_scale)
        layer.adapter = adapter.to(device=param.device, dtype=param.dtype if param.is_floating_point() else None)
        layer.register_forward_hook(_apply_adapter)
    return indices
