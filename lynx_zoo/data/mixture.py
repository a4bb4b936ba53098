"""The mixture DataModule: many sources sampled by ratio, batch by batch, resumable mid-epoch.

Every batch is drawn from one source, chosen by the configured ratios (Lynx's tables: BLIP CapFilt
30.5 %, Places365 10.9 %, ...), so images, videos and text-only samples never share a batch. The
whole schedule (which source each global batch comes from and which of its samples) is a pure
function of ``(seed, epoch, batch)``: every rank computes it, takes its own batches (global batch
``g`` belongs to rank ``g % world_size``) and every dataloader worker loads every ``num_workers``-th of
those, so each sample of a pass is read once across ranks and workers. Positions in each source carry
over from epoch to epoch (a source's pass continues where it stopped), and the DataModule's state in
a checkpoint (epoch and batches done) lets a resumed run continue with the next unseen batch.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import lightning as L
import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from lynx_zoo.data.datamodule import attached_model
from lynx_zoo.data.processor import LynxProcessor, Sample, Skipped
from lynx_zoo.data.sources import LoadContext, Source
from lynx_zoo.data.templates import InstructionTemplates

log = logging.getLogger(__name__)


class MixtureSchedule:
    """Which source and which sample indices each batch of an epoch gets, for one rank.

    Args:
        sources: the (prepared) sources; their ``ratio`` attributes are the sampling weights.
        batch_size: samples per batch.
        batches_per_epoch: batches per rank and epoch.
        seed: seeds the source draws and each source's pass orders.
        rank, world_size: this process and the number of processes.
    """

    def __init__(
        self, sources: list[Source], batch_size: int, batches_per_epoch: int, seed: int, rank: int, world_size: int
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
        self._orders: dict[tuple[int, int], np.ndarray] = {}

    def source_draws(self, epoch: int) -> np.ndarray:
        """The source of each global batch of ``epoch`` (all ranks)."""
        rng = np.random.default_rng([self.seed, epoch])
        return rng.choice(len(self.sources), size=self.batches_per_epoch * self.world_size, p=self.probabilities)

    def positions(self, epoch: int) -> list[int]:
        """Samples taken from each source before ``epoch`` starts (over all ranks)."""
        taken = np.zeros(len(self.sources), dtype=np.int64)
        for previous in range(epoch):
            taken += np.bincount(self.source_draws(previous), minlength=len(self.sources)) * self.batch_size
        return taken.tolist()

    def epoch_plan(self, epoch: int) -> list[tuple[int, np.ndarray]]:
        """``(source, sample indices)`` of this rank's batches in ``epoch``."""
        position = self.positions(epoch)
        plan = []
        for g, s in enumerate(self.source_draws(epoch)):
            if g % self.world_size == self.rank:
                plan.append((int(s), self._take(int(s), position[s])))
            position[s] += self.batch_size
        return plan

    def _take(self, source: int, start: int) -> np.ndarray:
        """``batch_size`` indices from ``start`` on in the source's endless sequence of passes."""
        size = len(self.sources[source])
        taken, out = start, []
        while len(out) < self.batch_size:
            pass_index, offset = divmod(taken, size)
            order = self._order(source, pass_index)
            chunk = order[offset : offset + self.batch_size - len(out)]
            out.extend(chunk.tolist())
            taken += len(chunk)
        return np.array(out)

    def _order(self, source: int, pass_index: int) -> np.ndarray:
        key = (source, pass_index)
        if key not in self._orders:
            self._orders = {k: v for k, v in self._orders.items() if k[0] != source}  # keep one pass per source
            self._orders[key] = self.sources[source].order(pass_index, self.seed + 7919 * source)
        return self._orders[key]


class MixtureStream(IterableDataset):
    """This rank's batches of one epoch, loaded and collated in the dataloader workers (in order)."""

    def __init__(self, schedule: MixtureSchedule, collate: LynxProcessor) -> None:
        self.schedule = schedule
        self.collate = collate
        self.epoch = 0
        self.start = 0  # batches of this epoch already consumed (resume)

    def __len__(self) -> int:
        return self.schedule.batches_per_epoch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        plan = self.schedule.epoch_plan(self.epoch)
        # the DataLoader takes batches from its workers round-robin, so worker w yields start + w, + 2w, ...
        for j in range(self.start + worker, len(plan), workers):
            yield self.load_batch(plan[j], j)

    def load_batch(self, step: tuple[int, np.ndarray], j: int) -> dict[str, Any]:
        source_index, indices = step
        source = self.schedule.sources[source_index]
        seed = f"{self.schedule.seed}/{self.epoch}/{self.schedule.rank}/{j}"
        samples: list[Sample | Skipped] = [source.load(int(i), f"{seed}/{k}") for k, i in enumerate(indices)]
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
            "batches_per_epoch": schedule.batches_per_epoch,
            "positions_at_epoch_start": {s.name: p for s, p in zip(schedule.sources, positions)},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        schedule = self.dataset.schedule  # type: ignore[attr-defined]
        now = {"seed": schedule.seed, "batch_size": schedule.batch_size, "world_size": schedule.world_size,
               "batches_per_epoch": schedule.batches_per_epoch}  # fmt: skip
        changed = {k: (state[k], v) for k, v in now.items() if k in state and state[k] != v}
        if changed:
            log.warning(
                "resuming the data mixture with other settings than the checkpoint's (%s: (then, now)): the "
                "schedule differs, so some samples will be repeated or skipped",
                changed,
            )
        finished = state["batches_done"] >= len(self)
        position = self.datamodule.position
        position.update(trainer_epoch=None, next_start=0 if finished else state["batches_done"])
        position["next_epoch"] = state["epoch"] + 1 if finished else state["epoch"]


class MixtureDataModule(L.LightningDataModule):
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
    ) -> None:
        super().__init__()
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
        self.processor: LynxProcessor | None = None  # the model's, or set by hand with ``num_frames``
        self.num_frames = 5
        self.stream: MixtureStream | None = None
        # which epoch of the mixture (and first batch) the training loader goes to next, and for which trainer epoch
        # it last went on (the stream keeps the current one)
        self.position: dict[str, Any] = {"next_epoch": 0, "next_start": 0, "trainer_epoch": None}

    # ------------------------------------------------------------------ set-up
    def setup(self, stage: str | None = None) -> None:
        if self.processor is None:
            model = attached_model(self)
            self.processor, self.num_frames = model.processor, model.vision_config.num_frames
        transform, frames = self.processor.image_transform, self.num_frames
        train_transform = self.processor.train_image_transform
        train = LoadContext(train_transform, self.templates, frames, True, self.strict, frame_transform=transform)
        held_out = LoadContext(transform, self.templates, frames, False, self.strict)
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
            schedule = MixtureSchedule(self.sources, self.batch_size, per_epoch, self.seed, rank, world)
            self.stream = MixtureStream(schedule, self.processor)

    @property
    def categories(self) -> list[str]:
        """Categories of the held-out sources, for per-category metrics."""
        return sorted({c for s in self.val_sources for c in s.categories})

    @property
    def skipped_lines(self) -> dict[str, int]:
        """Manifest lines / shard members skipped while reading the sources, by ``source/reason``."""
        return {f"{s.name}/{r}": n for s in [*self.sources, *self.val_sources] for r, n in s.skipped_lines.items()}

    # ------------------------------------------------------------------ loaders
    def train_dataloader(self) -> DataLoader:
        assert self.stream is not None, "call setup('fit') first"
        return MixtureLoader(self.stream, self, num_workers=self.num_workers)

    def val_dataloader(self) -> list[DataLoader]:
        return [
            DataLoader(source, batch_size=self.batch_size, num_workers=self.num_workers, collate_fn=self.processor)
            for source in self.val_sources
        ]
