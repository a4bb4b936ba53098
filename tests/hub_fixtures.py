"""Helpers of the hub tests: tiny models whose vision tower and LLM load from local "pretrained" bases."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from conftest import tiny_configs
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM

from lynx_zoo import LLMConfig, PrefixLynx, VisionConfig
from lynx_zoo.fusion.base import LynxModel
from lynx_zoo.llm import load_tokenizer
from lynx_zoo.vision import VisionEncoder

PROMPTS = ["how many shapes are there?", "what color is the circle in the top left?"]


def write_bases(root: Path) -> dict:
    """A tiny timm tower (safetensors file) and a tiny LLaMA folder, as base weights on disk.

    The LLM's vocabulary is one row short of the tokenizer, so building from it adds a row at the mean of
    the others (as the zoo adds Lynx's [PAD] to Vicuna).
    """
    configs = tiny_configs()
    torch.manual_seed(123)
    tower = VisionEncoder(configs["vision"])
    vision_file = root / "vision.safetensors"
    save_file({k: v.contiguous() for k, v in tower.model.state_dict().items()}, str(vision_file))
    tokenizer = load_tokenizer(configs["llm"])
    hf_config = AutoConfig.for_model(**configs["llm"].config, vocab_size=len(tokenizer) - 1)
    hf_config.bos_token_id, hf_config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    base = AutoModelForCausalLM.from_config(hf_config)
    llm_dir = root / "base_llm"
    base.save_pretrained(llm_dir)
    vision = VisionConfig(**{**configs["vision"].__dict__, "checkpoint_path": str(vision_file)})
    llm = LLMConfig(model=str(llm_dir), tokenizer=configs["llm"].tokenizer, pretrained=True)
    return dict(vision=vision, llm=llm)


def make_model(bases: dict | None = None, cls: type[LynxModel] = PrefixLynx, seed: int = 0, **overrides) -> LynxModel:
    """A tiny model (on local pretrained bases if given) whose trainable weights moved off their init."""
    torch.manual_seed(seed)
    model = cls(**tiny_configs(**(bases or {}), **overrides))
    with torch.no_grad():
        for _, p in model.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def fixed_inputs(batch: int = 2, seed: int = 7) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 30, (batch, 6), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding in the first row
    return dict(input_ids=ids, attention_mask=mask, images=torch.randn(batch, 3, 32, 32, generator=generator))


ADAPTER_NAMES = {"norm": "adapter_norm_before", "down": "adapter_down", "up": "adapter_up"}


def release_tower_layout(key: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    """One timm tower weight as the release's tower holds it (models/vits/eva_vit.py, StableAttention): each
    block's fused qkv split into q_proj/k_proj/v_proj, k without a bias, under ``vision_encoder.``."""
    if match := re.fullmatch(r"(blocks\.\d+\.attn)\.qkv\.(weight|bias)", key):
        q, k, v = value.chunk(3)
        if match[2] == "bias":
            assert not k.any(), "the release's k projection has no bias"
            return {f"vision_encoder.{match[1]}.q_proj.bias": q, f"vision_encoder.{match[1]}.v_proj.bias": v}
        return {f"vision_encoder.{match[1]}.{n}_proj.weight": t for n, t in zip("qkv", (q, k, v))}
    return {f"vision_encoder.{key}": value}


def to_original_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A lynx_zoo PT state dict renamed as the original release names it (models/lynx.py, eva_vit.py,
    resampler.py, modeling_llama.py of bytedance/lynx-llm)."""
    original = {}
    for key, value in state.items():
        if key == "frame_position":
            original["absolute_frame_pos_embed"] = value
        elif match := re.fullmatch(r"bridge\.layers\.(\d+)\.ff\.(.+)", key):
            original[f"bridge.layers.{match[1]}.1.{match[2]}"] = value
        elif match := re.fullmatch(r"bridge\.layers\.(\d+)\.(.+)", key):
            original[f"bridge.layers.{match[1]}.0.{match[2]}"] = value
        elif key.startswith("bridge."):
            original[key] = value
        elif match := re.fullmatch(r"llm\.model\.layers\.(\d+)\.adapter\.scale", key):
            original[f"LLM.model.layers.{match[1]}.output_adapter.scaling"] = value.reshape(1)
        elif match := re.fullmatch(r"llm\.model\.layers\.(\d+)\.adapter\.(\w+)\.(\w+)", key):
            original[f"LLM.model.layers.{match[1]}.output_adapter.{ADAPTER_NAMES[match[2]]}.{match[3]}"] = value
        elif key.startswith("vision.model."):
            original.update(release_tower_layout(key.removeprefix("vision.model."), value))
        elif key.startswith("llm."):
            original["LLM." + key.removeprefix("llm.")] = value
        else:
            raise AssertionError(f"unmapped test key {key}")
    return original


def outputs(model, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[str]]:
    with torch.no_grad():
        logits = model(**inputs).logits
    return logits, model.generate(
        images=inputs["images"], prompts=PROMPTS, max_new_tokens=5, min_new_tokens=5, num_beams=1
    )
