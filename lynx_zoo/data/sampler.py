"""Batches of one modality and similar lengths: the fallback when packing is off, for map-style data sets.

A padded batch costs its longest sample times its size; with instruction data's heavy-tailed lengths, random batches
are mostly padding. :class:`ModalityLengthGroupedSampler` makes every global batch (all ranks' batches of one
step) hold one modality (images, videos or text only: each fusion runs the same parts on every rank, which FSDP's
collectives need) and samples of similar length:

1. each epoch, each modality's samples are shuffled (seeded by ``seed`` and the epoch) and cut into megabatches of
   ``megabatch`` global batches;
2. each megabatch is sorted by length and cut into global batches, so a batch spans a narrow band of lengths;
3. the global batches of all modalities are shuffled together, and the one holding the longest sample goes first
   (a run that does not fit in memory fails at its first step, not hours in);
4. rank ``r`` of ``world_size`` takes every ``world_size``-th sample of each global batch (the ranks get alike
   lengths, so none waits long for the others).

The last global batch of a modality is completed with that modality's first samples of the epoch, as torch's
``DistributedSampler`` pads: every batch is full and every sample is read at least once an epoch.

With a :class:`~lynx_zoo.data.mixture.MixtureDataModule`, batches already hold one source (one modality); there,
``pack_tokens`` (:mod:`lynx_zoo.data.packing`) removes the padding instead.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler


class ModalityLengthGroupedSampler(Sampler[list[int]]):
    """Index batches for a ``DataLoader(dataset, batch_sampler=...)``: one modality and similar lengths per global
    batch (see the module docstring).

    Args:
        lengths: each sample's length in tokens (an estimate does: the words of its text, plus its visual tokens).
        modalities: each sample's modality (``"image"``, ``"video"``, ``"text"``, or any label).
        batch_size: samples per batch and rank.
        world_size: ranks sharing each global batch.
        rank: this rank.
        megabatch: global batches sorted together; larger groups lengths more tightly, smaller shuffles more.
        seed: seeds the shuffles (with the epoch: :meth:`set_epoch`).
    """

    def __init__(
        self,
        lengths: Sequence[int],
        modalities: Sequence[str],
        batch_size: int,
        world_size: int = 1,
        rank: int = 0,
        megabatch: int = 16,
        seed: int = 0,
    ) -> None:
        if len(lengths) != len(modalities):
            raise ValueError(f"sampler: {len(lengths)} lengths for {len(modalities)} modalities")
        if batch_size < 1 or megabatch < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"sampler: batch_size {batch_size} and megabatch {megabatch} must be positive and rank {rank} in "
                f"0..{world_size - 1}"
            )
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.modalities = list(modalities)
        self.batch_size, self.world_size, self.rank = batch_size, world_size, rank
        self.megabatch, self.seed = megabatch, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Draw the batches of ``epoch`` (call it before each epoch, as for ``DistributedSampler``)."""
        self.epoch = epoch

    def global_batches(self) -> list[np.ndarray]:
        """The epoch's global batches (each sorted longest first), in the order they are read."""
        rng = np.random.default_rng([self.seed, self.epoch])
        size = self.batch_size * self.world_size
        batches: list[np.ndarray] = []
        for modality in sorted(set(self.modalities)):
            indices = np.flatnonzero(np.asarray([m == modality for m in self.modalities]))
            indices = indices[rng.permutation(len(indices))]
            short = -len(indices) % size
            indices = np.concatenate([indices, np.resize(indices, short)])  # complete the last batch
            for start in range(0, len(indices), size * self.megabatch):
                group = indices[start : start + size * self.megabatch]
                group = group[np.argsort(-self.lengths[group], kind="stable")]
                batches += [group[i : i + size] for i in range(0, len(group), size)]
        batches = [batches[i] for i in rng.permutation(len(batches))]
        longest = max(range(len(batches)), key=lambda i: self.lengths[batches[i]].max(), default=0)
        if batches:
            batches.insert(0, batches.pop(longest))
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.global_batches():
            yield batch[self.rank :: self.world_size].tolist()

    def __len__(self) -> int:
        size = self.batch_size * self.world_size
        counts = {m: self.modalities.count(m) for m in set(self.modalities)}
        return sum(-(-count // size) for count in counts.values())
