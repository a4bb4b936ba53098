"""Decoder layers of an HF causal LM, and where in them to put things (adapters, cross-attention)."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from lynx_zoo.errors import ConfigError


def decoder_layers(llm: nn.Module) -> nn.ModuleList:
    """The decoder layers of an HF causal LM (``model.layers`` for the LLaMA family)."""
    decoder = llm.get_decoder() if hasattr(llm, "get_decoder") else llm
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"cannot find the decoder layers of {type(llm).__name__}: expected a `layers` ModuleList")
    return layers


@dataclass
class LayerPlacement:
    """Which decoder layers get a module: ``layers`` (an explicit list) if given, else every
    ``every``-th layer from ``start``; ``every: null`` with no ``layers`` means none."""

    section: ClassVar[str] = "placement"

    every: int | None = 2
    start: int = 0
    layers: list[int] | None = None

    def layer_indices(self, num_layers: int) -> list[int]:
        """The chosen layer indices, validated against ``num_layers``."""
        if self.layers is not None:
            bad = [i for i in self.layers if not 0 <= i < num_layers]
            if bad:
                raise ConfigError(
                    f"{self.section}.layers: {bad} out of range for an LLM with {num_layers} layers "
                    f"(expected 0..{num_layers - 1}), got {self.layers}"
                )
            return sorted(set(self.layers))
        if self.every is None:
            return []
        if self.every < 1:
            raise ConfigError(f"{self.section}.every: expected a positive integer or null, got {self.every}")
        if not 0 <= self.start < num_layers:
            raise ConfigError(f"{self.section}.start: expected 0..{num_layers - 1}, got {self.start}")
        return list(range(self.start, num_layers, self.every))


class InsertedBlock(nn.Module):
    """A module inserted into a decoder layer of the LLM (:func:`attach_block`): an adapter, or a fusion's block.

    It declares what the zoo's machinery needs to know of it, so that nothing looks for attribute names:

    * :meth:`replay_context`: the per-call inputs it reads beside the layer's arguments (a cross-attention
      block's visual tokens). Activation checkpointing recomputes the layer in the backward pass, after that
      call has returned: the context is asked for at the forward and restores those inputs for the recomputation.
    * :meth:`forward_flops`: its forward FLOPs per sample, for throughput and MFU.
    """

    def replay_context(self) -> AbstractContextManager[None]:
        """The context a recomputation of this block's layer runs in (default: it reads nothing beside its input)."""
        return nullcontext()

    def forward_flops(self, text_tokens: int, media_tokens: int) -> float:
        """Forward FLOPs for one sample of ``text_tokens`` LLM tokens and ``media_tokens`` visual tokens; by default
        every LLM token goes through every weight once (2 FLOPs a multiply-add)."""
        return 2.0 * sum(p.numel() for p in self.parameters()) * text_tokens


def attach_block(layer: nn.Module, name: str, block: InsertedBlock, *, before: bool) -> None:
    """Make ``block`` the child ``name`` of a decoder layer and run it with every call of the layer, without
    touching the layer's code: ``before`` the layer on its input hidden states, as ``block(hidden_states,
    position_ids)`` (a cross-attention block), else on its output hidden states, as ``block(hidden_states)``
    (an adapter). The block's weights are named ``<layer>.<name>.*``, beside the layer's own."""
    layer.add_module(name, block.to(device=next(layer.parameters()).device))
    hook = BlockHook(name, before)
    hook.register(layer)
    # kept on the layer itself, so that they travel with it (a spawned process gets a pickled copy of the model)
    layer.__dict__.setdefault(_HOOKS, []).append(hook)


def rehook_attached_blocks(layer: nn.Module) -> None:
    """Register the hooks of ``layer``'s attached blocks again, after any hooks added since (activation
    checkpointing's): they then run inside what those hooks enclose."""
    for hook in layer.__dict__.get(_HOOKS, []):
        hook.register(layer)


_HOOKS = "_lynx_zoo_block_hooks"


class BlockHook:
    """The hook that runs one attached block (see :func:`attach_block`)."""

    def __init__(self, name: str, before: bool) -> None:
        self.name, self.before = name, before
        self.handle: RemovableHandle | None = None

    def register(self, layer: nn.Module) -> None:
        """(Re-)register on ``layer``; an output hook is prepended, so that it runs before the hooks registered
        earlier that close the layer's call."""
        if self.handle is not None:
            self.handle.remove()
        if self.before:
            self.handle = layer.register_forward_pre_hook(self, with_kwargs=True)
        else:
            self.handle = layer.register_forward_hook(self, prepend=True)

    def __call__(self, layer: nn.Module, args: tuple, *rest: Any) -> Any:
        block = layer.get_submodule(self.name)
        if self.before:
            (kwargs,) = rest
            hidden = args[0] if args else kwargs.pop("hidden_states")
            position_ids = kwargs.get("position_ids")
            if position_ids is None:
                position_ids = torch.arange(hidden.shape[1], device=hidden.device)[None]
            return (block(hidden, position_ids), *args[1:]), kwargs
        (output,) = rest
        if isinstance(output, tuple):
            return (block(output[0]), *output[1:])
        return block(output)
