"""Runs that resume rather than start over.

* :func:`fix_checkpoint_folders`: every ``ModelCheckpoint`` of a ``fit`` config without a ``dirpath`` writes to
  ``<default_root_dir>/checkpoints`` (one is added when the config has none), not to a new
  ``lightning_logs/version_N/checkpoints`` per run, so the next run of the same config finds them.
* :func:`resolve_last`: what ``--ckpt_path last`` means: the newest ``last*.ckpt`` in those folders (Lightning's
  ``save_last``), else the newest checkpoint there; a :class:`~lynx_zoo.errors.ResumeError` saying where it
  looked when there is none (Lightning would warn and silently train from step 0). Starting afresh is asked for
  by leaving ``--ckpt_path`` out.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from fsspec.utils import get_protocol
from jsonargparse import Namespace
from lightning.pytorch.callbacks import ModelCheckpoint

from lynx_zoo.checkpoints import read_torch_checkpoint
from lynx_zoo.errors import ResumeError

CHECKPOINT_CLASS = f"{ModelCheckpoint.__module__}.{ModelCheckpoint.__qualname__}"
CHECKPOINT_FOLDER = "checkpoints"


def run_checkpoint_folder(default_root_dir: str | os.PathLike | None) -> str:
    """The fixed checkpoint folder of a run: ``<default_root_dir>/checkpoints`` (the working folder by default)."""
    return os.path.join(default_root_dir or os.getcwd(), CHECKPOINT_FOLDER)


def _is_model_checkpoint(class_path: str) -> bool:
    """Whether ``class_path`` (already imported by the config parser) names ``ModelCheckpoint`` or a subclass; never
    imports anything."""
    module, _, name = class_path.rpartition(".")
    cls = getattr(sys.modules.get(module), name, None)
    return class_path == "ModelCheckpoint" or (isinstance(cls, type) and issubclass(cls, ModelCheckpoint))


def fix_checkpoint_folders(trainer: Namespace) -> None:
    """Give the ``ModelCheckpoint`` callbacks of a parsed ``trainer`` config without a ``dirpath`` the run's fixed
    folder (:func:`run_checkpoint_folder`), adding Lightning's default one there when the config lists none."""
    if trainer.get("enable_checkpointing") is False:
        return
    folder = run_checkpoint_folder(trainer.get("default_root_dir"))
    callbacks = list(trainer.get("callbacks") or [])
    checkpoints = [c for c in callbacks if isinstance(c, Namespace) and _is_model_checkpoint(c.get("class_path", ""))]
    if not checkpoints:
        callbacks.append(Namespace(class_path=CHECKPOINT_CLASS, init_args=Namespace(dirpath=folder)))
        trainer["callbacks"] = callbacks
    for callback in checkpoints:
        if callback.get("init_args") is None:
            callback["init_args"] = Namespace()
        if callback["init_args"].get("dirpath") is None:
            callback["init_args"]["dirpath"] = folder


def last_checkpoint(folders: Sequence[Path]) -> Path | None:
    """The newest ``last*.ckpt`` (a file, or a sharded checkpoint's folder) in ``folders``, else the newest ``*.ckpt``
    there; ``None`` when they hold none."""
    found = [p for folder in folders if folder.is_dir() for p in folder.glob("*.ckpt")]
    last = [p for p in found if p.name.startswith(ModelCheckpoint.CHECKPOINT_NAME_LAST)]
    candidates = last or found
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


def resolve_last(trainer: L.Trainer) -> str | None:
    """The checkpoint ``--ckpt_path last`` resumes: see :func:`last_checkpoint`; checked to be readable.

    ``None`` (Lightning's own ``last``) for checkpoints in an object store; a :class:`ResumeError` saying where it
    looked when there is none."""
    dirpaths = [str(c.dirpath) for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint) and c.dirpath]
    if any(get_protocol(d) != "file" for d in dirpaths):
        return None
    if not dirpaths:
        raise ResumeError(
            "--ckpt_path last: the run has no ModelCheckpoint with a dirpath, so there is no folder to look in "
            "(enable_checkpointing is off?); name the checkpoint to resume, or leave out --ckpt_path to start afresh"
        )
    folders = [Path(d) for d in dirpaths]
    found = last_checkpoint(folders)
    if found is None:
        where = ", ".join(f"{f} ({'empty' if f.is_dir() else 'missing'})" for f in folders)
        raise ResumeError(
            f"--ckpt_path last: no checkpoint to resume in {where}; to start a fresh run, leave out --ckpt_path"
        )
    if found.is_file():
        read_torch_checkpoint(found)  # a truncated last checkpoint is named here, not deep inside Lightning
    return str(found)


def resume_arguments(trainer: L.Trainer, fit_arguments: Any) -> None:
    """Replace ``ckpt_path: last`` in ``fit``'s arguments (a mapping) by the checkpoint it means."""
    if fit_arguments.get("ckpt_path") == "last":
        found = resolve_last(trainer)
        if found is not None:
            fit_arguments["ckpt_path"] = found
