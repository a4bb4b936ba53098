"""Adapters inserted into a frozen LLM: Lynx's bottleneck adapters, or LoRA through peft (``adapters.kind``)."""

from __future__ import annotations

from torch import nn

from lynx_zoo.adapters.bottleneck import BottleneckAdapter, insert_bottleneck_adapters
from lynx_zoo.adapters.config import ADAPTER_KINDS, AdapterConfig
from lynx_zoo.adapters.lora import LoraWeights, insert_lora_adapters, merged_llm
from lynx_zoo.llm.layers import decoder_layers


def insert_adapters(llm: nn.Module, config: AdapterConfig, width: int) -> dict[int, nn.Module]:
    """Insert the adapters ``config`` asks for into ``llm``; returns, by decoder layer, the module(s) holding each
    layer's adapter weights (a :class:`BottleneckAdapter` or a :class:`LoraWeights`)."""
    if config.kind == "lora":
        return dict(insert_lora_adapters(llm, config))
    return dict(insert_bottleneck_adapters(llm, config, width))


__all__ = [
    "ADAPTER_KINDS",
    "AdapterConfig",
    "BottleneckAdapter",
    "LoraWeights",
    "decoder_layers",
    "insert_adapters",
    "merged_llm",
]
