"""The recipes (:mod:`lynx_zoo.recipes`: stages, the study and its data) sit on top of the zoo: no module outside
``recipes/`` imports them, type-only imports included; the command line names them in its command table, as
strings imported on first use of a command."""

from __future__ import annotations

import ast
from pathlib import Path

from lynx_zoo.cli import COMMANDS

PACKAGE = Path(__file__).resolve().parents[1] / "lynx_zoo"
RECIPES = "lynx_zoo.recipes"


def recipe_imports(source: str, module: str) -> list[str]:
    """The ``lynx_zoo.recipes`` modules that the source of ``module`` imports, anywhere in the file (functions and
    ``if TYPE_CHECKING:`` included; relative imports resolved)."""
    package = module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        else:
            continue
        found += [name for name in names if name == RECIPES or name.startswith(RECIPES + ".")]
    return sorted(set(found))


def core_modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if not (name == RECIPES or name.startswith(RECIPES + ".")):
            modules[name] = path
    return modules


def test_no_core_module_imports_the_recipes():
    offenders = {
        name: found
        for name, path in core_modules().items()
        if (found := recipe_imports(path.read_text(encoding="utf-8"), name))
    }
    assert offenders == {}


def test_the_checker_finds_every_form_of_import():
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from lynx_zoo.recipes.study import ROWS\n"
        "def f():\n    from ..recipes import stages\n"
        "import lynx_zoo.recipes.shapes_study\n"
    )
    assert recipe_imports(source, "lynx_zoo.data.x") == [
        "lynx_zoo.recipes",
        "lynx_zoo.recipes.shapes_study",
        "lynx_zoo.recipes.stages",
        "lynx_zoo.recipes.study",
        "lynx_zoo.recipes.study.ROWS",  # a name imported from a module: reported with it
    ]
    assert recipe_imports("from lynx_zoo.data import shapes\n", "lynx_zoo.hub.x") == []


def test_the_recipe_commands_run_from_the_recipes_package(capsys):
    for name in ("stages", "study"):
        try:
            COMMANDS[name].run(["--help"])
        except SystemExit as exit:
            assert exit.code == 0
        assert f"python -m lynx_zoo {name}" in capsys.readouterr().out
