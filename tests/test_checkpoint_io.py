"""A SIGKILL during a checkpoint save leaves the previous checkpoint loadable (and, written in place, it would
not be)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lynx_zoo.training.checkpoint_io import AtomicCheckpointIO, atomic_torch_save

# Saves step 1, then starts saving step 2 and stalls halfway through writing its bytes to the file. "naive" is
# torch.save straight onto the checkpoint's path: what the test must catch. (Lightning's own TorchCheckpointIO
# buffers the whole checkpoint in memory and writes it through an fsspec transaction; the atomic plugin
# streams it to a temporary file and fsyncs it before the rename.)
SAVER = textwrap.dedent(
    """
    import io, sys, time, torch
    from lynx_zoo.training.checkpoint_io import AtomicCheckpointIO

    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("step") == 2:
            buffer = io.BytesIO()
            real_save(obj, buffer)
            data = buffer.getvalue()
            out = open(f, "wb") if isinstance(f, str) else f
            out.write(data[: len(data) // 2])
            out.flush()
            print("WRITING", flush=True)
            time.sleep(120)
        return real_save(obj, f, *args, **kwargs)

    class NaiveCheckpointIO:
        def save_checkpoint(self, checkpoint, path):
            torch.save(checkpoint, path)

    torch.save = save
    io_plugin = {"atomic": AtomicCheckpointIO, "naive": NaiveCheckpointIO}[sys.argv[1]]()
    path = sys.argv[2]
    io_plugin.save_checkpoint({"step": 1, "weights": torch.arange(1000.0)}, path)
    io_plugin.save_checkpoint({"step": 2, "weights": torch.zeros(1000)}, path)
    """
)


def kill_during_second_save(kind: str, path: Path) -> None:
    process = subprocess.Popen(
        [sys.executable, "-c", SAVER, kind, str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        line = process.stdout.readline()
        assert line.strip() == "WRITING", process.stderr.read()
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        process.kill()
    assert process.returncode == -signal.SIGKILL


@pytest.mark.slow
def test_sigkill_mid_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    path = tmp_path / "last.ckpt"
    kill_during_second_save("atomic", path)
    checkpoint = AtomicCheckpointIO().load_checkpoint(path)
    assert checkpoint["step"] == 1
    torch.testing.assert_close(checkpoint["weights"], torch.arange(1000.0))
    # the half-written temporary file is beside it, never under the checkpoint's name
    assert [p.name for p in tmp_path.iterdir() if p.name != "last.ckpt"][0].startswith(".last.ckpt.")


@pytest.mark.slow
def test_the_same_kill_corrupts_a_checkpoint_written_in_place(tmp_path):
    path = tmp_path / "last.ckpt"
    kill_during_second_save("naive", path)
    with pytest.raises(Exception):  # noqa: B017  (truncated zip / EOF: the error depends on where the write stopped)
        torch.load(path, weights_only=True)


def test_atomic_save_replaces_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "sub" / "a.ckpt"
    atomic_torch_save({"x": 1}, path)
    atomic_torch_save({"x": 2}, path)
    assert torch.load(path)["x"] == 2 and [p.name for p in path.parent.iterdir()] == ["a.ckpt"]
    with pytest.raises(TypeError, match="storage_options"):
        AtomicCheckpointIO().save_checkpoint({}, path, storage_options={"a": 1})
