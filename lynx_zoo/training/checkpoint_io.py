"""Checkpoint files that are never half-written, and one-file exports of sharded checkpoints.

* :class:`AtomicCheckpointIO` (a Lightning ``CheckpointIO`` plugin, ``trainer.plugins``) writes each checkpoint
  to a temporary file beside its target, fsyncs it, then renames it over the target: a process killed
  mid-save (SIGKILL, a lost node) leaves the previous checkpoint in place and loadable, and a completed save
  survives a power loss. The temporary files such a kill leaves are deleted by the next save into that folder.
  (Lightning's own ``TorchCheckpointIO`` first pickles the whole checkpoint into memory, a second copy of a
  multi-GB state, then writes it through an fsspec transaction without fsync.) It loads checkpoints through
  :func:`~lynx_zoo.checkpoints.read_torch_checkpoint`: an empty, truncated or foreign file is a
  :class:`~lynx_zoo.errors.CheckpointError` naming it.
* :func:`consolidate_checkpoint` turns the sharded checkpoint folder that ``ModelParallelStrategy`` (FSDP2)
  writes into one Lightning checkpoint file with the full weights
  (``python -m lynx_zoo.training.checkpoint_io SHARDED_DIR OUT.ckpt``), loadable with
  ``PrefixLynx.load_from_checkpoint``, by ``init_from`` or by the export tools.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import time
import uuid
from pathlib import Path
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from lynx_zoo.checkpoints import read_torch_checkpoint

log = logging.getLogger(__name__)

METADATA_FILE = "meta.pt"  # what ModelParallelStrategy writes beside the shards: all but weights and optimizers
# the temporary file of a save in progress: .<target name>.<8 hex digits>.tmp
TEMPORARY_FILE = re.compile(r"^\..+\.[0-9a-f]{8}\.tmp$")


def remove_stale_temporaries(folder: str | os.PathLike, older_than: float) -> list[Path]:
    """Delete the temporary files of saves that a kill interrupted in ``folder``: those last written before
    ``older_than`` (a time stamp; a save in progress keeps writing its own). Returns what was deleted."""
    removed = []
    for path in Path(folder).glob(".*.tmp"):
        try:
            if TEMPORARY_FILE.match(path.name) and path.stat().st_mtime < older_than:
                path.unlink()
                removed.append(path)
        except FileNotFoundError:  # another process cleaned it first
            continue
    if removed:
        log.info("removed %d temporary files of interrupted saves in %s: %s", len(removed), folder, removed)
    return removed


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path`` through a temporary file in the same folder, fsynced, then ``os.replace``d."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)  # the rename itself survives a power loss
    finally:
        os.close(folder)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` with atomic writes on local file systems (see :func:`atomic_torch_save`);
    remote URLs (``s3://``, ...) go through fsspec as before. A crash can leave a ``.<name>.<id>.tmp`` file beside
    the checkpoints; it is never read, and the next save into that folder deletes it (any such file older than this
    plugin: a save in progress in another process keeps its file fresh). Local checkpoints load through
    :func:`read_torch_checkpoint` (an unreadable one is an error naming it)."""

    def __init__(self) -> None:
        super().__init__()
        self.started = time.time()

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint: storage_options are not supported")
        if not isinstance(get_filesystem(path), LocalFileSystem):
            return super().save_checkpoint(checkpoint, path)
        folder = Path(path).parent
        if folder.is_dir():
            remove_stale_temporaries(folder, self.started)
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(
        self, path: str | os.PathLike, map_location: Any = "cpu", weights_only: bool | None = None
    ) -> dict[str, Any]:
        """The checkpoint at ``path``, always through the weights-only unpickler."""
        if not isinstance(get_filesystem(path), LocalFileSystem):
            return super().load_checkpoint(path, map_location, weights_only)
        return read_torch_checkpoint(path, map_location)


def consolidate_checkpoint(sharded: str | os.PathLike, output: str | os.PathLike) -> Path:
    """Write the sharded (distributed) checkpoint folder ``sharded`` as one Lightning checkpoint file ``output``:
    the full ``state_dict`` and everything else Lightning saved (hyper-parameters, loop and callback states),
    but no optimizer states (to resume a run, resume from the folder). Runs in one process, no GPU needed."""
    sharded, output = Path(sharded), Path(output)
    if not (sharded / METADATA_FILE).is_file() or not (sharded / ".metadata").is_file():
        raise FileNotFoundError(
            f"consolidate_checkpoint: {sharded} is not a sharded checkpoint folder (expected {METADATA_FILE} and "
            ".metadata in it, as ModelParallelStrategy writes them)"
        )
    checkpoint = torch.load(sharded / METADATA_FILE, map_location="cpu", weights_only=True)
    full = output.with_name(f".{output.name}.shards.tmp")
    try:
        dcp_to_torch_save(sharded, full)
        state = torch.load(full, map_location="cpu", mmap=True, weights_only=True)
        checkpoint["state_dict"] = state["state_dict"]
        atomic_torch_save(checkpoint, output)
    finally:
        full.unlink(missing_ok=True)
    return output


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m lynx_zoo.training.checkpoint_io",
        description="Consolidate a sharded (FSDP2/ModelParallelStrategy) checkpoint folder into one .ckpt file.",
    )
    parser.add_argument("sharded", help="the checkpoint folder (e.g. runs/x/.../checkpoints/last.ckpt/)")
    parser.add_argument("output", help="the file to write")
    args = parser.parse_args(argv)
    print(consolidate_checkpoint(args.sharded, args.output))


if __name__ == "__main__":
    main()
