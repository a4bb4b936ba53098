"""Bridges from vision tokens to LLM-width visual tokens."""

from typing import TYPE_CHECKING

from lynx_zoo.lazy import lazy_exports

if TYPE_CHECKING:
    from lynx_zoo.bridge.bridges import BRIDGES, BridgeConfig, PerceiverResampler, build_bridge, register_bridge

__getattr__, __dir__ = lazy_exports(__name__, __file__)

__all__ = ["BRIDGES", "BridgeConfig", "PerceiverResampler", "build_bridge", "register_bridge"]
