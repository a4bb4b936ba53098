"""Shared fixtures: tiny models built from configs (random weights) and a small rendered data set."""

from __future__ import annotations

import dataclasses
import importlib.util
import shutil
from pathlib import Path

import pytest
import torch

from lynx_zoo import AdapterConfig, BridgeConfig, LLMConfig, OptimizerConfig, PrefixLynx, PromptConfig, VisionConfig
from lynx_zoo.data.shapes import write_shapes_vqa

REPO = Path(__file__).resolve().parents[1]


def tiny_configs(**overrides) -> dict:
    """Configs of a tiny PT model: a 2-block ViT, a 1-layer resampler, a 4-layer width-32 LLaMA."""
    configs = dict(
        vision=VisionConfig(
            model_name="vit_tiny_patch16_224",
            image_size=32,
            model_kwargs=dict(patch_size=8, embed_dim=32, depth=2, num_heads=2),
        ),
        bridge=BridgeConfig(kind="resampler", num_queries=4, depth=1, num_heads=2, head_dim=8, ff_mult=2),
        llm=LLMConfig(
            pretrained=False,
            tokenizer="lynx_zoo/shapes-words",
            config=dict(
                model_type="llama",
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=4,
                num_attention_heads=2,
                num_key_value_heads=2,
                max_position_embeddings=128,
            ),
        ),
        adapters=AdapterConfig(every=2),
        optimizer=OptimizerConfig(lr=3e-3, min_lr=3e-4),
        prompt=PromptConfig(max_length=32),
    )
    for key, value in overrides.items():
        if isinstance(value, dict) and dataclasses.is_dataclass(configs.get(key)):
            value = dataclasses.replace(configs[key], **value)
        configs[key] = value
    return configs


@pytest.fixture
def make_tiny():
    """``make_tiny(cls=PrefixLynx, **overrides)`` -> a tiny model with fixed random weights."""

    def make(cls=PrefixLynx, seed: int = 0, **overrides):
        torch.manual_seed(seed)
        return cls(**tiny_configs(**overrides))

    return make


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory) -> Path:
    """A small rendered shapes VQA set on disk (32 px, 64 training and 16 held-out images)."""
    root = tmp_path_factory.mktemp("shapes")
    write_shapes_vqa(root, num_train=64, num_val=16, image_size=32, seed=1)
    return root


@pytest.fixture(scope="session")
def llama_tokenizer_dir(tmp_path_factory) -> str:
    """A folder with the LLaMA-layout SentencePiece tokenizer (32,000 pieces) shipped in the mistral-common wheel."""
    spec = importlib.util.find_spec("mistral_common")
    source = Path(spec.origin).parent / "data" / "tokenizer.model.v1"
    target = tmp_path_factory.mktemp("llama_tok")
    shutil.copy(source, target / "tokenizer.model")
    return str(target)
