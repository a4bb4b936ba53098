"""Files that ship inside the package, read through ``importlib.resources`` (so a wheel works outside the checkout).

* ``configs/``: every config of the repository (the repository's ``configs/`` folder; copy and edit them there).
  On the command line a shipped config is named ``zoo:<path under configs/>``, e.g.
  ``python -m lynx_zoo fit --config zoo:demo.yaml``; a plain path is a file of your own.
* ``model_cards/``: the generated card of every released variant.
* ``study_results/``: the recorded evaluation results the cards cite (the repository's ``docs/study/results/``).
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

SHIPPED_CONFIG = "zoo:"


def shipped(relative: str) -> Path:
    """The path of a file or folder shipped in the package, e.g. ``shipped("configs/demo.yaml")``."""
    root = files("lynx_zoo")
    if not isinstance(root, Path):  # a zip import: no file paths to hand to parsers
        raise RuntimeError(f"lynx_zoo is installed as {root!r}; install it as files (pip install lynx-zoo)")
    return root / relative


def shipped_configs() -> list[str]:
    """The names of every shipped config, as the command line takes them (``zoo:demo.yaml``, ...)."""
    root = shipped("configs")
    return sorted(f"{SHIPPED_CONFIG}{p.relative_to(root).as_posix()}" for p in root.rglob("*.yaml"))


def config_path(name: str | Path) -> Path:
    """``zoo:NAME`` -> the shipped config ``configs/NAME``; anything else is a path of its own."""
    text = str(name)
    if not text.startswith(SHIPPED_CONFIG):
        return Path(text)
    relative = text.removeprefix(SHIPPED_CONFIG)
    path = shipped("configs") / relative
    if not path.is_file():
        raise FileNotFoundError(f"{text}: no shipped config {relative!r}; shipped: {', '.join(shipped_configs())}")
    return path
