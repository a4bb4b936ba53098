"""Convert a checkpoint of the original Lynx release (bytedance/lynx-llm: ``pretrain_lynx.pt``,
``finetune_lynx.pt``) into a lynx_zoo variant folder.

The original state dict (optionally under a ``"model"`` key) names the parts ``vision_encoder.`` (EVA ViT),
``LLM.`` (its LLaMA fork, adapters as ``output_adapter``), ``bridge.`` (the Perceiver resampler, each layer a
``[PerceiverAttention, FeedForward]`` pair) and ``absolute_frame_pos_embed``. Every trained weight maps one to
one onto lynx_zoo's modules (the architectures are the same; the adapter's scale is a ``(1,)`` tensor there
and a scalar here).

The tower (``vision_encoder.*``: each block's attention split into ``q_proj``/``k_proj``/``v_proj``, k without
a bias, the position embedding already interpolated to 420 px) is fused into timm's layout and stored in the
variant, which then takes its tower from the checkpoint rather than from ``vision.checkpoint_path``: those
are the weights the release ran with. A checkpoint without a tower keeps the config's vision base.
The frozen LLM's own weights (``LLM.*``) are not copied: the variant references its base LLM, as every
variant does; their number is recorded in ``config.json``.
A key that maps nowhere, a shape that differs, or a weight the variant needs but the checkpoint lacks is an
error naming it: nothing is dropped silently.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from lynx_zoo.errors import listed_problems
from lynx_zoo.hub.config import model_config_from_files
from lynx_zoo.hub.export import write_variant
from lynx_zoo.hub.weights import base_prefixes, variant_keys
from lynx_zoo.resources import config_path
from lynx_zoo.vision.checkpoint import LYNX_TOWER_PREFIX, fuse_split_qkv

DEFAULT_CONFIG = "zoo:pt_vicuna_420.yaml"

# original name (regex) -> lynx_zoo name (template)
KEY_MAP: list[tuple[str, str]] = [
    (r"absolute_frame_pos_embed", "frame_position"),
    (r"bridge\.latents", "bridge.latents"),
    (r"bridge\.norm\.(weight|bias)", r"bridge.norm.\1"),
    (r"bridge\.layers\.(\d+)\.0\.(norm_media|norm_latents|to_q|to_kv|to_out)\.(\w+)", r"bridge.layers.\1.\2.\3"),
    (r"bridge\.layers\.(\d+)\.1\.([013])\.(weight|bias)", r"bridge.layers.\1.ff.\2.\3"),
    (r"LLM\.model\.layers\.(\d+)\.output_adapter\.adapter_norm_before\.(\w+)", r"llm.model.layers.\1.adapter.norm.\2"),
    (r"LLM\.model\.layers\.(\d+)\.output_adapter\.adapter_down\.(weight|bias)", r"llm.model.layers.\1.adapter.down.\2"),
    (r"LLM\.model\.layers\.(\d+)\.output_adapter\.adapter_up\.(weight|bias)", r"llm.model.layers.\1.adapter.up.\2"),
    (r"LLM\.model\.layers\.(\d+)\.output_adapter\.scaling", r"llm.model.layers.\1.adapter.scale"),
]  # fmt: skip
# frozen base weights of the original: referenced by the variant, not copied
BASE_PATTERNS = (r"LLM\.(?!.*output_adapter).*",)
TOWER = "vision.model."  # where lynx_zoo keeps the timm tower


def map_key(key: str) -> str | None:
    """The lynx_zoo name of an original trained weight; ``None`` for a frozen base weight.

    Raises ``KeyError`` for a key of neither kind."""
    for pattern, template in KEY_MAP:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, template, key)
    if any(re.fullmatch(p, key) for p in BASE_PATTERNS):
        return None
    raise KeyError(key)


def read_original(path: Path) -> dict[str, torch.Tensor]:
    """The state dict of an original checkpoint (weights only: no code runs while reading it)."""
    if not path.is_file():
        raise FileNotFoundError(f"convert-lynx: no checkpoint at {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: not a Lynx state dict (expected tensors, optionally under a 'model' key)")
    for wrapper in ("module.", "model."):  # DeepSpeed / wrapper prefixes on every key
        if state and all(k.startswith(wrapper) for k in state):
            state = {k.removeprefix(wrapper): v for k, v in state.items()}
    return state


def convert_state(
    original: dict[str, torch.Tensor], own: dict[str, torch.Tensor], wanted: list[str], source: Path
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Map ``original`` onto the model whose state dict (shapes) is ``own``; ``wanted``: what the variant stores.

    Returns the converted tensors and the original base keys that were not copied."""
    converted: dict[str, torch.Tensor] = {}
    base_keys: list[str] = []
    unknown: list[str] = []
    mismatched: list[str] = []
    tower = {k.removeprefix(LYNX_TOWER_PREFIX): v for k, v in original.items() if k.startswith(LYNX_TOWER_PREFIX)}
    tower_keys = {k.removeprefix(TOWER) for k in own if k.startswith(TOWER)}
    named = [(f"{LYNX_TOWER_PREFIX}{k}", f"{TOWER}{k}", v) for k, v in fuse_split_qkv(tower, tower_keys).items()]
    for key, tensor in original.items():
        if not key.startswith(LYNX_TOWER_PREFIX):
            try:
                named.append((key, map_key(key), tensor))
            except KeyError:
                unknown.append(key)
    for key, target, tensor in named:
        if target is None:
            base_keys.append(key)
            continue
        if target not in own:
            unknown.append(f"{key} -> {target} (not in this config's model)")
            continue
        expected = own[target].shape
        if target.endswith(".adapter.scale") and tensor.shape == (1,) and expected == ():
            tensor = tensor.reshape(())  # the original's scale is a (1,) tensor, lynx_zoo's a scalar
        if tensor.shape != expected:
            mismatched.append(f"{key} -> {target}: checkpoint {tuple(tensor.shape)}, config {tuple(expected)}")
            continue
        converted[target] = tensor.to(own[target].dtype).contiguous()
    missing = [k for k in wanted if k not in converted]
    problems = listed_problems(
        ("shapes differ from the lynx_zoo config", mismatched),
        ("keys with no lynx_zoo counterpart", unknown),
        ("weights the variant needs but the checkpoint lacks", missing),
    )
    if problems:
        raise ValueError(
            f"convert-lynx {source}: " + problems + ". Pick the lynx_zoo config that matches the "
            "checkpoint (--config: resolution, resampler size, adapter placement, num_frames)"
        )
    return converted, base_keys


def convert_lynx(
    checkpoint: str | Path, out: str | Path, configs: list[str | Path] | None = None, name: str | None = None
) -> Path:
    """Convert an original Lynx checkpoint into a variant folder at ``out``.

    Args:
        checkpoint: ``finetune_lynx.pt`` / ``pretrain_lynx.pt`` of bytedance/lynx-llm.
        out: the variant folder to write.
        configs: the lynx_zoo config (and overlays) describing the architecture; default: the released
            Lynx, ``zoo:pt_vicuna_420.yaml`` (the shipped ``configs/pt_vicuna_420.yaml``).
        name: the variant's name (default: the folder's).
    """
    checkpoint = Path(checkpoint)
    paths = [config_path(c) for c in (configs or [DEFAULT_CONFIG])]
    config, _ = model_config_from_files(paths)  # a model-only config is enough: nothing else is read
    original = read_original(checkpoint)
    tower_in_checkpoint = any(k.startswith(LYNX_TOWER_PREFIX) for k in original)
    vision_base: dict[str, Any] = {"timm_model": config.vision.model_name}
    if tower_in_checkpoint:  # the variant stores the release's tower: no vision base to load
        config = config.replace(vision={"pretrained": False, "checkpoint_path": None})
        vision_base["weights"] = f"{checkpoint.name}: {LYNX_TOWER_PREFIX}* (stored in the variant)"
    model = config.build_on_meta()
    # what the variant stores follows the config it stands for (pretrained bases), not the meta build
    wanted = variant_keys(model, bases=base_prefixes(config.vision, config.llm))
    converted, base_keys = convert_state(original, model.state_dict(), wanted, checkpoint)
    bases = {"vision": vision_base, "llm": {"model": config.llm.model}}
    extra = {
        "conversion": {
            "from": "bytedance/lynx-llm",
            "checkpoint": checkpoint.name,
            "configs": [str(p) for p in paths],
            "vision_tower": "from the checkpoint" if tower_in_checkpoint else "from the config's vision base",
            "base_keys_not_copied": len(base_keys),
        }
    }
    return write_variant(out, model, config, converted, name=name, bases=bases, source=str(checkpoint), extra=extra)
