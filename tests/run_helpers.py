"""Helpers of the data and fault tests: callbacks that record what a run trained on, a quiet CPU trainer, and the
callback and checkpoint plugin that hold a child ``fit`` where a test kills it."""

from __future__ import annotations

import io
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from lynx_zoo.training.checkpoint_io import AtomicCheckpointIO


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


class PauseAt(Callback):
    """In a child ``fit``: after optimizer step ``step`` (and its checkpoint), writes ``marker`` and sleeps, so that
    the test can SIGKILL the run there, mid-training."""

    def __init__(self, step: int, marker: str) -> None:
        self.step = step
        self.marker = marker

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            Path(self.marker).write_text(str(self.step))
            time.sleep(600)


class StallingCheckpointIO(AtomicCheckpointIO):
    """In a child ``fit``: the save of step ``step`` writes half its bytes to the temporary file, writes ``marker``
    and sleeps, so that the test can SIGKILL the run in the middle of a checkpoint save."""

    def __init__(self, step: int, marker: str) -> None:
        super().__init__()
        self.step = step
        self.marker = marker

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        if checkpoint.get("global_step") == self.step:
            real_save = torch.save

            def half_save(obj, file, *args, **kwargs):
                buffer = io.BytesIO()
                real_save(obj, buffer)
                data = buffer.getvalue()
                file.write(data[: len(data) // 2])
                file.flush()
                Path(self.marker).write_text(str(path))
                time.sleep(600)

            torch.save = half_save
        super().save_checkpoint(checkpoint, path, storage_options)
