"""A run is a function of its seed on one machine: two fits of the same config and seed, through the CLI with a
dataloader worker process, end with bit-identical weights; another seed ends elsewhere."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def fit(root: Path, name: str, seed: int) -> dict[str, torch.Tensor]:
    args = ["fit", "--config", "configs/tiny.yaml", f"--seed_everything={seed}", "--trainer.max_steps=6"]
    args += [f"--trainer.default_root_dir={root / name}", f"--data.init_args.root={root / 'shapes'}"]
    args += ["--data.init_args.num_workers=1", "--trainer.enable_progress_bar=false"]
    result = subprocess.run([sys.executable, "-m", "lynx_zoo", *args], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    (checkpoint,) = (root / name).rglob("*.ckpt")
    return torch.load(checkpoint, weights_only=True)["state_dict"]


@pytest.mark.slow
def test_the_same_seed_gives_the_same_weights_and_another_seed_does_not(tmp_path):
    first, again, other = fit(tmp_path, "a", 7), fit(tmp_path, "b", 7), fit(tmp_path, "c", 8)
    assert first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)
