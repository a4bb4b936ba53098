"""Training step time: lynx_zoo through the Lightning Trainer vs a bare PyTorch loop over the same model vs HF
transformers' ``LlavaForConditionalGeneration`` of the same shapes (random weights, no download).

All three train the same thing: a frozen vision tower (196 patch tokens at 224 px), a trainable MLP projector
and a frozen 8-layer width-512 LLaMA (32,000-token vocabulary), AdamW, on the same batches (``--batch`` samples
of ``--text`` text tokens, every text token a target), interleaved step by step in one process (a Lightning
step, then a step of each bare loop; the first ``--warmup`` steps not counted); the table shows medians.

    python benchmarks/train_step.py            # CPU: a few minutes on 2 cores
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from scale_common import image_tokens, llava_inputs, llava_model, lynx_model, measuring_trainer, report
from torch.utils.data import DataLoader

from lynx_zoo.data.processor import IGNORE_INDEX
from lynx_zoo.optim import build_optimizer

LIGHTNING, BARE, LLAVA = "lynx_zoo (Lightning Trainer)", "bare PyTorch loop (same model)", "HF LLaVA loop"


class Interleave(L.Callback):
    """After each Lightning step, one step of each bare loop; each timed on its own. A Lightning step is the
    time from the return of this callback to the end of the next batch: everything the Trainer does for it."""

    def __init__(self, loops: dict[str, Callable[[], None]]) -> None:
        self.loops = loops
        self.times: dict[str, list[float]] = {LIGHTNING: [], **{name: [] for name in loops}}
        self.resumed: float | None = None

    def on_train_batch_end(self, *args: Any) -> None:
        if self.resumed is not None:
            self.times[LIGHTNING].append(time.perf_counter() - self.resumed)
        for name, step in self.loops.items():
            start = time.perf_counter()
            step()
            self.times[name].append(time.perf_counter() - start)
        self.resumed = time.perf_counter()

    def on_train_start(self, *args: Any) -> None:
        self.resumed = time.perf_counter()


def loop_step(model: Any, batch: dict[str, torch.Tensor], steps: int, config: Any) -> Callable[[], None]:
    """One step of the bare loop: forward, backward, AdamW step, schedule step, zero grads."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer, scheduler = build_optimizer(params, steps, config)

    def step() -> None:
        model(**batch).loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--text", type=int, default=32)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()

    lynx, bare = lynx_model(), lynx_model()
    vocab = len(lynx.tokenizer)
    llava = llava_model(vocab)
    for model in (bare, llava):
        model.train()
    llava.model.vision_tower.eval()
    llava.model.language_model.eval()

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, vocab, (args.batch, args.text), generator=g)
    mask = torch.ones_like(ids)
    images = torch.randn(args.batch, 3, 224, 224, generator=g)
    batch = {"input_ids": ids, "attention_mask": mask, "images": images, "labels": ids}
    hf = llava_inputs(ids, mask, llava.config.image_token_index)
    hf_labels = torch.cat([torch.full((args.batch, image_tokens()), IGNORE_INDEX), ids], dim=1)
    hf_batch = {**hf, "pixel_values": images, "labels": hf_labels}

    loops = {
        BARE: loop_step(bare, batch, args.steps, lynx.optimizer_config),
        LLAVA: loop_step(llava, hf_batch, args.steps, lynx.optimizer_config),
    }
    interleave = Interleave(loops)
    trainer = measuring_trainer(args.steps, interleave)
    trainer.fit(lynx, train_dataloaders=DataLoader([batch] * args.steps, batch_size=None))
    times = {name: measured[args.warmup :] for name, measured in interleave.times.items()}

    def count(model: Any, trainable: bool | None = None) -> int:
        return sum(p.numel() for p in model.parameters() if trainable is None or p.requires_grad == trainable)

    models = {LIGHTNING: lynx, BARE: bare, LLAVA: llava}
    base = statistics.median(times[BARE])
    rows = []
    for name, measured in times.items():
        median = statistics.median(measured)
        rows.append(
            {
                "run": name,
                "params": count(models[name]),
                "trainable": count(models[name], True),
                "median_step_s": median,
                "min_step_s": min(measured),
                "steps_measured": len(measured),
                "vs_bare_loop": median / base,
                "llm_tokens_per_s": args.batch * (args.text + image_tokens()) / median,
            }
        )
    report(
        "train_step",
        rows,
        [
            "run",
            "params",
            "trainable",
            "median_step_s",
            "min_step_s",
            "steps_measured",
            "vs_bare_loop",
            "llm_tokens_per_s",
        ],  # fmt: skip
        settings=vars(args) | {"llm_sequence": args.text + image_tokens()},
    )


if __name__ == "__main__":
    main()
