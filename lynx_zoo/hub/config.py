"""A variant folder's format (its files, ``config.json``'s format and version), and training config files read as
the model configuration they describe (:func:`model_config_from_files`, parsed as ``fit`` parses them).

The configuration itself, :class:`~lynx_zoo.fusion.config.ModelConfig`, lives with the model.
"""

from __future__ import annotations

import functools
import json
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from jsonargparse import ActionConfigFile
from lightning.pytorch.cli import LightningArgumentParser

from lynx_zoo.data import import_config_classes
from lynx_zoo.fusion.base import LynxModel
from lynx_zoo.fusion.config import ModelConfig

FORMAT = "lynx_zoo-variant"
FORMAT_VERSION = 1
# the files of a variant folder
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "README.md"
TOKENIZER_DIR = "tokenizer"


def model_config_from_files(paths: Sequence[str | Path]) -> tuple[ModelConfig, dict[str, Any]]:
    """The model of config files (a base and its overlays, as ``fit --config ... --config ...`` resolves them),
    and the whole resolved config (``trainer``, ``data``, ...). Nothing is built."""
    config = parse_config_files(paths)
    where = " + ".join(str(p) for p in paths)
    return ModelConfig.from_dict({"model_class": config["model"]["class_path"], **config["model"]}, where), config


def parse_config_files(paths: Sequence[str | Path]) -> dict[str, Any]:
    """Config files resolved as ``python -m lynx_zoo fit`` resolves them (base first, overlays after), as a dict;
    nothing is built or seeded."""
    return parse_fit_args([arg for path in paths for arg in ("--config", str(path))])


def parse_fit_args(args: Sequence[str]) -> dict[str, Any]:
    """``fit``'s arguments (``--config`` files and options) resolved as the command resolves them, as a dict."""
    return fit_parser().parse_args(list(args)).as_dict()


@functools.cache
def fit_parser() -> LightningArgumentParser:
    """The parser of ``fit``'s configuration (trainer, model, data), built once: it introspects every class."""
    import_config_classes()
    parser = LightningArgumentParser(exit_on_error=False, default_env=False)
    parser.add_argument("-c", "--config", action=ActionConfigFile)
    parser.add_argument("--seed_everything", type=typing.Union[bool, int], default=True)
    parser.add_lightning_class_args(L.Trainer, "trainer")
    parser.add_lightning_class_args(LynxModel, "model", subclass_mode=True)
    parser.add_lightning_class_args(L.LightningDataModule, "data", subclass_mode=True, required=False)
    return parser


def check_format(config: dict[str, Any], where: str) -> None:
    """A variant's ``config.json`` is of this format and not newer than this lynx_zoo reads."""
    if config.get("format") != FORMAT:
        raise ValueError(
            f"{where}: not a lynx_zoo variant config (format {config.get('format')!r}, expected {FORMAT!r})"
        )
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(
            f"{where}: format_version {config['format_version']} is newer than this lynx_zoo reads "
            f"({FORMAT_VERSION}); upgrade lynx_zoo"
        )


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``, or an error naming the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err.msg}, line {err.lineno})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data
