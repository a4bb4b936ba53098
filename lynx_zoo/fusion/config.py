"""A model's whole configuration as one typed object, :class:`ModelConfig`: its registered class and the
``__init__`` arguments that build it, each config section as its dataclass.

The model classes' ``__init__`` signatures are the one source: :class:`ModelConfig` reads their annotations (the
section dataclasses: ``VisionConfig``, ``BridgeConfig``, ...), as LightningCLI does. Export writes it as
``config.json`` (:meth:`ModelConfig.to_dict`), loading reads it back (:meth:`ModelConfig.from_dict`), and
:func:`lynx_zoo.hub.config.model_config_from_files` resolves it from training config files. A section a config
omits gets its defaults; the class is looked up in the registry (:mod:`lynx_zoo.fusion.registry`): nothing in a
file chooses code to run.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import tempfile
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from lynx_zoo.adapters import AdapterConfig
from lynx_zoo.bridge import BridgeConfig
from lynx_zoo.data.processor import PromptConfig
from lynx_zoo.fusion.base import LynxModel
from lynx_zoo.fusion.registry import class_path, model_class, registered_class_of
from lynx_zoo.llm import LLMConfig, base_llm
from lynx_zoo.llm.causal_lm import gguf_folder
from lynx_zoo.optim import OptimizerConfig
from lynx_zoo.vision import VisionConfig

# run settings, not the model's: a variant's weights come from its own file
RUN_ARGUMENTS = ("init_from",)


def jsonable(value: Any) -> Any:
    """``value`` as JSON values: dataclasses as dicts, tuples as lists, paths as strings, NaN as null."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and math.isnan(value):
        return None
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"cannot write {type(value).__name__} {value!r} as JSON")


@dataclasses.dataclass
class ModelConfig:
    """A registered model class and every argument of its ``__init__`` (config sections as their dataclasses)."""

    model_class: type[LynxModel]
    init_args: dict[str, Any]

    @classmethod
    def of(cls, model_class: type[LynxModel], init_args: dict[str, Any] | None = None, where: str = "") -> ModelConfig:
        """Check ``init_args`` against ``model_class``'s ``__init__`` and type them: a dict becomes the section's
        dataclass (unknown fields named in the error), an omitted or ``None`` section its default."""
        where = where or model_class.__name__
        params = _init_parameters(model_class)
        given = {k: v for k, v in (init_args or {}).items() if k not in RUN_ARGUMENTS}
        unknown = sorted(set(given) - set(params))
        if unknown:
            raise ValueError(
                f"{where}: {model_class.__name__} takes no argument(s) {unknown}; it takes {sorted(params)}"
            )
        typed = {}
        for name, annotation in params.items():
            section = _dataclass_of(annotation)
            value = given.get(name)
            if section is not None:
                value = _to_dataclass(section, value, f"{where}: {name}")
            elif name not in given:
                continue  # a plain argument left to its default
            typed[name] = value
        return cls(model_class, typed)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> ModelConfig:
        """From the JSON form (``{"model_class": ..., "init_args": {...}}``); the class must be registered."""
        name = data.get("model_class")
        if not isinstance(name, str):
            raise ValueError(f"{where}: no `model_class` (a registered model class, e.g. PrefixLynx)")
        init_args = data.get("init_args") or {}
        if not isinstance(init_args, dict):
            raise ValueError(f"{where}: `init_args` must be a mapping, got {type(init_args).__name__}")
        return cls.of(model_class(name, where), init_args, where)

    @classmethod
    def from_model(cls, model: LynxModel) -> ModelConfig:
        """The configuration a model was built with (its hyper-parameters)."""
        hparams = {k: v for k, v in model.hparams.items() if not k.startswith("_")}
        return cls.of(registered_class_of(model), hparams)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (``config.json`` of a variant)."""
        return {"model_class": class_path(self.model_class), "init_args": jsonable(self.init_args)}

    def section(self, name: str) -> Any:
        """One ``__init__`` argument (a config dataclass for a section), ``None`` if the class takes no such one."""
        return self.init_args.get(name)

    @property
    def vision(self) -> VisionConfig:
        return self.init_args["vision"]

    @property
    def bridge(self) -> BridgeConfig:
        return self.init_args["bridge"]

    @property
    def llm(self) -> LLMConfig:
        return self.init_args["llm"]

    @property
    def adapters(self) -> AdapterConfig:
        return self.init_args["adapters"]

    @property
    def optimizer(self) -> OptimizerConfig:
        return self.init_args["optimizer"]

    @property
    def prompt(self) -> PromptConfig:
        return self.init_args["prompt"]

    def replace(self, **sections: dict[str, Any]) -> ModelConfig:
        """A copy with fields of some sections changed, e.g. ``replace(llm={"model": "/models/vicuna"})``."""
        init_args = dict(self.init_args)
        for name, changes in sections.items():
            current = init_args.get(name)
            if not dataclasses.is_dataclass(current):
                known = sorted(k for k, v in init_args.items() if dataclasses.is_dataclass(v))
                raise ValueError(f"{self.model_class.__name__} has no config section {name!r}; sections: {known}")
            fields = {f.name for f in dataclasses.fields(current)}
            unknown = sorted(set(changes) - fields)
            if unknown:
                raise ValueError(f"{name}: unknown field(s) {unknown}; expected some of {sorted(fields)}")
            init_args[name] = dataclasses.replace(current, **changes)
        return ModelConfig(self.model_class, init_args)

    def build(self) -> LynxModel:
        """The model, with its bases loaded as the config says."""
        return self.model_class(**self.init_args)

    def build_on_meta(self) -> LynxModel:
        """The model on the meta device with random-weight bases: no weights are read or downloaded and no memory is
        taken, so a 7B config is counted in seconds. A known base LLM (:mod:`lynx_zoo.llm.bases`) without a tokenizer
        at hand gets a stand-in of its vocabulary size; a GGUF model its dequantised folder (made once, cached)."""
        config = self.replace(vision={"pretrained": False, "checkpoint_path": None})
        llm = config.llm
        if llm.gguf_file:
            folder = gguf_folder(llm)
            llm = dataclasses.replace(llm, model=folder, gguf_file=None, tokenizer=llm.tokenizer or folder)
        llm = dataclasses.replace(llm, pretrained=False)
        known = base_llm(llm.model)
        with _stand_in_tokenizer(known.architecture["vocab_size"] if known and not llm.tokenizer else None) as folder:
            if folder is not None:
                llm = dataclasses.replace(llm, tokenizer=folder)
            with torch.device("meta"):
                return config.model_class(**{**config.init_args, "llm": llm})


def _init_parameters(cls: type[LynxModel]) -> dict[str, Any]:
    """``__init__`` parameters (name -> annotation) over the class and its LynxModel bases."""
    params: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        if isinstance(klass, type) and issubclass(klass, LynxModel) and "__init__" in klass.__dict__:
            hints = typing.get_type_hints(klass.__init__)
            for p in inspect.signature(klass.__init__).parameters.values():
                if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self":
                    params[p.name] = hints.get(p.name)
    return params


def _dataclass_of(annotation: Any) -> type | None:
    candidates = typing.get_args(annotation) or (annotation,)
    return next((c for c in candidates if dataclasses.is_dataclass(c)), None)


def _to_dataclass(cls: type, value: Any, where: str) -> Any:
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise ValueError(f"{where}: expected a mapping of {cls.__name__} fields, got {type(value).__name__} {value!r}")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - fields)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown} for {cls.__name__}; expected some of {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {
        name: tuple(item) if typing.get_origin(hints.get(name)) is tuple and isinstance(item, list) else item
        for name, item in value.items()
    }
    return cls(**kwargs)


@contextmanager
def _stand_in_tokenizer(vocab_size: int | None) -> Iterator[str | None]:
    """A folder with a tokenizer of ``vocab_size`` tokens and no pad token (the LLaMA tokenizer's layout: the zoo
    adds ``[PAD]``), for counting parameters without downloading the real one; ``None`` gives none."""
    if vocab_size is None:
        yield None
        return
    vocab = {token: i for i, token in enumerate(["<unk>", "<s>", "</s>", *(f"t{i}" for i in range(3, vocab_size))])}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        yield folder
