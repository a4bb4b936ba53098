"""convert-lynx: a tiny checkpoint in the original bytedance/lynx-llm key layout becomes a loadable variant."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import safetensors.torch
import torch
import yaml
from hub_fixtures import fixed_inputs, make_model, to_original_layout, write_bases

from lynx_zoo import OptimizerConfig, PromptConfig
from lynx_zoo.cli import main
from lynx_zoo.hub import load_pretrained
from lynx_zoo.hub.convert_lynx import convert_lynx

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert")
    bases = write_bases(root)
    model = make_model(bases)
    with torch.no_grad():  # a tower the release's layout can hold: no bias on k
        for block in model.vision.model.blocks:
            width = block.attn.qkv.bias.shape[0] // 3
            block.attn.qkv.bias[width : 2 * width] = 0
    checkpoint = root / "finetune_lynx.pt"
    torch.save({"model": to_original_layout(model.state_dict())}, checkpoint)
    overlay = root / "bases.yaml"
    overlay.write_text(
        "model:\n  init_args:\n"
        f"    vision: {{checkpoint_path: {bases['vision'].checkpoint_path}}}\n"
        f"    llm: {{model: {bases['llm'].model}, pretrained: true}}\n"
    )
    return dict(
        root=root, model=model, bases=bases, checkpoint=checkpoint, configs=[REPO / "configs/tiny.yaml", overlay]
    )


def test_an_original_checkpoint_converts_to_a_variant_with_identical_outputs(setup, tmp_path):
    out = tmp_path / "lynx-converted"
    main(["convert-lynx", "--ckpt", str(setup["checkpoint"]), "--out", str(out)] + [
        arg for c in setup["configs"] for arg in ("--config", str(c))
    ])  # fmt: skip
    loaded = load_pretrained(out)
    inputs = fixed_inputs()
    videos = torch.randn(2, 5, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, setup["model"](**inputs).logits)
        # the frame-position embedding came over: videos give the same visual tokens
        assert torch.equal(loaded.encode_images(videos), setup["model"].encode_images(videos))
    config = json.loads((out / "config.json").read_text())
    # the tower came from the checkpoint (q/k/v fused again) and is stored; only the frozen LLM is referenced
    base_keys = sum(1 for k in setup["model"].state_dict() if k.startswith("llm.") and ".adapter." not in k)
    assert config["conversion"]["base_keys_not_copied"] == base_keys
    assert config["conversion"]["vision_tower"] == "from the checkpoint"
    assert config["init_args"]["vision"]["checkpoint_path"] is None
    assert "vision.model.blocks.0.attn.qkv.weight" in config["weights"]["keys"]
    assert (out / "README.md").read_text().startswith("---\nlicense:")


def test_a_checkpoint_without_a_tower_keeps_the_configs_vision_base(setup, tmp_path):
    state = torch.load(setup["checkpoint"], weights_only=True)["model"]
    torch.save({k: v for k, v in state.items() if not k.startswith("vision_encoder.")}, tmp_path / "no_tower.pt")
    out = convert_lynx(tmp_path / "no_tower.pt", tmp_path / "out", configs=setup["configs"])
    config = json.loads((out / "config.json").read_text())
    assert config["conversion"]["vision_tower"] == "from the config's vision base"
    assert config["init_args"]["vision"]["checkpoint_path"] == str(setup["bases"]["vision"].checkpoint_path)
    assert not any(k.startswith("vision.") for k in config["weights"]["keys"])
    loaded = load_pretrained(out)
    base = safetensors.torch.load_file(setup["bases"]["vision"].checkpoint_path)
    torch.testing.assert_close(loaded.vision.model.blocks[0].attn.qkv.bias, base["blocks.0.attn.qkv.bias"])


def test_a_tower_with_a_k_bias_is_refused(setup, tmp_path):
    state = torch.load(setup["checkpoint"], weights_only=True)["model"]
    state["vision_encoder.blocks.0.attn.k_proj.bias"] = torch.ones(32)
    torch.save(state, tmp_path / "k_bias.pt")
    with pytest.raises(ValueError, match=r"blocks.0.attn.k_proj has a nonzero bias"):
        convert_lynx(tmp_path / "k_bias.pt", tmp_path / "out", configs=setup["configs"])


def test_a_config_that_does_not_fit_names_the_keys(setup, tmp_path):
    overlay = tmp_path / "bigger.yaml"
    overlay.write_text("model:\n  init_args:\n    bridge: {num_queries: 8, depth: 2}\n")
    with pytest.raises(ValueError) as err:
        convert_lynx(setup["checkpoint"], tmp_path / "out", configs=[*setup["configs"], overlay])
    message = str(err.value)
    assert "bridge.latents -> bridge.latents: checkpoint (4, 32), config (8, 32)" in message
    assert "lacks" in message and "bridge.layers.1." in message
    assert not (tmp_path / "out").exists()


def test_an_unknown_key_is_an_error_not_dropped(setup, tmp_path):
    state = torch.load(setup["checkpoint"], weights_only=True)
    state["model"]["bridge.extra_norm.weight"] = torch.ones(32)
    torch.save(state, tmp_path / "odd.pt")
    with pytest.raises(ValueError, match=r"no lynx_zoo counterpart \(1\): \['bridge.extra_norm.weight'\]"):
        convert_lynx(tmp_path / "odd.pt", tmp_path / "out", configs=setup["configs"])


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pickle code ran"))


def test_the_checkpoint_is_read_weights_only(tmp_path, setup):
    marker = tmp_path / "marker"
    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"model": _Exploit(marker)}))
    with pytest.raises(pickle.UnpicklingError):
        convert_lynx(tmp_path / "evil.pt", tmp_path / "out", configs=setup["configs"])
    assert not marker.exists()


def test_a_model_only_config_converts(setup, tmp_path):
    """A config with a `model:` section alone (no trainer, no data): every omitted section takes its default."""
    tiny = yaml.safe_load((REPO / "configs/tiny.yaml").read_text())["model"]
    tiny["init_args"].pop("optimizer")  # omitted sections: defaults
    tiny["init_args"].pop("prompt")
    model_only = tmp_path / "model_only.yaml"
    model_only.write_text(yaml.safe_dump({"model": tiny}))
    out = tmp_path / "converted"
    main(["convert-lynx", "--ckpt", str(setup["checkpoint"]), "--out", str(out)] + [
        arg for c in (model_only, setup["configs"][1]) for arg in ("--config", str(c))
    ])  # fmt: skip
    loaded = load_pretrained(out)
    assert loaded.optimizer_config.lr == OptimizerConfig().lr and loaded.processor.prompt == PromptConfig()
    assert "## Training data and schedule" in (out / "README.md").read_text()
