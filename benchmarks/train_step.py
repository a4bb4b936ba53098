"""Training step time: lynx_zoo through the Lightning Trainer vs a bare PyTorch loop over the same model vs HF
transformers' ``LlavaForConditionalGeneration`` of the same shapes (random weights, no download).

All three train the same thing: a frozen vision tower (196 patch tokens at 224 px), a trainable MLP projector
and a frozen 8-layer width-512 LLaMA (32,000-token vocabulary), AdamW, on the same batches (``--batch`` samples
of ``--text`` text tokens, every text token a target). They run in turns in one process (``--rounds`` rounds
of ``--steps`` steps each, the first ``--warmup`` steps of each turn not counted); the table shows medians.

    python benchmarks/train_step.py            # CPU: a few minutes on 2 cores
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import lightning as L
import torch
from scale_common import image_tokens, llava_inputs, llava_model, lynx_model, report
from torch.utils.data import DataLoader

from lynx_zoo.data.processor import IGNORE_INDEX
from lynx_zoo.training.optim import build_optimizer


class StepTimes(L.Callback):
    """Wall time between consecutive ends of training batches (everything the loop does for one step)."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if not self.ends:
            self.ends.append(time.perf_counter())

    def on_train_batch_end(self, *args: Any) -> None:
        self.ends.append(time.perf_counter())

    def times(self) -> list[float]:
        return [b - a for a, b in zip(self.ends, self.ends[1:])]


def lightning_turn(model: Any, batch: dict[str, torch.Tensor], steps: int) -> list[float]:
    timer = StepTimes()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        callbacks=[timer],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, train_dataloaders=DataLoader([batch] * steps, batch_size=None))
    return timer.times()


def loop_turn(model: Any, batch: dict[str, torch.Tensor], steps: int, config: Any) -> list[float]:
    """The bare loop: forward, backward, AdamW step, schedule step, zero grads."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer, scheduler = build_optimizer(params, steps, config)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--text", type=int, default=32)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
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

    times: dict[str, list[float]] = {"lynx_zoo (Lightning Trainer)": [], "bare PyTorch loop": [], "HF LLaVA loop": []}
    for _ in range(args.rounds):
        turns = (
            lightning_turn(lynx, batch, args.steps),
            loop_turn(bare, batch, args.steps, lynx.optimizer_config),
            loop_turn(llava, hf_batch, args.steps, lynx.optimizer_config),
        )
        for name, measured in zip(times, turns):
            times[name] += measured[args.warmup :]

    def count(model: Any, trainable: bool | None = None) -> int:
        return sum(p.numel() for p in model.parameters() if trainable is None or p.requires_grad == trainable)

    models = {"lynx_zoo (Lightning Trainer)": lynx, "bare PyTorch loop": bare, "HF LLaVA loop": llava}
    base = statistics.median(times["bare PyTorch loop"])
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
