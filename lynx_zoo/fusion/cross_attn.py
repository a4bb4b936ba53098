"""Flamingo-style cross-attention fusion (CA), the Lynx paper's alternative to PT.

Gated cross-attention dense blocks go before chosen decoder layers of the LLM (OpenFlamingo on
LLaMA-7B: before every 4th layer). Each attends from the text to the resampled visual tokens and adds
its result through ``tanh`` gates that start at 0, so at initialisation the model is exactly its LLM.
The blocks are children ``gated_xattn`` of the decoder layers, run on each layer's input
(:func:`~lynx_zoo.llm.layers.attach_block`): transformers' modeling files stay as they are.

Media-position masking: media ``m`` of a sample appears at text position ``media_positions[b, m]``
(in position-id space: the count of real tokens before it). A text token attends only to the latest
media at or before its position; tokens before the first media get a zero attention output. In packed rows
(several samples per row) each media item also carries its sample's segment id and each token reads only the media
of its own sample.

As OpenFlamingo defines the block, the masking acts inside the attention only: the gated feed-forward
applies to every token, with media before it or not. A text-only batch (no media at all) runs the blocks
too: the attention contributes nothing and the gated feed-forward applies, so it learns from text data
(the paper's "CA, trainable LLM + text data" row).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lynx_zoo.data.packing import PackedRows
from lynx_zoo.fusion.base import FusedInputs, LynxModel, Media
from lynx_zoo.fusion.registry import register_model
from lynx_zoo.llm.layers import InsertedBlock, LayerPlacement, attach_block, decoder_layers


@dataclass
class CrossAttnConfig(LayerPlacement):
    """Where the gated cross-attention blocks go and their size.

    Args:
        every: a block before every ``every``-th decoder layer (OpenFlamingo: 4).
        start: the first layer with a block (OpenFlamingo: 3, i.e. layers 3, 7, 11, ...).
        layers: explicit layer indices (overrides ``every``/``start``).
        num_heads: cross-attention heads.
        head_dim: width of one head.
        ff_mult: feed-forward expansion.
    """

    section: ClassVar[str] = "cross_attn"

    every: int | None = 4
    start: int = 3
    num_heads: int = 8
    head_dim: int = 64
    ff_mult: int = 4


class GatedCrossAttentionBlock(InsertedBlock):
    """``x + tanh(a) * XAttn(LN(x), media)``, then ``x + tanh(f) * FF(x)``; ``a = f = 0`` at init (OpenFlamingo).

    The media mask acts inside the attention only (a token with no media before it gets a zero attention
    output); the gated feed-forward applies to every token, also when the batch has no media.
    """

    def __init__(self, width: int, num_heads: int, head_dim: int, ff_mult: int) -> None:
        super().__init__()
        inner = num_heads * head_dim
        self.num_heads = num_heads
        self.norm = nn.LayerNorm(width)
        self.to_q = nn.Linear(width, inner, bias=False)
        self.to_kv = nn.Linear(width, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, width, bias=False)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.ff = nn.Sequential(
            nn.LayerNorm(width),
            nn.Linear(width, ff_mult * width, bias=False),
            nn.GELU(),
            nn.Linear(ff_mult * width, width, bias=False),
        )
        self.ff_gate = nn.Parameter(torch.zeros(1))
        self.media: torch.Tensor | None = None
        self.media_positions: torch.Tensor | None = None
        self.segments: MediaSegments | None = None

    @contextmanager
    def attending_to(
        self,
        media: torch.Tensor | None,
        media_positions: torch.Tensor | None,
        segments: MediaSegments | None = None,
    ) -> Iterator[None]:
        """The visual tokens ``(B, M, Q, width)`` and their text positions ``(B, M)`` for the calls inside
        (``None``: a text-only call); ``segments``: the samples they and the tokens belong to, for packed rows."""
        outer = self.media, self.media_positions, self.segments
        self.media, self.media_positions, self.segments = media, media_positions, segments
        try:
            yield
        finally:
            self.media, self.media_positions, self.segments = outer

    def replay_context(self) -> AbstractContextManager[None]:
        return self.attending_to(self.media, self.media_positions, self.segments)

    def forward_flops(self, text_tokens: int, media_tokens: int) -> float:
        """Queries, output and feed-forward on every text token; keys and values on the visual tokens only; the
        attention between them."""
        kv = self.to_kv.weight.numel()
        dense = 2.0 * (sum(p.numel() for p in self.parameters()) - kv) * text_tokens + 2.0 * kv * media_tokens
        return dense + 4.0 * self.to_q.out_features * text_tokens * media_tokens

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        # the block keeps its own (fp32) weights beside a low-precision frozen LLM
        hidden = x
        x = x.to(self.to_q.weight.dtype)
        update = None
        if self.media is not None:
            update = torch.tanh(self.attn_gate) * self.attend(x, position_ids)
            x = x + update
        ff_update = torch.tanh(self.ff_gate) * self.ff(x)
        update = ff_update if update is None else update + ff_update
        return hidden + update.to(hidden.dtype)

    def attend(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """The masked cross-attention output (before its gate): zero for tokens with no media before them."""
        media, media_positions = self.media, self.media_positions
        assert media is not None and media_positions is not None
        if media.shape[0] != x.shape[0]:  # beam search / num_return_sequences expand the batch
            repeat = x.shape[0] // media.shape[0]
            media, media_positions = media.repeat_interleave(repeat, 0), media_positions.repeat_interleave(repeat, 0)
        b, t, _ = x.shape
        num_media, per_media = media.shape[1], media.shape[2]
        # the latest media at or before each token, of its own sample (0 = none yet)
        position_ids = position_ids.expand(b, t)
        before = media_positions[:, None, :] <= position_ids[:, :, None]
        if self.segments is not None:
            before = before & (self.segments.media[:, None, :] == self.segments.tokens[:, :, None])
        media_index = torch.arange(1, num_media + 1, device=x.device)
        latest = (before * media_index).amax(-1)
        media_index = media_index.repeat_interleave(per_media)
        allowed = latest[:, :, None] == media_index[None, None, :]
        has_media = latest > 0
        allowed = allowed | ~has_media[:, :, None]  # keep softmax finite; these rows are zeroed below
        q = self.to_q(self.norm(x)).view(b, t, self.num_heads, -1).transpose(1, 2)
        k, v = self.to_kv(media.flatten(1, 2).to(x.dtype)).chunk(2, dim=-1)
        k, v = (z.view(b, num_media * per_media, self.num_heads, -1).transpose(1, 2) for z in (k, v))
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None])
        return self.to_out(attended.transpose(1, 2).flatten(2)) * has_media[..., None].to(x.dtype)


@dataclass
class MediaSegments:
    """Which sample of a packed row each media item (``media``, ``(B, M)``) and each token (``tokens``, ``(B, T)``)
    belongs to: a token reads only media of its own segment."""

    media: torch.Tensor
    tokens: torch.Tensor


@register_model
class CrossAttnLynx(LynxModel):
    """Flamingo-style fusion: the text goes through the LLM alone and reads the visual tokens through
    gated cross-attention blocks. With ``llm.trainable: false`` the LLM is frozen (the paper's first CA
    row); ``true`` trains it too (the second). Text-only batches run the blocks' gated feed-forward.

    Args:
        cross_attn: placement and size of the gated cross-attention blocks.
        (the other arguments are those of :class:`LynxModel`)
    """

    label = "CA"
    kind = "cross-attention"
    supports_packing = True

    def __init__(self, *args: Any, cross_attn: CrossAttnConfig | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cross_attn_config = cross_attn or CrossAttnConfig()
        config = self.cross_attn_config
        layers = decoder_layers(self.llm)
        self.blocks: dict[int, GatedCrossAttentionBlock] = {}
        for i in config.layer_indices(len(layers)):
            self.blocks[i] = GatedCrossAttentionBlock(self.llm_width, config.num_heads, config.head_dim, config.ff_mult)
            attach_block(layers[i], "gated_xattn", self.blocks[i], before=True)

    def fusion_blocks(self) -> dict[int, GatedCrossAttentionBlock]:
        return dict(self.blocks)

    @contextmanager
    def fused(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        media: Media | None,
        media_positions: torch.Tensor | None = None,
        packed: PackedRows | None = None,
    ) -> Iterator[FusedInputs]:
        """The text as it is; every block attends to the visual tokens while the LLM runs.

        ``media`` images or videos are one media item per sample; ``media_positions`` ``(B, M)``: where each
        appears in the text (default: before it). Several media per sample go to :meth:`attending_to` directly.
        In packed rows, each sample's media comes before its own text and only its own tokens read it.
        """
        visual = None if media is None else self.encode_images(media)
        if packed is None:
            with self.attending_to(None if visual is None else visual[:, None], media_positions):
                yield FusedInputs(attention_mask, input_ids=input_ids)
            return
        if media_positions is not None:
            raise ValueError("packed rows place each sample's media before its text: media_positions cannot be given")
        segments = None
        if visual is not None:  # row r's k-th sample is segment k + 1; its media goes to slot k of the row
            slots = packed.sample_slots()
            visual = visual[slots.clamp(min=0)] * (slots >= 0)[..., None, None].to(visual.dtype)
            media_segments = torch.where(slots >= 0, torch.arange(1, slots.shape[1] + 1, device=slots.device), -1)
            segments = MediaSegments(media_segments, packed.segment_ids)
        with self.attending_to(visual, None, segments):
            yield FusedInputs(attention_mask, input_ids=input_ids, position_ids=packed.position_ids)

    @contextmanager
    def attending_to(
        self, media: torch.Tensor | None, media_positions: torch.Tensor | None, segments: MediaSegments | None = None
    ) -> Iterator[None]:
        """Give every block the visual tokens ``(B, M, Q, width)`` and their text positions ``(B, M)`` (default:
        all before the text) for the LLM calls inside; ``segments`` for packed rows."""
        if media is not None and media_positions is None:
            media_positions = torch.zeros(media.shape[:2], dtype=torch.long, device=media.device)
        with ExitStack() as stack:
            for block in self.blocks.values():
                stack.enter_context(block.attending_to(media, media_positions, segments))
            yield


torch.serialization.add_safe_globals([CrossAttnConfig])
