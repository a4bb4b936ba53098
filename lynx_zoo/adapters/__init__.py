"""Adapters inserted into a frozen LLM: Lynx's bottleneck adapters, or LoRA through peft (``adapters.kind``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from lynx_zoo.lazy import lazy_exports

if TYPE_CHECKING:
    from lynx_zoo.adapters.bottleneck import BottleneckAdapter
    from lynx_zoo.adapters.config import ADAPTER_KINDS, AdapterConfig
    from lynx_zoo.adapters.lora import LoraWeights, merged_llm
    from lynx_zoo.llm.layers import decoder_layers

__getattr__, __dir__ = lazy_exports(__name__, __file__)


def insert_adapters(llm: nn.Module, config: AdapterConfig, width: int) -> dict[int, nn.Module]:
    """Insert the adapters ``config`` asks for into ``llm``; returns, by decoder layer, the module(s) holding each
    layer's adapter weights (a :class:`BottleneckAdapter` or a :class:`LoraWeights`). peft is imported for LoRA
    only."""
    if config.kind == "lora":
        from lynx_zoo.adapters.lora import insert_lora_adapters

        return dict(insert_lora_adapters(llm, config))
    from lynx_zoo.adapters.bottleneck import insert_bottleneck_adapters

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
