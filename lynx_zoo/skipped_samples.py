"""What the data dropped during a run, as every lynx_zoo model reports it (``LynxModel.configure_callbacks``).

The model's batches carry their skipped and truncated counts (``skipped``, ``num_skipped``, ``num_truncated``);
the DataModule declares what it skipped while reading its sources and the share of skipped samples a run
tolerates by deriving from :class:`DeclaresSkips` (every DataModule of the zoo does).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from lynx_zoo.errors import TrainingFailed


class DeclaresSkips(ABC):
    """What a DataModule declares to :class:`SkippedSampleReport`; a DataModule that does not gets no
    ``data/skipped_lines/*`` and a ``max_skipped_share`` of 0.5."""

    #: a run whose training batches dropped more than this share of their samples fails
    max_skipped_share: float

    @property
    @abstractmethod
    def skipped_lines(self) -> dict[str, int]:
        """Records skipped while reading the sources (manifest lines, tar members), by ``source/reason``."""


class SkippedSampleReport(L.Callback):
    """What the data dropped, logged, and the run failed when that leaves it without training.

    Logs ``data/skipped`` and ``data/truncated`` per epoch (summed over ranks), ``data/skipped/<source>/<reason>``
    at each training epoch's end, ``data/skipped_val/<source>/<reason>`` after each validation run, and
    ``data/skipped_lines/<source>/<reason>`` (records dropped while the sources were read: manifest lines, tar
    members) when training starts, each with a one-line summary. Every lynx_zoo model adds it
    (``LynxModel.configure_callbacks``); what it reads of the DataModule, the DataModule declares
    (:class:`DeclaresSkips`).

    A run fails with :class:`~lynx_zoo.errors.TrainingFailed` (a non-zero exit, the reason in one line) when its
    training batches dropped more than the DataModule's ``max_skipped_share`` of their samples (checked at each
    epoch's end; 0.5 for DataModules that declare none), or when it ends without one optimizer step on real
    samples.
    """

    def __init__(self) -> None:
        self.counts: Counter = Counter()  # this epoch's unreadable samples by source/reason (this rank)
        self.val_counts: Counter = Counter()  # this validation run's (this rank)
        self.run_skipped = 0  # samples dropped from this run's training batches (this rank)
        self.run_kept = 0  # samples trained on in this run (this rank)
        self.run_batches = 0  # training batches of this run (this rank)
        self.train_ended = False

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.run_skipped = self.run_kept = self.run_batches = 0
        self.train_ended = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        datamodule = trainer.datamodule
        lines = datamodule.skipped_lines if isinstance(datamodule, DeclaresSkips) else {}
        for key, count in sorted(lines.items()):
            pl_module.log(f"data/skipped_lines/{key}", float(count), rank_zero_only=True)
        if lines:
            rank_zero_info(f"skipped {sum(lines.values())} records while reading the data ({_listed(lines)})")

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not isinstance(batch, dict):
            return
        self.counts.update(batch.get("skipped", {}))
        self.run_batches += 1
        self.run_skipped += int(batch.get("num_skipped", 0))
        self.run_kept += int(batch["input_ids"].shape[0]) if "input_ids" in batch else 0
        for key in ("skipped", "truncated"):
            value = float(batch.get(f"num_{key}", 0))
            pl_module.log(
                f"data/{key}", value, reduce_fx="sum", on_step=False, on_epoch=True, batch_size=1, sync_dist=True
            )

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        counts, self.counts = _summed(self.counts), Counter()
        for key, count in sorted(counts.items()):
            pl_module.log(f"data/skipped/{key}", float(count), rank_zero_only=True)
        if counts:
            rank_zero_info(
                f"epoch {trainer.current_epoch}: skipped {sum(counts.values())} unreadable samples ({_listed(counts)})"
            )
        self._check_skipped_share(trainer)

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if isinstance(batch, dict):
            self.val_counts.update(batch.get("skipped", {}))

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        counts, self.val_counts = _summed(self.val_counts), Counter()
        if trainer.sanity_checking:
            return
        for key, count in sorted(counts.items()):
            pl_module.log(f"data/skipped_val/{key}", float(count), rank_zero_only=True)
        if counts:
            rank_zero_info(f"validation: skipped {sum(counts.values())} unreadable samples ({_listed(counts)})")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.train_ended = True
        self._check_trained(trainer)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.train_ended:  # Lightning skipped the training loop: no batch at all
            self._check_trained(trainer)

    def _check_skipped_share(self, trainer: L.Trainer) -> None:
        skipped, kept = _reduced(trainer, self.run_skipped, self.run_kept)
        datamodule = trainer.datamodule
        limit = datamodule.max_skipped_share if isinstance(datamodule, DeclaresSkips) else 0.5
        if skipped and skipped > limit * (skipped + kept):
            raise TrainingFailed(
                f"the training data dropped {skipped} of {skipped + kept} samples ({skipped / (skipped + kept):.0%}), "
                f"more than data.max_skipped_share={limit} (see the data/skipped/* metrics and the warnings above "
                "for which files and why); fix the data, or raise max_skipped_share to go on"
            )

    def _check_trained(self, trainer: L.Trainer) -> None:
        if trainer.interrupted or not _asked_to_train(trainer):
            return
        batches, kept = _reduced(trainer, self.run_batches, self.run_kept)
        if batches and not kept:
            raise TrainingFailed(
                f"no optimizer step: all {batches} training batches of this run were empty (every sample was skipped; "
                "see the data/skipped/* metrics and the warnings above)"
            )
        if not batches and trainer.global_step == 0:
            raise TrainingFailed(f"no optimizer step: the training data gave no batch ({_data_size(trainer)})")


def _asked_to_train(trainer: L.Trainer) -> bool:
    return trainer.max_steps != 0 and trainer.max_epochs != 0 and trainer.limit_train_batches != 0


def _data_size(trainer: L.Trainer) -> str:
    """How much training data there was, for the message of a run that got no batch."""
    loader = trainer.train_dataloader
    try:
        samples = f"{len(loader.dataset)} training samples"
    except (AttributeError, TypeError):
        samples = "an empty training set"
    batch_size = getattr(loader, "batch_size", None)
    if batch_size and getattr(loader, "drop_last", False):
        samples += f" for batches of {batch_size}, the last partial batch dropped"
    return f"{samples}; limit_train_batches={trainer.limit_train_batches}"


def _listed(counts: dict[str, int]) -> str:
    return ", ".join(f"{key}: {count}" for key, count in sorted(counts.items()))


def _summed(counts: Counter) -> Counter:
    """``counts`` summed over the ranks (itself in a single process)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return counts
    gathered: list[dict[str, int]] = [{} for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather_object(gathered, dict(counts))
    return sum((Counter(g) for g in gathered), Counter())


def _reduced(trainer: L.Trainer, *values: int) -> list[int]:
    """``values`` summed over the ranks, so that every rank takes the same decision."""
    counts = torch.tensor(values, dtype=torch.long, device=trainer.strategy.root_device)
    total = trainer.strategy.reduce(counts, reduce_op="sum")
    return [int(v) for v in total.tolist()]
