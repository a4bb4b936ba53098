"""What the scale benchmarks share: the model sizes, the machine record, the table and the JSON file."""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
import torch

RESULTS = Path(__file__).resolve().parent / "results"

# a small-but-not-tiny LLaVA-shaped model: a ViT-S-like tower at 224 px (196 patch tokens), an MLP projector,
# an 8-layer width-512 LLaMA with the 32,000-token LLaMA vocabulary
VISION = dict(width=384, depth=6, heads=6, patch=16, image_size=224)
LLM = dict(
    model_type="llama",
    hidden_size=512,
    intermediate_size=1376,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=8,
    max_position_embeddings=1024,
)


def llama_tokenizer_dir() -> str:
    """The LLaMA-layout SentencePiece tokenizer (32,000 pieces) in the mistral-common wheel (a dev dependency)."""
    spec = importlib.util.find_spec("mistral_common")
    if spec is None or spec.origin is None:
        raise SystemExit("benchmarks need mistral-common (pip install --no-deps mistral-common) for a LLaMA tokenizer")
    folder = Path(tempfile.gettempdir()) / "lynx_zoo_llama_tokenizer"
    folder.mkdir(exist_ok=True)
    shutil.copy(Path(spec.origin).parent / "data" / "tokenizer.model.v1", folder / "tokenizer.model")
    return str(folder)


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    try:
        info["cpu"] = next(
            line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")
        )
        info["load_average_at_start"] = os.getloadavg()
    except (OSError, StopIteration):
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    try:
        info["git_commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=RESULTS.parent, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return info


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A Markdown table of ``rows``."""

    def cell(value: Any) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def report(name: str, rows: list[dict[str, Any]], columns: list[str], **extra: Any) -> Path:
    """Print the table and write ``results/<name>.json`` with the command and the machine."""
    print(table(rows, columns))
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    record = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": machine(), "rows": rows, **extra}
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")
    return path


# ---------------------------------------------------------------------------------------------- matched models


def measuring_trainer(max_steps: int, callback: L.Callback, **options: Any) -> L.Trainer:
    """A CPU Lightning Trainer that adds nothing to the steps it runs beyond the loop itself: no logger, checkpoints,
    progress bar, model summary or validation; ``callback`` measures. ``options`` go to the Trainer."""
    return L.Trainer(
        **{"accelerator": "cpu", "devices": 1, **options},
        max_steps=max_steps,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )


def lynx_model(seed: int = 0, llm_trainable: bool = False, bridge: Any = None, max_length: int = 128) -> Any:
    """lynx_zoo PT at the benchmark size: frozen tower (196 patch tokens), trainable MLP projector (or ``bridge``),
    frozen LLM (or a trainable one), ``max_length`` text tokens per sample."""
    from lynx_zoo import AdapterConfig, BridgeConfig, LLMConfig, OptimizerConfig, PrefixLynx, PromptConfig, VisionConfig

    torch.manual_seed(seed)
    vision = VisionConfig(
        model_name="vit_small_patch16_224",
        image_size=VISION["image_size"],
        keep_cls_token=False,
        model_kwargs=dict(embed_dim=VISION["width"], depth=VISION["depth"], num_heads=VISION["heads"]),
    )
    return PrefixLynx(
        vision=vision,
        bridge=bridge or BridgeConfig(kind="mlp"),
        llm=LLMConfig(pretrained=False, tokenizer=llama_tokenizer_dir(), config=dict(LLM), trainable=llm_trainable),
        adapters=AdapterConfig(every=None),
        optimizer=OptimizerConfig(lr=1e-4, min_lr=1e-5),
        prompt=PromptConfig(max_length=max_length),
    )


def llava_model(vocab_size: int, seed: int = 0, llm_trainable: bool = False) -> Any:
    """HF transformers' LLaVA of the same shapes: CLIP tower (last layer, patch tokens), MLP projector, LLaMA;
    the tower and the LLM frozen (or the LLM trainable), the projector trained, as in the lynx_zoo model."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    text = {k: v for k, v in LLM.items() if k != "model_type"}
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=VISION["width"],
            intermediate_size=4 * VISION["width"],
            num_hidden_layers=VISION["depth"],
            num_attention_heads=VISION["heads"],
            image_size=VISION["image_size"],
            patch_size=VISION["patch"],
        ),
        text_config=LlamaConfig(**text, vocab_size=vocab_size + 1),
        image_token_index=vocab_size,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    config._attn_implementation = "sdpa"
    model = LlavaForConditionalGeneration(config)
    model.requires_grad_(False)
    model.model.multi_modal_projector.requires_grad_(True)
    if llm_trainable:
        model.model.language_model.requires_grad_(True)
        model.lm_head.requires_grad_(True)
    return model


def image_tokens() -> int:
    return (VISION["image_size"] // VISION["patch"]) ** 2


def llava_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor, image_token: int) -> dict[str, torch.Tensor]:
    """LLaVA's inputs for the same text: one image placeholder per visual token before the text."""
    b, n = input_ids.shape[0], image_tokens()
    ids = torch.cat([torch.full((b, n), image_token, dtype=input_ids.dtype), input_ids], dim=1)
    return {"input_ids": ids, "attention_mask": torch.cat([attention_mask.new_ones(b, n), attention_mask], dim=1)}
