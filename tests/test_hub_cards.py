"""Model cards: every config has one, each is what the configs generate, and its stated facts match the config."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import ADAPTER, CONFIGS, GRID, LLAMA_7B

from lynx_zoo.hub.cards import stale_cards
from lynx_zoo.hub.config import model_config_from_files
from lynx_zoo.hub.variants import VARIANTS
from lynx_zoo.llm import LLMConfig, base_llm

REPO = Path(__file__).resolve().parents[1]
CARDS = REPO / "model_cards"
SMOLLM2_LAYERS = 30


def card_field(text: str, name: str) -> str:
    match = re.search(rf"^\| {re.escape(name)} \| (.+) \|$", text, re.M)
    assert match, f"card has no {name!r} row"
    return match[1]


def card_count(text: str, name: str) -> int:
    match = re.search(rf"^- {re.escape(name)}: ([\d,]+)", text, re.M)
    assert match, f"card has no {name!r} count"
    return int(match[1].replace(",", ""))


def test_every_config_has_a_variant_and_a_card():
    registered = {tuple(REPO / c for c in v.configs): v.id for v in VARIANTS.values()}
    for paths in CONFIGS:
        assert tuple(paths) in registered, f"no variant in lynx_zoo.variants for {[str(p) for p in paths]}"
        assert (CARDS / f"{registered[tuple(paths)]}.md").is_file(), f"no card for {registered[tuple(paths)]}"
    assert {p.stem for p in CARDS.glob("*.md")} == set(VARIANTS)


@pytest.mark.slow
def test_the_cards_are_what_the_configs_generate():
    assert stale_cards(CARDS) == [], "run: python -m lynx_zoo cards"


def _num_layers(llm: LLMConfig) -> int:
    if llm.config:
        return llm.config["num_hidden_layers"]
    known = base_llm(llm.model)
    if known is not None:
        return known.architecture["num_hidden_layers"]
    assert (llm.gguf_file or "").startswith("SmolLM2-135M"), llm
    return SMOLLM2_LAYERS


@pytest.mark.slow
@pytest.mark.parametrize("variant_id", sorted(VARIANTS))
def test_card_states_the_config(variant_id):
    info = VARIANTS[variant_id]
    text = (CARDS / f"{variant_id}.md").read_text()
    config, _ = model_config_from_files(info.config_paths)
    fusion = config.model_class.__name__
    assert f"`{fusion}`" in card_field(text, "fusion")
    assert card_field(text, "fusion").startswith("PT " if fusion == "PrefixLynx" else "CA ")
    assert card_field(text, "image size") == f"{config.vision.image_size} px"
    layers = config.adapters.layer_indices(_num_layers(config.llm))
    assert card_field(text, "adapter layers") == (", ".join(map(str, layers)) or "none")
    if config.llm.model:
        assert config.llm.model in card_field(text, "LLM")
    else:
        assert "random-weights llama" in card_field(text, "LLM")
    assert card_field(text, "LLM trains") == ("yes" if config.llm.trainable else "no (frozen)")
    assert text.startswith("---\nlicense: ") and "\npipeline_tag: image-text-to-text\n" in text


@pytest.mark.parametrize("stem", sorted(GRID))
def test_grid_cards_state_the_reference_parameter_counts(stem):
    """Independent of the card generator: the grid table and reference sizes of tests/test_configs.py."""
    fusion, size, llm_id, adapters, xattn, llm_trainable = GRID[stem]
    (info,) = [v for v in VARIANTS.values() if v.configs[-1] == f"configs/grid/{stem}.yaml"]
    text = (CARDS / f"{info.id}.md").read_text()
    assert f"`{fusion}`" in card_field(text, "fusion") and card_field(text, "image size") == f"{size} px"
    assert f"`{llm_id}`" == card_field(text, "LLM")
    assert card_field(text, "visual tokens per image") == f"{(size // 14) ** 2 + 1} from the tower"
    blocks = f"`GatedCrossAttentionBlock` before layers {', '.join(map(str, xattn))}" if xattn else "none"
    assert card_field(text, "fusion blocks") == blocks
    rows = dict(re.findall(r"^\| ([^|]+) \| ([\d,]+) \| (?:yes|no) \|$", text, re.M))
    counts = {k: int(v.replace(",", "")) for k, v in rows.items()}
    assert counts["LLM (without adapters / fusion blocks)"] == LLAMA_7B
    assert counts.get("adapters", 0) == len(adapters) * ADAPTER
    trainable = card_count(text, "trainable parameters")
    frame_positions = 5 * 1408  # (1, 5 frames, 1, EVA width)
    base = counts["bridge"] + counts.get("adapters", 0) + counts.get("fusion blocks", 0) + frame_positions
    assert trainable == base + (LLAMA_7B if llm_trainable else 0)
    # the variant stores what trains (the frozen EVA tower and LLM are referenced)
    assert card_count(text, "parameters stored in the variant's model.safetensors") == trainable
