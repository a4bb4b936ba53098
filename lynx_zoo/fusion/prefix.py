"""Prefix-finetuning (PT), the fusion of Lynx: the visual tokens go before the text embeddings."""

from __future__ import annotations

from typing import Any

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

from lynx_zoo.data.processor import IGNORE_INDEX
from lynx_zoo.fusion.base import LynxModel, positions_from_mask


class PrefixLynx(LynxModel):
    """``inputs_embeds = cat[visual tokens, text embeddings]``; the LLM reads the image as a prefix.

    With left-padded text the sequence is ``[visual][pad...][<s> prompt answer </s>]``: pads are masked
    and position ids follow the attention mask, so padding changes nothing.
    """

    def prefix_inputs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, images: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``inputs_embeds`` and ``attention_mask`` with the visual prefix in place."""
        embeds = self.llm.get_input_embeddings()(input_ids)
        if images is None:
            return embeds, attention_mask
        visual = self.encode_images(images).to(embeds.dtype)
        visual_mask = attention_mask.new_ones(visual.shape[:2])
        return torch.cat([visual, embeds], dim=1), torch.cat([visual_mask, attention_mask], dim=1)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        images: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> CausalLMOutputWithPast:
        inputs_embeds, mask = self.prefix_inputs(input_ids, attention_mask, images)
        if labels is not None and inputs_embeds.shape[1] > labels.shape[1]:
            prefix = labels.new_full((labels.shape[0], inputs_embeds.shape[1] - labels.shape[1]), IGNORE_INDEX)
            labels = torch.cat([prefix, labels], dim=1)
        return self.llm(
            inputs_embeds=inputs_embeds,
            attention_mask=mask,
            position_ids=positions_from_mask(mask),
            labels=labels,
            use_cache=False,
        )

    def generate_ids(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, images: torch.Tensor | None, **kwargs: Any
    ) -> torch.Tensor:
        inputs_embeds, mask = self.prefix_inputs(input_ids, attention_mask, images)
        return self.llm.generate(
            inputs_embeds=inputs_embeds,
            attention_mask=mask,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
            **kwargs,
        )
