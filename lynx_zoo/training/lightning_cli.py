"""LightningCLI over every registered :class:`~lynx_zoo.fusion.base.LynxModel` and every DataModule: the training
loops of ``python -m lynx_zoo fit|validate|test|predict`` (:mod:`lynx_zoo.cli` imports this module only when one
of them runs, so the command line's help does not wait for Lightning)."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re

import lightning as L
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.core.datamodule import LightningDataModule

from lynx_zoo.data import import_config_classes
from lynx_zoo.errors import valid_choices
from lynx_zoo.fusion import LynxModel, registered_models
from lynx_zoo.training.resume import fix_checkpoint_folders, resume_arguments

PROG = "python -m lynx_zoo"
import_config_classes()


class LynxCLI(LightningCLI):
    """LightningCLI over every :class:`LynxModel` subclass and every DataModule; pick them with
    ``class_path`` (short names work for the zoo's own classes).

    ``fit`` checkpoints into ``<default_root_dir>/checkpoints`` (every ``ModelCheckpoint`` without a ``dirpath``),
    so ``--ckpt_path last`` finds the last checkpoint of an interrupted run, and is an error when there is none
    (:mod:`lynx_zoo.training.resume`)."""

    def __init__(self, args: list[str] | None = None, run: bool = True, exit_on_error: bool = True) -> None:
        super().__init__(
            LynxModel,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"default_env": False, "exit_on_error": exit_on_error, "prog": PROG},
            args=args,
            run=run,
        )

    def before_instantiate_classes(self) -> None:
        if self.subcommand == "fit":
            fix_checkpoint_folders(self.config[self.subcommand]["trainer"])

    def before_fit(self) -> None:
        resume_arguments(self.trainer, self.config_init["fit"])


def _subclass_names(base: type) -> list[str]:
    if base is LynxModel:
        return sorted(registered_models())
    found, stack = set(), [base]
    while stack:
        cls = stack.pop()
        for sub in cls.__subclasses__():
            if sub.__module__.startswith("lynx_zoo") and not inspect.isabstract(sub):
                found.add(sub.__name__)
            stack.append(sub)
    return sorted(found)


def _accepted_options(class_path: str) -> list[str]:
    module, _, name = class_path.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    if dataclasses.is_dataclass(cls):
        return [f.name for f in dataclasses.fields(cls)]
    return [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "args", "kwargs")]


def explain_error(message: str) -> str:
    """A short, actionable message for a config error: what is wrong, and the valid choices."""
    option = re.search(r"class_path '([\w.]+)':\s*\n\s*Option '([\w.]+)' is not accepted", message)
    if option:
        class_path, key = option.groups()
        name, key = class_path.rpartition(".")[2], key.partition(".")[0]  # a misspelt section: its first key
        return f"unknown option {key!r} for {name}: {valid_choices(key, _accepted_options(class_path))}"
    section = re.match(r'Parser key "(model|data)":', message)
    given = re.search(r"Expected a dot import path string: (\S+)", message) or re.search(
        r"Problem with given class_path '([^']+)':\s*\n\s*(?:No module named|module '[^']*' has no attribute)", message
    )
    if section and given:
        kind, name = section.group(1), given.group(1)
        base = LynxModel if kind == "model" else L.LightningDataModule
        return f"unknown {kind} class {name!r}: {valid_choices(name.rpartition('.')[2], _subclass_names(base))}"
    unrecognized = re.search(r"unrecognized arguments: --trainer\.(\w+)", message)
    if unrecognized:
        key = unrecognized.group(1)
        params = [p for p in inspect.signature(L.Trainer.__init__).parameters if p != "self"]
        return f"unknown trainer option {key!r}: {valid_choices(key, params)}"
    return message
