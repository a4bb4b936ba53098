"""One loader for every form a model comes in: :func:`load_model` takes a Lightning checkpoint of a lynx_zoo run,
an exported variant folder, a registered or released variant name, or ``hf://org/repo[@revision]``.

Nothing a file names is imported: the model class comes from the registry (:mod:`lynx_zoo.fusion.registry`),
a variant's weights from safetensors after their sha256 is checked, a checkpoint through torch's weights-only
unpickler. Pickle files beside a variant are never read.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lynx_zoo.checkpoints import read_torch_checkpoint
from lynx_zoo.data import shapes as _registers_the_demo_tokenizer  # noqa: F401  (lynx_zoo/shapes-words, named by lynx-demo and lynx-tiny)
from lynx_zoo.errors import listed_problems
from lynx_zoo.fusion.base import LynxModel
from lynx_zoo.fusion.config import ModelConfig
from lynx_zoo.fusion.registry import model_class as registered_class
from lynx_zoo.hub.config import CONFIG_FILE, WEIGHTS_FILE, check_format, read_json
from lynx_zoo.hub.variants import resolve_variant
from lynx_zoo.hub.weights import sha256_file, variant_keys

log = logging.getLogger(__name__)

# files that are never read: pickles can run code when loaded
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


class VariantError(ValueError):
    """A model that cannot be loaded as asked (wrong fusion, wrong shapes, bad checksum...)."""


class BaseModelNotFoundError(FileNotFoundError):
    """A base (vision tower or LLM) that a variant references cannot be found."""


def load_model(
    source: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    expected: type[LynxModel] | None = None,
    trust_remote_code: bool = False,
    overrides: dict[str, dict[str, Any]] | None = None,
    model_class: type[LynxModel] | str | None = None,
) -> LynxModel:
    """A model ready for :meth:`LynxModel.generate` (eval mode), from any form it comes in.

    Args:
        source: a Lightning checkpoint (``.ckpt`` of a lynx_zoo run), a variant folder, a variant name from
            ``lynx_zoo.list_variants()``, or ``hf://org/repo[@revision]``.
        device: where the model goes.
        dtype: the LLM's weight dtype (e.g. ``torch.bfloat16``, ``"float32"``); default: as saved. The vision tower,
            bridge, adapters and fusion blocks keep fp32.
        expected: the model class the caller needs (e.g. ``PrefixLynx``): another fusion is an error.
        trust_remote_code: allow a hub base LLM to run its own code (off unless you turn it on).
        overrides: per-section config changes, e.g. ``{"llm": {"model": "/models/vicuna-7b"}}`` for a local copy of a
            base.
        model_class: for a checkpoint that records no class: a registered name, or a class the caller names.
    """
    text = str(source)
    path = Path(text).expanduser()
    if not text.startswith("hf://") and path.is_file():
        return load_checkpoint(path, device, model_class, dtype, expected, trust_remote_code, overrides)
    return load_variant_folder(resolve_variant(text), device, dtype, expected, trust_remote_code, overrides)


load_pretrained = load_model  # the name users of pretrained-model hubs look for


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A Lightning checkpoint through torch's weights-only unpickler; an unreadable file names itself (a
    :class:`~lynx_zoo.errors.CheckpointError`)."""
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    checkpoint = read_torch_checkpoint(path)
    if "state_dict" not in checkpoint:
        raise VariantError(f"{path}: not a Lightning checkpoint of a lynx_zoo run (no state_dict)")
    return checkpoint


def checkpoint_class(
    checkpoint: dict[str, Any], where: Path, model_class: type[LynxModel] | str | None = None
) -> type[LynxModel]:
    """The registered class a checkpoint records (``_class_path`` in its hyper-parameters), else the one the caller
    names; never a class imported from the module path a file spells."""
    if isinstance(model_class, type):
        return model_class
    name = (checkpoint.get("hyper_parameters") or {}).get("_class_path") or model_class
    if not name:
        raise ValueError(
            f"{where}: its hyper-parameters have no `_class_path` (not saved through the lynx_zoo CLI); "
            "name the model class, e.g. --model-class PrefixLynx"
        )
    return registered_class(name, str(where))


def load_checkpoint(
    path: Path,
    device: str | torch.device = "cpu",
    model_class: type[LynxModel] | str | None = None,
    dtype: torch.dtype | str | None = None,
    expected: type[LynxModel] | None = None,
    trust_remote_code: bool = False,
    overrides: dict[str, dict[str, Any]] | None = None,
) -> LynxModel:
    """The model of a Lightning checkpoint of a lynx_zoo run (see :func:`load_model`)."""
    checkpoint = read_checkpoint(path)
    cls = checkpoint_class(checkpoint, path, model_class)
    _check_expected(cls, expected, path)
    hparams = {k: v for k, v in (checkpoint.get("hyper_parameters") or {}).items() if not k.startswith("_")}
    config = _for_loading(ModelConfig.of(cls, hparams, str(path)), dtype, trust_remote_code, overrides, path)
    model = _build(config, path)
    model.load_state_dict(checkpoint["state_dict"])
    return model.to(device).eval()


def read_variant_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no {CONFIG_FILE}; not a lynx_zoo variant folder (see `lynx_zoo export`)")
    record = read_json(path)
    check_format(record, str(path))
    return record


def verify_files(folder: Path, record: dict[str, Any]) -> None:
    """Check every file recorded at export against its sha256 (before anything is read from it)."""
    files = record.get("files") or {}
    if WEIGHTS_FILE not in files:
        raise VariantError(f"{folder / CONFIG_FILE}: records no checksum for {WEIGHTS_FILE}; re-export the variant")
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            hint = " (pickle files such as pytorch_model.bin are never loaded)" if name == WEIGHTS_FILE else ""
            raise FileNotFoundError(f"{path}: missing{hint}")
        got = sha256_file(path)
        if got != expected:
            raise VariantError(
                f"{path}: sha256 {got} does not match {expected} recorded in {CONFIG_FILE}: the file was changed "
                "or corrupted after export; refusing to load it (download or export it again)"
            )
    ignored = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if ignored:
        log.warning(
            "%s: ignoring %s (pickle files are never loaded; weights come from %s)", folder, ignored, WEIGHTS_FILE
        )


def load_variant_folder(
    folder: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    expected: type[LynxModel] | None = None,
    trust_remote_code: bool = False,
    overrides: dict[str, dict[str, Any]] | None = None,
) -> LynxModel:
    """The model of a variant folder (see :func:`load_model`)."""
    folder = Path(folder)
    record = read_variant_config(folder)
    where = folder / CONFIG_FILE
    config = ModelConfig.from_dict(record, str(where))  # the class from the registry, before anything else
    _check_expected(config.model_class, expected, folder)
    verify_files(folder, record)
    if record.get("tokenizer"):
        config = config.replace(llm={"tokenizer": str(folder / record["tokenizer"])})
    config = _for_loading(config, dtype, trust_remote_code, overrides, where)
    _check_bases(config, folder)
    model = _build(config, where, record.get("bases"))
    load_weights(model, folder / WEIGHTS_FILE, bool(record.get("tokenizer")))
    return model.to(device).eval()


def load_weights(model: LynxModel, path: Path, changed_tokenizer: bool = False) -> None:
    """Load a variant's safetensors into ``model``; its keys must be exactly what the variant stores."""
    own = model.state_dict()
    wanted = set(variant_keys(model, changed_tokenizer))
    with safe_open(str(path), framework="pt") as handle:
        shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
    unexpected = sorted(set(shapes) - set(own))
    mismatched = [
        f"{k}: expected {tuple(own[k].shape)}, got {shapes[k]}"
        for k in sorted(shapes)
        if k in own and tuple(own[k].shape) != shapes[k]
    ]
    missing = sorted(wanted - set(shapes))
    problems = listed_problems(
        ("wrong shapes for this config", mismatched),
        ("keys the model does not have", unexpected),
        ("weights the variant should hold but does not", missing),
    )
    if problems:
        raise VariantError(
            f"{path}: does not fit the model that config.json describes ({type(model).__name__}): "
            + problems
            + ". The weights and config.json belong to different variants (a different fusion, bridge, "
            "adapter placement or LLM?); export the variant again"
        )
    model.load_state_dict(load_file(str(path)), strict=False)


def _check_expected(cls: type[LynxModel], expected: type[LynxModel] | None, where: Path) -> None:
    if expected is None or issubclass(cls, expected):
        return
    raise VariantError(
        f"{where}: this model is {cls.label} ({cls.kind}, {cls.__name__}), but {expected.label} ({expected.kind}, "
        f"{expected.__name__}) was "
        f"expected; load it with expected={cls.__name__} (or without expected=), or pick a {expected.__name__} "
        "variant (lynx_zoo.list_variants())"
    )


def _for_loading(
    config: ModelConfig,
    dtype: torch.dtype | str | None,
    trust_remote_code: bool,
    overrides: dict[str, dict[str, Any]] | None,
    where: Path,
) -> ModelConfig:
    """The config with the caller's overrides, dtype and permission to run hub code."""
    if config.llm.trust_remote_code and not trust_remote_code:
        raise VariantError(
            f"{where}: the base LLM {config.llm.model!r} asks to run its own code from the hub; review it, then "
            "pass trust_remote_code=True to allow it"
        )
    try:
        config = config.replace(**(overrides or {}))
    except ValueError as err:
        raise ValueError(f"overrides for {where}: {err}") from None
    llm: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if dtype is not None:
        llm["dtype"] = str(dtype).removeprefix("torch.")
        if llm["dtype"] in ("bfloat16", "float16"):
            llm["trainable"] = False  # inference: a half-precision LLM is never trained (no fp32 master weights)
    return config.replace(llm=llm)


def _check_bases(config: ModelConfig, where: Path) -> None:
    """Local base files that are missing, named before any building starts."""
    vision, llm = config.vision, config.llm
    if vision.checkpoint_path and not Path(vision.checkpoint_path).is_file():
        raise BaseModelNotFoundError(
            f"{where}: the base vision tower's weights {vision.checkpoint_path} are missing; they are not part of the "
            "variant. Put the file there or pass overrides={'vision': {'checkpoint_path': PATH}}"
        )
    if llm.pretrained and llm.model and not llm.model.startswith("package://"):
        local = Path(llm.model).expanduser()
        if (local.is_absolute() or llm.model.startswith(".")) and not local.is_dir():
            raise BaseModelNotFoundError(
                f"{where}: the base LLM folder {llm.model} is missing; it is not part of the variant. "
                "Put a copy there or pass overrides={'llm': {'model': PATH}}"
            )


def _build(config: ModelConfig, where: Path, bases: dict[str, Any] | None = None) -> LynxModel:
    try:
        return config.build()
    except OSError as err:  # transformers / huggingface_hub / timm: a base that cannot be found or fetched
        bases = bases or {"vision": config.vision.model_name, "llm": config.llm.model}
        raise BaseModelNotFoundError(
            f"{where}: a base model could not be loaded ({err}). Bases are not part of the variant: vision "
            f"{bases.get('vision')}, LLM {bases.get('llm')}. Make them reachable (hub access or a local copy) or "
            "point to a local copy with overrides={'llm': {'model': PATH}}"
        ) from err
