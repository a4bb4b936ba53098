"""Modality-aware packing: several training samples share a row of the LLM's input, each with its own visual tokens.

A batch of samples becomes a few rows of at most ``max_tokens`` LLM tokens. Each sample keeps the layout it has
alone: ``[its visual tokens][<s> prompt answer </s>]`` for a fusion that puts the visual tokens in the sequence (PT),
``[<s> prompt answer </s>]`` for one that reads them beside it (CA). Rows are padded at their end only. What a packed
batch adds to an ordinary one (:class:`PackedRows`):

* ``segment_ids`` ``(rows, length)``: each token's sample, numbered 1, 2, ... within its row (0: padding);
* ``position_ids`` ``(rows, length)``: each token's position within its own sample (restarting at 0).

Attention never crosses samples: the LLM gets the position ids and no 2-D mask, from which transformers builds a
block-diagonal causal mask (SDPA, eager, FlexAttention) or runs ``flash_attention_2`` on variable-length sequences.
Labels are those of each sample (the first token of a sample is never a target), so the loss (a mean over the
batch's target tokens) weighs every sample exactly as the unpacked batch does.

Rows are filled by :func:`assign_rows`, for the least padding (what the rows lack of the longest one): packing pays most
on batches that mix long and short samples, not on length-sorted ones.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from lynx_zoo.data.processor import IGNORE_INDEX, LynxProcessor, Sample, Skipped

#: LLM sequence positions one sample's media takes, by its frame count (1 for an image): the model's
#: :meth:`~lynx_zoo.fusion.base.LynxModel.media_tokens_in_sequence`
MediaTokens = Callable[[int], int]


@dataclass
class PackedRows:
    """Where the samples of a packed batch sit: ``segment_ids`` (1, 2, ... per sample of a row; 0 for padding) and
    ``position_ids`` (each token's position within its sample), both ``(rows, length)``."""

    segment_ids: torch.Tensor
    position_ids: torch.Tensor

    @classmethod
    def of(cls, batch: dict[str, Any]) -> PackedRows | None:
        """The packing of a collated batch, ``None`` for an ordinary (padded) one."""
        if batch.get("segment_ids") is None:
            return None
        return cls(batch["segment_ids"], batch["position_ids"])

    @property
    def num_samples(self) -> int:
        return int(self.segment_ids.amax(1).sum()) if self.segment_ids.numel() else 0

    def sample_slots(self) -> torch.Tensor:
        """``(rows, most samples in a row)``: the batch index of the ``k``-th sample of each row (samples are numbered
        row by row), -1 where a row has fewer samples."""
        per_row = self.segment_ids.amax(1)
        first = per_row.cumsum(0) - per_row
        k = torch.arange(int(per_row.max()) if per_row.numel() else 0, device=per_row.device)
        slots = first[:, None] + k[None, :]
        return torch.where(k[None, :] < per_row[:, None], slots, torch.full_like(slots, -1))

    def media_slots(self, tokens_per_sample: int) -> torch.Tensor:
        """``(rows, length)``: where the visual tokens go when each sample starts with ``tokens_per_sample`` of them."""
        return (self.segment_ids > 0) & (self.position_ids < tokens_per_sample)


def samples_in(batch: dict[str, Any]) -> int:
    """Samples in a collated batch (a packed row holds several: the count :class:`PackingCollate` recorded, read
    without a device sync)."""
    if batch.get("num_samples") is not None:
        return int(batch["num_samples"])
    packed = PackedRows.of(batch)
    return packed.num_samples if packed is not None else int(batch["input_ids"].shape[0])


def assign_rows(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped in rows of at most ``max_tokens`` each, with the least padding (what the rows
    lack of the longest one) found among: first-fit-decreasing, and the rows balanced longest-first (each item to the
    shortest row) over as many rows as first-fit needs or up to two more. Each row lists its items in their given
    order; rows are ordered by their first item."""
    if any(length > max_tokens for length in lengths):
        raise ValueError(f"packing: a sample of {max(lengths)} tokens does not fit a row of max_tokens={max_tokens}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    first_fit: list[list[int]] = []
    room: list[int] = []
    for i in order:
        row = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if row is None:
            first_fit.append([])
            room.append(max_tokens)
            row = len(room) - 1
        first_fit[row].append(i)
        room[row] -= lengths[i]
    candidates = [first_fit]
    for count in range(len(first_fit), min(len(lengths), len(first_fit) + 2) + 1):
        balanced: list[list[int]] = [[] for _ in range(count)]
        heap = [(0, r) for r in range(count)]
        for i in order:
            fill, r = heapq.heappop(heap)
            balanced[r].append(i)
            heapq.heappush(heap, (fill + lengths[i], r))
        if max(fill for fill, _ in heap) <= max_tokens:
            candidates.append(balanced)

    def padding(rows: list[list[int]]) -> tuple[int, int]:
        fills = [sum(lengths[i] for i in row) for row in rows]
        return len(rows) * max(fills, default=0) - sum(fills), len(rows)

    best = min(candidates, key=padding)
    return sorted((sorted(row) for row in best if row), key=lambda row: row[0])


def frames_of(sample: Sample) -> int:
    """Frames of a sample's media (1 for an image, ``T`` for a video), 0 without media."""
    if sample.vision_tokens is not None:
        return 1 if sample.vision_tokens.dim() == 2 else int(sample.vision_tokens.shape[0])
    if sample.image is None:
        return 0
    return 1 if sample.image.dim() == 3 else int(sample.image.shape[0])


class PackingCollate:
    """Collates training samples into packed rows (a drop-in for the processor as a ``collate_fn``).

    Args:
        processor: the model's processor (prompt format, tokens, labels, skip counting).
        max_tokens: LLM tokens per row; at least the longest sample (visual tokens and ``prompt.max_length``).
        media_tokens: sequence positions a sample's media takes, by frame count (the model's
            :meth:`~lynx_zoo.fusion.base.LynxModel.media_tokens_in_sequence`).

    The batch has the keys of the processor's, with ``input_ids``/``attention_mask``/``labels`` as rows, the samples
    (``images`` or ``vision_tokens``, ``ids``, ``answers``, ...) in row order, and ``segment_ids``,
    ``position_ids`` and ``num_samples``; ``padded_tokens`` counts the padding of the rows.
    """

    def __init__(self, processor: LynxProcessor, max_tokens: int, media_tokens: MediaTokens) -> None:
        if max_tokens < 2:
            raise ValueError(f"packing: max_tokens must be at least 2, got {max_tokens}")
        self.processor = processor
        self.max_tokens = max_tokens
        self.media_tokens = media_tokens

    def __call__(self, samples: list[Sample | Skipped | None]) -> dict[str, Any]:
        kept, skipped = self.processor.encode_batch(samples)
        visual = [self.media_tokens(frames_of(sample)) if frames_of(sample) else 0 for sample, *_ in kept]
        lengths = [v + len(ids) for v, (_, ids, _, _) in zip(visual, kept)]
        for (sample, ids, *_), v, length in zip(kept, visual, lengths):
            if length > self.max_tokens:
                raise ValueError(
                    f"packing: sample {sample.id!r} of {sample.source or 'a source'} takes {length} LLM tokens ({v} "
                    f"visual + {len(ids)} text), more than a row's max_tokens={self.max_tokens}: raise it to at least "
                    "the visual tokens plus prompt.max_length"
                )
        rows = assign_rows(lengths, self.max_tokens)
        width = max((sum(lengths[i] for i in row) for row in rows), default=0)
        pad = self.processor.tokenizer.pad_token_id
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        segment_ids = torch.zeros((len(rows), width), dtype=torch.long)
        position_ids = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):
            at = 0
            for k, i in enumerate(row, 1):
                _, ids, sample_labels, _ = kept[i]
                text = slice(at + visual[i], at + lengths[i])
                input_ids[r, text] = torch.tensor(ids)
                labels[r, text] = torch.tensor(sample_labels)
                labels[r, at] = IGNORE_INDEX  # nothing of its sample precedes a sample's first token
                segment_ids[r, at : at + lengths[i]] = k
                position_ids[r, at : at + lengths[i]] = torch.arange(lengths[i])
                at += lengths[i]
            position_ids[r, at:] = torch.arange(width - at)  # the padding: a sequence of its own, after every sample
        order = [i for row in rows for i in row]
        batch: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": (segment_ids > 0).long(),
            "labels": labels,
            "segment_ids": segment_ids,
            "position_ids": position_ids,
        }
        batch.update(self.processor.collate_meta([kept[i][0] for i in order]))
        batch["num_samples"] = len(order)
        batch["padded_tokens"] = int((segment_ids == 0).sum())
        batch["skipped"] = dict(skipped)
        batch["num_skipped"] = sum(skipped.values())
        batch["num_truncated"] = sum(kept[i][3] for i in order)
        return batch
