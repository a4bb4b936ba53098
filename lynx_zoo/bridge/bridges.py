"""Bridges map vision tokens ``(B, N, vision_width)`` to LLM-width visual tokens ``(B, Q, llm_width)``.

Each bridge registers itself under a short name; ``BridgeConfig.kind`` picks one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lynx_zoo.errors import ConfigError


@dataclass
class BridgeConfig:
    """How to build the bridge.

    Args:
        kind: a registered bridge: ``resampler`` (Lynx's Perceiver resampler), ``linear`` or ``mlp``.
        num_queries: learned latent queries of the resampler, i.e. visual tokens per image (Lynx: 32).
        depth: resampler layers (Lynx: 3).
        num_heads: attention heads (Lynx: 8).
        head_dim: width of one head (Lynx: 64).
        ff_mult: feed-forward expansion of the resampler (Lynx: 4).
    """

    kind: str = "resampler"
    num_queries: int = 32
    depth: int = 3
    num_heads: int = 8
    head_dim: int = 64
    ff_mult: int = 4


class Bridge:
    """What every bridge declares, for sharding and FLOP counting (a mixin of the bridge's ``nn.Module``)."""

    def units(self) -> list[nn.Module]:
        """Its repeated layers, each an FSDP unit of its own (none for a projector)."""
        return []

    def output_tokens(self, input_tokens: int) -> int:
        """Visual tokens out for ``input_tokens`` vision tokens in (a projector keeps one per vision token)."""
        return input_tokens

    def forward_flops(self, input_tokens: int) -> float:
        """Forward FLOPs for one image of ``input_tokens`` vision tokens (default: each token through each weight)."""
        return 2.0 * sum(p.numel() for p in self.parameters()) * input_tokens  # type: ignore[attr-defined]


BridgeBuilder = Callable[[BridgeConfig, int, int], Bridge]
BRIDGES: dict[str, BridgeBuilder] = {}


def register_bridge(name: str) -> Callable[[BridgeBuilder], BridgeBuilder]:
    """Register ``builder(config, vision_width, llm_width) -> Bridge`` as bridge ``name`` (a module that mixes in
    :class:`Bridge`)."""

    def decorator(builder: BridgeBuilder) -> BridgeBuilder:
        BRIDGES[name] = builder
        return builder

    return decorator


def build_bridge(config: BridgeConfig, vision_width: int, llm_width: int) -> Bridge:
    if config.kind not in BRIDGES:
        raise ConfigError(f"bridge.kind: unknown bridge {config.kind!r}; choose one of {sorted(BRIDGES)}")
    return BRIDGES[config.kind](config, vision_width, llm_width)


class ResamplerLayer(nn.Module):
    """Latents attend to the visual tokens (keys/values from the visual tokens only), then a feed-forward."""

    def __init__(self, vision_width: int, width: int, num_heads: int, head_dim: int, ff_mult: int) -> None:
        super().__init__()
        inner = num_heads * head_dim
        self.num_heads = num_heads
        self.norm_media = nn.LayerNorm(vision_width)
        self.norm_latents = nn.LayerNorm(width)
        self.to_q = nn.Linear(width, inner, bias=False)
        self.to_kv = nn.Linear(vision_width, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, width, bias=False)
        self.ff = nn.Sequential(
            nn.LayerNorm(width),
            nn.Linear(width, ff_mult * width, bias=False),
            nn.GELU(),
            nn.Linear(ff_mult * width, width, bias=False),
        )

    def forward(self, latents: torch.Tensor, media: torch.Tensor) -> torch.Tensor:
        b = latents.shape[0]
        q = self.to_q(self.norm_latents(latents))
        k, v = self.to_kv(self.norm_media(media)).chunk(2, dim=-1)
        q, k, v = (t.view(b, t.shape[1], self.num_heads, -1).transpose(1, 2) for t in (q, k, v))
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        latents = latents + self.to_out(attended)
        return latents + self.ff(latents)


class PerceiverResampler(Bridge, nn.Module):
    """Lynx's bridge: learned queries in the LLM width read the visual tokens; output ``(B, Q, llm_width)``
    whatever the number of input tokens (one image, or several video frames concatenated)."""

    def __init__(
        self,
        vision_width: int,
        llm_width: int,
        num_queries: int = 32,
        depth: int = 3,
        num_heads: int = 8,
        head_dim: int = 64,
        ff_mult: int = 4,
    ) -> None:
        super().__init__()
        # standard normal (std 1), as the release initialises them
        self.latents = nn.Parameter(torch.randn(num_queries, llm_width))
        self.layers = nn.ModuleList(
            ResamplerLayer(vision_width, llm_width, num_heads, head_dim, ff_mult) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(llm_width)
        self.num_queries = num_queries

    def units(self) -> list[nn.Module]:
        return list(self.layers)

    def output_tokens(self, input_tokens: int) -> int:
        return self.num_queries

    def forward_flops(self, input_tokens: int) -> float:
        """Key/value projections on the vision tokens, everything else on the latents, and the attention."""
        kv = sum(layer.to_kv.weight.numel() + layer.norm_media.weight.numel() * 2 for layer in self.layers)
        dense = 2.0 * (sum(p.numel() for p in self.parameters()) - kv) * self.num_queries + 2.0 * kv * input_tokens
        return dense + sum(4.0 * layer.to_q.out_features * self.num_queries * input_tokens for layer in self.layers)

    def forward(self, media: torch.Tensor) -> torch.Tensor:
        latents = self.latents.unsqueeze(0).expand(media.shape[0], -1, -1).to(media.dtype)
        for layer in self.layers:
            latents = layer(latents, media)
        return self.norm(latents)


@register_bridge("resampler")
def _resampler(config: BridgeConfig, vision_width: int, llm_width: int) -> Bridge:
    return PerceiverResampler(
        vision_width, llm_width, config.num_queries, config.depth, config.num_heads, config.head_dim, config.ff_mult
    )


class LinearProjector(Bridge, nn.Linear):
    """One visual token per vision token (LLaVA-1 style)."""


class MLPProjector(Bridge, nn.Sequential):
    """Two-layer GELU projector, one visual token per vision token (LLaVA-1.5 style)."""

    def __init__(self, vision_width: int, llm_width: int) -> None:
        super().__init__(nn.Linear(vision_width, llm_width), nn.GELU(), nn.Linear(llm_width, llm_width))


@register_bridge("linear")
def _linear(config: BridgeConfig, vision_width: int, llm_width: int) -> Bridge:
    return LinearProjector(vision_width, llm_width)


@register_bridge("mlp")
def _mlp(config: BridgeConfig, vision_width: int, llm_width: int) -> Bridge:
    return MLPProjector(vision_width, llm_width)
