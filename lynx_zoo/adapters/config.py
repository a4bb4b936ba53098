"""Which adapters go into a frozen LLM, where, and how big: one config section (``adapters``) for every kind."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Literal

from lynx_zoo.llm.layers import LayerPlacement

AdapterKind = Literal["bottleneck", "lora"]
ADAPTER_KINDS: tuple[str, ...] = ("bottleneck", "lora")
# the fields that only one kind reads
KIND_FIELDS: dict[str, tuple[str, ...]] = {
    "bottleneck": ("bottleneck", "init_std", "init_scale"),
    "lora": ("rank", "alpha", "dropout", "target_modules"),
}


@dataclass
class AdapterConfig(LayerPlacement):
    """Where the adapters go, of which kind, and how big they are.

    Placement (both kinds): ``layers`` (an explicit list) if given, else every ``every``-th decoder layer from
    ``start``; ``every: null`` with no ``layers`` means no adapters. Lynx's released config: bottleneck adapters on
    every 2nd layer from 0.

    Args:
        kind: ``bottleneck``: Lynx's adapter after each chosen layer's MLP residual
            (:class:`~lynx_zoo.adapters.bottleneck.BottleneckAdapter`); ``lora``: low-rank updates of the chosen layers'
            linear modules through peft (:mod:`lynx_zoo.adapters.lora`).
        every: an adapter on every ``every``-th decoder layer (1 = all layers).
        start: the first layer that gets one when placing by ``every``.
        layers: explicit layer indices (overrides ``every``/``start``).
        bottleneck: (bottleneck) hidden size of the adapter (default: half the LLM width, Lynx's 4096 -> 2048).
        init_std: (bottleneck) std of the normal init of the down/up weights (biases start at 0).
        init_scale: (bottleneck) initial value of the learnable output scale ``s``.
        rank: (lora) rank ``r`` of each update ``B @ A``.
        alpha: (lora) the update is scaled by ``alpha / rank``.
        dropout: (lora) dropout on the input of each update while training.
        target_modules: (lora) names of the linear modules inside a decoder layer that get an update (LLaMA:
            ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``, ``gate_proj``, ``up_proj``, ``down_proj``).
    """

    section: ClassVar[str] = "adapters"

    kind: AdapterKind = "bottleneck"
    bottleneck: int | None = None
    init_std: float = 0.02
    init_scale: float = 1.0
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")

    def __post_init__(self) -> None:
        if self.kind not in ADAPTER_KINDS:
            raise ValueError(f"adapters.kind: expected one of {list(ADAPTER_KINDS)}, got {self.kind!r}")
        self.target_modules = tuple(self.target_modules)  # a YAML list arrives as a list
        defaults = {f.name: f.default for f in dataclasses.fields(AdapterConfig)}
        for kind, names in KIND_FIELDS.items():
            foreign = [name for name in names if kind != self.kind and getattr(self, name) != defaults[name]]
            if foreign:
                raise ValueError(
                    f"adapters: {', '.join(foreign)} configure {kind} adapters, but adapters.kind is {self.kind!r}; "
                    f"remove them or set adapters.kind: {kind}"
                )
        if self.kind == "lora":
            if self.rank < 1:
                raise ValueError(f"adapters.rank: expected a positive integer, got {self.rank}")
            if not 0.0 <= self.dropout < 1.0:
                raise ValueError(f"adapters.dropout: expected a probability in [0, 1), got {self.dropout}")
            if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
                raise ValueError(f"adapters.target_modules: expected module names, got {self.target_modules!r}")

    def describe(self) -> str:
        """One line on the kind and size (model cards, messages)."""
        if self.kind == "lora":
            return (
                f"LoRA (peft): rank {self.rank}, alpha {self.alpha:g}, dropout {self.dropout:g}, "
                f"on {', '.join(self.target_modules)}"
            )
        size = self.bottleneck or "half the LLM width"
        return f"bottleneck (Lynx): LayerNorm -> {size} -> SiLU -> LLM width, learnable scale"
