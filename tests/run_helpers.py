"""Helpers of the data tests: callbacks that record what a run trained on, and a quiet CPU trainer."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback


class Recorder(Callback):
    """Records each training batch's sample ids and source."""

    def __init__(self) -> None:
        self.ids: list[list[str]] = []
        self.sources: list[str] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.ids.append(list(batch["ids"]))
        self.sources.append(batch["source"])


class StopAt(Callback):
    """Stops training after ``step`` optimizer steps (as a killed job would)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        trainer.should_stop = trainer.global_step >= self.step


class IdsToFile(Callback):
    """Appends each training batch's sample ids to ``folder/rank<R>.txt`` (survives spawned processes); with
    ``per_epoch``, to ``folder/rank<R>-epoch<E>.txt``."""

    def __init__(self, folder: Path, per_epoch: bool = False) -> None:
        self.folder = folder
        self.per_epoch = per_epoch

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        name = f"rank{trainer.global_rank}" + (f"-epoch{trainer.current_epoch}" if self.per_epoch else "")
        with (self.folder / f"{name}.txt").open("a") as out:
            out.write("".join(f"{key}\n" for key in batch["ids"]))


def trainer(tmp_path: Path, **kwargs) -> L.Trainer:
    """A CPU trainer without logger, progress bar, checkpoints or validation (override any of them)."""
    options = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    return L.Trainer(**{**options, **kwargs})
