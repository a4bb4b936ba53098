"""Loading a file never runs code: a class named in a variant's config.json or a checkpoint's hyper-parameters is
looked up in the registry, never imported from the module path it spells. Each case runs the real command in a
fresh process whose working folder holds the module the file names; that module would leave a marker file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_checkpoint, tiny_configs

from lynx_zoo import PrefixLynx
from lynx_zoo.data.shapes import write_shapes_vqa
from lynx_zoo.hub import export_variant

pytestmark = pytest.mark.slow  # each test runs a real process or a GGUF model

EVIL = "from pathlib import Path\nPath('PWNED').write_text('this module ran')\nclass PrefixLynx: pass\n"


def run(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "LYNX_ZOO_VARIANTS": str(cwd / "registry")}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A working folder with a variant folder and a checkpoint, each naming a module of its own beside it."""
    root = tmp_path_factory.mktemp("security")
    variant = export_variant(PrefixLynx(**tiny_configs()), root / "variants" / "lynx-evil")
    (variant / "evil.py").write_text(EVIL)
    config = json.loads((variant / "config.json").read_text())
    config["model_class"] = "variants.lynx-evil.evil.PrefixLynx"
    (variant / "config.json").write_text(json.dumps(config))
    zen = export_variant(PrefixLynx(**tiny_configs()), root / "variants" / "lynx-zen")
    config = json.loads((zen / "config.json").read_text())
    config["model_class"] = "this.PrefixLynx"  # the standard library's `this` prints the Zen of Python
    (zen / "config.json").write_text(json.dumps(config))
    (root / "runs" / "x").mkdir(parents=True)
    (root / "runs" / "x" / "evil.py").write_text(EVIL)
    tiny_checkpoint(root / "runs" / "x" / "model.ckpt", 0, "runs.x.evil.PrefixLynx")
    write_shapes_vqa(root / "shapes", num_train=2, num_val=1, image_size=32, seed=0)
    return root


def assert_refused(world: Path, result: subprocess.CompletedProcess, name: str) -> None:
    assert result.returncode != 0, result.stdout[-2000:]
    assert f"model class {name!r} is not registered" in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert not (world / "PWNED").exists(), "the module a file names was imported"


def test_a_variant_folder_naming_a_standard_module_imports_nothing(world):
    code = (
        "import sys, lynx_zoo\n"
        "try:\n    lynx_zoo.load_model('variants/lynx-zen')\nexcept ValueError as err:\n    print('refused:', err)\n"
        "print('this' in sys.modules)"
    )
    result = run(world, "-c", code)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "refused:" in result.stdout and "'this.PrefixLynx' is not registered" in result.stdout
    assert result.stdout.strip().endswith("False") and "Beautiful is better than ugly" not in result.stdout


def test_a_variant_folder_naming_its_own_module_runs_nothing(world):
    image = next((world / "shapes").rglob("*.png"))
    result = run(world, "-m", "lynx_zoo", "ask", "--variant", "variants/lynx-evil", "--image", str(image), "-q", "?")
    assert_refused(world, result, "variants.lynx-evil.evil.PrefixLynx")
    code = "import lynx_zoo\ntry:\n    lynx_zoo.load_model('variants/lynx-evil')\nexcept ValueError:\n    pass"
    assert run(world, "-c", code).returncode == 0 and not (world / "PWNED").exists()


@pytest.mark.parametrize("command", ["evaluate", "ask", "fit"])
def test_a_checkpoint_naming_a_module_beside_it_runs_nothing(world, command):
    checkpoint, manifest = "runs/x/model.ckpt", str(world / "shapes" / "val.jsonl")
    image = str(next((world / "shapes").rglob("*.png")))
    args = {
        "evaluate": ["evaluate", checkpoint, "--vqa", manifest, "--results", "results"],
        "ask": ["ask", "--ckpt", checkpoint, "--image", image, "-q", "how many shapes are there?"],
        "fit": ["fit", "--config", "zoo:tiny.yaml", "--ckpt_path", checkpoint],
    }[command]
    assert_refused(world, run(world, "-m", "lynx_zoo", *args), "runs.x.evil.PrefixLynx")
