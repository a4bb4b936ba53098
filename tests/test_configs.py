"""Every shipped config parses; the real Lynx config builds on the meta device with the reference's sizes."""

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch

from lynx_zoo.cli import LynxCLI
from lynx_zoo.fusion import PrefixLynx

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


class ParseOnlyCLI(LynxCLI):
    """Parses and validates a config (types, keys, class paths) without building anything."""

    def instantiate_classes(self) -> None:
        pass


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_config_parses(config):
    cli = ParseOnlyCLI(args=["--config", str(config)], run=False)
    assert cli.config.model.class_path.startswith("lynx_zoo.")
    assert cli.config.data.class_path.startswith("lynx_zoo.")


@pytest.fixture(scope="module")
def llama_tokenizer_dir(tmp_path_factory) -> str:
    """The LLaMA-layout SentencePiece tokenizer (32,000 pieces) shipped in the mistral-common wheel."""
    spec = importlib.util.find_spec("mistral_common")
    source = Path(spec.origin).parent / "data" / "tokenizer.model.v1"
    target = tmp_path_factory.mktemp("llama_tok")
    shutil.copy(source, target / "tokenizer.model")
    return str(target)


def test_pt_vicuna_420_parameter_counts_on_meta(llama_tokenizer_dir):
    args = [
        "--config", "configs/pt_vicuna_420.yaml",
        "--model.init_args.vision.pretrained=false",
        "--model.init_args.llm.pretrained=false",
        f"--model.init_args.llm.tokenizer={llama_tokenizer_dir}",
        "--trainer.accelerator=cpu",
    ]
    with torch.device("meta"):
        model = LynxCLI(args=args, run=False).model
    assert isinstance(model, PrefixLynx)

    def count(module):
        return sum(p.numel() for p in module.parameters())

    adapters = sum(count(layer.adapter) for layer in model.llm.model.layers if hasattr(layer, "adapter"))
    vision, llm_total, bridge = count(model.vision), count(model.llm), count(model.bridge)
    # vision: EVA ViT-g/14, 39 of 40 blocks, at 420 px (901 position embeddings): ~1.0B
    assert 0.95e9 < vision < 1.05e9, vision
    assert model.vision.num_tokens == 901
    # adapters: 16 layers (0, 2, ..., 30) x (down + up weights, their biases, the LayerNorm, the scale)
    assert model.adapter_layers == list(range(0, 32, 2))
    assert adapters == 16 * (2 * 4096 * 2048 + 2048 + 4096 + 2 * 4096 + 1)
    # LLM: LLaMA-7B (6,738,415,616) plus the added [PAD] row in the input and output embeddings
    assert llm_total - adapters == 6_738_415_616 + 2 * 4096
    assert len(model.tokenizer) == 32001 and model.tokenizer.pad_token == "[PAD]"
    # bridge: 32 latents in the LLM width, 3 layers of 8 x 64 heads with K/V from the 1408-wide tokens
    per_layer = 2 * 1408 + 2 * 4096 + 4096 * 512 + 1408 * 1024 + 512 * 4096 + 2 * 4096 + 2 * 4096 * 16384
    assert bridge == 32 * 4096 + 3 * per_layer + 2 * 4096
    # trainable: the bridge and the adapters only
    trainable = sum(p.numel() for _, p in model.trainable_parameters())
    assert trainable == bridge + adapters
