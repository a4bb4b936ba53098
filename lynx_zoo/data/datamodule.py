"""DataModules shared by every model of the zoo.

The model owns the processor (tokenizer, prompt format, image transform); the DataModule takes it
from the model it is trained with (or from ``processor=``) so that one DataModule serves PT and CA
models alike. Every DataModule of the zoo is a :class:`LynxDataModule`: it declares the records it skipped while
reading its sources and the share of skipped samples a run tolerates (``SkippedSampleReport`` reads both), and its
training loader resumes mid-epoch with the next unseen batch (Lightning's ``state_dict`` protocol).
"""

from __future__ import annotations

import logging
from abc import abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
from torch.utils.data import DataLoader, DistributedSampler

from lynx_zoo.data.images import DEFAULT_MAX_IMAGE_PIXELS
from lynx_zoo.data.processor import LynxProcessor
from lynx_zoo.data.shapes import write_shapes_vqa
from lynx_zoo.data.sources import ImageTextSource, LoadContext, Source
from lynx_zoo.errors import ConfigError
from lynx_zoo.skipped_samples import DeclaresSkips

log = logging.getLogger(__name__)


def attached_model(datamodule: L.LightningDataModule) -> Any:
    """The lynx_zoo model a DataModule is trained with (its processor and vision settings shape the data)."""
    model = datamodule.trainer.lightning_module if datamodule.trainer is not None else None
    if not hasattr(model, "processor"):
        raise RuntimeError(
            f"{type(datamodule).__name__} needs a processor: attach it to a lynx_zoo model's trainer "
            "or set `datamodule.processor = model.processor`"
        )
    return model


def warn_of_changed_settings(data: str, saved: dict[str, Any], now: dict[str, Any], what: str) -> None:
    """Warn, naming each setting as (then, now), when ``data`` resumes with other settings than its checkpoint
    ``saved``: its ``what`` (order, schedule) differs, so some samples will be repeated or skipped."""
    changed = {k: (saved[k], v) for k, v in now.items() if k in saved and saved[k] != v}
    if changed:
        log.warning(
            "resuming %s with other settings than the checkpoint's (%s: (then, now)): the %s differs, so some "
            "samples will be repeated or skipped",
            data,
            changed,
            what,
        )


class LynxDataModule(L.LightningDataModule, DeclaresSkips):
    """The base of the zoo's DataModules: what they declare to the skipped-sample report (:class:`DeclaresSkips`).

    Args:
        max_skipped_share: a run whose training batches dropped more than this share of their samples
            (unreadable, oversized, malformed...) fails instead of ending as a success (0: none may be skipped;
            1: never fail).
    """

    def __init__(self, max_skipped_share: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= max_skipped_share <= 1.0:
            raise ConfigError(f"data.max_skipped_share: expected a share between 0 and 1, got {max_skipped_share}")
        self.max_skipped_share = max_skipped_share

    @abstractmethod
    def read_sources(self) -> list[Source]:
        """The sources read so far (training and held-out)."""

    @property
    def skipped_lines(self) -> dict[str, int]:
        """Records skipped while reading the sources (manifest lines, tar members), by ``source/reason``."""
        return {f"{s.name}/{r}": n for s in self.read_sources() for r, n in s.skipped_lines.items()}


class EpochShuffle(DistributedSampler):
    """This rank's share of a seeded shuffle of each epoch (``set_epoch``), starting ``start`` samples in right
    after a resume. A ``DistributedSampler``, so Lightning keeps it under DDP/FSDP rather than replacing it."""

    def __init__(self, dataset: Source, seed: int, rank: int = 0, world_size: int = 1) -> None:
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.start = 0

    def __iter__(self) -> Iterator[int]:
        start, self.start = self.start, 0
        for position, index in enumerate(super().__iter__()):
            if position >= start:
                yield index


class ResumableLoader(DataLoader):
    """A training DataLoader whose position Lightning saves in checkpoints (epoch and batches done) and restores
    before iterating, so a resumed run continues with the first batch it has not trained on, in the same order."""

    def __init__(self, dataset: Source, sampler: EpochShuffle, datamodule: L.LightningDataModule, **kwargs: Any):
        super().__init__(dataset, sampler=sampler, drop_last=True, **kwargs)
        self.datamodule = datamodule

    def state_dict(self) -> dict[str, Any]:
        """The epoch, the batches of it done on this rank, and the settings that fix the order."""
        sampler: EpochShuffle = self.sampler  # type: ignore[assignment]
        trainer = self.datamodule.trainer
        done = trainer.fit_loop.epoch_loop.batch_progress.current.ready if trainer is not None else 0
        return {
            "epoch": sampler.epoch,
            "batches_done": done,
            "seed": sampler.seed,
            "batch_size": self.batch_size,
            "world_size": sampler.num_replicas,
            "samples": len(self.dataset),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        sampler: EpochShuffle = self.sampler  # type: ignore[assignment]
        now = {"seed": sampler.seed, "batch_size": self.batch_size, "world_size": sampler.num_replicas,
               "samples": len(self.dataset)}  # fmt: skip
        warn_of_changed_settings("the training data", state, now, "order")
        finished = state["batches_done"] >= self._epoch_batches()
        sampler.start = 0 if finished else state["batches_done"] * self.batch_size

    def _epoch_batches(self) -> int:
        """The batches of an epoch the trainer takes (``limit_train_batches`` may end it early)."""
        trainer = self.datamodule.trainer
        limit = trainer.limit_train_batches if trainer is not None else 1.0
        if isinstance(limit, int):
            return min(len(self), limit)
        return int(len(self) * limit)


class VQADataModule(LynxDataModule):
    """Image + question + answer data from JSONL manifests (see :mod:`lynx_zoo.data.manifest`).

    Args:
        train_manifest: manifest of the training split.
        val_manifest: manifest of the held-out split (validation loss and generated-answer accuracy).
        image_root: folder the manifests' image paths are relative to (default: each manifest's folder).
        batch_size: samples per batch and device.
        num_workers: DataLoader worker processes (decoding and transforms run there).
        strict: raise on an unreadable image or a malformed manifest line instead of skipping it.
        seed: seeds the shuffled order of each training epoch (the same after a resume).
        max_image_pixels: skip images of more pixels than this before decoding them (``null``: no cap).
        max_skipped_share: fail a run that skipped more than this share of its training samples.
    """

    def __init__(
        self,
        train_manifest: str,
        val_manifest: str | None = None,
        image_root: str | None = None,
        batch_size: int = 8,
        num_workers: int = 2,
        strict: bool = False,
        seed: int = 0,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
        max_skipped_share: float = 0.5,
    ) -> None:
        super().__init__(max_skipped_share)
        self.train_manifest = train_manifest
        self.val_manifest = val_manifest
        self.image_root = image_root
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.strict = strict
        self.seed = seed
        self.max_image_pixels = max_image_pixels
        self.processor: LynxProcessor | None = None
        self.train_set: ImageTextSource | None = None
        self.val_set: ImageTextSource | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.processor is None:
            self.processor = attached_model(self).processor
        if stage in (None, "fit") and self.train_set is None:
            self.train_set = self._source(self.train_manifest, training=True)
        if self.val_manifest and self.val_set is None:
            self.val_set = self._source(self.val_manifest, training=False)

    def _source(self, manifest: str, training: bool) -> ImageTextSource:
        source = ImageTextSource(manifest, root=self.image_root, name=Path(manifest).stem)
        transform = self.processor.train_image_transform if training else self.processor.image_transform
        frames = self.processor.image_transform
        context = LoadContext(
            transform,
            training=training,
            strict=self.strict,
            frame_transform=frames,
            max_image_pixels=self.max_image_pixels,
        )
        source.prepare(context)
        return source

    def read_sources(self) -> list[Source]:
        return [s for s in (self.train_set, self.val_set) if s is not None]

    @property
    def categories(self) -> list[str]:
        """Categories of the held-out split, for per-category metrics."""
        if self.val_set is not None:
            return self.val_set.categories
        return []

    def _options(self) -> dict[str, Any]:
        return dict(
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            collate_fn=self.processor,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> ResumableLoader:
        assert self.train_set is not None, "call setup('fit') first"
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        sampler = EpochShuffle(self.train_set, self.seed, rank, world)
        return ResumableLoader(self.train_set, sampler, self, **self._options())

    def val_dataloader(self) -> DataLoader | list:
        return DataLoader(self.val_set, shuffle=False, **self._options()) if self.val_set is not None else []

    def test_dataloader(self) -> DataLoader | list:
        return self.val_dataloader()


class ShapesVQADataModule(VQADataModule):
    """The built-in rendered-shapes VQA set (:mod:`lynx_zoo.data.shapes`), written under ``root`` on
    first use and then read through the same manifest path as any real data set.

    Args:
        root: folder of the rendered set (created if missing).
        num_train: training images (four questions each).
        num_val: held-out images (four questions each).
        image_size: rendered image size in pixels.
        seed: seed of the renderer and of the shuffled order of each training epoch.
        (``batch_size``, ``num_workers``, ``strict``, ``max_skipped_share`` as for :class:`VQADataModule`.)
    """

    def __init__(
        self,
        root: str = "data/shapes_vqa",
        num_train: int = 8000,
        num_val: int = 250,
        image_size: int = 64,
        seed: int = 0,
        batch_size: int = 32,
        num_workers: int = 2,
        strict: bool = False,
        max_skipped_share: float = 0.5,
    ) -> None:
        super().__init__(
            train_manifest=str(Path(root) / "train.jsonl"),
            val_manifest=str(Path(root) / "val.jsonl"),
            batch_size=batch_size,
            num_workers=num_workers,
            strict=strict,
            seed=seed,
            max_skipped_share=max_skipped_share,
        )
        self.root = Path(root)
        self.num_train, self.num_val, self.image_size, self.seed = num_train, num_val, image_size, seed

    def prepare_data(self) -> None:
        stamp = self.root / "params.txt"
        params = f"num_train={self.num_train} num_val={self.num_val} image_size={self.image_size} seed={self.seed}"
        if stamp.is_file() and stamp.read_text() == params and (self.root / "val.jsonl").is_file():
            return
        write_shapes_vqa(self.root, self.num_train, self.num_val, self.image_size, self.seed)
        stamp.write_text(params)
