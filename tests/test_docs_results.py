"""The figures in README.md and docs/ are what their results files under benchmarks/results/ render."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "render_docs.py"


def load_render_docs():
    spec = importlib.util.spec_from_file_location("render_docs", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


render_docs = load_render_docs()


def copy_docs(root: Path) -> Path:
    """README.md and docs/ copied under ``root``."""
    shutil.copy(REPO / "README.md", root / "README.md")
    shutil.copytree(REPO / "docs", root / "docs", ignore=shutil.ignore_patterns("*.png"))
    return root


def test_every_results_block_matches_its_results_file():
    messages = render_docs.check()
    assert not messages, "\n".join(messages) + "\nrun: python benchmarks/render_docs.py"


def test_the_docs_hold_rendered_blocks_with_provenance():
    names = {m.group("name") for path in render_docs.documents() for m in render_docs.BLOCK.finditer(path.read_text())}
    assert {"train_throughput", "train_step", "gpu_full_size", "data_memory"} <= names
    for name in names:
        *_, last = render_docs.render(name).splitlines()
        assert last.startswith("<sub>Rendered from `benchmarks/results/") and "commit" in last


def test_a_figure_edited_by_hand_fails_the_check_naming_file_and_block(tmp_path):
    root = copy_docs(tmp_path)
    doc = root / "docs" / "scale.md"
    text = doc.read_text()
    assert "| HF LLaVA loop | 69554688 | 459776 | 0.8701 |" in text
    doc.write_text(
        text.replace("| HF LLaVA loop | 69554688 | 459776 | 0.8701 |", "| HF LLaVA loop | 69554688 | 459776 | 0.9 |")
    )
    (message,) = render_docs.check(root)
    assert message.startswith("docs/scale.md:") and "results:train_step" in message
    assert "0.9 |" in message and "0.8701 |" in message  # the line as it is, and as it renders

    # rendering puts the figure back
    assert render_docs.write(root) == [doc]
    assert doc.read_text() == text and not render_docs.check(root)


def test_the_check_command_fails_on_an_edited_doc(tmp_path):
    root = copy_docs(tmp_path)
    doc = root / "docs" / "throughput.md"
    doc.write_text(doc.read_text().replace("**answer-only logits: 1.37x**", "**answer-only logits: 1.50x**"))
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--check", "--root", str(root)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 1
    assert done.stdout.startswith("docs/throughput.md:") and "results:train_throughput:gains" in done.stdout
    assert "1 results block(s) differ" in done.stdout


def test_a_block_without_a_renderer_or_with_unbalanced_markers_is_an_error():
    with pytest.raises(SystemExit, match="'no_such_file' has no renderer"):
        render_docs.rendered("<!-- results:no_such_file -->\nx\n<!-- /results:no_such_file -->\n", "doc.md")
    with pytest.raises(SystemExit, match="doc.md: unbalanced results markers"):
        render_docs.rendered("<!-- results:train_step -->\nx\n", "doc.md")


def test_a_renderer_needs_its_results_file_in_the_shape_it_reads(monkeypatch):
    monkeypatch.setitem(render_docs.RENDERERS, "missing", render_docs.Renderer(lambda result: "", "missing.json"))
    with pytest.raises(SystemExit, match="missing.json: no such results file"):
        render_docs.render("missing")
    monkeypatch.setitem(
        render_docs.RENDERERS, "renamed", render_docs.Renderer(lambda r: r["no_such_key"], "memory.json")
    )
    with pytest.raises(SystemExit, match=r"memory.json: block 'renamed' cannot render it \(KeyError"):
        render_docs.render("renamed")
    with pytest.raises(ValueError, match="two renderers"):
        render_docs.renderer("train_step")(lambda result: "")
