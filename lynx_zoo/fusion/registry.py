"""The registry of model classes: the only classes a file (a variant's ``config.json``, a checkpoint's
hyper-parameters) may name. A name is looked up here and never imported from a module path it spells.

The zoo's fusions register themselves. An outside fusion registers with :func:`register_model`, called by its
package, or through an entry point of its distribution (group ``lynx_zoo.models``, loaded on the first lookup
that misses), e.g. in its ``pyproject.toml``::

    [project.entry-points."lynx_zoo.models"]
    PooledPrefixLynx = "my_fusion:PooledPrefixLynx"
"""

from __future__ import annotations

import difflib
import sys
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from lynx_zoo.fusion.base import LynxModel

ENTRY_POINT_GROUP = "lynx_zoo.models"
_MODELS: dict[str, type[LynxModel]] = {}
_entry_points_loaded = False
M = TypeVar("M", bound="type[LynxModel]")


class UnknownModelClassError(ValueError):
    """A file names a model class that is not registered."""


def class_path(cls: type) -> str:
    """``module.QualifiedName`` of a class."""
    return f"{cls.__module__}.{cls.__qualname__}"


def register_model(cls: M) -> M:
    """Register a :class:`~lynx_zoo.fusion.base.LynxModel` subclass under its name and its class path (a decorator)."""
    from lynx_zoo.fusion.base import LynxModel

    if not (isinstance(cls, type) and issubclass(cls, LynxModel)):
        raise TypeError(f"register_model: {cls!r} is not a LynxModel subclass")
    for key in (cls.__name__, class_path(cls)):
        known = _MODELS.get(key)
        if known is not None and known is not cls:
            raise ValueError(f"register_model: {key!r} is registered already, as {class_path(known)}")
        _MODELS[key] = cls
    return cls


def registered_class_of(model: LynxModel) -> type[LynxModel]:
    """The registered class of ``model``: its own, or the one it derives from when a wrapper swapped its class
    (FSDP2's ``fully_shard`` makes it an ``FSDP<Class>``)."""
    registered = set(_MODELS.values())
    for cls in type(model).__mro__:
        if cls in registered:
            return cls
    raise UnknownModelClassError(
        f"{type(model).__name__} is not registered: register it with lynx_zoo.register_model to export or load it"
    )


def registered_models() -> dict[str, type[LynxModel]]:
    """Every registered model class by its short name (entry points included)."""
    _load_entry_points()
    return {name: cls for name, cls in _MODELS.items() if "." not in name}


def model_class(name: str, where: str = "") -> type[LynxModel]:
    """The registered class a file names: its short name (``PrefixLynx``), its class path
    (``lynx_zoo.fusion.prefix.PrefixLynx``), or a public alias of it in a module already imported
    (``lynx_zoo.PrefixLynx``, as LightningCLI records it). Anything else is an :class:`UnknownModelClassError`;
    nothing is imported from a module path the name spells."""
    if name not in _MODELS:
        _load_entry_points()
    cls = (_MODELS.get(name) or _imported_alias(name)) if isinstance(name, str) else None
    if cls is None:
        known = sorted(registered_models())
        close = difflib.get_close_matches(str(name).rpartition(".")[2], known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UnknownModelClassError(
            f"{where + ': ' if where else ''}model class {name!r} is not registered{hint}; registered: "
            f"{', '.join(known)}. Files choose among registered classes only: an outside fusion registers through "
            f"lynx_zoo.register_model or an entry point in the group {ENTRY_POINT_GROUP!r}"
        )
    return cls


def _imported_alias(name: str) -> type[LynxModel] | None:
    module, _, attribute = name.rpartition(".")
    found = getattr(sys.modules.get(module), attribute, None) if module else None
    return found if any(found is cls for cls in _MODELS.values()) else None


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        register_model(entry.load())
