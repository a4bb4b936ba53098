"""Prefix-finetuning (PT), the fusion of Lynx: the visual tokens go before the text embeddings."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from lynx_zoo.fusion.base import FusedInputs, LynxModel
from lynx_zoo.fusion.registry import register_model


@register_model
class PrefixLynx(LynxModel):
    """``inputs_embeds = cat[visual tokens, text embeddings]``; the LLM reads the image as a prefix.

    With left-padded text the sequence is ``[visual][pad...][<s> prompt answer </s>]``: pads are masked
    and position ids follow the attention mask, so padding changes nothing.
    """

    label = "PT"
    kind = "prefix-finetuning"
    media_in_sequence = True

    @contextmanager
    def fused(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, media: torch.Tensor | None, **fusion_inputs: Any
    ) -> Iterator[FusedInputs]:
        embeds = self.llm.get_input_embeddings()(input_ids)
        if media is None:
            yield FusedInputs(attention_mask, inputs_embeds=embeds)
            return
        visual = self.encode_images(media).to(embeds.dtype)
        visual_mask = attention_mask.new_ones(visual.shape[:2])
        yield FusedInputs(torch.cat([visual_mask, attention_mask], 1), inputs_embeds=torch.cat([visual, embeds], 1))
