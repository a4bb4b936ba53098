"""The vision tower: any timm ViT, at any resolution, returning patch tokens."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from timm.data import resolve_data_config
from timm.layers import resample_abs_pos_embed
from torch import nn
from torchvision import transforms


@dataclass
class VisionConfig:
    """How to build the vision tower.

    Args:
        model_name: a timm architecture name, optionally with a pretrained tag
            (``eva_giant_patch14_clip_224.laion400m``, ``vit_base_patch16_224.augreg_in21k``).
        pretrained: load timm's pretrained weights for ``model_name`` (from the HF hub or its cache).
        checkpoint_path: a local ``.safetensors``/``.pth`` state dict to load instead of timm's weights.
        image_size: input resolution; position embeddings are resampled (bicubic) when it differs
            from the checkpoint's.
        num_blocks: keep only the first ``num_blocks`` transformer blocks (Lynx drops the last of EVA's 40).
        final_norm: keep the tower's final norm (Lynx: no).
        keep_cls_token: return the CLS/prefix tokens with the patch tokens (Lynx: yes, 30x30+1 at 420 px).
        trainable: train the tower (Lynx: frozen).
        num_frames: video frames per clip, each encoded separately and marked by a learned frame-position
            embedding (Lynx: 5); 0 for an image-only model.
        model_kwargs: explicit architecture overrides passed to ``timm.create_model``
            (``embed_dim``, ``depth``, ``num_heads``, ``patch_size``, ``mlp_ratio``, ...).
    """

    model_name: str = "vit_base_patch16_224"
    pretrained: bool = False
    checkpoint_path: str | None = None
    image_size: int = 224
    num_blocks: int | None = None
    final_norm: bool = True
    keep_cls_token: bool = True
    trainable: bool = False
    num_frames: int = 5
    model_kwargs: dict[str, Any] = field(default_factory=dict)


class VisionEncoder(nn.Module):
    """A timm ViT that maps images ``(B, 3, H, W)`` to tokens ``(B, N, width)``."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        kwargs = dict(config.model_kwargs)
        kwargs.update(num_classes=0, img_size=config.image_size)
        if config.checkpoint_path:
            path = Path(config.checkpoint_path)
            if not path.is_file():
                raise FileNotFoundError(f"vision.checkpoint_path: no file at {path}")
            # timm loads the file through the architecture's own filter, which resamples
            # position embeddings to ``img_size``.
            kwargs["pretrained_cfg_overlay"] = dict(file=str(path), num_classes=0)
        try:
            self.model = timm.create_model(
                config.model_name, pretrained=config.pretrained or bool(config.checkpoint_path), **kwargs
            )
        except RuntimeError as err:
            if "Unknown model" in str(err):
                raise ValueError(
                    f"vision.model_name: timm has no architecture {config.model_name!r}; "
                    "see timm.list_models('*vit*') for the choices"
                ) from err
            raise
        if not hasattr(self.model, "blocks") or not hasattr(self.model, "num_prefix_tokens"):
            raise ValueError(f"vision.model_name: {config.model_name!r} is not a ViT-style model with blocks")
        if config.num_blocks is not None:
            depth = len(self.model.blocks)
            if not 0 < config.num_blocks <= depth:
                raise ValueError(
                    f"vision.num_blocks: expected 1..{depth} for {config.model_name}, got {config.num_blocks}"
                )
            self.model.blocks = self.model.blocks[: config.num_blocks]
        if not config.final_norm:
            self.model.norm = nn.Identity()
        self.width: int = self.model.embed_dim
        self.num_prefix_tokens: int = self.model.num_prefix_tokens
        grid = self.model.patch_embed.grid_size
        self.num_tokens: int = grid[0] * grid[1] + (self.num_prefix_tokens if config.keep_cls_token else 0)
        if not config.trainable:
            self.model.requires_grad_(False)
            self.model.eval()

    @property
    def blocks(self) -> nn.Sequential:
        """The tower's transformer blocks (each an FSDP unit of its own)."""
        return self.model.blocks

    def train(self, mode: bool = True) -> VisionEncoder:
        """A frozen tower stays in eval mode (no dropout / drop-path) whatever the trainer asks."""
        super().train(mode)
        if not self.config.trainable:
            self.model.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.model.forward_features(images)
        if not self.config.keep_cls_token:
            tokens = tokens[:, self.num_prefix_tokens :]
        return tokens

    def image_transform(self) -> transforms.Compose:
        """Resize + centre crop + normalise with the tower's mean/std (the Lynx eval transform)."""
        data_config = resolve_data_config(model=self.model)
        size = self.config.image_size
        return transforms.Compose(
            [
                transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
                transforms.CenterCrop(size),
                transforms.ToTensor(),
                transforms.Normalize(data_config["mean"], data_config["std"]),
            ]
        )


def resample_vision_pos_embed(state_dict: dict[str, torch.Tensor], encoder: VisionEncoder, prefix: str = "") -> None:
    """Resample an absolute ``pos_embed`` in ``state_dict`` (in place) to ``encoder``'s grid.

    Used when a checkpoint trained at one resolution (Lynx: 224) initialises a model at another (420).
    """
    key = f"{prefix}model.pos_embed"
    if key not in state_dict:
        return
    target = encoder.model.pos_embed
    if state_dict[key].shape == target.shape:
        return
    no_embed_class = getattr(encoder.model, "no_embed_class", False)
    state_dict[key] = resample_abs_pos_embed(
        state_dict[key],
        new_size=list(encoder.model.patch_embed.grid_size),
        num_prefix_tokens=0 if no_embed_class else encoder.num_prefix_tokens,
    )
