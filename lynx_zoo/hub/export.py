"""Export a trained model as a variant folder: ``config.json``, ``model.safetensors``, a model card.

What is stored: every trainable weight (bridge, adapters, fusion blocks, anything unfrozen) and every
weight of a part that is not loaded from a pretrained base (a tower or LLM built with random weights,
a frozen bridge). Frozen weights of pretrained bases are referenced by id/path and revision, not copied:
the [PAD] embedding row that the zoo adds to a frozen LLM is the mean of the base's rows, recomputed
identically at load time, so it needs no storing either.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from lynx_zoo.fusion.base import LynxModel
from lynx_zoo.hub.config import FORMAT, FORMAT_VERSION, class_path, model_init_args
from lynx_zoo.llm import load_tokenizer
from lynx_zoo.llm.causal_lm import resolve_model_path

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "README.md"
TOKENIZER_DIR = "tokenizer"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def base_prefixes(vision: dict[str, Any], llm: dict[str, Any]) -> tuple[str, ...]:
    """State-dict prefixes of the parts loaded from pretrained bases (their frozen weights are not stored),
    from the ``vision`` and ``llm`` config sections (as dicts)."""
    prefixes = []
    if vision.get("pretrained") or vision.get("checkpoint_path"):
        prefixes.append("vision.")
    if llm.get("pretrained", True):
        prefixes.append("llm.")
    return tuple(prefixes)


def tokenizer_changed(model: LynxModel) -> bool:
    """Whether the model's tokenizer differs from what its LLM config loads (tokens added after building)."""
    return model.tokenizer.get_vocab() != load_tokenizer(model.llm_config).get_vocab()


def embedding_keys(model: LynxModel) -> set[str]:
    """State-dict names of the LLM's input and output embedding matrices."""
    matrices = [model.llm.get_input_embeddings().weight]
    output = model.llm.get_output_embeddings()
    if output is not None:
        matrices.append(output.weight)
    return {
        f"llm.{name}" for name, p in model.llm.named_parameters(remove_duplicate=False) if any(p is m for m in matrices)
    }


def variant_keys(model: LynxModel, changed_tokenizer: bool = False, bases: tuple[str, ...] | None = None) -> list[str]:
    """The state-dict keys a variant stores (see the module docstring); with a changed tokenizer, also the
    embedding matrices (their added rows are not reproducible from the base). ``bases``: the prefixes of
    pretrained bases (default: from the model's own configs; a model built on the meta device with random
    weights passes those of the config it stands for)."""
    if bases is None:
        bases = base_prefixes(dataclasses.asdict(model.vision_config), dataclasses.asdict(model.llm_config))
    trainable = {n for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}
    extra = embedding_keys(model) if changed_tokenizer else set()
    return [k for k in model.state_dict() if k in trainable or k in extra or not k.startswith(bases)]


def describe_bases(model: LynxModel, init_args: dict[str, Any]) -> dict[str, Any]:
    """How the frozen bases are identified: timm architecture/hub id or file, LLM id/path and revision."""
    vision, llm = model.vision_config, model.llm_config
    pretrained_cfg = getattr(model.vision.model, "pretrained_cfg", {}) or {}
    vision_base: dict[str, Any] = {"timm_model": vision.model_name, "pretrained": vision.pretrained}
    if vision.pretrained:
        vision_base["hf_hub_id"] = pretrained_cfg.get("hf_hub_id")
    if vision.checkpoint_path:
        vision_base["checkpoint_path"] = vision.checkpoint_path
        vision_base["checkpoint_sha256"] = sha256_file(Path(vision.checkpoint_path))
    llm_base: dict[str, Any] = {
        "model": llm.model,
        "revision": init_args["llm"].get("revision"),
        "pretrained": llm.pretrained,
        "tokenizer": llm.tokenizer or llm.model,
    }
    if llm.gguf_file:
        gguf = Path(llm.gguf_file)
        gguf = gguf if gguf.is_absolute() else resolve_model_path(llm.model or ".") / gguf
        llm_base.update(gguf_file=llm.gguf_file, gguf_sha256=sha256_file(gguf))
    return {"vision": vision_base, "llm": llm_base}


def _package_version() -> str:
    try:
        return version("lynx-zoo")
    except PackageNotFoundError:
        return "unknown"


def _prepare_out(out: Path) -> Path:
    """A fresh temporary folder beside ``out``; ``out`` may only be missing, empty or an earlier variant."""
    if out.exists() and any(out.iterdir()) and not (out / CONFIG_FILE).is_file():
        raise FileExistsError(f"export: {out} exists and is not a variant folder; choose an empty or new folder")
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def export_variant(model: LynxModel, out: str | Path, name: str | None = None, source: str | None = None) -> Path:
    """Write ``model`` as a variant folder at ``out`` (replaced as a whole if it holds an earlier variant).

    Args:
        model: the trained model.
        out: the folder to write.
        name: the variant's name (default: the folder name).
        source: where the weights came from (a checkpoint path), recorded in ``config.json``.
    """
    init_args = model_init_args(model)
    llm_config = model.llm_config
    if llm_config.pretrained and not llm_config.gguf_file and not llm_config.revision:
        # pin the hub commit the base was loaded at (None for local folders)
        init_args["llm"]["revision"] = getattr(model.llm.config, "_commit_hash", None)
    changed = tokenizer_changed(model)
    state = model.state_dict()
    # clone: tied weights share storage, which safetensors refuses; contiguous: what it writes
    tensors = {k: state[k].detach().to("cpu").clone().contiguous() for k in variant_keys(model, changed)}
    return write_variant(
        out,
        model,
        init_args,
        tensors,
        name=name,
        bases=describe_bases(model, init_args),
        source=source,
        save_tokenizer=model.tokenizer.save_pretrained if changed else None,
    )


def write_variant(
    out: str | Path,
    model: LynxModel,
    init_args: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    name: str | None = None,
    bases: dict[str, Any] | None = None,
    source: str | None = None,
    save_tokenizer: Callable[[Path], Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a variant folder: ``tensors`` as model.safetensors, ``config.json`` with ``init_args`` and the
    sha256 of every file, the model card. ``model`` (which may live on the meta device) gives the class and
    the card's facts; ``save_tokenizer(folder)`` writes a changed tokenizer; ``extra`` goes into config.json."""
    from lynx_zoo.hub.cards import exported_card

    out = Path(out)
    name = name or out.name
    tmp = _prepare_out(out)
    try:
        files: dict[str, str] = {}
        if save_tokenizer is not None:
            save_tokenizer(tmp / TOKENIZER_DIR)
            for path in sorted((tmp / TOKENIZER_DIR).iterdir()):
                files[f"{TOKENIZER_DIR}/{path.name}"] = sha256_file(path)
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "lynx_zoo": FORMAT})
        files[WEIGHTS_FILE] = sha256_file(tmp / WEIGHTS_FILE)
        config = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "name": name,
            "model_class": class_path(type(model)),
            "init_args": init_args,
            "bases": bases,
            "tokenizer": TOKENIZER_DIR if save_tokenizer is not None else None,
            "weights": {
                "file": WEIGHTS_FILE,
                "keys": sorted(tensors),
                "num_tensors": len(tensors),
                "num_parameters": sum(t.numel() for t in tensors.values()),
                "dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()}),
            },
            "files": files,
            "source": source,
            **(extra or {}),
            "lynx_zoo_version": _package_version(),
            "torch_version": torch.__version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        (tmp / CARD_FILE).write_text(exported_card(config, model), encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def export_checkpoint(
    checkpoint: str | Path, out: str | Path, name: str | None = None, model_class: str | None = None
) -> Path:
    """Export a Lightning checkpoint of a lynx_zoo run (``RUN.ckpt``) as a variant folder."""
    from lynx_zoo.evaluation.runner import load_variant

    model = load_variant(Path(checkpoint), "cpu", model_class)
    return export_variant(model, out, name=name, source=str(Path(checkpoint).resolve()))
