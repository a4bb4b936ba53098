"""Reading a torch checkpoint file safely: through torch's weights-only unpickler, with an error naming the file
for every way it can be unreadable. The model (``init_from``), the loader and the training tools all read here."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from lynx_zoo.errors import CheckpointError


def read_torch_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """A checkpoint file through torch's weights-only unpickler (memory-mapped); a :class:`CheckpointError` naming
    the file when it is missing, empty, truncated or not a checkpoint (torch raises many kinds for those)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path}: an empty file (0 bytes), not a checkpoint (a save that never finished?)")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True, mmap=True)
    except Exception as err:
        raise CheckpointError(
            f"{path}: not a readable checkpoint ({size:,} bytes; {type(err).__name__}: {_first_sentence(err)}); "
            "truncated, or not written by torch.save"
        ) from err
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path}: not a checkpoint (it holds a {type(checkpoint).__name__}, not a dict)")
    return checkpoint


def _first_sentence(error: Exception) -> str:
    return str(error).strip().splitlines()[0].split(". ")[0] if str(error).strip() else "no message"
