"""Start-up: ``import lynx_zoo`` and the command line's help load no heavy library (each checked in a fresh
interpreter, through ``sys.modules``), and every lazily re-exported name resolves. The timings are
benchmarks/startup.py's."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from lynx_zoo.lazy import type_checking_imports

REPO = Path(__file__).resolve().parents[1]
# loaded only when a model, a DataModule or a trainer is built
HEAVY = ("lightning", "peft", "av", "jsonargparse", "transformers", "timm", "torchvision", "torchmetrics", "litdata")
LAZY_PACKAGES = [
    "lynx_zoo",
    "lynx_zoo.adapters",
    "lynx_zoo.bridge",
    "lynx_zoo.data",
    "lynx_zoo.evaluation",
    "lynx_zoo.hub",
    "lynx_zoo.llm",
    "lynx_zoo.training",
    "lynx_zoo.vision",
]


def modules_loaded_by(code: str) -> set[str]:
    """The top-level packages in ``sys.modules`` after running ``code`` in a fresh interpreter."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted({{m.partition('.')[0] for m in sys.modules}})))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_import_lynx_zoo_loads_no_heavy_library():
    loaded = modules_loaded_by("import lynx_zoo")
    assert "lynx_zoo" in loaded
    assert sorted(loaded & set(HEAVY)) == []
    assert "torch" not in loaded


@pytest.mark.parametrize(
    "argv", [["--help"], ["ask", "--help"], ["evaluate", "--help"], ["stages", "--help"], ["serve", "--help"]]
)
def test_the_command_line_help_loads_no_heavy_library(argv):
    code = f"import sys\nfrom lynx_zoo.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass"
    assert sorted(modules_loaded_by(code) & set(HEAVY)) == []


def test_a_model_class_is_there_on_first_use():
    loaded = modules_loaded_by("import lynx_zoo\nassert lynx_zoo.PrefixLynx.__name__ == 'PrefixLynx'")
    assert {"lightning", "transformers", "timm"} <= loaded
    assert "peft" not in loaded  # LoRA only: a bottleneck-adapter model needs no peft


@pytest.mark.parametrize("package", LAZY_PACKAGES)
def test_every_re_exported_name_resolves_and_is_listed(package):
    module = importlib.import_module(package)
    names = set(type_checking_imports(module.__file__))
    assert names <= set(module.__all__)
    for name in module.__all__:
        assert getattr(module, name) is not None, name
    assert set(module.__all__) <= set(dir(module))


def test_an_unknown_name_is_an_attribute_error():
    import lynx_zoo

    with pytest.raises(AttributeError, match="no attribute 'PrefixLinx'"):
        lynx_zoo.PrefixLinx  # noqa: B018
