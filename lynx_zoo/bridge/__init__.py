"""Bridges from vision tokens to LLM-width visual tokens."""

from lynx_zoo.bridge.bridges import BRIDGES, BridgeConfig, PerceiverResampler, build_bridge, register_bridge

__all__ = ["BRIDGES", "BridgeConfig", "PerceiverResampler", "build_bridge", "register_bridge"]
