"""lynx_zoo: a PyTorch Lightning model zoo for GPT4-style multimodal LLMs (the Lynx study, runnable)."""

from lynx_zoo.adapters import AdapterConfig
from lynx_zoo.bridge import BridgeConfig
from lynx_zoo.data import PromptConfig, ShapesVQADataModule, VQADataModule
from lynx_zoo.fusion import CrossAttnConfig, CrossAttnLynx, LynxModel, PrefixLynx, register_model
from lynx_zoo.hub import VARIANTS as variants
from lynx_zoo.hub import list_variants, load_model, load_pretrained
from lynx_zoo.llm import LLMConfig
from lynx_zoo.training import OptimizerConfig
from lynx_zoo.vision import VisionConfig

__all__ = [
    "AdapterConfig",
    "BridgeConfig",
    "CrossAttnConfig",
    "CrossAttnLynx",
    "LLMConfig",
    "LynxModel",
    "OptimizerConfig",
    "PrefixLynx",
    "PromptConfig",
    "ShapesVQADataModule",
    "VQADataModule",
    "VisionConfig",
    "list_variants",
    "load_model",
    "load_pretrained",
    "register_model",
    "variants",
]
