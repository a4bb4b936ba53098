"""Turns samples into model batches: the prompt format, tokenisation, label masking and padding."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100


@dataclass
class Sample:
    """One training or evaluation example, as every data source yields it.

    ``image`` is a transformed image ``(3, H, W)`` or ``None`` for text-only data; ``answer`` is empty
    for prompts to be answered.
    """

    instruction: str
    answer: str = ""
    image: torch.Tensor | None = None
    category: str = ""
    id: str = ""


@dataclass
class PromptConfig:
    """The prompt format and text limits.

    Args:
        template: the instruction prompt; the answer follows it after a space, then EOS (Lynx:
            ``User: {instruction}\\nBot:``).
        max_length: text tokens per sample (prompt + answer); longer samples lose the end of their
            instruction first, then the end of their answer.
        lower_case: lower-case instructions (Lynx does at evaluation).
    """

    template: str = "User: {instruction}\nBot:"
    max_length: int = 256
    lower_case: bool = False


class LynxProcessor:
    """Builds ``input_ids``/``attention_mask``/``labels``/``images`` from :class:`Sample` lists.

    Layout per sample: ``<s> prompt answer </s>``, left-padded (as Lynx), loss on ``answer </s>`` only.
    The visual tokens are not part of the text: each fusion module puts them where it wants.
    ``image_transform`` (the vision tower's) turns a PIL image into the tensor the model reads.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompt: PromptConfig,
        image_transform: Callable[[Image.Image], torch.Tensor],
    ) -> None:
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token: load it with lynx_zoo.llm.load_tokenizer")
        self.tokenizer = tokenizer
        self.prompt = prompt
        self.image_transform = image_transform

    def format_prompt(self, instruction: str) -> str:
        if self.prompt.lower_case:
            instruction = instruction.lower()
        return self.prompt.template.format(instruction=instruction)

    def _prompt_ids(self, instruction: str) -> list[int]:
        ids = self.tokenizer(self.format_prompt(instruction), add_special_tokens=False)["input_ids"]
        bos = self.tokenizer.bos_token_id
        return ids if bos is None else [bos, *ids]

    def encode(self, sample: Sample, with_answer: bool = True) -> tuple[list[int], list[int]]:
        """Token ids and labels of one sample (labels are ``IGNORE_INDEX`` on the prompt).

        Over ``max_length``, the instruction is shortened first (the template's ending, ``Bot:``,
        stays so the model still knows where to answer), then the end of the answer.
        """
        tok, limit = self.tokenizer, self.prompt.max_length
        answer_ids: list[int] = []
        if with_answer:
            answer_ids = tok(" " + sample.answer.strip(), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        prompt_ids = self._prompt_ids(sample.instruction)
        excess = len(prompt_ids) + len(answer_ids) - limit
        if excess > 0:
            instruction_ids = tok(sample.instruction, add_special_tokens=False)["input_ids"]
            shorter = tok.decode(instruction_ids[: max(0, len(instruction_ids) - excess)])
            prompt_ids = self._prompt_ids(shorter)[:limit]
            answer_ids = answer_ids[: max(0, limit - len(prompt_ids))]
        return prompt_ids + answer_ids, [IGNORE_INDEX] * len(prompt_ids) + answer_ids

    def __call__(self, samples: list[Sample | None]) -> dict[str, Any]:
        """Collate training samples. ``None`` entries (unreadable inputs) and samples whose answer
        cannot fit ``max_length`` at all are dropped and counted in ``num_skipped``."""
        encoded = [(s, self.encode(s)) for s in samples if s is not None]
        kept = [(s, e) for s, e in encoded if any(label != IGNORE_INDEX for label in e[1])]
        batch = self._pad([e for _, e in kept])
        batch.update(self._meta([s for s, _ in kept]))
        batch["num_skipped"] = len(samples) - len(kept)
        return batch

    def prompts(self, samples: list[Sample]) -> dict[str, Any]:
        """Collate prompts for generation (no answer, no labels)."""
        batch = self._pad([self.encode(s, with_answer=False) for s in samples])
        del batch["labels"]
        batch.update(self._meta(samples))
        return batch

    def _pad(self, encoded: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
        length = max((len(ids) for ids, _ in encoded), default=0)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(encoded), length), pad, dtype=torch.long)
        labels = torch.full((len(encoded), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(encoded), length), dtype=torch.long)
        for row, (ids, lab) in enumerate(encoded):
            if ids:
                input_ids[row, -len(ids) :] = torch.tensor(ids)
                labels[row, -len(ids) :] = torch.tensor(lab)
                attention_mask[row, -len(ids) :] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    @staticmethod
    def _meta(samples: list[Sample]) -> dict[str, Any]:
        images = [s.image for s in samples]
        if any(i is not None for i in images) and any(i is None for i in images):
            raise ValueError("a batch mixes samples with and without images; keep text-only data in its own batches")
        return {
            "images": torch.stack(images) if images and images[0] is not None else None,
            "instructions": [s.instruction for s in samples],
            "answers": [s.answer for s in samples],
            "categories": [s.category for s in samples],
            "ids": [s.id for s in samples],
        }
