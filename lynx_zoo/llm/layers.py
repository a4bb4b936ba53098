"""Decoder layers of an HF causal LM, and where in them to put things (adapters, cross-attention)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn


def decoder_layers(llm: nn.Module) -> nn.ModuleList:
    """The decoder layers of an HF causal LM (``model.layers`` for the LLaMA family)."""
    decoder = llm.get_decoder() if hasattr(llm, "get_decoder") else llm
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"cannot find the decoder layers of {type(llm).__name__}: expected a `layers` ModuleList")
    return layers


@dataclass
class LayerPlacement:
    """Which decoder layers get a module: ``layers`` (an explicit list) if given, else every
    ``every``-th layer from ``start``; ``every: null`` with no ``layers`` means none."""

    section: ClassVar[str] = "placement"

    every: int | None = 2
    start: int = 0
    layers: list[int] | None = None

    def layer_indices(self, num_layers: int) -> list[int]:
        """The chosen layer indices, validated against ``num_layers``."""
        if self.layers is not None:
            bad = [i for i in self.layers if not 0 <= i < num_layers]
            if bad:
                raise ValueError(f"{self.section}.layers: {bad} out of range for an LLM with {num_layers} layers")
            return sorted(set(self.layers))
        if self.every is None:
            return []
        if self.every < 1:
            raise ValueError(f"{self.section}.every: expected a positive integer or null, got {self.every}")
        if not 0 <= self.start < num_layers:
            raise ValueError(f"{self.section}.start: expected 0..{num_layers - 1}, got {self.start}")
        return list(range(self.start, num_layers, self.every))
