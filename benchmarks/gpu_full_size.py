"""Full-size Lynx on one GPU with random weights: tokens/s, MFU and peak memory of a training step for PT Vicuna-7B at
224 and 420 px and CA Vicuna-7B at 420 px, with and without activation checkpointing, on four input paths:

* ``fixed_full_logits``: ``--batch`` samples of ``--text`` text tokens, every token a target, the logits of every
  position (the earlier measurement of this script);
* ``padded_full_logits``, ``padded_answer_only``, ``packed``: the same ``--samples`` instruction samples shaped like
  LLaVA-665K (``train_throughput.make_samples``: heavy-tailed lengths, answers only as targets; an image round, as
  batches hold one modality), left-padded with every position's logits, left-padded with the answer-only loss, and
  packed into rows of ``--pack-tokens`` with the answer-only loss.

The models are the shipped configs (configs/pt_vicuna_420.yaml and its grid overlays) with ``pretrained: false``
(no download: the LLaMA tokenizer comes from the mistral-common wheel), built directly on the device: frozen bf16
Vicuna-7B, frozen fp32 EVA ViT-g/14, trainable fp32 resampler and adapters (PT) or cross-attention blocks (CA),
AdamW, bf16 autocast.

MFU = model FLOPs of the step / step time / the GPU's dense bf16 peak (``--peak-tflops``, default 989: H100 SXM and
H200). The model FLOPs (``lynx_step_flops``: forward ``2 N T`` per part plus attention, backward ``2x`` for trainable
parts, ``1x`` for frozen parts that gradients cross) count the useful work only: each sample's real tokens with
attention inside the sample, and for the realistic paths the LM head on the target tokens. The three realistic paths
count the same FLOPs, so their MFU compares their speed.

    python benchmarks/gpu_full_size.py                       # all variants and paths, with and without checkpointing
    python benchmarks/gpu_full_size.py --variants pt420 --paths packed --samples 32
    python benchmarks/gpu_full_size.py --device cpu --variants tiny --steps 2 --warmup 1   # a check without a GPU

Not run in this repository's CI (it needs a GPU with ~80 GB); its results go to results/gpu_full_size.json.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from scale_common import llama_tokenizer_dir, report
from train_throughput import make_samples

from lynx_zoo.data.packing import PackingCollate, samples_in
from lynx_zoo.fusion.base import model_inputs
from lynx_zoo.fusion.scale_out import apply_activation_checkpointing
from lynx_zoo.optim import build_optimizer
from lynx_zoo.training.lightning_cli import LynxCLI
from lynx_zoo.training.throughput import lynx_step_flops, target_tokens_of, text_lengths_of

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
VARIANTS = {
    "pt224": [CONFIGS / "pt_vicuna_420.yaml", CONFIGS / "grid" / "pt_vicuna_224.yaml"],
    "pt420": [CONFIGS / "pt_vicuna_420.yaml"],
    "ca420": [CONFIGS / "pt_vicuna_420.yaml", CONFIGS / "grid" / "ca_vicuna_420.yaml"],
    "tiny": [CONFIGS / "tiny.yaml"],  # for checking the script on a CPU
}
PATHS = ("fixed_full_logits", "padded_full_logits", "padded_answer_only", "packed")


def build(variant: str, device: str) -> Any:
    """The model of a shipped config with random weights, on ``device``."""
    args = [a for path in VARIANTS[variant] for a in ("--config", str(path))] + [
        "--model.init_args.vision.pretrained=false",
        '--model.init_args.vision={"checkpoint_path": null}',  # random weights: no EVA file
        "--model.init_args.llm.pretrained=false",
        f"--model.init_args.llm.tokenizer={llama_tokenizer_dir()}",
        "--trainer.accelerator=cpu",  # the CLI's trainer is not used
    ]
    with torch.device(device):
        return LynxCLI(args=args, run=False).model


def step_inputs(path: str, model: Any, args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any], float]:
    """The batch of ``path`` (on the device), its collated form (for counting) and its model FLOPs."""
    size, device = model.vision_config.image_size, args.device
    if path == "fixed_full_logits":
        ids = torch.randint(4, len(model.tokenizer), (args.batch, args.text))
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids,
                 "images": torch.randn(args.batch, 3, size, size)}  # fmt: skip
        flops = lynx_step_flops(model, args.batch, args.text)
        inputs = {**model_inputs(batch), "return_logits": True}
    else:
        # an image round (batches hold one modality, as the grouped sampler and the mixture draw them)
        drawn = make_samples(2 * args.samples, 0, model.processor, size)
        samples = [s for s in drawn if s.image is not None][: args.samples]
        if path == "packed":
            batch = PackingCollate(model.processor, args.pack_tokens, model.media_tokens_in_sequence)(samples)
        else:
            batch = model.processor(samples)
        # the same useful work on every realistic path: real tokens, attention in each sample, the head on targets
        lengths = text_lengths_of(model.processor(samples), model)
        flops = lynx_step_flops(model, len(lengths), 0, text_lengths=lengths, head_tokens=target_tokens_of(batch))
        inputs = {**model_inputs(batch), "return_logits": path == "padded_full_logits"}
    on_device = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    if "packed" in on_device:
        packed = on_device["packed"]
        packed.segment_ids, packed.position_ids = packed.segment_ids.to(device), packed.position_ids.to(device)
    return on_device, batch, flops


def measure(variant: str, path: str, checkpointing: bool, args: argparse.Namespace) -> dict[str, Any]:
    cuda = args.device.startswith("cuda")
    model = build(variant, args.device)
    if checkpointing:
        apply_activation_checkpointing(model)
    model.train()
    optimizer, _ = build_optimizer(model.trainable_parameters(), args.steps, model.optimizer_config)
    inputs, batch, flops = step_inputs(path, model, args)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    times = []
    for _ in range(args.steps):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        with autocast:
            loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    step = statistics.median(times[args.warmup :])
    samples = samples_in(batch)
    mask = batch["attention_mask"]
    row = {
        "variant": variant,
        "path": path,
        "activation_ckpt": checkpointing,
        "samples": samples,
        "rows_x_length": f"{mask.shape[0]}x{mask.shape[1]}",
        "step_s": step,
        "samples_per_s": samples / step,
        "target_tokens_per_s": target_tokens_of(batch) / step,
        "model_TFLOP_per_step": flops / 1e12,
        "mfu": flops / step / (args.peak_tflops * 1e12),
        "peak_mem_GB": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
    }
    del model, optimizer, inputs, loss
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=["pt224", "pt420", "ca420"], choices=list(VARIANTS))
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    parser.add_argument("--batch", type=int, default=4, help="samples of the fixed path")
    parser.add_argument("--text", type=int, default=512, help="text tokens of each sample of the fixed path")
    parser.add_argument("--samples", type=int, default=16, help="samples of the realistic paths")
    parser.add_argument("--pack-tokens", type=int, default=2048, help="LLM tokens per packed row")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--no-checkpointing-comparison", action="store_true", help="only without checkpointing")
    args = parser.parse_args()
    if args.device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SystemExit("gpu_full_size.py needs a CUDA GPU (about 80 GB at 420 px); --device cpu checks it")
        torch.backends.cuda.matmul.allow_tf32 = True
    rows = []
    for variant in args.variants:
        for path in args.paths:
            for checkpointing in (False,) if args.no_checkpointing_comparison else (False, True):
                try:
                    rows.append(measure(variant, path, checkpointing, args))
                except torch.OutOfMemoryError:
                    rows.append({"variant": variant, "path": path, "activation_ckpt": checkpointing, "step_s": "OOM"})
                    gc.collect()
                    torch.cuda.empty_cache()
                print(rows[-1], flush=True)
    columns = ["variant", "path", "activation_ckpt", "samples", "rows_x_length", "step_s", "samples_per_s",
               "target_tokens_per_s", "model_TFLOP_per_step", "mfu", "peak_mem_GB"]  # fmt: skip
    report("gpu_full_size" if args.device.startswith("cuda") else "gpu_full_size_cpu_check", rows, columns,
           settings=vars(args))  # fmt: skip


if __name__ == "__main__":
    main()
