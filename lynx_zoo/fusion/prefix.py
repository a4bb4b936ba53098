"""Prefix-finetuning (PT), the fusion of Lynx: the visual tokens go before the text embeddings."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from lynx_zoo.data.packing import PackedRows
from lynx_zoo.fusion.base import FusedInputs, LynxModel, Media
from lynx_zoo.fusion.registry import register_model


@register_model
class PrefixLynx(LynxModel):
    """``inputs_embeds = cat[visual tokens, text embeddings]``; the LLM reads the image as a prefix.

    With left-padded text the sequence is ``[visual][pad...][<s> prompt answer </s>]``: pads are masked
    and position ids follow the attention mask, so padding changes nothing. In packed rows each sample is
    ``[visual][<s> prompt answer </s>]`` with its own positions: its visual tokens fill the slots the packing
    left at its start.
    """

    label = "PT"
    kind = "prefix-finetuning"
    media_in_sequence = True
    supports_packing = True

    @contextmanager
    def fused(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        media: Media | None,
        packed: PackedRows | None = None,
        **fusion_inputs: Any,
    ) -> Iterator[FusedInputs]:
        embeds = self.llm.get_input_embeddings()(input_ids)
        if packed is not None:
            if media is not None:
                embeds = self._fill_media_slots(embeds, self.encode_images(media).to(embeds.dtype), packed)
            yield FusedInputs(attention_mask, inputs_embeds=embeds, position_ids=packed.position_ids)
            return
        if media is None:
            yield FusedInputs(attention_mask, inputs_embeds=embeds)
            return
        visual = self.encode_images(media).to(embeds.dtype)
        visual_mask = attention_mask.new_ones(visual.shape[:2])
        yield FusedInputs(torch.cat([visual_mask, attention_mask], 1), inputs_embeds=torch.cat([visual, embeds], 1))

    @staticmethod
    def _fill_media_slots(embeds: torch.Tensor, visual: torch.Tensor, packed: PackedRows) -> torch.Tensor:
        """``embeds`` with each sample's visual tokens ``(samples, Q, width)`` in the first ``Q`` positions of its
        sample (samples in row order)."""
        slots = packed.media_slots(visual.shape[1])
        if int(slots.sum()) != visual.shape[0] * visual.shape[1]:
            raise ValueError(
                f"packed rows hold {packed.num_samples} samples with {int(slots.sum())} visual slots, but the media "
                f"make {visual.shape[0]} x {visual.shape[1]} visual tokens: pack with this model's "
                "media_tokens_in_sequence"
            )
        return embeds.masked_scatter(slots[..., None], visual)
