"""Convert a checkpoint of the original Lynx release (bytedance/lynx-llm: ``pretrain_lynx.pt``,
``finetune_lynx.pt``) into a lynx_zoo variant folder.

The original state dict (optionally under a ``"model"`` key) names the parts ``vision_encoder.`` (EVA ViT),
``LLM.`` (its LLaMA fork, adapters as ``output_adapter``), ``bridge.`` (the Perceiver resampler, each layer a
``[PerceiverAttention, FeedForward]`` pair) and ``absolute_frame_pos_embed``. Every trained weight maps one to
one onto lynx_zoo's modules (the architectures are the same; the adapter's scale is a ``(1,)`` tensor there
and a scalar here). Frozen base weights (``vision_encoder.*`` and the LLM's own ``LLM.*``) are not copied:
the variant references its bases, as every variant does; their number is recorded in ``config.json``.
A key that maps nowhere, a shape that differs, or a weight the variant needs but the checkpoint lacks is an
error naming it: nothing is dropped silently.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from lynx_zoo.evaluation.runner import resolve_model_class
from lynx_zoo.hub.cards import build_on_meta, resolved_config
from lynx_zoo.hub.export import base_prefixes, variant_keys, write_variant
from lynx_zoo.resources import config_path

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
BASE_PATTERNS = (r"vision_encoder\..*", r"LLM\.(?!.*output_adapter).*")


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
    for key, tensor in original.items():
        try:
            target = map_key(key)
        except KeyError:
            unknown.append(key)
            continue
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
    problems = []
    if mismatched:
        problems.append(f"shapes differ from the lynx_zoo config ({len(mismatched)}): {mismatched[:5]}")
    if unknown:
        problems.append(f"keys with no lynx_zoo counterpart ({len(unknown)}): {unknown[:5]}")
    if missing:
        problems.append(f"weights the variant needs but the checkpoint lacks ({len(missing)}): {missing[:5]}")
    if problems:
        raise ValueError(
            f"convert-lynx {source}: " + "; ".join(problems) + ". Pick the lynx_zoo config that matches the "
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
    config = resolved_config(paths)
    cls = resolve_model_class(config["model"]["class_path"])
    init_args: dict[str, Any] = {k: v for k, v in config["model"]["init_args"].items() if k != "init_from"}
    init_args = _jsonable(init_args)
    model = build_on_meta(cls, init_args)
    # what the variant stores follows the config it stands for (pretrained bases), not the meta build
    wanted = variant_keys(model, bases=base_prefixes(init_args["vision"], init_args["llm"]))
    own = model.state_dict()
    converted, base_keys = convert_state(read_original(checkpoint), own, wanted, checkpoint)
    bases = {"vision": {"timm_model": init_args["vision"]["model_name"]}, "llm": {"model": init_args["llm"]["model"]}}
    extra = {
        "conversion": {
            "from": "bytedance/lynx-llm",
            "checkpoint": checkpoint.name,
            "configs": [str(p) for p in paths],
            "base_keys_not_copied": len(base_keys),
        }
    }
    return write_variant(out, model, init_args, converted, name=name, bases=bases, source=str(checkpoint), extra=extra)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value
