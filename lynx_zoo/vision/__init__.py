"""The vision tower."""

from typing import TYPE_CHECKING

from lynx_zoo.lazy import lazy_exports

if TYPE_CHECKING:
    from lynx_zoo.vision.encoder import VisionConfig, VisionEncoder, resample_vision_pos_embed

__getattr__, __dir__ = lazy_exports(__name__, __file__)

__all__ = ["VisionConfig", "VisionEncoder", "resample_vision_pos_embed"]
