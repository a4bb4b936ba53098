"""The variant commands end to end: fit with ExportVariant -> load_pretrained by name; export, predict, chat."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lynx_zoo import PrefixLynx, load_pretrained
from lynx_zoo.cli import main
from lynx_zoo.hub.cli import is_hub_command

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, env: dict[str, str], stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lynx_zoo", *args],
        cwd=REPO,
        env={**os.environ, **env},
        input=stdin,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """configs/tiny.yaml fitted for 4 steps with the ExportVariant callback (as configs/demo.yaml has it)."""
    root = tmp_path_factory.mktemp("fit")
    env = {"LYNX_ZOO_VARIANTS": str(root / "variants")}
    result = run_cli(
        "fit",
        "--config",
        "configs/tiny.yaml",
        f"--trainer.default_root_dir={root / 'tiny'}",
        f"--data.init_args.root={root / 'shapes'}",
        "--trainer.callbacks+=lynx_zoo.hub.ExportVariant",
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (checkpoint,) = (root / "tiny").rglob("*.ckpt")
    image = next((root / "shapes").rglob("*.png"))
    return dict(root=root, env=env, checkpoint=checkpoint, image=image)


def test_fit_exports_and_registers_the_variant(fitted, monkeypatch):
    monkeypatch.setenv("LYNX_ZOO_VARIANTS", fitted["env"]["LYNX_ZOO_VARIANTS"])
    model = load_pretrained("lynx-tiny")  # runs/<tiny> -> lynx-tiny, registered by the callback
    trained = PrefixLynx.load_from_checkpoint(fitted["checkpoint"])
    for name, value in trained.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name


def test_export_predict_and_chat_from_the_terminal(fitted, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LYNX_ZOO_VARIANTS", fitted["env"]["LYNX_ZOO_VARIANTS"])
    out = tmp_path / "exported"
    main(["export", "--ckpt", str(fitted["checkpoint"]), "--out", str(out), "--name", "my-tiny", "--register"])
    assert (out / "README.md").read_text().startswith("---\n")
    question = "how many shapes are there?"
    model = load_pretrained(out)
    settings = dict(preset="greedy", max_new_tokens=3, min_new_tokens=3)
    expected = model.generate(images=[fitted["image"]], prompts=[question], **settings)[0]
    # a question about an image file: `predict --image` is ours, LightningCLI's `predict` takes a DataModule
    args = ["--variant", "my-tiny", "--image", str(fitted["image"]), "--preset", "greedy"]
    args += ["--max-new-tokens", "3", "--min-new-tokens", "3"]
    capsys.readouterr()
    main(["predict", *args, "--question", question])
    assert expected.strip() and capsys.readouterr().out == expected + "\n"
    # chat: questions piped on stdin, one answer a line; /text switches to questions without the image
    text_only = model.generate(prompts=[question], **settings)[0]
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{question}\n/text\n{question}\n"))
    main(["chat", *args])
    assert capsys.readouterr().out.splitlines() == [expected, text_only]


def test_predict_dispatch_keeps_lightning_predict():
    assert is_hub_command(["predict", "--variant", "x", "--image", "a.png", "-q", "?"])
    assert is_hub_command(["predict", "--video=a.mp4"])
    assert not is_hub_command(["predict", "--config", "configs/tiny.yaml", "--ckpt_path", "x.ckpt"])
    assert not is_hub_command(["fit", "--config", "configs/tiny.yaml"])
    assert is_hub_command(["export", "--ckpt", "x"]) and is_hub_command(["convert-lynx"])
