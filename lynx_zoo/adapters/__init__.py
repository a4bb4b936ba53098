"""Adapters inserted into a frozen LLM."""

from lynx_zoo.adapters.bottleneck import AdapterConfig, BottleneckAdapter, decoder_layers, insert_adapters

__all__ = ["AdapterConfig", "BottleneckAdapter", "decoder_layers", "insert_adapters"]
