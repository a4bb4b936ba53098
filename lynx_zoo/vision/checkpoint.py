"""Vision tower weights from a file, and the position-embedding interpolation of the Lynx release.

``vision.checkpoint_path`` reads any of these layouts (optionally under a ``model``/``module``/``state_dict``
key, as training frameworks save them):

* timm's own state dict of the architecture (``.safetensors`` or a weights-only pickle);
* the raw EVA-01 file the release builds its tower from (``EVA01_g_psz14.pt``, renamed ``eva_vit_g.pth`` in
  its README): the same names as timm's EVA (``blocks.N.attn.qkv.weight`` fused, ``q_bias`` and ``v_bias``,
  no bias for k), 40 blocks of which Lynx keeps 39, and a final norm Lynx does not use;
* the tower of a Lynx release checkpoint (``finetune_lynx.pt``): the keys under ``vision_encoder.``, each
  block's attention split into ``q_proj``/``k_proj``/``v_proj`` (k without a bias), the position embedding
  already interpolated to 420 px.

Blocks beyond the tower's ``num_blocks``, a final norm the tower does not keep and EVA-01's pretraining heads
are left out (logged), as the release leaves them out. Any other key the tower lacks is left out with a warning
naming it (the release loads with ``strict=False``); a weight the tower needs but the file lacks is an error
naming it.
"""

from __future__ import annotations

import logging
import math
import re
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file
from timm.layers import resample_abs_pos_embed
from torch import nn

from lynx_zoo.errors import listed_problems

log = logging.getLogger(__name__)

# the prefix of the tower's weights in a Lynx release checkpoint (models/lynx.py: self.vision_encoder)
LYNX_TOWER_PREFIX = "vision_encoder."
_SPLIT_QKV = re.compile(r"(blocks\.\d+\.attn)\.([qkv])_proj\.(weight|bias)")
_BLOCK = re.compile(r"blocks\.(\d+)\.")
# what EVA-01's masked-image-modelling and classification heads add beside the tower (no place in it)
PRETRAINING_HEADS = ("mask_token", "lm_head.", "head.", "fc_norm.")


def resample_pos_embed(pos_embed: torch.Tensor, new_grid: tuple[int, int], num_prefix_tokens: int = 1) -> torch.Tensor:
    """``pos_embed`` ``(1, prefix + h*w, width)`` resampled to ``new_grid`` as the Lynx release does
    (``models/vits/eva_vit.py: interpolate_pos_embed``): bicubic, ``align_corners=False``, no antialiasing,
    in float32, the prefix (CLS) rows kept as they are. The source grid must be square, as there.

    timm's default antialiases, which in PyTorch selects a different cubic kernel even when upsampling.
    """
    num_patches = pos_embed.shape[1] - num_prefix_tokens
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(
            f"pos_embed: {num_patches} patch positions (after {num_prefix_tokens} prefix tokens) are not a square "
            "grid; cannot tell its height and width"
        )
    return resample_abs_pos_embed(
        pos_embed,
        new_size=list(new_grid),
        old_size=[side, side],
        num_prefix_tokens=num_prefix_tokens,
        interpolation="bicubic",
        antialias=False,
        align_corners=False,
    )


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file or a weights-only pickle (``.pth``/``.pt``/``.bin``), unwrapped
    from a ``model``/``module``/``state_dict`` key. Nothing in the file is executed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"vision.checkpoint_path: no file at {path}")
    if path.suffix == ".safetensors":
        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        for key in ("model", "module", "state_dict"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"vision.checkpoint_path: {path} holds no state dict of tensors")
    return state


def tower_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tower's own weights of ``state``: those under ``vision_encoder.`` if the file is a whole Lynx
    checkpoint (with ``model.`` or ``module.`` wrappers removed), else all of them."""
    for wrapper in ("module.", "model."):
        if state and all(k.startswith(wrapper) for k in state):
            state = {k.removeprefix(wrapper): v for k, v in state.items()}
    if any(k.startswith(LYNX_TOWER_PREFIX) for k in state):
        return {k.removeprefix(LYNX_TOWER_PREFIX): v for k, v in state.items() if k.startswith(LYNX_TOWER_PREFIX)}
    return state


def fuse_split_qkv(state: dict[str, torch.Tensor], target_keys: set[str]) -> dict[str, torch.Tensor]:
    """The release's split attention (``attn.q_proj``/``k_proj``/``v_proj``; k has no bias) as timm's fused
    ``attn.qkv.weight`` with, as the target tower has them, ``q_bias``/``v_bias`` (EVA) or one ``qkv.bias``
    whose k third is zero (a plain timm ViT). Other keys pass through."""
    fused: dict[str, torch.Tensor] = {}
    split: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        match = _SPLIT_QKV.fullmatch(key)
        if match:
            split.setdefault(match[1], {})[f"{match[2]}_{match[3]}"] = tensor
        else:
            fused[key] = tensor
    for attn, parts in split.items():
        missing = [p for p in ("q_weight", "k_weight", "v_weight") if p not in parts]
        if missing:
            raise ValueError(f"vision checkpoint: {attn} lacks {', '.join(m.replace('_', '_proj.') for m in missing)}")
        if "k_bias" in parts and bool(parts["k_bias"].any()):
            raise ValueError(f"vision checkpoint: {attn}.k_proj has a nonzero bias, which the fused layout cannot hold")
        fused[f"{attn}.qkv.weight"] = torch.cat([parts["q_weight"], parts["k_weight"], parts["v_weight"]])
        if "q_bias" in parts or "v_bias" in parts:
            q_bias = parts.get("q_bias", torch.zeros(parts["q_weight"].shape[0]))
            v_bias = parts.get("v_bias", torch.zeros(parts["v_weight"].shape[0]))
            if f"{attn}.q_bias" in target_keys:
                fused[f"{attn}.q_bias"], fused[f"{attn}.v_bias"] = q_bias, v_bias
            else:
                fused[f"{attn}.qkv.bias"] = torch.cat([q_bias, torch.zeros_like(q_bias), v_bias])
    return fused


def fit_to_tower(state: dict[str, torch.Tensor], model: nn.Module, source: str) -> dict[str, torch.Tensor]:
    """``state`` (any layout of the module docstring) as ``model``'s state dict: q/k/v fused, the position
    embedding resampled to the model's grid, blocks and norms the model does not keep left out.

    ``model`` is a timm ViT-style tower (``blocks``, ``patch_embed``, ``pos_embed``, ``num_prefix_tokens``)."""
    own = model.state_dict()
    state = fuse_split_qkv(tower_weights(state), set(own))
    kept_blocks = len(model.blocks)
    dropped_blocks = sorted({int(m[1]) for k in state if (m := _BLOCK.match(k)) and int(m[1]) >= kept_blocks})
    dropped_norm = sorted(k for k in state if k.startswith("norm.") and k not in own)
    heads = sorted(k for k in state if k.startswith(PRETRAINING_HEADS) and k not in own)
    extra = sorted(
        k
        for k in state
        if k not in own and not k.startswith(("norm.", *PRETRAINING_HEADS)) and not _beyond(k, kept_blocks)
    )
    if dropped_blocks or dropped_norm or heads:
        log.info(
            "%s: left out blocks %s, final norm %s and pretraining heads %s (the tower keeps %d blocks%s)",
            source,
            dropped_blocks or "none",
            dropped_norm or "none",
            heads or "none",
            kept_blocks,
            "" if "norm.weight" in own else ", no final norm",
        )
    if extra:
        warnings.warn(
            f"{source}: {len(extra)} weights have no place in the vision tower and are left out "
            f"(as the Lynx release's strict=False load does): {extra[:8]}",
            stacklevel=3,
        )
    fitted = {k: v for k, v in state.items() if k in own}
    if "pos_embed" in fitted and "pos_embed" in own and fitted["pos_embed"].shape != own["pos_embed"].shape:
        prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
        fitted["pos_embed"] = resample_pos_embed(fitted["pos_embed"], tuple(model.patch_embed.grid_size), prefix)
    missing = sorted(set(own) - set(fitted))
    mismatched = [
        f"{k}: file {tuple(v.shape)}, tower {tuple(own[k].shape)}" for k, v in fitted.items() if v.shape != own[k].shape
    ]
    problems = listed_problems(
        ("weights the tower needs but the file lacks", missing), ("shapes that differ", mismatched), shown=6
    )
    if problems:
        raise ValueError(
            f"{source}: does not fit the vision tower: "
            + problems
            + " (check vision.model_name, vision.model_kwargs and vision.num_blocks)"
        )
    return fitted


def _beyond(key: str, kept_blocks: int) -> bool:
    match = _BLOCK.match(key)
    return match is not None and int(match[1]) >= kept_blocks


def load_tower_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Load ``path`` (any layout of the module docstring) into the timm tower ``model``, strictly."""
    fitted = fit_to_tower(read_state_dict(path), model, f"vision.checkpoint_path {path}")
    model.load_state_dict(fitted, strict=True)


def set_tower_resolution(model: nn.Module, image_size: int) -> None:
    """Move a built timm tower to ``image_size``, its position embedding resampled as the release does."""
    old_pos_embed = model.pos_embed.detach().clone()
    model.set_input_size(img_size=(image_size, image_size))
    prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
    with torch.no_grad():
        model.pos_embed.copy_(resample_pos_embed(old_pos_embed, tuple(model.patch_embed.grid_size), prefix))
