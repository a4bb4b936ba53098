"""Adapters inserted into a frozen LLM."""

from lynx_zoo.adapters.bottleneck import AdapterConfig, BottleneckAdapter, insert_adapters
from lynx_zoo.llm.layers import decoder_layers

__all__ = ["AdapterConfig", "BottleneckAdapter", "decoder_layers", "insert_adapters"]
