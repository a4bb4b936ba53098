"""The fusion example of docs/extending.md, defined outside the package, trains and reloads."""

import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from lynx_zoo.data import Sample

REPO = Path(__file__).resolve().parents[1]


def example_module() -> str:
    doc = (REPO / "docs" / "extending.md").read_text()
    return re.search(r"```python\n# my_fusion.py\n(.*?)```", doc, re.S).group(1)


def test_outside_fusion_trains_with_the_cli_and_reloads(tmp_path, monkeypatch):
    plugin_dir = tmp_path / "plugins"
    plugin_dir.mkdir()
    (plugin_dir / "my_fusion.py").write_text(example_module())
    env = {**os.environ, "PYTHONPATH": f"{plugin_dir}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "lynx_zoo",
            "fit",
            "--config",
            "configs/tiny.yaml",
            "--model=my_fusion.PooledPrefixLynx",
            "--model.init_args.num_pooled=2",
            f"--trainer.default_root_dir={tmp_path / 'run'}",
            f"--data.init_args.root={tmp_path / 'shapes'}",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (checkpoint,) = (tmp_path / "run").rglob("*.ckpt")

    monkeypatch.syspath_prepend(str(plugin_dir))
    from my_fusion import PooledPrefixLynx

    model = PooledPrefixLynx.load_from_checkpoint(checkpoint)
    assert model.num_pooled == 2
    batch = model.processor.prompts([Sample("how many shapes are there?")])
    images = torch.randn(1, 3, 32, 32)
    out = model(batch["input_ids"], batch["attention_mask"], images)
    assert out.logits.shape[1] == 2 + batch["input_ids"].shape[1]  # two pooled visual tokens
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    torch.testing.assert_close(model.bridge.latents, state["bridge.latents"])
    assert len(model.generate(images, ["how many shapes are there?"], max_new_tokens=2)) == 1
