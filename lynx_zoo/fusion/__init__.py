"""Fusion modules: how visual tokens enter the LLM. The base owns everything else; the registry names them."""

from lynx_zoo.fusion.base import FusedInputs, LynxModel
from lynx_zoo.fusion.cross_attn import CrossAttnConfig, CrossAttnLynx, GatedCrossAttentionBlock
from lynx_zoo.fusion.prefix import PrefixLynx
from lynx_zoo.fusion.registry import UnknownModelClassError, model_class, register_model, registered_models

__all__ = [
    "CrossAttnConfig",
    "CrossAttnLynx",
    "FusedInputs",
    "GatedCrossAttentionBlock",
    "LynxModel",
    "PrefixLynx",
    "UnknownModelClassError",
    "model_class",
    "register_model",
    "registered_models",
]
