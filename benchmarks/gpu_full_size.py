"""Full-size Lynx on one GPU with random weights: tokens/s, MFU and peak memory of a training step, with and
without activation checkpointing, for PT Vicuna-7B at 224 and 420 px and CA Vicuna-7B at 420 px.

The models are the shipped configs (configs/pt_vicuna_420.yaml and its grid overlays) with
``pretrained: false`` (no download: the LLaMA tokenizer comes from the mistral-common wheel), built directly
on the GPU: frozen bf16 Vicuna-7B, frozen fp32 EVA ViT-g/14, trainable fp32 resampler and adapters (PT) or
cross-attention blocks (CA), AdamW, bf16 autocast. Batches: ``--batch`` samples of ``--text`` text tokens.

MFU = model FLOPs of the step (``lynx_zoo.training.throughput.lynx_step_flops``: forward ``2 N T`` per part
plus attention, backward ``2x`` for trainable parts, ``1x`` for frozen parts that gradients cross, ``0`` below
them) / step time / the GPU's dense bf16 peak (``--peak-tflops``, default 989: H100 SXM and H200).

    python benchmarks/gpu_full_size.py                       # all variants, with and without checkpointing
    python benchmarks/gpu_full_size.py --variants pt420 --batch 8 --text 512

Not run in this repository's CI (it needs a GPU with ~80 GB); its results go to results/gpu_full_size.json.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from scale_common import llama_tokenizer_dir, report

from lynx_zoo.cli import LynxCLI
from lynx_zoo.training.distributed import apply_activation_checkpointing
from lynx_zoo.training.optim import build_optimizer
from lynx_zoo.training.throughput import lynx_step_flops

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
VARIANTS = {
    "pt224": [CONFIGS / "pt_vicuna_420.yaml", CONFIGS / "grid" / "pt_vicuna_224.yaml"],
    "pt420": [CONFIGS / "pt_vicuna_420.yaml"],
    "ca420": [CONFIGS / "pt_vicuna_420.yaml", CONFIGS / "grid" / "ca_vicuna_420.yaml"],
}


def build(variant: str) -> Any:
    """The model of a shipped config with random weights, on the GPU."""
    args = [a for path in VARIANTS[variant] for a in ("--config", str(path))] + [
        "--model.init_args.vision.pretrained=false",
        '--model.init_args.vision={"checkpoint_path": null}',  # random weights: no EVA file
        "--model.init_args.llm.pretrained=false",
        f"--model.init_args.llm.tokenizer={llama_tokenizer_dir()}",
        "--trainer.accelerator=cpu",  # the CLI's trainer is not used
    ]
    with torch.device("cuda"):
        return LynxCLI(args=args, run=False).model


def measure(variant: str, checkpointing: bool, batch_size: int, text: int, steps: int, warmup: int, peak: float):
    model = build(variant)
    if checkpointing:
        apply_activation_checkpointing(model)
    model.train()
    optimizer, _ = build_optimizer(model.trainable_parameters(), steps, model.optimizer_config)
    size = model.vision_config.image_size
    ids = torch.randint(4, 32000, (batch_size, text), device="cuda")
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "images": torch.randn(batch_size, 3, size, size, device="cuda"),
        "labels": ids,
    }
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    step = statistics.median(times[warmup:])
    flops = lynx_step_flops(model, batch_size, text)
    visual = model.bridge.output_tokens(model.vision.num_tokens) if model.media_in_sequence else 0
    row = {
        "variant": variant,
        "activation_ckpt": checkpointing,
        "batch": batch_size,
        "llm_seq": text + visual,
        "step_s": step,
        "samples_per_s": batch_size / step,
        "llm_tokens_per_s": batch_size * (text + visual) / step,
        "model_TFLOP_per_step": flops / 1e12,
        "mfu": flops / step / (peak * 1e12),
        "peak_mem_GB": torch.cuda.max_memory_allocated() / 2**30,
    }
    del model, optimizer, batch, loss
    gc.collect()
    torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--text", type=int, default=512)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_full_size.py needs a CUDA GPU (about 80 GB for batch 4 at 420 px)")
    torch.backends.cuda.matmul.allow_tf32 = True
    rows = []
    for variant in args.variants:
        for checkpointing in (False, True):
            try:
                rows.append(
                    measure(variant, checkpointing, args.batch, args.text, args.steps, args.warmup, args.peak_tflops)
                )
            except torch.OutOfMemoryError:
                failed = {"variant": variant, "activation_ckpt": checkpointing, "batch": args.batch, "step_s": "OOM"}
                rows.append(failed)
                gc.collect()
                torch.cuda.empty_cache()
    columns = ["variant", "activation_ckpt", "batch", "llm_seq", "step_s", "samples_per_s", "llm_tokens_per_s",
               "model_TFLOP_per_step", "mfu", "peak_mem_GB"]  # fmt: skip
    report("gpu_full_size", rows, columns, settings=vars(args))


if __name__ == "__main__":
    main()
