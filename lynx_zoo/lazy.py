"""Lazy re-exports (PEP 562): a package hands on names from its modules, and imports a module on the first use of
one of its names, so ``import lynx_zoo`` (and ``python -m lynx_zoo --help``) loads no heavy library until a model,
a DataModule or a trainer is asked for.

A package writes what it re-exports once, as ordinary imports under ``if TYPE_CHECKING:`` (what type checkers,
editors and ``tests/test_layout.py`` read), and hands its own file to :func:`lazy_exports`::

    from typing import TYPE_CHECKING

    from lynx_zoo.lazy import lazy_exports

    if TYPE_CHECKING:
        from lynx_zoo.vision.encoder import VisionConfig, VisionEncoder

    __getattr__, __dir__ = lazy_exports(__name__, __file__)
"""

from __future__ import annotations

import ast
import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def type_checking_imports(path: str | Path) -> dict[str, tuple[str, str]]:
    """The names a module imports under ``if TYPE_CHECKING:``: ``{name: (module, attribute)}`` (absolute
    ``from module import attribute [as name]`` only)."""
    tree = ast.parse(Path(path).read_text(encoding="utf-8"))
    found: dict[str, tuple[str, str]] = {}
    for node in tree.body:
        if not (isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"):
            continue
        for statement in node.body:
            if not isinstance(statement, ast.ImportFrom) or statement.level or not statement.module:
                raise TypeError(f"{path}: lazy re-exports are absolute 'from MODULE import NAME' lines only")
            for alias in statement.names:
                found[alias.asname or alias.name] = (statement.module, alias.name)
    return found


def lazy_exports(package: str, path: str | Path) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for the package ``package`` defined in the file ``path``: each name it
    imports under ``if TYPE_CHECKING:`` is imported from its module on first use (and kept in the package)."""
    exports = type_checking_imports(path)

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module, attribute = exports[name]
        value = getattr(importlib.import_module(module), attribute)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(exports))

    return __getattr__, __dir__
