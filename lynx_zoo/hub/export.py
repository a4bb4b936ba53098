"""Export a trained model as a variant folder: ``config.json``, ``model.safetensors``, a model card (what the
folder stores: :mod:`lynx_zoo.hub.weights`)."""

from __future__ import annotations

import datetime
import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule

from lynx_zoo.adapters import AdapterConfig
from lynx_zoo.adapters.lora import base_state_dict, lora_layers, merged_llm
from lynx_zoo.fusion.base import LynxModel
from lynx_zoo.fusion.config import ModelConfig
from lynx_zoo.hub.cards import exported_card
from lynx_zoo.hub.config import CARD_FILE, CONFIG_FILE, FORMAT, FORMAT_VERSION, TOKENIZER_DIR, WEIGHTS_FILE
from lynx_zoo.hub.weights import sha256_file, tokenizer_changed, variant_keys
from lynx_zoo.llm.causal_lm import resolve_model_path


def describe_bases(model: LynxModel, llm_revision: str | None) -> dict[str, Any]:
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
        "revision": llm_revision,
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


@contextmanager
def _written_in_place_of(out: Path) -> Iterator[Path]:
    """A fresh temporary folder beside ``out`` to write into; when the block ends without an error it replaces
    ``out`` (renamed into place), else it is removed and ``out`` stays as it was."""
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def export_variant(
    model: LynxModel,
    out: str | Path,
    name: str | None = None,
    source: str | None = None,
    state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``model`` as a variant folder at ``out`` (replaced as a whole if it holds an earlier variant).

    Args:
        model: the trained model.
        out: the folder to write.
        name: the variant's name (default: the folder name).
        source: where the weights came from (a checkpoint path), recorded in ``config.json``.
        state: the model's full state dict, where ``model.state_dict()`` holds only this process's shards (FSDP2:
            :func:`full_state_dict`).
    """
    config = ModelConfig.from_model(model)
    llm = model.llm_config
    if llm.pretrained and not llm.gguf_file and not llm.revision:
        # pin the hub commit the base was loaded at (None for local folders)
        config = config.replace(llm={"revision": getattr(model.llm.config, "_commit_hash", None)})
    changed = tokenizer_changed(model)
    state = model.state_dict() if state is None else state
    # clone: tied weights share storage, which safetensors refuses; contiguous: what it writes
    tensors = {k: state[k].detach().to("cpu").clone().contiguous() for k in variant_keys(model, changed)}
    return write_variant(
        out,
        model,
        config,
        tensors,
        name=name,
        bases=describe_bases(model, config.llm.revision),
        source=source,
        save_tokenizer=model.tokenizer.save_pretrained if changed else None,
    )


def full_state_dict(model: LynxModel) -> dict[str, torch.Tensor]:
    """The whole state dict of a model sharded with FSDP2, on the CPU (a collective: every rank calls it), or the
    plain state dict of an unsharded one."""
    if not any(isinstance(m, FSDPModule) for m in model.modules()):
        return model.state_dict()
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def write_variant(
    out: str | Path,
    model: LynxModel,
    config: ModelConfig,
    tensors: dict[str, torch.Tensor],
    name: str | None = None,
    bases: dict[str, Any] | None = None,
    source: str | None = None,
    save_tokenizer: Callable[[Path], Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a variant folder: ``tensors`` as model.safetensors, ``config.json`` with ``config`` and the sha256 of
    every file, the model card. ``model`` (which may live on the meta device) gives the card's facts;
    ``save_tokenizer(folder)`` writes a changed tokenizer; ``extra`` goes into config.json."""
    out = Path(out)
    name = name or out.name
    if out.exists() and any(out.iterdir()) and not (out / CONFIG_FILE).is_file():
        raise FileExistsError(f"export: {out} exists and is not a variant folder; choose an empty or new folder")
    with _written_in_place_of(out) as tmp:
        files: dict[str, str] = {}
        if save_tokenizer is not None:
            save_tokenizer(tmp / TOKENIZER_DIR)
            for path in sorted((tmp / TOKENIZER_DIR).iterdir()):
                files[f"{TOKENIZER_DIR}/{path.name}"] = sha256_file(path)
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "lynx_zoo": FORMAT})
        files[WEIGHTS_FILE] = sha256_file(tmp / WEIGHTS_FILE)
        record = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "name": name,
            **config.to_dict(),
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
        (tmp / CONFIG_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        (tmp / CARD_FILE).write_text(exported_card(name, config, model, source), encoding="utf-8")
    return out


def export_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    name: str | None = None,
    model_class: str | None = None,
    merge_lora: str | Path | None = None,
) -> Path:
    """Export a Lightning checkpoint of a lynx_zoo run (``RUN.ckpt``) as a variant folder; ``merge_lora``: merge its
    LoRA updates into a local copy of the base LLM written there (:func:`export_merged_variant`)."""
    from lynx_zoo.hub.loading import load_checkpoint

    model = load_checkpoint(Path(checkpoint), "cpu", model_class)
    source = str(Path(checkpoint).resolve())
    if merge_lora is not None:
        return export_merged_variant(model, out, merge_lora, name=name, source=source)
    return export_variant(model, out, name=name, source=source)


def export_merged_variant(
    model: LynxModel, out: str | Path, llm_folder: str | Path, name: str | None = None, source: str | None = None
) -> Path:
    """Export a model with LoRA adapters for serving: its LoRA updates merged into a local copy of its base LLM.

    The merged LLM is written to ``llm_folder`` (a transformers folder, :func:`save_llm`); the variant at ``out``
    loads it as its pretrained, frozen base and has no adapters, so it runs at the base LLM's speed. It stores the
    model's other trained weights (bridge, fusion blocks, ...); its answers are those of the unmerged model.
    """
    if model.adapter_config.kind != "lora" or not model.adapter_blocks:
        raise ValueError(
            f"merge LoRA: the model has no LoRA adapters (adapters.kind: {model.adapter_config.kind}, layers "
            f"{model.adapter_layers}); export it without merging"
        )
    llm_folder = save_llm(model, llm_folder).resolve()
    config = ModelConfig.from_model(model)
    llm = model.llm_config
    config = config.replace(
        llm={
            "model": str(llm_folder),
            "pretrained": True,
            "gguf_file": None,
            "revision": None,
            "tokenizer": llm.tokenizer if llm.tokenizer and not llm.gguf_file else str(llm_folder),
        }
    )
    config = ModelConfig(config.model_class, {**config.init_args, "adapters": AdapterConfig(every=None)})
    merged = config.build()
    llm_keys = {f"llm.{k}" for k in base_state_dict(merged.llm)}
    state = model.state_dict()
    merged.load_state_dict({k: state[k] for k in merged.state_dict() if k not in llm_keys}, strict=False)
    return export_variant(merged, out, name=name, source=source)


def save_llm(model: LynxModel, folder: str | Path) -> Path:
    """Write the model's LLM as a transformers folder (``config.json``, ``model.safetensors``, the tokenizer) that
    ``llm.model`` can name as a pretrained base: LoRA updates merged into the weights they adapt, without the blocks
    the zoo inserted into its layers (adapters, cross-attention blocks). Written beside and renamed into place."""
    folder = Path(folder)
    llm = merged_llm(model.llm) if any(lora_layers(model.llm)) else model.llm
    with _written_in_place_of(folder) as tmp:
        llm.save_pretrained(tmp, state_dict=base_state_dict(llm), safe_serialization=True)
        model.tokenizer.save_pretrained(tmp)
    return folder
