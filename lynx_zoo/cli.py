"""The command line, ``python -m lynx_zoo COMMAND ...``: one entry point for every command.

The training loops (``fit``, ``validate``, ``test``, ``predict``) are LightningCLI's, over every registered
:class:`LynxModel` and every DataModule (:class:`lynx_zoo.training.lightning_cli.LynxCLI`); the other commands live
with their design axis
(:mod:`lynx_zoo.hub.cli`, :mod:`lynx_zoo.evaluation.cli`, :mod:`lynx_zoo.recipes`) and are listed here.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from argparse import ArgumentError
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lynx_zoo.errors import CheckpointError, one_line, reported_cause, valid_choices
from lynx_zoo.resources import SHIPPED_CONFIG, config_path

PROG = "python -m lynx_zoo"


@dataclass(frozen=True)
class Command:
    """A command of ``python -m lynx_zoo``: a line of help, the function that runs it on its arguments, and the
    errors that mean bad input (a file, a name, a value), reported in one line rather than a traceback. Every
    command also reports a :class:`~lynx_zoo.errors.ReportedError` that it raised or that a library wrapped (a
    config value, a data file, a checkpoint, a run that failed) in one line; anything else keeps its traceback."""

    help: str
    run: Callable[[list[str]], Any]
    input_errors: tuple[type[Exception], ...] = (OSError, ValueError)


def _lightning(subcommand: str) -> Callable[[list[str]], Any]:
    def run(argv: list[str]) -> Any:
        if subcommand == "predict" and any(a.split("=", 1)[0] in ("--image", "--video") for a in argv):
            sys.exit(f"{PROG} predict: runs a DataModule's predict loop; to ask about a file: {PROG} ask --image ...")
        check_checkpoint_class(argv)
        from lynx_zoo.training.lightning_cli import LynxCLI, explain_error  # Lightning: only for a training loop

        try:
            with warnings.catch_warnings():  # the arguments are the process's own, handed on
                warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
                return LynxCLI(args=[subcommand, *argv], exit_on_error=False)
        except ArgumentError as err:
            if reported_cause(err) is not None:
                raise  # a config value's own check: main() reports its message
            sys.exit(f"{PROG} {subcommand}: error: {explain_error(str(err))}")

    return run


def _lazy(module: str, function: str) -> Callable[[list[str]], Any]:
    def run(argv: list[str]) -> Any:
        return getattr(importlib.import_module(module), function)(argv)

    return run


COMMANDS: dict[str, Command] = {
    "fit": Command("train a model (LightningCLI: --config FILE or zoo:NAME, --model.*, ...)", _lightning("fit"), ()),
    "validate": Command("run a model's validation loop on a DataModule (LightningCLI)", _lightning("validate"), ()),
    "test": Command("run a model's test loop on a DataModule (LightningCLI)", _lightning("test"), ()),
    "predict": Command("run a model's predict loop on a DataModule (LightningCLI)", _lightning("predict"), ()),
    "ask": Command("answer a question about an image or video file", _lazy("lynx_zoo.hub.cli", "ask_main")),
    "serve": Command("serve a model: OpenAI-compatible API and a chat page", _lazy("lynx_zoo.serving", "main")),
    "chat": Command("answer questions read from stdin, one a line", _lazy("lynx_zoo.hub.cli", "chat_main")),
    "evaluate": Command(
        "evaluate models on benchmarks (VQA, Open-VQA, MME, OwlEval)",
        _lazy("lynx_zoo.evaluation.cli", "evaluate_main"),
        (OSError, ValueError, RuntimeError, ImportError),  # a judge's failures are RuntimeErrors (JudgeError)
    ),
    "report": Command("tables and charts of evaluation results", _lazy("lynx_zoo.evaluation.cli", "report_main")),
    "lmms-task": Command(
        "write lmms-eval tasks from VQA manifests and MME folders",
        _lazy("lynx_zoo.evaluation.lmms_tasks", "main"),
        (OSError, ValueError, ImportError),
    ),
    "stages": Command("train a grid row through the paper's stages", _lazy("lynx_zoo.recipes.stages", "main")),
    "study": Command(
        "the frozen-LLM study on a CPU: stage 0, every row over 3 seeds, the report",
        _lazy("lynx_zoo.recipes.study", "main"),
        (OSError, ValueError, RuntimeError),  # a failed run is a RuntimeError naming its log
    ),
    "data": Command(
        "prepare data sets for streaming (data prepare KIND INPUT... --output DIR)",
        _lazy("lynx_zoo.data.prepare", "main"),
    ),
    "cache-features": Command(
        "compute a frozen vision tower's tokens of a data set once, to train without the tower",
        _lazy("lynx_zoo.training.cache_features", "main"),
    ),
    "export": Command("export a run's checkpoint as a variant folder", _lazy("lynx_zoo.hub.cli", "export_main")),
    "variants": Command("list the released and registered variants", _lazy("lynx_zoo.hub.cli", "variants_main")),
    "cards": Command("generate or check the model cards", _lazy("lynx_zoo.hub.cli", "cards_main")),
    "convert-lynx": Command("convert an original Lynx checkpoint", _lazy("lynx_zoo.hub.cli", "convert_main")),
    "configs": Command("list the shipped configs (--config zoo:NAME)", _lazy("lynx_zoo.hub.cli", "configs_main")),
}


def overview() -> str:
    """``python -m lynx_zoo --help``: every command with a line each."""
    width = max(map(len, COMMANDS))
    lines = [f"usage: {PROG} COMMAND [options]   ({PROG} COMMAND --help for a command's options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {command.help}" for name, command in COMMANDS.items()]
    return "\n".join(lines)


def main(args: list[str] | None = None) -> Any:
    """Entry point of ``python -m lynx_zoo`` and the ``lynx-zoo`` script: run one command; returns what it
    returns (an exit status, the files written, the LightningCLI of a training loop)."""
    argv = list(sys.argv[1:] if args is None else args)
    if not argv or argv[0] in ("-h", "--help"):
        print(overview())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        sys.exit(f"{PROG}: unknown command {name!r}: {valid_choices(name, list(COMMANDS))}\n\n{overview()}")
    try:
        rest = shipped_config_args(rest)
    except FileNotFoundError as err:
        sys.exit(f"{PROG} {name}: error: {err}")
    command = COMMANDS[name]
    try:
        return command.run(rest)
    except Exception as err:
        cause = err if isinstance(err, command.input_errors) else reported_cause(err)
        if cause is None:
            raise  # a bug: its traceback is what helps
        sys.exit(f"{PROG} {name}: error: {one_line(cause)}")


def run() -> None:
    """The process entry point (``python -m lynx_zoo``, the ``lynx-zoo`` script): :func:`main`, and its exit status
    (a command that returns no status succeeded)."""
    result = main()
    sys.exit(result if isinstance(result, int) else 0)


def shipped_config_args(argv: list[str]) -> list[str]:
    """``--config zoo:NAME`` (or ``-c``/``--config=``) -> the path of the shipped config (:mod:`lynx_zoo.resources`)."""
    out: list[str] = []
    for i, arg in enumerate(argv):
        flag, eq, value = arg.partition("=")
        if eq and flag in ("--config", "-c") and value.startswith(SHIPPED_CONFIG):
            arg = f"{flag}={config_path(value)}"
        elif i > 0 and argv[i - 1] in ("--config", "-c") and arg.startswith(SHIPPED_CONFIG):
            arg = str(config_path(arg))
        out.append(arg)
    return out


def check_checkpoint_class(argv: list[str]) -> None:
    """``--ckpt_path FILE``: LightningCLI rebuilds the model from the checkpoint's hyper-parameters, importing the
    class they name; refuse one the registry does not hold before anything is imported."""
    from lynx_zoo.hub.loading import checkpoint_class, read_checkpoint

    for i, arg in enumerate(argv):
        flag, eq, value = arg.partition("=")
        if flag != "--ckpt_path":
            continue
        path = Path(value if eq else (argv[i + 1] if i + 1 < len(argv) else ""))
        if path.is_file():
            try:
                checkpoint_class(read_checkpoint(path), path)
            except CheckpointError:
                raise
            except ValueError as err:  # a class the registry does not hold
                raise CheckpointError(str(err)) from err
