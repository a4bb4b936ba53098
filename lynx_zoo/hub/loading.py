"""Load a variant folder (or a registered variant by name) as a ready model: safetensors only, checksums verified."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lynx_zoo.fusion.base import LynxModel
from lynx_zoo.hub.config import check_format, decode_init_args, fusion_name, model_class
from lynx_zoo.hub.export import CONFIG_FILE, WEIGHTS_FILE, sha256_file, variant_keys

log = logging.getLogger(__name__)

# files that are never read: pickles can run code when loaded
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


class VariantError(ValueError):
    """A variant folder that cannot be loaded as asked (wrong fusion, wrong shapes, bad checksum...)."""


class BaseModelNotFoundError(FileNotFoundError):
    """A base (vision tower or LLM) that a variant references cannot be found."""


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no {CONFIG_FILE}; not a lynx_zoo variant folder (see `lynx_zoo export`)")
    config = json.loads(path.read_text(encoding="utf-8"))
    check_format(config, str(path))
    return config


def verify_files(folder: Path, config: dict[str, Any]) -> None:
    """Check every file recorded at export against its sha256 (before anything is read from it)."""
    files = config.get("files") or {}
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


def _check_expected(cls: type[LynxModel], expected: type[LynxModel] | None, where: Path) -> None:
    if expected is None or issubclass(cls, expected):
        return
    raise VariantError(
        f"{where}: this variant is {fusion_name(cls.__name__)} ({cls.__name__}), but "
        f"{fusion_name(expected.__name__)} ({expected.__name__}) was expected; load it with "
        f"expected={cls.__name__} (or without expected=), or pick a {expected.__name__} variant "
        "(lynx_zoo.list_variants())"
    )


def _check_bases(init_args: dict[str, Any], where: Path) -> None:
    """Local base files that are missing, named before any building starts."""
    vision, llm = init_args.get("vision") or {}, init_args.get("llm") or {}
    checkpoint = vision.get("checkpoint_path")
    if checkpoint and not Path(checkpoint).is_file():
        raise BaseModelNotFoundError(
            f"{where}: the base vision tower's weights {checkpoint} are missing; they are not part of the variant. "
            "Put the file there or pass overrides={'vision': {'checkpoint_path': PATH}}"
        )
    model = llm.get("model")
    if llm.get("pretrained", True) and model and not model.startswith("package://"):
        local = Path(model).expanduser()
        if (local.is_absolute() or model.startswith(".")) and not local.is_dir():
            raise BaseModelNotFoundError(
                f"{where}: the base LLM folder {model} is missing; it is not part of the variant. "
                "Put a copy there or pass overrides={'llm': {'model': PATH}}"
            )


def _merge(init_args: dict[str, Any], overrides: dict[str, dict[str, Any]] | None) -> dict[str, Any]:
    merged = {k: dict(v) if isinstance(v, dict) else v for k, v in init_args.items()}
    for section, values in (overrides or {}).items():
        if not isinstance(merged.get(section), dict):
            raise ValueError(f"overrides: {section!r} is no config section of this variant ({sorted(merged)})")
        merged[section].update(values)
    return merged


def load_variant_folder(
    folder: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    expected: type[LynxModel] | None = None,
    trust_remote_code: bool = False,
    overrides: dict[str, dict[str, Any]] | None = None,
) -> LynxModel:
    """The model of a variant folder (see :func:`lynx_zoo.load_pretrained` for the arguments)."""
    folder = Path(folder)
    config = read_config(folder)
    where = folder / CONFIG_FILE
    cls = model_class(config, str(where))
    _check_expected(cls, expected, folder)
    verify_files(folder, config)

    init_args = _merge(config["init_args"], overrides)
    llm = init_args["llm"]
    if llm.get("trust_remote_code") and not trust_remote_code:
        raise VariantError(
            f"{where}: the base LLM {llm.get('model')!r} asks to run its own code from the hub; review it, then "
            "pass trust_remote_code=True to allow it"
        )
    llm["trust_remote_code"] = trust_remote_code
    if dtype is not None:
        llm["dtype"] = str(dtype).removeprefix("torch.")
        if llm["dtype"] in ("bfloat16", "float16"):
            llm["trainable"] = False  # inference: a half-precision LLM is never trained (no fp32 master weights)
    if config.get("tokenizer"):
        llm["tokenizer"] = str(folder / config["tokenizer"])
    _check_bases(init_args, folder)
    kwargs = decode_init_args(cls, init_args, str(where))
    try:
        model = cls(**kwargs)
    except OSError as err:  # transformers / huggingface_hub / timm: a base that cannot be found or fetched
        raise BaseModelNotFoundError(
            f"{where}: a base model could not be loaded ({err}). Bases are not part of the variant: vision "
            f"{config.get('bases', {}).get('vision')}, LLM {config.get('bases', {}).get('llm')}. Make them "
            "reachable (hub access or a local copy) or point to a local copy with overrides={'llm': {'model': PATH}}"
        ) from err
    load_weights(model, folder / WEIGHTS_FILE, bool(config.get("tokenizer")))
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
    if unexpected or mismatched or missing:
        problems = []
        if mismatched:
            problems.append(f"wrong shapes for this config ({len(mismatched)}): {mismatched[:5]}")
        if unexpected:
            problems.append(f"keys the model does not have ({len(unexpected)}): {unexpected[:5]}")
        if missing:
            problems.append(f"weights the variant should hold but does not ({len(missing)}): {missing[:5]}")
        raise VariantError(
            f"{path}: does not fit the model that config.json describes ({type(model).__name__}): "
            + "; ".join(problems)
            + ". The weights and config.json belong to different variants (a different fusion, bridge, "
            "adapter placement or LLM?); export the variant again"
        )
    model.load_state_dict(load_file(str(path)), strict=False)
