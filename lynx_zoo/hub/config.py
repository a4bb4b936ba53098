"""A model's full configuration as JSON (``config.json`` of a variant folder), and the model back from it.

The JSON names the model class and holds every ``__init__`` argument of it, config dataclasses as plain
dicts. Rebuilding resolves the class among :class:`LynxModel` subclasses only and turns each dict back into
the dataclass its ``__init__`` annotation names: nothing in the file chooses code to run.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from typing import Any

from lynx_zoo.evaluation.runner import resolve_model_class
from lynx_zoo.fusion.base import LynxModel

FORMAT = "lynx_zoo-variant"
FORMAT_VERSION = 1
# fusion classes and the short name the docs and errors use for them
FUSION_NAMES = {"PrefixLynx": "PT (prefix-finetuning)", "CrossAttnLynx": "CA (gated cross-attention)"}


def class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def fusion_name(class_path_or_name: str) -> str:
    """``PT (prefix-finetuning)`` for PrefixLynx, ``CA (...)`` for CrossAttnLynx, else the class name."""
    name = class_path_or_name.rpartition(".")[2]
    return FUSION_NAMES.get(name, name)


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"cannot write {type(value).__name__} {value!r} to config.json")


def model_init_args(model: LynxModel) -> dict[str, Any]:
    """The ``__init__`` arguments that rebuild ``model`` (its hyper-parameters), as JSON values.

    ``init_from`` is dropped: a variant's weights come from its own file.
    """
    args = {k: v for k, v in model.hparams.items() if not k.startswith("_") and k != "init_from"}
    return {k: _jsonable(v) for k, v in args.items()}


def _init_annotations(cls: type[LynxModel]) -> dict[str, Any]:
    """``__init__`` parameter annotations over the class and its LynxModel bases."""
    hints: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        if isinstance(klass, type) and issubclass(klass, LynxModel) and "__init__" in klass.__dict__:
            hints.update(typing.get_type_hints(klass.__init__))
    return hints


def _accepted(cls: type[LynxModel]) -> set[str]:
    names: set[str] = set()
    for klass in cls.__mro__:
        if isinstance(klass, type) and issubclass(klass, LynxModel) and "__init__" in klass.__dict__:
            params = inspect.signature(klass.__init__).parameters.values()
            names |= {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return names - {"self"}


def _dataclass_of(annotation: Any) -> type | None:
    candidates = typing.get_args(annotation) or (annotation,)
    return next((c for c in candidates if dataclasses.is_dataclass(c)), None)


def _to_dataclass(cls: type, value: dict[str, Any], where: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown} for {cls.__name__}; expected some of {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, item in value.items():
        origin = typing.get_origin(hints.get(name))
        kwargs[name] = tuple(item) if origin is tuple and isinstance(item, list) else item
    return cls(**kwargs)


def decode_init_args(cls: type[LynxModel], init_args: dict[str, Any], where: str) -> dict[str, Any]:
    """JSON ``init_args`` -> keyword arguments of ``cls`` (dicts become the annotated config dataclasses)."""
    accepted = _accepted(cls)
    unknown = sorted(set(init_args) - accepted)
    if unknown:
        raise ValueError(f"{where}: {cls.__name__} takes no argument(s) {unknown}; it takes {sorted(accepted)}")
    hints = _init_annotations(cls)
    kwargs = {}
    for name, value in init_args.items():
        dataclass = _dataclass_of(hints.get(name))
        kwargs[name] = (
            _to_dataclass(dataclass, value, f"{where}: {name}") if dataclass and isinstance(value, dict) else value
        )
    return kwargs


def model_class(config: dict[str, Any], where: str) -> type[LynxModel]:
    """The LynxModel subclass that ``config['model_class']`` names (never any other class)."""
    name = config.get("model_class")
    if not isinstance(name, str):
        raise ValueError(f"{where}: no `model_class` (e.g. lynx_zoo.fusion.prefix.PrefixLynx)")
    return resolve_model_class(name)


def check_format(config: dict[str, Any], where: str) -> None:
    if config.get("format") != FORMAT:
        raise ValueError(
            f"{where}: not a lynx_zoo variant config (format {config.get('format')!r}, expected {FORMAT!r})"
        )
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(
            f"{where}: format_version {config['format_version']} is newer than this lynx_zoo reads "
            f"({FORMAT_VERSION}); upgrade lynx_zoo"
        )
