"""``torch.compile`` as a switch: regional compilation of a model's repeated blocks.

Compiling each decoder layer (and each vision block) on its own, rather than the whole model, compiles one graph per
kind of block and reuses it for every layer, so the first step takes seconds rather than minutes, and the parts
between the blocks (the fusion, the loss) stay eager. The blocks inserted into the layers (adapters, cross-attention
blocks) run from the layers' hooks and are compiled with them. A run turns it on with the callback::

    trainer:
      callbacks:
        - class_path: lynx_zoo.training.CompileRegions
          init_args: {regions: [llm_layers]}

Whether it pays depends on the machine: ``benchmarks/train_throughput.py --compile`` measures it (``docs/throughput.md``
has the result of this repository's machine).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import lightning as L
from torch import nn

from lynx_zoo.llm.layers import decoder_layers

if TYPE_CHECKING:
    from lynx_zoo.fusion.base import LynxModel

Region = Literal["llm_layers", "vision_blocks", "bridge_layers"]
REGIONS: tuple[str, ...] = ("llm_layers", "vision_blocks", "bridge_layers")


def region_modules(model: LynxModel, region: str) -> list[nn.Module]:
    """The blocks of one region: the LLM's decoder layers, the vision tower's blocks or the bridge's layers."""
    if region == "llm_layers":
        return list(decoder_layers(model.llm))
    if region == "vision_blocks":
        return list(model.vision.blocks)
    if region == "bridge_layers":
        return model.bridge.units()
    raise ValueError(f"compile: unknown region {region!r}; choose among {list(REGIONS)}")


# The blocks compile_regions compiled: torch has no public way to ask a module whether ``nn.Module.compile`` ran on it
_COMPILED: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def is_compiled(block: nn.Module) -> bool:
    """Whether :func:`compile_regions` compiled ``block``."""
    return block in _COMPILED


def compile_regions(
    model: LynxModel,
    regions: Sequence[str] = ("llm_layers",),
    dynamic: bool | None = None,
    mode: str | None = None,
    backend: str = "inductor",
) -> int:
    """``torch.compile`` every block of ``regions`` in place (``nn.Module.compile``: names and state dicts stay the
    model's); idempotent. ``dynamic``: torch's (``None``: shapes become dynamic once they change, as packed rows'
    lengths do). Returns the number of compiled blocks."""
    blocks = [block for region in regions for block in region_modules(model, region)]
    for block in blocks:
        if block not in _COMPILED:
            block.compile(dynamic=dynamic, mode=mode, backend=backend)
            _COMPILED.add(block)
    return len(blocks)


class CompileRegions(L.Callback):
    """Compiles the model's blocks when training starts (after sharding and activation checkpointing are applied).

    Args:
        regions: ``llm_layers`` (the decoder layers, with their adapters and cross-attention blocks),
            ``vision_blocks`` (the tower's blocks), ``bridge_layers`` (the resampler's layers).
        dynamic: ``torch.compile``'s ``dynamic`` (``None``: automatic).
        mode: ``torch.compile``'s ``mode`` (``None``, ``"max-autotune-no-cudagraphs"``, ...).
        backend: ``torch.compile``'s ``backend``.
    """

    def __init__(
        self,
        regions: Sequence[Region] = ("llm_layers",),
        dynamic: bool | None = None,
        mode: str | None = None,
        backend: str = "inductor",
    ) -> None:
        for region in regions:
            if region not in REGIONS:
                raise ValueError(f"CompileRegions: unknown region {region!r}; choose among {list(REGIONS)}")
        self.regions, self.dynamic, self.mode, self.backend = list(regions), dynamic, mode, backend

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        compile_regions(pl_module, self.regions, self.dynamic, self.mode, self.backend)  # type: ignore[arg-type]
