"""Every shipped config parses; the real Lynx config builds on the meta device with the reference's sizes."""

from __future__ import annotations

import pytest
from conftest import ADAPTER, CONFIG_ROOT, CONFIGS, FRAME_POSITION, GRID, LLAMA_7B, XATTN_BLOCK, config_args

from lynx_zoo.fusion import PrefixLynx
from lynx_zoo.fusion.config import ModelConfig
from lynx_zoo.hub.config import model_config_from_files, parse_fit_args


@pytest.mark.parametrize("configs", CONFIGS, ids=lambda ps: "+".join(p.stem for p in ps))
def test_config_parses(configs):
    config = parse_fit_args(config_args(configs))
    assert config["model"]["class_path"].startswith("lynx_zoo.")
    assert config["data"]["class_path"].startswith("lynx_zoo.")


def test_every_stage_and_data_config_is_covered():
    covered = {p for paths in CONFIGS for p in paths}
    assert set((CONFIG_ROOT / "stages").glob("*.yaml")) | set((CONFIG_ROOT / "data").glob("*.yaml")) <= covered


def test_the_stage_configs_chain_with_the_papers_schedule():
    def resolved(stage: str, data: str) -> tuple[ModelConfig, dict]:
        base = CONFIG_ROOT / "pt_vicuna_420.yaml"
        return model_config_from_files(
            [base, CONFIG_ROOT / "stages" / f"{stage}.yaml", CONFIG_ROOT / "data" / f"lynx_{data}.yaml"]
        )

    (first, first_run), (second, second_run), (third, third_run) = (
        resolved("stage1_224", "stage1"),
        resolved("stage1_420", "stage1"),
        resolved("stage2", "stage2"),
    )
    assert [m.vision.image_size for m in (first, second, third)] == [224, 420, 420]
    assert [(m.optimizer.lr, m.optimizer.min_lr) for m in (first, second, third)] == [
        (1e-4, 1e-5),
        (1e-5, 1e-6),
        (2e-5, 2e-6),
    ]
    runs = (first_run, second_run, third_run)
    assert [r["trainer"]["max_steps"] for r in runs] == [100_000, 10_000, 20_000]
    init_from = [r["model"]["init_args"].get("init_from") for r in runs]
    assert init_from[0] is None
    # each stage starts from the last checkpoint of the one before
    assert init_from[1] == f"{first_run['trainer']['callbacks'][0]['init_args']['dirpath']}/last.ckpt"
    assert init_from[2] == f"{second_run['trainer']['callbacks'][0]['init_args']['dirpath']}/last.ckpt"
    stage1 = {s["init_args"]["name"]: s["init_args"]["ratio"] for s in first_run["data"]["init_args"]["sources"]}
    assert stage1["blip_capfilt"] == 30.5 and stage1["places365"] == 10.9 and stage1["cc3m"] == 10.1
    kinds = {s["class_path"].rpartition(".")[2] for s in third_run["data"]["init_args"]["sources"]}
    assert {"TextSource", "ImageTextSource", "ConversationSource", "VideoQASource"} <= kinds


def test_a_model_only_config_gets_every_omitted_section_at_its_default(tmp_path):
    path = tmp_path / "model.yaml"
    path.write_text("model:\n  class_path: PrefixLynx\n  init_args:\n    llm: {model: lmsys/vicuna-7b-v1.1}\n")
    config, resolved = model_config_from_files([path])
    assert config.model_class is PrefixLynx and config.llm.model == "lmsys/vicuna-7b-v1.1"
    assert config.prompt.template and config.optimizer.lr > 0 and config.adapters.every == 2
    assert resolved.get("data") is None


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def build_on_meta(*names: str):
    return model_config_from_files([CONFIG_ROOT / n for n in names])[0].build_on_meta()


def test_pt_vicuna_420_parameter_counts_on_meta():
    model = build_on_meta("pt_vicuna_420.yaml")
    assert isinstance(model, PrefixLynx)
    adapters = sum(count(a) for a in model.adapter_blocks.values())
    vision, llm_total, bridge = count(model.vision), count(model.llm), count(model.bridge)
    # vision: EVA ViT-g/14, 39 of 40 blocks, at 420 px (901 position embeddings): ~1.0B
    assert 0.95e9 < vision < 1.05e9, vision
    assert model.vision.num_tokens == 901
    # adapters: 16 layers (0, 2, ..., 30)
    assert model.adapter_layers == list(range(0, 32, 2))
    assert adapters == 16 * ADAPTER
    # LLM: LLaMA-7B (6,738,415,616) plus the added [PAD] row in the input and output embeddings
    assert llm_total - adapters == LLAMA_7B
    assert len(model.tokenizer) == 32001 and model.tokenizer.pad_token == "[PAD]"
    # bridge: 32 latents in the LLM width, 3 layers of 8 x 64 heads with K/V from the 1408-wide tokens
    per_layer = 2 * 1408 + 2 * 4096 + 4096 * 512 + 1408 * 1024 + 512 * 4096 + 2 * 4096 + 2 * 4096 * 16384
    assert bridge == 32 * 4096 + 3 * per_layer + 2 * 4096
    # trainable: the bridge, the adapters and the video frame-position embedding (5 frames x 1408)
    trainable = sum(p.numel() for _, p in model.trainable_parameters())
    assert model.frame_position.shape == (1, 5, 1, 1408)
    assert trainable == bridge + adapters + FRAME_POSITION


def test_every_grid_overlay_is_covered():
    assert {p.stem for p in (CONFIG_ROOT / "grid").glob("*.yaml")} == set(GRID)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(GRID))
def test_grid_variant_builds_on_meta_with_its_parameter_counts(name):
    fusion, size, llm_id, adapters, xattn, llm_trainable = GRID[name]
    model = build_on_meta("pt_vicuna_420.yaml", f"grid/{name}.yaml")
    assert type(model).__name__ == fusion
    assert model.vision_config.image_size == size and model.vision.num_tokens == (size // 14) ** 2 + 1
    assert model.llm_config.model == llm_id and model.adapter_layers == adapters
    assert list(model.fusion_blocks()) == xattn
    n_adapters = sum(count(a) for a in model.adapter_blocks.values())
    n_xattn = sum(count(b) for b in model.fusion_blocks().values())
    assert n_adapters == len(adapters) * ADAPTER
    assert n_xattn == len(xattn) * XATTN_BLOCK
    assert count(model.llm) - n_adapters - n_xattn == LLAMA_7B
    trainable = sum(p.numel() for _, p in model.trainable_parameters())
    expected = count(model.bridge) + n_adapters + n_xattn + FRAME_POSITION + (LLAMA_7B if llm_trainable else 0)
    assert trainable == expected
