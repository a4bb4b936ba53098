"""Start a PT model from a folder in transformers' LLaVA layout (``LlavaForConditionalGeneration``): the configs of
the matching lynx_zoo model, and its weights under lynx_zoo's names (``init_from: FOLDER``).

Read by transformers itself (so every key layout it reads works), then mapped: a ``ViTModel`` tower to timm's
VisionTransformer, ``LlavaMultiModalProjector`` to the ``mlp`` bridge, the language model to the LLM. Towers of other
kinds (CLIP, SigLIP, ...) are refused naming theirs. This module imports no lynx_zoo model code (the models import it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

LLAVA_MODEL_TYPE = "llava"


def is_llava_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder whose ``config.json`` is a transformers LLaVA config."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    return json.loads(config.read_text(encoding="utf-8")).get("model_type") == LLAVA_MODEL_TYPE


def _llava_config(folder: Path) -> Any:
    from transformers import LlavaConfig

    if not is_llava_folder(folder):
        raise ValueError(
            f"{folder}: not a transformers LLaVA folder (config.json with model_type {LLAVA_MODEL_TYPE!r})"
        )
    config = LlavaConfig.from_pretrained(folder)
    vision = config.vision_config
    problems = []
    if vision.model_type != "vit":
        problems.append(f"vision tower {vision.model_type!r} (lynx_zoo reads transformers' ViT towers, model_type vit)")
    if not isinstance(config.vision_feature_layer, int):
        problems.append(f"vision_feature_layer {config.vision_feature_layer} (several layers concatenated)")
    if config.vision_feature_select_strategy not in ("default", "full"):
        problems.append(f"vision_feature_select_strategy {config.vision_feature_select_strategy!r}")
    if not config.multimodal_projector_bias or config.projector_hidden_act != "gelu":
        problems.append(
            f"projector act {config.projector_hidden_act!r}, bias {config.multimodal_projector_bias} "
            "(the mlp bridge: GELU, with biases)"
        )
    if vision.model_type == "vit" and not getattr(vision, "qkv_bias", True):
        problems.append("a ViT tower without qkv bias")
    if problems:
        raise ValueError(f"{folder}: cannot start a PT model from it: {'; '.join(problems)}")
    return config


def _num_blocks(layer: int, depth: int) -> int:
    """Blocks the tower keeps so that its last one gives ``hidden_states[layer]`` (index 0: the embeddings)."""
    blocks = depth + 1 + layer if layer < 0 else layer
    if not 0 < blocks <= depth:
        raise ValueError(f"vision_feature_layer {layer}: not a block of the {depth}-block tower")
    return blocks


def llava_model_configs(folder: str | Path) -> dict[str, Any]:
    """The ``vision``, ``bridge``, ``llm`` and ``adapters`` init arguments (plain dicts) of the PT model whose tower,
    projector and LLM are those of the LLaVA folder: the LLM built from its text config, the folder's tokenizer."""
    folder = Path(folder)
    config = _llava_config(folder)
    vision = config.vision_config
    return {
        "vision": {
            "model_name": "vit_base_patch16_224",  # the architecture: its sizes follow
            "image_size": vision.image_size,
            "num_blocks": _num_blocks(config.vision_feature_layer, vision.num_hidden_layers),
            "final_norm": False,
            "keep_cls_token": config.vision_feature_select_strategy == "full",
            "num_frames": 0,
            "model_kwargs": {
                "patch_size": vision.patch_size,
                "embed_dim": vision.hidden_size,
                "depth": vision.num_hidden_layers,
                "num_heads": vision.num_attention_heads,
                "mlp_ratio": vision.intermediate_size / vision.hidden_size,
                "qkv_bias": True,
            },
        },
        "bridge": {"kind": "mlp"},
        "llm": {
            "pretrained": False,
            "config": config.text_config.to_diff_dict() | {"model_type": config.text_config.model_type},
            "tokenizer": str(folder),
            "trainable": True,
        },
        "adapters": {"every": None},
    }


def lynx_state_from_llava(folder: str | Path, num_blocks: int) -> dict[str, torch.Tensor]:
    """The LLaVA folder's weights under the names of the PT model of :func:`llava_model_configs` (``vision.model.*``
    for the first ``num_blocks`` blocks, ``bridge.*``, ``llm.*``)."""
    from transformers import LlavaForConditionalGeneration

    folder = Path(folder)
    _llava_config(folder)
    llava = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
    tower = llava.model.vision_tower.state_dict()
    embeddings = "embeddings."
    state = {
        "vision.model.cls_token": tower[f"{embeddings}cls_token"],
        "vision.model.pos_embed": tower[f"{embeddings}position_embeddings"],
        "vision.model.patch_embed.proj.weight": tower[f"{embeddings}patch_embeddings.projection.weight"],
        "vision.model.patch_embed.proj.bias": tower[f"{embeddings}patch_embeddings.projection.bias"],
    }
    for i in range(num_blocks):
        src, dst = f"layers.{i}.", f"vision.model.blocks.{i}."
        attention = [tower[f"{src}attention.{p}_proj.weight"] for p in "qkv"]
        attention_bias = [tower[f"{src}attention.{p}_proj.bias"] for p in "qkv"]
        state |= {
            f"{dst}norm1.weight": tower[f"{src}layernorm_before.weight"],
            f"{dst}norm1.bias": tower[f"{src}layernorm_before.bias"],
            f"{dst}attn.qkv.weight": torch.cat(attention),
            f"{dst}attn.qkv.bias": torch.cat(attention_bias),
            f"{dst}attn.proj.weight": tower[f"{src}attention.o_proj.weight"],
            f"{dst}attn.proj.bias": tower[f"{src}attention.o_proj.bias"],
            f"{dst}norm2.weight": tower[f"{src}layernorm_after.weight"],
            f"{dst}norm2.bias": tower[f"{src}layernorm_after.bias"],
            f"{dst}mlp.fc1.weight": tower[f"{src}mlp.fc1.weight"],
            f"{dst}mlp.fc1.bias": tower[f"{src}mlp.fc1.bias"],
            f"{dst}mlp.fc2.weight": tower[f"{src}mlp.fc2.weight"],
            f"{dst}mlp.fc2.bias": tower[f"{src}mlp.fc2.bias"],
        }
    projector = llava.model.multi_modal_projector
    state |= {
        "bridge.0.weight": projector.linear_1.weight,
        "bridge.0.bias": projector.linear_1.bias,
        "bridge.2.weight": projector.linear_2.weight,
        "bridge.2.bias": projector.linear_2.bias,
    }
    state |= {f"llm.model.{k}": v for k, v in llava.model.language_model.state_dict().items()}
    state["llm.lm_head.weight"] = llava.lm_head.weight
    return {k: v.detach().clone() for k, v in state.items()}
