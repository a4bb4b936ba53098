"""Fusion modules: how visual tokens enter the LLM. The base owns everything else."""

from lynx_zoo.fusion.base import LynxModel
from lynx_zoo.fusion.cross_attn import CrossAttnConfig, CrossAttnLynx, GatedCrossAttentionBlock
from lynx_zoo.fusion.prefix import PrefixLynx

__all__ = ["CrossAttnConfig", "CrossAttnLynx", "GatedCrossAttentionBlock", "LynxModel", "PrefixLynx"]
