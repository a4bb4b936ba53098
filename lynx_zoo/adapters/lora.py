"""LoRA adapters through peft, placed by the same keys as Lynx's bottleneck adapters.

peft wraps each target linear module of the chosen decoder layers (``inject_adapter_in_model`` with its layer
selection, ``layers_to_transform``): ``q_proj`` becomes a ``lora.Linear`` that keeps the original module as
``base_layer`` and adds the update ``B @ A`` as ``lora_A.default`` / ``lora_B.default`` (``B`` starts at zero, so the
untrained model is exactly its LLM). peft freezes everything but the LoRA matrices.

Names stay stable: a wrapped module writes and reads its base weights under the HF checkpoint's names
(``...q_proj.weight``, not peft's ``...q_proj.base_layer.weight``), so checkpoints, ``init_from`` and exported
variants hold the same LLM keys with or without LoRA; the LoRA matrices add ``...q_proj.lora_A.default.weight`` and
``...q_proj.lora_B.default.weight``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn

from lynx_zoo.adapters.config import AdapterConfig
from lynx_zoo.llm.layers import InsertedBlock, decoder_layers

ADAPTER_NAME = "default"  # peft's name of the one adapter each wrapped module holds
BASE_LAYER = "base_layer."


class LoraWeights(nn.ModuleDict):
    """The LoRA modules peft put into one decoder layer: ``A``, ``B`` and the dropout of every wrapped linear module,
    keyed by the module's path in the layer (``self_attn/q_proj``). A view for counting, training mode and reports:
    the modules stay where peft put them (their weights are named after those places)."""

    def __init__(self, wrapped: dict[str, LoraLayer]) -> None:
        super().__init__()
        for path, module in wrapped.items():
            parts = {name: getattr(module, name) for name in (*module.adapter_layer_names, "lora_dropout")}
            self[path.replace(".", "/")] = nn.ModuleDict({k: v for k, v in parts.items() if len(v)})


def insert_lora_adapters(llm: nn.Module, config: AdapterConfig) -> dict[int, LoraWeights]:
    """Wrap ``config.target_modules`` of the decoder layers ``config`` chooses with LoRA (peft); returns the LoRA
    weights by layer index. No layer chosen: no LoRA at all."""
    layers = decoder_layers(llm)
    chosen = config.layer_indices(len(layers))
    if not chosen:
        return {}
    lora = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=list(config.target_modules),
        layers_to_transform=chosen,
        layers_pattern="layers",  # the decoder layers' ModuleList (decoder_layers finds the same one)
        bias="none",
    )
    try:
        inject_adapter_in_model(lora, llm, adapter_name=ADAPTER_NAME)
    except ValueError as err:
        raise ValueError(f"adapters.target_modules {list(config.target_modules)}: {err}") from None
    weights: dict[int, LoraWeights] = {}
    for index, layer in enumerate(layers):
        wrapped = {path: m for path, m in layer.named_modules() if isinstance(m, LoraLayer)}
        if not wrapped:
            continue
        missing = sorted(set(config.target_modules) - {path.rpartition(".")[2] for path in wrapped})
        if missing:
            raise ValueError(
                f"adapters.target_modules: decoder layer {index} has no module named {missing}; "
                f"its linear modules: {sorted(linear_module_names(layer))}"
            )
        for module in wrapped.values():
            keep_base_names(module)
        weights[index] = LoraWeights(wrapped)
    if sorted(weights) != chosen:
        raise RuntimeError(f"peft put LoRA into decoder layers {sorted(weights)}, but layers {chosen} were asked for")
    return weights


def linear_module_names(layer: nn.Module) -> set[str]:
    """The names (last path part) of the linear modules of a decoder layer: what ``target_modules`` may name."""
    return {path.rpartition(".")[2] for path, m in layer.named_modules() if isinstance(m, nn.Linear)}


# ------------------------------------------------------------------------------ stable state-dict names
def keep_base_names(module: LoraLayer) -> None:
    """Make a peft-wrapped module write and read its base weights as the module it wraps did (``weight``, not
    ``base_layer.weight``)."""
    module.register_state_dict_post_hook(_base_names_out)
    module.register_load_state_dict_pre_hook(_base_names_in)


def _base_names_out(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    inner = prefix + BASE_LAYER
    for key in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + key[len(inner) :]] = state_dict.pop(key)


def _base_names_in(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    base = module.get_base_layer()
    for name in [n for n, _ in base.named_parameters()] + [n for n, _ in base.named_buffers()]:
        if prefix + name in state_dict:
            state_dict[prefix + BASE_LAYER + name] = state_dict.pop(prefix + name)


# ------------------------------------------------------------------------------ merging
def lora_layers(llm: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    """Every peft-wrapped module of ``llm`` with its path."""
    for path, module in llm.named_modules():
        if isinstance(module, LoraLayer):
            yield path, module


@torch.no_grad()
def merged_llm(llm: nn.Module) -> nn.Module:
    """A copy of ``llm`` with every LoRA update merged into the weights it adapts and peft's wrappers removed: the
    plain HF model again (``llm`` itself is left as it is). Blocks the zoo inserted into decoder layers (adapters,
    cross-attention blocks) stay in the copy; :func:`base_state_dict` leaves them out."""
    merged = copy.deepcopy(llm)
    for path, module in list(lora_layers(merged)):
        module.merge(safe_merge=True, adapter_names=[ADAPTER_NAME])
        parent, _, name = path.rpartition(".")
        setattr(merged.get_submodule(parent), name, module.get_base_layer())
    if hasattr(merged, "peft_config"):
        del merged.peft_config
    return merged


def base_state_dict(llm: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of the LLM alone: without the blocks the zoo inserted into its decoder layers."""
    inserted = [f"{path}." for path, m in llm.named_modules() if isinstance(m, InsertedBlock)]
    return {k: v for k, v in llm.state_dict().items() if not k.startswith(tuple(inserted))}
