"""The variant commands end to end: fit with ExportVariant -> load_pretrained by name; export, predict, chat."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lynx_zoo import PrefixLynx, load_model, load_pretrained
from lynx_zoo.cli import main

pytestmark = pytest.mark.slow  # each test runs a real process or a GGUF model

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
    # a question about an image file: `ask` (LightningCLI's `predict` runs a DataModule's predict loop)
    args = ["--variant", "my-tiny", "--image", str(fitted["image"]), "--preset", "greedy"]
    args += ["--max-new-tokens", "3", "--min-new-tokens", "3"]
    capsys.readouterr()
    main(["ask", *args, "--question", question])
    assert expected.strip() and capsys.readouterr().out == expected + "\n"
    # chat: questions piped on stdin, one answer a line; /text switches to questions without the image
    text_only = model.generate(prompts=[question], **settings)[0]
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{question}\n/text\n{question}\n"))
    main(["chat", *args])
    assert capsys.readouterr().out.splitlines() == [expected, text_only]


def test_ask_answers_with_the_variants_own_generation_settings(fitted, monkeypatch, capsys):
    """No preset unless one is asked for: a preset's forced minimum length must not pad a one-word answer."""
    monkeypatch.setenv("LYNX_ZOO_VARIANTS", fitted["env"]["LYNX_ZOO_VARIANTS"])
    model = load_model("lynx-tiny")
    question = "how many shapes are there?"
    expected = model.generate(images=[fitted["image"]], prompts=[question])[0]  # model.eval_generation
    forced = model.generate(images=[fitted["image"]], prompts=[question], preset="lynx-beam")[0]
    capsys.readouterr()
    assert main(["ask", "--variant", "lynx-tiny", "--image", str(fitted["image"]), "-q", question]) == expected
    assert capsys.readouterr().out == expected + "\n"
    assert len(forced.split()) >= 2 and len(expected.split()) <= model.eval_generation["max_new_tokens"]


def test_predict_is_lightnings_and_points_questions_to_ask(tmp_path):
    with pytest.raises(SystemExit, match="ask --image"):
        main(["predict", "--variant", "x", "--image", "a.png", "-q", "?"])


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: python -m lynx_zoo COMMAND")
    for command in ("fit", "validate", "test", "predict", "ask", "chat", "evaluate", "report", "export", "variants",
                    "cards", "convert-lynx", "configs", "stages"):  # fmt: skip
        assert f"\n  {command} " in text, command
    help_out = subprocess.run(
        [sys.executable, "-m", "lynx_zoo", "fit", "--help"], capture_output=True, text=True, timeout=300, cwd=REPO
    )
    assert help_out.returncode == 0 and help_out.stdout.startswith("usage: python -m lynx_zoo"), help_out.stdout[:300]
