"""The vision tower."""

from lynx_zoo.vision.encoder import VisionConfig, VisionEncoder, resample_vision_pos_embed

__all__ = ["VisionConfig", "VisionEncoder", "resample_vision_pos_embed"]
