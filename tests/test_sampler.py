"""The modality- and length-grouped sampler: one modality per global batch, similar lengths, every sample each
epoch, the ranks of a step sharing its modality, a new draw each epoch."""

from __future__ import annotations

import numpy as np

from lynx_zoo.data.sampler import ModalityLengthGroupedSampler


def data(n: int = 203, seed: int = 0) -> tuple[list[int], list[str]]:
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(4.5, 0.9, n), 4, 1500).astype(int).tolist()  # heavy-tailed
    modalities = rng.choice(["image", "video", "text"], n, p=[0.7, 0.1, 0.2]).tolist()
    return lengths, modalities


def padding(batches: list[list[int]], lengths: list[int]) -> float:
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return 1 - sum(lengths[i] for b in batches for i in b) / padded


def test_each_global_batch_holds_one_modality_and_every_sample_is_read(one_thread):
    lengths, modalities = data()
    ranks = [ModalityLengthGroupedSampler(lengths, modalities, 4, world_size=2, rank=r, seed=1) for r in (0, 1)]
    steps = list(zip(*[list(sampler) for sampler in ranks]))
    assert len(steps) == len(ranks[0])
    for batch0, batch1 in steps:
        assert len(batch0) == len(batch1) == 4  # every batch full (the last of a modality completed)
        assert len({modalities[i] for i in batch0 + batch1}) == 1  # the ranks of a step share its modality
    seen = [i for step in steps for batch in step for i in batch]
    assert set(seen) == set(range(len(lengths)))
    assert len(seen) - len(lengths) < 3 * 8  # at most one completed global batch per modality repeats samples
    longest = max(range(len(lengths)), key=lengths.__getitem__)
    assert longest in steps[0][0] + steps[0][1]  # the longest sample comes first: out of memory at step 1, if ever


def test_grouped_batches_pad_far_less_than_random_ones():
    lengths, modalities = data()
    grouped = list(ModalityLengthGroupedSampler(lengths, modalities, 8, seed=2))
    order = np.random.default_rng(2).permutation(len(lengths)).tolist()
    shuffled = [order[i : i + 8] for i in range(0, len(order), 8)]
    assert padding(grouped, lengths) < 0.2 < 0.5 < padding(shuffled, lengths)  # ~0.18 vs ~0.6


def test_epochs_draw_new_batches_and_repeat_for_the_same_seed():
    lengths, modalities = data()
    sampler = ModalityLengthGroupedSampler(lengths, modalities, 4, seed=3)
    first = list(sampler)
    sampler.set_epoch(1)
    second = list(sampler)
    assert first != second
    sampler.set_epoch(0)
    assert list(sampler) == first
    assert list(ModalityLengthGroupedSampler(lengths, modalities, 4, seed=3)) == first
