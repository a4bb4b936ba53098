"""The vision tower: any timm ViT, at any resolution, returning patch tokens."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from timm.data import resolve_data_config
from torch import nn
from torchvision import transforms

from lynx_zoo.errors import ConfigError
from lynx_zoo.vision.checkpoint import load_tower_checkpoint, resample_pos_embed, set_tower_resolution


@dataclass
class VisionConfig:
    """How to build the vision tower.

    Args:
        model_name: a timm architecture name, optionally with a pretrained tag
            (``eva_giant_patch14_clip_224.laion400m``, ``vit_base_patch16_224.augreg_in21k``).
        pretrained: load timm's pretrained weights for ``model_name`` (from the HF hub or its cache).
        checkpoint_path: a local weights file to load instead of timm's: a timm state dict, the raw EVA-01
            file of the Lynx release (``eva_vit_g.pth``: fused qkv with ``q_bias``/``v_bias``, 40 blocks), or
            a Lynx release checkpoint's tower (``vision_encoder.*``, split q/k/v); see
            :mod:`lynx_zoo.vision.checkpoint`. Read without executing anything (safetensors or weights-only).
        image_size: input resolution; position embeddings are resampled when it differs from the weights'
            (bicubic, ``align_corners=False``, no antialiasing: exactly as the Lynx release).
        num_blocks: keep only the first ``num_blocks`` transformer blocks (Lynx drops the last of EVA's 40).
        final_norm: keep the tower's final norm (Lynx: no).
        keep_cls_token: return the CLS/prefix tokens with the patch tokens (Lynx: yes, 30x30+1 at 420 px).
        trainable: train the tower (Lynx: frozen).
        train_crop: the training image transform: ``true`` takes a random resized crop (the release's
            ``RandomResizedCrop(image_size, scale=train_crop_scale, ratio=train_crop_ratio)``, bicubic);
            ``false`` trains on the evaluation transform (resize + centre crop). Video frames always use the
            evaluation transform, as in the release.
        train_crop_scale: area range of the random crop (Lynx: 0.9 to 1.0).
        train_crop_ratio: aspect-ratio range of the random crop (Lynx: 0.75 to 1.3333).
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
    train_crop: bool = False
    train_crop_scale: tuple[float, float] = (0.9, 1.0)
    train_crop_ratio: tuple[float, float] = (0.75, 1.3333)
    num_frames: int = 5
    model_kwargs: dict[str, Any] = field(default_factory=dict)


class VisionEncoder(nn.Module):
    """A timm ViT that maps images ``(B, 3, H, W)`` to tokens ``(B, N, width)``."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        kwargs = dict(config.model_kwargs)
        kwargs["num_classes"] = 0
        # timm's own weights load at their native resolution, then move to ``image_size`` with the release's
        # interpolation (timm's loader would antialias); a checkpoint file is resampled as it loads
        from_timm = config.pretrained and not config.checkpoint_path
        if not from_timm:
            kwargs["img_size"] = config.image_size
        if config.checkpoint_path and not Path(config.checkpoint_path).is_file():
            raise FileNotFoundError(f"vision.checkpoint_path: no file at {config.checkpoint_path}")
        try:
            self.model = timm.create_model(config.model_name, pretrained=from_timm, **kwargs)
        except RuntimeError as err:
            if "Unknown model" in str(err):
                raise ConfigError(
                    f"vision.model_name: timm has no architecture {config.model_name!r}; "
                    "see timm.list_models('*vit*') for the choices"
                ) from err
            raise
        if not hasattr(self.model, "blocks") or not hasattr(self.model, "num_prefix_tokens"):
            raise ConfigError(f"vision.model_name: {config.model_name!r} is not a ViT-style model with blocks")
        if config.num_blocks is not None:
            depth = len(self.model.blocks)
            if not 0 < config.num_blocks <= depth:
                raise ConfigError(
                    f"vision.num_blocks: expected 1..{depth} for {config.model_name}, got {config.num_blocks}"
                )
            self.model.blocks = self.model.blocks[: config.num_blocks]
        if not config.final_norm:
            self.model.norm = nn.Identity()
        if config.num_frames < 0:
            raise ConfigError(
                f"vision.num_frames: expected 0 (images only) or more frames per clip, got {config.num_frames}"
            )
        patch = tuple(self.model.patch_embed.patch_size)
        if config.image_size < 1 or any(config.image_size % side for side in patch):
            fits = [k * patch[0] for k in (config.image_size // patch[0], config.image_size // patch[0] + 1) if k]
            raise ConfigError(
                f"vision.image_size: {config.image_size} is not a multiple of the patch size {patch[0]} of "
                f"{config.model_name} (the tower would drop the last {config.image_size % patch[0]} rows and columns "
                f"of every image); use {' or '.join(map(str, fits))}"
            )
        if from_timm and tuple(self.model.patch_embed.img_size) != (config.image_size, config.image_size):
            set_tower_resolution(self.model, config.image_size)
        if config.checkpoint_path:
            load_tower_checkpoint(self.model, config.checkpoint_path)
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
        size = self.config.image_size
        return self._compose([transforms.Resize(size, interpolation=BICUBIC), transforms.CenterCrop(size)])

    def train_image_transform(self) -> transforms.Compose:
        """The training transform of images: a random resized crop when ``train_crop`` is on (the release's
        ``RandomResizedCrop``), else the evaluation transform. It draws from torch's global generator."""
        if not self.config.train_crop:
            return self.image_transform()
        size = self.config.image_size
        crop = transforms.RandomResizedCrop(
            (size, size),
            scale=tuple(self.config.train_crop_scale),
            ratio=tuple(self.config.train_crop_ratio),
            interpolation=BICUBIC,
        )
        return self._compose([crop])

    def _compose(self, geometry: list) -> transforms.Compose:
        data_config = resolve_data_config(model=self.model)
        return transforms.Compose(
            [*geometry, transforms.ToTensor(), transforms.Normalize(data_config["mean"], data_config["std"])]
        )


BICUBIC = transforms.InterpolationMode.BICUBIC


def resample_vision_pos_embed(state_dict: dict[str, torch.Tensor], encoder: VisionEncoder, prefix: str = "") -> None:
    """Resample an absolute ``pos_embed`` in ``state_dict`` (in place) to ``encoder``'s grid, as the Lynx
    release interpolates (:func:`~lynx_zoo.vision.checkpoint.resample_pos_embed`).

    Used when a checkpoint trained at one resolution (Lynx: 224) initialises a model at another (420).
    """
    key = f"{prefix}model.pos_embed"
    if key not in state_dict:
        return
    target = encoder.model.pos_embed
    if state_dict[key].shape == target.shape:
        return
    no_embed_class = getattr(encoder.model, "no_embed_class", False)
    state_dict[key] = resample_pos_embed(
        state_dict[key],
        tuple(encoder.model.patch_embed.grid_size),
        num_prefix_tokens=0 if no_embed_class else encoder.num_prefix_tokens,
    )
