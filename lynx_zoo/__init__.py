"""lynx_zoo: a PyTorch Lightning model zoo for GPT4-style multimodal LLMs (the Lynx study, runnable).

Every name here is imported on first use (:mod:`lynx_zoo.lazy`): ``import lynx_zoo`` loads neither Lightning nor
transformers, timm, peft or PyAV until a model, a DataModule or a trainer is asked for.
"""

from typing import TYPE_CHECKING

from lynx_zoo.lazy import lazy_exports

if TYPE_CHECKING:
    from lynx_zoo.adapters.config import AdapterConfig
    from lynx_zoo.bridge.bridges import BridgeConfig
    from lynx_zoo.data.datamodule import ShapesVQADataModule, VQADataModule
    from lynx_zoo.data.processor import PromptConfig
    from lynx_zoo.fusion import CrossAttnConfig, CrossAttnLynx, LynxModel, PrefixLynx, register_model
    from lynx_zoo.fusion.config import ModelConfig
    from lynx_zoo.hub.loading import load_model, load_pretrained
    from lynx_zoo.hub.variants import VARIANTS as variants
    from lynx_zoo.hub.variants import list_variants
    from lynx_zoo.llm.causal_lm import LLMConfig
    from lynx_zoo.optim import OptimizerConfig
    from lynx_zoo.vision.encoder import VisionConfig

__getattr__, __dir__ = lazy_exports(__name__, __file__)

__all__ = [
    "AdapterConfig",
    "BridgeConfig",
    "CrossAttnConfig",
    "CrossAttnLynx",
    "LLMConfig",
    "LynxModel",
    "ModelConfig",
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
