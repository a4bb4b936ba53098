"""What a variant folder stores, and how its files are checked.

Stored: every trainable weight (bridge, adapters, fusion blocks, anything unfrozen) and every weight of a part
that is not loaded from a pretrained base (a tower or LLM built with random weights, a frozen bridge). Frozen
weights of pretrained bases are referenced by id/path and revision, not copied: the [PAD] embedding row that
the zoo adds to a frozen LLM is the mean of the base's rows, recomputed identically at load time, so it needs
no storing either.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from lynx_zoo.fusion.base import LynxModel
from lynx_zoo.llm import LLMConfig, load_tokenizer
from lynx_zoo.vision import VisionConfig


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def base_prefixes(vision: VisionConfig, llm: LLMConfig) -> tuple[str, ...]:
    """State-dict prefixes of the parts loaded from pretrained bases (their frozen weights are not stored)."""
    prefixes = []
    if vision.pretrained or vision.checkpoint_path:
        prefixes.append("vision.")
    if llm.pretrained:
        prefixes.append("llm.")
    return tuple(prefixes)


def tokenizer_changed(model: LynxModel) -> bool:
    """Whether the model's tokenizer differs from what its LLM config loads (tokens added after building)."""
    return model.tokenizer.get_vocab() != load_tokenizer(model.llm_config).get_vocab()


def embedding_keys(model: LynxModel) -> set[str]:
    """State-dict names of the LLM's input and output embedding matrices."""
    matrices = [model.llm.get_input_embeddings().weight]
    output = model.llm.get_output_embeddings()
    if output is not None:
        matrices.append(output.weight)
    return {
        f"llm.{name}" for name, p in model.llm.named_parameters(remove_duplicate=False) if any(p is m for m in matrices)
    }


def variant_keys(model: LynxModel, changed_tokenizer: bool = False, bases: tuple[str, ...] | None = None) -> list[str]:
    """The state-dict keys a variant stores (see the module docstring); with a changed tokenizer, also the
    embedding matrices (their added rows are not reproducible from the base). ``bases``: the prefixes of
    pretrained bases (default: from the model's own configs; a model built on the meta device with random
    weights passes those of the config it stands for)."""
    if bases is None:
        bases = base_prefixes(model.vision_config, model.llm_config)
    trainable = {n for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}
    extra = embedding_keys(model) if changed_tokenizer else set()
    return [k for k in model.state_dict() if k in trainable or k in extra or not k.startswith(bases)]
