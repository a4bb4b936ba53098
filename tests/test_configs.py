"""Every shipped config parses; the real Lynx config builds on the meta device with the reference's sizes."""

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch

from lynx_zoo.cli import LynxCLI
from lynx_zoo.fusion import PrefixLynx

ROOT = Path(__file__).resolve().parents[1] / "configs"
# every config, with the base it overlays: grid/ overlays the real Lynx, demo_grid/ the demo
CONFIGS = (
    [[p] for p in sorted(ROOT.glob("*.yaml"))]
    + [[ROOT / "pt_vicuna_420.yaml", p] for p in sorted((ROOT / "grid").glob("*.yaml"))]
    + [[ROOT / "demo.yaml", p] for p in sorted((ROOT / "demo_grid").glob("*.yaml"))]
    # the two training stages of Lynx, each with its data mixture
    + [
        [ROOT / "pt_vicuna_420.yaml", ROOT / "stages" / f"{stage}.yaml", ROOT / "data" / f"lynx_{data}.yaml"]
        for stage, data in (("stage1_224", "stage1"), ("stage1_420", "stage1"), ("stage2", "stage2"))
    ]
)


def config_args(paths: list[Path]) -> list[str]:
    return [arg for path in paths for arg in ("--config", str(path))]


class ParseOnlyCLI(LynxCLI):
    """Parses and validates a config (types, keys, class paths) without building anything."""

    def instantiate_classes(self) -> None:
        pass


@pytest.mark.parametrize("configs", CONFIGS, ids=lambda ps: "+".join(p.stem for p in ps))
def test_config_parses(configs):
    cli = ParseOnlyCLI(args=config_args(configs), run=False)
    assert cli.config.model.class_path.startswith("lynx_zoo.")
    assert cli.config.data.class_path.startswith("lynx_zoo.")


def test_every_stage_and_data_config_is_covered():
    covered = {p for paths in CONFIGS for p in paths}
    assert set((ROOT / "stages").glob("*.yaml")) | set((ROOT / "data").glob("*.yaml")) <= covered


def test_the_stage_configs_chain_with_the_papers_schedule():
    def resolved(stage: str, data: str):
        paths = [ROOT / "pt_vicuna_420.yaml", ROOT / "stages" / f"{stage}.yaml", ROOT / "data" / f"lynx_{data}.yaml"]
        return ParseOnlyCLI(args=config_args(paths), run=False).config

    first, second, third = (
        resolved("stage1_224", "stage1"),
        resolved("stage1_420", "stage1"),
        resolved("stage2", "stage2"),
    )
    model = [c.model.init_args for c in (first, second, third)]
    assert [m.vision.image_size for m in model] == [224, 420, 420]
    assert [(m.optimizer.lr, m.optimizer.min_lr) for m in model] == [(1e-4, 1e-5), (1e-5, 1e-6), (2e-5, 2e-6)]
    assert [c.trainer.max_steps for c in (first, second, third)] == [100_000, 10_000, 20_000]
    assert model[0].init_from is None
    # each stage starts from the last checkpoint of the one before
    assert model[1].init_from == f"{first.trainer.callbacks[0].init_args.dirpath}/last.ckpt"
    assert model[2].init_from == f"{second.trainer.callbacks[0].init_args.dirpath}/last.ckpt"
    stage1 = {s.init_args.name: s.init_args.ratio for s in first.data.init_args.sources}
    assert stage1["blip_capfilt"] == 30.5 and stage1["places365"] == 10.9 and stage1["cc3m"] == 10.1
    kinds = {s.class_path.rpartition(".")[2] for s in third.data.init_args.sources}
    assert {"TextSource", "ImageTextSource", "ConversationSource", "VideoQASource"} <= kinds


@pytest.fixture(scope="module")
def llama_tokenizer_dir(tmp_path_factory) -> str:
    """The LLaMA-layout SentencePiece tokenizer (32,000 pieces) shipped in the mistral-common wheel."""
    spec = importlib.util.find_spec("mistral_common")
    source = Path(spec.origin).parent / "data" / "tokenizer.model.v1"
    target = tmp_path_factory.mktemp("llama_tok")
    shutil.copy(source, target / "tokenizer.model")
    return str(target)


def build_on_meta(paths: list[Path], tokenizer_dir: str):
    """The model of a config with random weights on the meta device (no download, no memory)."""
    args = config_args(paths) + [
        "--model.init_args.vision.pretrained=false",
        "--model.init_args.llm.pretrained=false",
        f"--model.init_args.llm.tokenizer={tokenizer_dir}",
        "--trainer.accelerator=cpu",
    ]
    with torch.device("meta"):
        return LynxCLI(args=args, run=False).model


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


ADAPTER = 2 * 4096 * 2048 + 2048 + 4096 + 2 * 4096 + 1
LLAMA_7B = 6_738_415_616 + 2 * 4096  # plus the [PAD] rows
FRAME_POSITION = 5 * 1408


def test_pt_vicuna_420_parameter_counts_on_meta(llama_tokenizer_dir):
    model = build_on_meta([ROOT / "pt_vicuna_420.yaml"], llama_tokenizer_dir)
    assert isinstance(model, PrefixLynx)

    adapters = sum(count(layer.adapter) for layer in model.llm.model.layers if hasattr(layer, "adapter"))
    vision, llm_total, bridge = count(model.vision), count(model.llm), count(model.bridge)
    # vision: EVA ViT-g/14, 39 of 40 blocks, at 420 px (901 position embeddings): ~1.0B
    assert 0.95e9 < vision < 1.05e9, vision
    assert model.vision.num_tokens == 901
    # adapters: 16 layers (0, 2, ..., 30) x (down + up weights, their biases, the LayerNorm, the scale)
    assert model.adapter_layers == list(range(0, 32, 2))
    assert adapters == 16 * (2 * 4096 * 2048 + 2048 + 4096 + 2 * 4096 + 1)
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


GRID = {
    # overlay: (fusion, image size, LLM id, adapter layers, cross-attention layers, LLM trainable)
    "pt_llama_420": ("PrefixLynx", 420, "huggyllama/llama-7b", list(range(0, 32, 2)), [], False),
    "pt_vicuna_224": ("PrefixLynx", 224, "lmsys/vicuna-7b-v1.1", list(range(0, 32, 2)), [], False),
    "ca_vicuna_420": ("CrossAttnLynx", 420, "lmsys/vicuna-7b-v1.1", [], [3, 7, 11, 15, 19, 23, 27, 31], False),
    "ca_vicuna_420_trainable_llm": (
        "CrossAttnLynx",
        420,
        "lmsys/vicuna-7b-v1.1",
        [],
        [3, 7, 11, 15, 19, 23, 27, 31],
        True,
    ),
    "adapters_every_layer": ("PrefixLynx", 420, "lmsys/vicuna-7b-v1.1", list(range(32)), [], False),
    "adapters_every_2nd": ("PrefixLynx", 420, "lmsys/vicuna-7b-v1.1", list(range(0, 32, 2)), [], False),
    "adapters_none": ("PrefixLynx", 420, "lmsys/vicuna-7b-v1.1", [], [], False),
}


def test_every_grid_overlay_is_covered():
    assert {p.stem for p in (ROOT / "grid").glob("*.yaml")} == set(GRID)


@pytest.mark.parametrize("name", sorted(GRID))
def test_grid_variant_builds_on_meta_with_its_parameter_counts(name, llama_tokenizer_dir):
    fusion, size, llm_id, adapters, xattn, llm_trainable = GRID[name]
    model = build_on_meta([ROOT / "pt_vicuna_420.yaml", ROOT / "grid" / f"{name}.yaml"], llama_tokenizer_dir)
    assert type(model).__name__ == fusion
    assert model.vision_config.image_size == size and model.vision.num_tokens == (size // 14) ** 2 + 1
    assert model.llm_config.model == llm_id and model.adapter_layers == adapters
    assert getattr(model, "cross_attn_layers", []) == xattn
    n_adapters = sum(count(layer.adapter) for layer in model.llm.model.layers if hasattr(layer, "adapter"))
    n_xattn = sum(count(layer.gated_xattn) for layer in model.llm.model.layers if hasattr(layer, "gated_xattn"))
    assert n_adapters == len(adapters) * ADAPTER
    # a gated block: LayerNorm, q + k + v + out (8 x 64 heads in width 4096), two gates, LN + 4x feed-forward
    assert n_xattn == len(xattn) * (2 * 4096 + 4 * 4096 * 512 + 2 + 2 * 4096 + 2 * 4096 * 16384)
    assert count(model.llm) - n_adapters - n_xattn == LLAMA_7B
    trainable = sum(p.numel() for _, p in model.trainable_parameters())
    expected = count(model.bridge) + n_adapters + n_xattn + FRAME_POSITION + (LLAMA_7B if llm_trainable else 0)
    assert trainable == expected
