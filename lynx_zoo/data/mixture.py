"""The mixture DataModule: many sources sampled by ratio, batch by batch, resumable mid-epoch.

Every batch is drawn from one source, chosen by the configured ratios (Lynx's tables: BLIP CapFilt
30.5 %, Places365 10.9 %, ...), so images, videos and text-only samples never share a batch; the ranks of one
training step share the draw, so they all run the same modality. The
whole schedule (which source each global batch comes from and which of its samples) is a pure
function of ``(seed, epoch, batch)``, computed block by block so that no process holds anything that grows
with the number of samples or batches.

Global batch ``g`` belongs to rank ``g % world_size``; batch ``j`` of a rank is loaded by dataloader worker
``j % num_workers``. Each (rank, worker) pair is a *reader* with its own share of every source: a pass over a
source is its blocks (chunks of a prepared data set, tar shards; a manifest is one block) in a shuffled order,
each shuffled within, and reader ``r`` of ``R`` reads the ``r``-th contiguous ``1/R`` of that order. So each
sample of a pass is read exactly once across ranks and workers, and a reader streams only its own chunks. A
reader's position in each source carries over from epoch to epoch (its pass continues where it stopped), and
the loader's state in a checkpoint (epoch and batches done) lets a resumed run continue with the next unseen
batch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from lynx_zoo.data.datamodule import LynxDataModule, attached_model, warn_of_changed_settings
from lynx_zoo.data.feature_cache import FeatureCacheSource, tower_description
from lynx_zoo.data.images import DEFAULT_MAX_IMAGE_PIXELS
from lynx_zoo.data.packing import MediaTokens, PackingCollate
from lynx_zoo.data.processor import LynxProcessor, Sample, Skipped
from lynx_zoo.data.sources import LoadContext, Source
from lynx_zoo.data.templates import InstructionTemplates

log = logging.getLogger(__name__)

# global batches whose sources are drawn together (the unit of the schedule's memory and of its seeding)
DRAW_BLOCK = 8192


class PassOrder:
    """The sample indices of one pass over a source: its blocks in a shuffled order, each shuffled within.

    Holds one entry per block and the permutation of the block last read, never one per sample.
    """

    def __init__(self, chunk_sizes: list[int], seed: list[int]) -> None:
        self.sizes = np.asarray(chunk_sizes, dtype=np.int64)
        self.firsts = np.cumsum(self.sizes) - self.sizes  # the index of each block's first sample
        self.seed = seed
        self.blocks = np.random.default_rng(seed).permutation(len(self.sizes))
        self.ends = np.cumsum(self.sizes[self.blocks])  # the pass position after each block of the order
        self._cached: tuple[int, np.ndarray] = (-1, np.empty(0, dtype=np.int64))

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def take(self, start: int, count: int) -> np.ndarray:
        """The sample indices at pass positions ``start .. start + count - 1``."""
        parts, position, stop = [], start, start + count
        while position < stop:
            slot = int(np.searchsorted(self.ends, position, side="right"))
            block = int(self.blocks[slot])
            begin = int(self.ends[slot] - self.sizes[block])
            until = min(stop, int(self.ends[slot]))
            parts.append(self.firsts[block] + self._permutation(block)[position - begin : until - begin])
            position = until
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)

    def _permutation(self, block: int) -> np.ndarray:
        if self._cached[0] != block:
            shuffled = np.random.default_rng([*self.seed, block + 1]).permutation(int(self.sizes[block]))
            self._cached = (block, shuffled)
        return self._cached[1]


class MixtureSchedule:
    """Which source and which sample indices each batch of an epoch gets, for one rank.

    Args:
        sources: the (prepared) sources; their ``ratio`` attributes are the sampling weights.
        batch_size: samples per batch.
        batches_per_epoch: batches per rank and epoch.
        seed: seeds the source draws and each source's pass orders.
        rank, world_size: this process and the number of processes.
        num_workers: dataloader workers per rank (each (rank, worker) pair reads its own share of each source).
    """

    def __init__(
        self,
        sources: list[Source],
        batch_size: int,
        batches_per_epoch: int,
        seed: int,
        rank: int,
        world_size: int,
        num_workers: int = 0,
    ) -> None:
        weights = np.array([s.ratio for s in sources], dtype=float)
        empty = [s.name for s in sources if len(s) == 0 and s.ratio > 0]
        if empty:
            raise ValueError(f"mixture: source(s) {empty} have no samples (check their manifests / shards)")
        if weights.sum() <= 0:
            raise ValueError("mixture: the sources' ratios sum to 0")
        self.sources = sources
        self.probabilities = weights / weights.sum()
        self.batch_size, self.batches_per_epoch = batch_size, batches_per_epoch
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.workers = max(1, num_workers)
        self.readers = world_size * self.workers
        small = [f"{s.name} ({len(s)})" for s in sources if 0 < len(s) < self.readers and s.ratio > 0]
        if small:
            raise ValueError(
                f"mixture: source(s) {small} have fewer samples than the {self.readers} readers "
                f"({world_size} ranks x {self.workers} dataloader workers); give them more samples or fewer workers"
            )
        self._orders: dict[tuple[int, int], PassOrder] = {}

    @property
    def global_batches(self) -> int:
        """Batches per epoch over all ranks."""
        return self.batches_per_epoch * self.world_size

    def reader_of(self, batches: np.ndarray) -> np.ndarray:
        """The reader (``rank * workers + worker``) of each global batch."""
        return (batches % self.world_size) * self.workers + (batches // self.world_size) % self.workers

    def source_draws(self, epoch: int, first: int = 0, count: int | None = None) -> np.ndarray:
        """The source of global batches ``first .. first + count - 1`` of ``epoch`` (default: all of them).

        One draw per training step, shared by the step's ranks: every rank of a step then runs the same modality, so
        the model runs the same parts on every rank (FSDP's all-gathers and reduce-scatters must match)."""
        count = self.global_batches - first if count is None else count
        steps = np.arange(first, first + count) // self.world_size
        drawn = np.empty(count, dtype=np.int64)
        for block in np.unique(steps // DRAW_BLOCK):
            rng = np.random.default_rng([self.seed, epoch, int(block)])
            draws = rng.choice(len(self.sources), size=DRAW_BLOCK, p=self.probabilities)
            inside = steps // DRAW_BLOCK == block
            drawn[inside] = draws[steps[inside] - block * DRAW_BLOCK]
        return drawn

    def _blocks(self, epoch: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """``(global batches, their sources, their readers)`` of ``epoch``, a block at a time."""
        for first in range(0, self.global_batches, DRAW_BLOCK):
            batches = np.arange(first, min(first + DRAW_BLOCK, self.global_batches))
            yield batches, self.source_draws(epoch, first, len(batches)), self.reader_of(batches)

    def taken_before(self, epoch: int) -> np.ndarray:
        """Samples each reader took from each source before ``epoch`` starts: ``(readers, sources)``."""
        taken = np.zeros((self.readers, len(self.sources)), dtype=np.int64)
        for previous in range(epoch):
            for _, draws, readers in self._blocks(previous):
                np.add.at(taken, (readers, draws), self.batch_size)
        return taken

    def positions(self, epoch: int) -> list[int]:
        """Samples taken from each source before ``epoch`` starts (over all ranks and workers)."""
        return self.taken_before(epoch).sum(axis=0).tolist()

    def epoch_plan(self, epoch: int, start: int = 0, step: int = 1) -> Iterator[tuple[int, int, np.ndarray]]:
        """``(j, source, sample indices)`` of this rank's batches ``j = start, start + step, ...`` in ``epoch``."""
        taken = self.taken_before(epoch)
        num_sources = len(self.sources)
        for batches, draws, readers in self._blocks(epoch):
            keys = readers * num_sources + draws
            # how many earlier batches of this block the same reader took from the same source
            order = np.argsort(keys, kind="stable")
            sorted_keys = keys[order]
            group_start = np.searchsorted(sorted_keys, sorted_keys, side="left")
            earlier = np.empty_like(keys)
            earlier[order] = np.arange(len(keys)) - group_start
            j = batches // self.world_size
            mine = (batches % self.world_size == self.rank) & (j >= start) & ((j - start) % step == 0)
            for k in np.flatnonzero(mine):
                reader, source = int(readers[k]), int(draws[k])
                position = int(taken[reader, source] + earlier[k] * self.batch_size)
                yield int(j[k]), source, self._take(source, reader, position)
            np.add.at(taken, (readers, draws), self.batch_size)

    def _take(self, source: int, reader: int, start: int) -> np.ndarray:
        """``batch_size`` indices from ``start`` on in the reader's endless sequence of its shares of passes."""
        size = len(self.sources[source])
        low, high = size * reader // self.readers, size * (reader + 1) // self.readers
        share = high - low
        taken, out = start, []
        while sum(len(part) for part in out) < self.batch_size:
            pass_index, offset = divmod(taken, share)
            count = min(share - offset, self.batch_size - sum(len(part) for part in out))
            out.append(self._order(source, pass_index).take(low + offset, count))
            taken += count
        return np.concatenate(out)

    def _order(self, source: int, pass_index: int) -> PassOrder:
        key = (source, pass_index)
        if key not in self._orders:
            # keep two passes per source (readers cross from one pass to the next at different batches)
            kept = [k for k in self._orders if k[0] == source and k[1] >= pass_index - 1]
            self._orders = {k: v for k, v in self._orders.items() if k[0] != source or k in kept}
            seed = [self.seed, 7919 * source, pass_index]
            self._orders[key] = PassOrder(self.sources[source].chunk_sizes(), seed)
        return self._orders[key]


class MixtureStream(IterableDataset):
    """This rank's batches of one epoch, loaded and collated in the dataloader workers (in order): padded by the
    processor, or packed into rows (:class:`~lynx_zoo.data.packing.PackingCollate`). Packing rearranges a batch's
    samples, never which samples a batch holds: the schedule's exactly-once reading and resume are unchanged."""

    def __init__(self, schedule: MixtureSchedule, collate: Callable[[list[Sample | Skipped]], dict[str, Any]]) -> None:
        self.schedule = schedule
        self.collate = collate
        self.epoch = 0
        self.start = 0  # batches of this epoch already consumed (resume)

    def __len__(self) -> int:
        return self.schedule.batches_per_epoch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        # the DataLoader takes batches from its workers round-robin, so worker w yields start + w, + 2w, ...
        for j, source, indices in self.schedule.epoch_plan(self.epoch, self.start + worker, workers):
            yield self.load_batch(source, indices, j)

    def load_batch(self, source_index: int, indices: np.ndarray, j: int) -> dict[str, Any]:
        source = self.schedule.sources[source_index]
        seed = f"{self.schedule.seed}/{self.epoch}/{self.schedule.rank}/{j}"
        samples: list[Sample | Skipped] = [source.read_sample(int(i), f"{seed}/{k}") for k, i in enumerate(indices)]
        batch = self.collate(samples)
        batch["source"] = source.name
        return batch


class MixtureLoader(DataLoader):
    """The training DataLoader of :class:`MixtureDataModule`. Each epoch of the trainer is the next epoch of the
    mixture: the count lives in the DataModule, so it survives reloaded dataloaders, and a second ``iter()`` in
    the same trainer epoch repeats the same epoch (Lightning's own epoch counter can skip one when a run
    resumes at an epoch's end). Right after a resume it starts with the first batch not yet trained on.
    Lightning saves its ``state_dict`` in checkpoints and restores it before iterating."""

    def __init__(self, stream: MixtureStream, datamodule: MixtureDataModule, **kwargs: Any) -> None:
        super().__init__(stream, batch_size=None, **kwargs)
        self.datamodule = datamodule

    def __iter__(self) -> Any:
        stream: MixtureStream = self.dataset  # type: ignore[assignment]
        position = self.datamodule.position
        trainer = self.datamodule.trainer
        trainer_epoch = (id(trainer), trainer.current_epoch) if trainer is not None else None
        if trainer_epoch is None or trainer_epoch != position["trainer_epoch"]:
            stream.epoch, stream.start = position["next_epoch"], position["next_start"]
            position.update(next_epoch=stream.epoch + 1, next_start=0, trainer_epoch=trainer_epoch)
        return super().__iter__()

    def state_dict(self) -> dict[str, Any]:
        """Epoch and batches done on this rank, and the position in each source at the epoch's start."""
        stream: MixtureStream = self.dataset  # type: ignore[assignment]
        trainer = self.datamodule.trainer
        done = trainer.fit_loop.epoch_loop.batch_progress.current.ready if trainer is not None else 0
        schedule = stream.schedule
        positions = schedule.positions(stream.epoch)
        return {
            "epoch": stream.epoch,
            "batches_done": done,
            "seed": schedule.seed,
            "batch_size": schedule.batch_size,
            "world_size": schedule.world_size,
            "num_workers": schedule.workers,
            "batches_per_epoch": schedule.batches_per_epoch,
            "positions_at_epoch_start": {s.name: p for s, p in zip(schedule.sources, positions)},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        schedule = self.dataset.schedule  # type: ignore[attr-defined]
        now = {"seed": schedule.seed, "batch_size": schedule.batch_size, "world_size": schedule.world_size,
               "num_workers": schedule.workers, "batches_per_epoch": schedule.batches_per_epoch}  # fmt: skip
        warn_of_changed_settings("the data mixture", state, now, "schedule")
        finished = state["batches_done"] >= len(self)
        position = self.datamodule.position
        position.update(trainer_epoch=None, next_start=0 if finished else state["batches_done"])
        position["next_epoch"] = state["epoch"] + 1 if finished else state["epoch"]


class MixtureDataModule(LynxDataModule):
    """Sources sampled by ratio, with instruction templates, for every model of the zoo (PT and CA).

    Args:
        sources: the training sources (their ``ratio`` are the mixture weights).
        val_sources: held-out sources, each read once in order with its first template and the
            centre frames of each video segment (one validation dataloader per source).
        templates: a templates file (task -> templates; default: the zoo's ``templates.yaml``).
        diverse_prompts: draw one of several templates per sample (Lynx) instead of each task's first.
        batch_size: samples per batch and device.
        batches_per_epoch: batches per epoch and device (default: the training samples over the global batch).
        num_workers: dataloader worker processes (decoding and transforms run there).
        seed: seeds the mixture schedule, template and frame draws.
        strict: raise on an unreadable file or a malformed line (naming it) instead of skipping it.
        max_image_pixels: skip images of more pixels than this before decoding them (``null``: no cap).
        max_skipped_share: fail a run that skipped more than this share of its training samples.
        pack_tokens: pack each training batch's samples into rows of at most this many LLM tokens (visual tokens
            included), attention kept inside each sample (:mod:`lynx_zoo.data.packing`); ``None`` pads each sample
            to the longest of its batch. At least the visual tokens of a sample plus ``prompt.max_length``.
    """

    def __init__(
        self,
        sources: list[Source],
        val_sources: list[Source] | None = None,
        templates: str | None = None,
        diverse_prompts: bool = True,
        batch_size: int = 8,
        batches_per_epoch: int | None = None,
        num_workers: int = 2,
        seed: int = 0,
        strict: bool = False,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
        max_skipped_share: float = 0.5,
        pack_tokens: int | None = None,
    ) -> None:
        super().__init__(max_skipped_share)
        if not sources:
            raise ValueError("MixtureDataModule: give at least one training source")
        names = [s.name for s in [*sources, *(val_sources or [])]]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"MixtureDataModule: source names must be unique, got {duplicates} more than once")
        self.sources = sources
        self.val_sources = val_sources or []
        self.templates = InstructionTemplates.from_file(templates, diverse_prompts)
        self.batch_size = batch_size
        self.batches_per_epoch = batches_per_epoch
        self.num_workers = num_workers
        self.seed = seed
        self.strict = strict
        self.max_image_pixels = max_image_pixels
        self.pack_tokens = pack_tokens
        self.processor: LynxProcessor | None = None  # the model's, or set by hand with ``num_frames``
        self.num_frames = 5
        # sequence positions of a sample's media by frame count (packing): the model's, or set by hand
        self.media_tokens: MediaTokens | None = None
        self.stream: MixtureStream | None = None
        # which epoch of the mixture (and first batch) the training loader goes to next, and for which trainer epoch
        # it last went on (the stream keeps the current one)
        self.position: dict[str, Any] = {"next_epoch": 0, "next_start": 0, "trainer_epoch": None}

    # ------------------------------------------------------------------ set-up
    def setup(self, stage: str | None = None) -> None:
        if self.processor is None or (self.pack_tokens and self.media_tokens is None):
            model = attached_model(self)
            self.processor, self.num_frames = model.processor, model.vision_config.num_frames
            # a table by frame count (an image: 1, a clip: num_frames), not the model's bound method: the collate
            # goes to every dataloader worker, and under spawn the whole model would be pickled with it
            by_frames = {f: model.media_tokens_in_sequence(f) for f in range(1, max(self.num_frames, 1) + 1)}
            self.media_tokens = by_frames.__getitem__
        model = self.trainer.lightning_module if self.trainer is not None else None
        caches = [s for s in [*self.sources, *self.val_sources] if isinstance(s, FeatureCacheSource)]
        if caches and model is not None:
            tower = tower_description(model.vision)  # hashes the tower's weights: once for all caches
            for source in caches:
                source.check_tower(model.vision, tower)  # the model's own frozen tower made it
        transform, frames = self.processor.image_transform, self.num_frames
        train_transform = self.processor.train_image_transform
        cap = self.max_image_pixels
        train = LoadContext(train_transform, self.templates, frames, True, self.strict, transform, cap)
        held_out = LoadContext(transform, self.templates, frames, False, self.strict, max_image_pixels=cap)
        for source in self.sources:
            source.prepare(train)
        for source in self.val_sources:
            source.prepare(held_out)
        for source in [*self.sources, *self.val_sources]:
            if source.skipped_lines:
                log.warning("source %s: skipped %s while reading it", source.name, dict(source.skipped_lines))
        if self.stream is None:
            rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
            total = sum(len(s) for s in self.sources if s.ratio > 0)
            per_epoch = self.batches_per_epoch or max(1, total // (self.batch_size * world))
            schedule = MixtureSchedule(
                self.sources, self.batch_size, per_epoch, self.seed, rank, world, self.num_workers
            )
            collate: Any = self.processor
            if self.pack_tokens:
                assert self.media_tokens is not None
                collate = PackingCollate(self.processor, self.pack_tokens, self.media_tokens)
            self.stream = MixtureStream(schedule, collate)

    @property
    def categories(self) -> list[str]:
        """Categories of the held-out sources, for per-category metrics."""
        return sorted({c for s in self.val_sources for c in s.categories})

    def read_sources(self) -> list[Source]:
        return [*self.sources, *self.val_sources]

    # ------------------------------------------------------------------ loaders
    def train_dataloader(self) -> DataLoader:
        assert self.stream is not None, "call setup('fit') first"
        return MixtureLoader(self.stream, self, num_workers=self.num_workers)

    def val_dataloader(self) -> list[DataLoader]:
        return [
            DataLoader(source, batch_size=self.batch_size, num_workers=self.num_workers, collate_fn=self.processor)
            for source in self.val_sources
        ]
