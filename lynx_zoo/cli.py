"""The command line: ``python -m lynx_zoo fit --config configs/pt_vicuna_420.yaml`` (LightningCLI)."""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import re
import sys
from argparse import ArgumentError
from typing import Any

import lightning as L
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.core.datamodule import LightningDataModule

import lynx_zoo  # noqa: F401  (registers the short class names: PrefixLynx, ShapesVQADataModule, ...)
from lynx_zoo.fusion import LynxModel

EVALUATION_COMMANDS = ("evaluate", "report")


class LynxCLI(LightningCLI):
    """LightningCLI over every :class:`LynxModel` subclass and every DataModule; pick them with
    ``class_path`` (short names work for the zoo's own classes)."""

    def __init__(self, args: list[str] | None = None, run: bool = True, exit_on_error: bool = True) -> None:
        super().__init__(
            LynxModel,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"default_env": False, "exit_on_error": exit_on_error},
            args=args,
            run=run,
        )


def _subclass_names(base: type) -> list[str]:
    found, stack = set(), [base]
    while stack:
        cls = stack.pop()
        for sub in cls.__subclasses__():
            if sub.__module__.startswith("lynx_zoo") or base is LynxModel:
                found.add(sub.__name__)
            stack.append(sub)
    return sorted(found)


def _accepted_options(class_path: str) -> list[str]:
    module, _, name = class_path.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    if dataclasses.is_dataclass(cls):
        return [f.name for f in dataclasses.fields(cls)]
    return [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "args", "kwargs")]


def _choices(given: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(given, valid, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"{hint}valid choices: {', '.join(valid)}"


def explain_error(message: str) -> str:
    """A short, actionable message for a config error: what is wrong, and the valid choices."""
    option = re.search(r"class_path '([\w.]+)':\s*\n\s*Option '(\w+)' is not accepted", message)
    if option:
        class_path, key = option.groups()
        name = class_path.rpartition(".")[2]
        return f"unknown option {key!r} for {name}: {_choices(key, _accepted_options(class_path))}"
    unknown_class = re.search(r'Parser key "(model|data)":.*?Given value: (\S+)', message, re.S)
    if unknown_class and "import path" in message:
        section, given = unknown_class.groups()
        base = LynxModel if section == "model" else L.LightningDataModule
        return f"unknown {section} class {given!r}: {_choices(given.rpartition('.')[2], _subclass_names(base))}"
    unrecognized = re.search(r"unrecognized arguments: --trainer\.(\w+)", message)
    if unrecognized:
        key = unrecognized.group(1)
        params = [p for p in inspect.signature(L.Trainer.__init__).parameters if p != "self"]
        return f"unknown trainer option {key!r}: {_choices(key, params)}"
    return message


def main(args: list[str] | None = None) -> Any:
    """Entry point of ``python -m lynx_zoo`` and the ``lynx-zoo`` script.

    ``serve`` is the OpenAI-compatible server (:mod:`lynx_zoo.serving`); ``evaluate`` and ``report`` are the
    evaluation commands (:mod:`lynx_zoo.evaluation.cli`); ``export``,
    ``chat``, ``variants``, ``cards``, ``convert-lynx`` and ``predict --image/--video`` (a question about a file)
    are the variant commands (:mod:`lynx_zoo.hub.cli`); everything else goes to LightningCLI (``fit``,
    ``validate``, ``test``, ``predict`` with a DataModule).
    """
    argv = sys.argv[1:] if args is None else args
    if argv and argv[0] == "serve":
        from lynx_zoo.serving import main as serve

        status = serve(argv[1:])
        if status:
            sys.exit(status)
        return None
    if argv and argv[0] in EVALUATION_COMMANDS:
        from lynx_zoo.evaluation.cli import run_command

        return run_command(argv)
    from lynx_zoo.hub.cli import is_hub_command

    if is_hub_command(argv):
        from lynx_zoo.hub.cli import run_command as run_hub_command

        return run_hub_command(argv)
    try:
        return LynxCLI(args=args, exit_on_error=False)
    except ArgumentError as err:
        sys.exit(f"lynx_zoo: error: {explain_error(str(err))}")
