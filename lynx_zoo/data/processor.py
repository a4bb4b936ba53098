"""Turns samples into model batches: the prompt format, tokenisation, label masking and padding."""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100


@dataclass
class Sample:
    """One training or evaluation example, as every data source yields it.

    ``image`` is a transformed image ``(3, H, W)``, a video's transformed frames ``(T, 3, H, W)``, or
    ``None`` for text-only data; ``answer`` is empty for prompts to be answered; ``history`` holds the
    earlier (instruction, answer) turns of a conversation. ``vision_tokens`` stands in for ``image``: what a frozen
    vision tower made of it, ``(N, width)`` or ``(T, N, width)`` for a video, read from a feature cache
    (:mod:`lynx_zoo.data.feature_cache`).
    """

    instruction: str
    answer: str = ""
    image: torch.Tensor | None = None
    category: str = ""
    id: str = ""
    history: list[tuple[str, str]] = field(default_factory=list)
    source: str = ""
    vision_tokens: torch.Tensor | None = None


@dataclass
class Skipped:
    """What a data source yields instead of a :class:`Sample` it could not read (counted, never fatal)."""

    source: str
    reason: str
    detail: str = ""


class PromptCutWarning(UserWarning):
    """A generation prompt lost its first tokens to ``prompt.max_input_tokens`` (else ``prompt.max_length``)."""


@dataclass
class PromptConfig:
    """The prompt format and text limits.

    Args:
        template: the instruction prompt; the answer follows it after a space, then EOS (Lynx:
            ``User: {instruction}\\nBot:``).
        max_length: text tokens per training sample (prompt + answer); longer samples lose the end of their
            instruction first, then the end of their answer. At generation it limits prompts when
            ``max_input_tokens`` is null (cut the same way: from their start).
        lower_text: lower-case the whole rendered prompt, template included (the release's ``lower_text``:
            the model reads ``user: ...\\nbot:``); answers keep their case.
        max_input_tokens: at generation, keep only the last this many prompt tokens (``<s>`` included), as the
            release's evaluation does (``max_input_tokens: 40``): the question's end and ``bot:`` stay, its start
            goes (never its end: the model must answer the question asked). Each cut is counted (``num_cut`` of the
            batch) and warned about (:class:`PromptCutWarning`). ``None``: ``max_length`` is the limit.
        lower_case: lower-case the instruction only (the setting before ``lower_text``; kept so that configs and
            variants saved with it load and behave as they did).
    """

    template: str = "User: {instruction}\nBot:"
    max_length: int = 256
    lower_text: bool = False
    max_input_tokens: int | None = None
    lower_case: bool = False


class LynxProcessor:
    """Builds ``input_ids``/``attention_mask``/``labels``/``images`` from :class:`Sample` lists.

    Layout per sample: ``<s> prompt answer </s>``, left-padded (as Lynx), loss on ``answer </s>`` only.
    The visual tokens are not part of the text: each fusion module puts them where it wants.
    ``image_transform`` (the vision tower's) turns a PIL image into the tensor the model reads;
    ``train_image_transform`` does for training images (default: the same).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompt: PromptConfig,
        image_transform: Callable[[Image.Image], torch.Tensor],
        train_image_transform: Callable[[Image.Image], torch.Tensor] | None = None,
    ) -> None:
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token: load it with lynx_zoo.llm.load_tokenizer")
        if prompt.max_input_tokens is not None and prompt.max_input_tokens < 1:
            raise ValueError(
                f"prompt.max_input_tokens: expected a positive number or null, got {prompt.max_input_tokens}"
            )
        self.tokenizer = tokenizer
        self.prompt = prompt
        self.image_transform = image_transform
        self.train_image_transform = train_image_transform or image_transform

    def format_prompt(self, instruction: str) -> str:
        """The rendered prompt of one instruction (lower-cased as a whole with ``lower_text``)."""
        text = self.prompt.template.format(instruction=instruction.lower() if self.prompt.lower_case else instruction)
        return text.lower() if self.prompt.lower_text else text

    def _prompt_ids(self, instruction: str) -> list[int]:
        return self.tokenizer(self.format_prompt(instruction), add_special_tokens=False)["input_ids"]

    def _answer_ids(self, answer: str) -> list[int]:
        return self.tokenizer(" " + answer.strip(), add_special_tokens=False)["input_ids"] + [
            self.tokenizer.eos_token_id
        ]

    def encode(self, sample: Sample, with_answer: bool = True) -> tuple[list[int], list[int], bool]:
        """Token ids, labels (``IGNORE_INDEX`` on prompts) and whether ``max_length`` cut the sample.

        A conversation is ``<s> prompt1 answer1 </s> prompt2 answer2 </s> ...`` with the loss on every
        answer. Over ``max_length``, the oldest turns go first; then the last instruction is shortened
        (the template's ending, ``Bot:``, stays so the model still knows where to answer), then the end
        of the answer.
        """
        tok, limit = self.tokenizer, self.prompt.max_length
        bos = [] if tok.bos_token_id is None else [tok.bos_token_id]
        turns = [(self._prompt_ids(q), self._answer_ids(a)) for q, a in sample.history]
        prompt_ids = self._prompt_ids(sample.instruction)
        answer_ids = self._answer_ids(sample.answer) if with_answer else []
        truncated = False
        while turns and len(bos) + sum(len(q) + len(a) for q, a in turns) + len(prompt_ids) + len(answer_ids) > limit:
            turns.pop(0)
            truncated = True
        ids, labels = list(bos), [IGNORE_INDEX] * len(bos)
        for turn_prompt, turn_answer in turns:
            ids += turn_prompt + turn_answer
            labels += [IGNORE_INDEX] * len(turn_prompt) + turn_answer
        room = limit - len(ids)
        excess = len(prompt_ids) + len(answer_ids) - room
        if excess > 0:
            truncated = True
            instruction_ids = tok(sample.instruction, add_special_tokens=False)["input_ids"]
            keep = max(0, len(instruction_ids) - excess)
            prompt_ids = self._prompt_ids(tok.decode(instruction_ids[:keep]))
            # the formatted prompt re-tokenizes (template, lower case): shorten until the answer fits
            while keep > 0 and len(prompt_ids) + len(answer_ids) > room:
                keep -= 1
                prompt_ids = self._prompt_ids(tok.decode(instruction_ids[:keep]))
            prompt_ids = prompt_ids[: max(0, room)]
            answer_ids = answer_ids[: max(0, room - len(prompt_ids))]
        ids, labels = (
            (ids + prompt_ids + answer_ids)[:limit],
            (labels + [IGNORE_INDEX] * len(prompt_ids) + answer_ids)[:limit],
        )
        return ids, labels, truncated

    def __call__(self, samples: list[Sample | Skipped | None]) -> dict[str, Any]:
        """Collate training samples. Unreadable inputs (:class:`Skipped`, or ``None``) and samples whose
        answer cannot fit ``max_length`` at all are dropped and counted in ``skipped`` by
        ``source/reason`` (``num_skipped`` is the total); ``num_truncated`` counts cut samples."""
        kept, skipped = self.encode_batch(samples)
        batch = self._pad([(ids, labels) for _, ids, labels, _ in kept])
        batch.update(self.collate_meta([s for s, *_ in kept]))
        batch["skipped"] = dict(skipped)
        batch["num_skipped"] = sum(skipped.values())
        batch["num_truncated"] = sum(t for *_, t in kept)
        return batch

    def encode_batch(
        self, samples: list[Sample | Skipped | None]
    ) -> tuple[list[tuple[Sample, list[int], list[int], bool]], Counter]:
        """``(sample, ids, labels, truncated)`` of each training sample kept, and the dropped ones counted by
        ``source/reason`` (unreadable inputs, answers that cannot fit ``max_length``)."""
        skipped: Counter = Counter()
        kept = []
        for sample in samples:
            if not isinstance(sample, Sample):
                skipped[f"{sample.source}/{sample.reason}" if sample else "unknown/unreadable"] += 1
                continue
            ids, labels, truncated = self.encode(sample)
            if all(label == IGNORE_INDEX for label in labels):
                skipped[f"{sample.source or 'unknown'}/answer_too_long"] += 1
                continue
            kept.append((sample, ids, labels, truncated))
        return kept, skipped

    def prompt_ids(self, sample: Sample) -> list[int]:
        """The whole generation prompt of ``sample``: ``<s>``, its earlier turns with their answers, its prompt."""
        tok = self.tokenizer
        ids = [] if tok.bos_token_id is None else [tok.bos_token_id]
        for question, answer in sample.history:
            ids += self._prompt_ids(question) + self._answer_ids(answer)
        return ids + self._prompt_ids(sample.instruction)

    def prompts(self, samples: list[Sample]) -> dict[str, Any]:
        """Collate prompts for generation (no answer, no labels). A prompt over the limit (``max_input_tokens``, else
        ``max_length``) keeps its last tokens: its start is cut, never its end, so the question asked is the one
        answered; ``num_cut`` counts them and a :class:`PromptCutWarning` gives the lengths and the limit."""
        encoded = [self.prompt_ids(s) for s in samples]
        limit = self.prompt.max_input_tokens or self.prompt.max_length
        setting = "prompt.max_input_tokens" if self.prompt.max_input_tokens else "prompt.max_length"
        dropped = [len(ids) - limit for ids in encoded if len(ids) > limit]
        if dropped:
            warnings.warn(
                f"{setting}={limit}: {len(dropped)} of {len(samples)} prompts were longer (up to "
                f"{limit + max(dropped)} tokens) and were cut to their last {limit} tokens (up to {max(dropped)} "
                f"dropped from their start, as the Lynx release's evaluation cuts: the question's end stays); raise "
                f"{setting} to keep whole prompts",
                PromptCutWarning,
                stacklevel=2,
            )
            encoded = [ids[-limit:] for ids in encoded]
        batch = self._pad([(ids, [IGNORE_INDEX] * len(ids)) for ids in encoded])
        del batch["labels"]
        batch.update(self.collate_meta(samples))
        batch["num_cut"] = len(dropped)
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
    def collate_meta(samples: list[Sample]) -> dict[str, Any]:
        """The batch's media (``images``, or ``vision_tokens`` from a feature cache), stacked, and its samples'
        texts, ids and sources as lists."""
        kinds = {tuple(None if media is None else media.dim() for media in (s.image, s.vision_tokens)) for s in samples}
        if len(kinds) > 1:
            raise ValueError(
                "a batch mixes images, videos, cached vision tokens and text-only samples; keep each kind in its own "
                "batches (MixtureDataModule draws every batch from one source)"
            )
        images = [s.image for s in samples]
        tokens = [s.vision_tokens for s in samples]
        return {
            "images": torch.stack(images) if images and images[0] is not None else None,
            "vision_tokens": torch.stack(tokens) if tokens and tokens[0] is not None else None,
            "instructions": [s.instruction for s in samples],
            "answers": [s.answer for s in samples],
            "categories": [s.category for s in samples],
            "ids": [s.id for s in samples],
            "histories": [s.history for s in samples],
            "sources": [s.source for s in samples],
        }
