"""Callbacks of the zoo."""

from __future__ import annotations

from collections import Counter
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from lynx_zoo.data.answers import metric_key, normalize_answer


def majority_rates(records: list[dict]) -> dict[str, float]:
    """Per category, the share of the most frequent answer: what always guessing it would score."""
    answers: dict[str, Counter] = {}
    for record in records:
        category = metric_key(str(record.get("category") or ""))
        answers.setdefault(category, Counter())[normalize_answer(record["answer"])] += 1
    return {c: counts.most_common(1)[0][1] / sum(counts.values()) for c, counts in answers.items()}


class HeldOutReport(L.Callback):
    """At the end of ``fit``, print the last held-out accuracy per category next to the chance level
    (the majority-answer rate of that category in the held-out split)."""

    def __init__(self) -> None:
        self.accuracy: dict[str, float] = {}

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.accuracy = {
            key.removeprefix("val/acc/"): float(value)
            for key, value in trainer.callback_metrics.items()
            if key.startswith("val/acc/")
        }

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        val_set = getattr(trainer.datamodule, "val_set", None)
        if not self.accuracy or val_set is None:
            return
        chance = majority_rates(val_set.records)
        limited = trainer.limit_val_batches != 1.0
        scope = "a part of" if limited else "all"
        lines = [
            f"Held-out accuracy after {trainer.global_step} steps ({scope} the {len(val_set)} held-out questions):",
            f"  {'category':<12}{'accuracy':>10}{'chance':>10}",
        ]
        for category in sorted(self.accuracy):
            lines.append(f"  {category:<12}{self.accuracy[category]:>10.3f}{chance.get(category, float('nan')):>10.3f}")
        rank_zero_info("\n".join(lines))


class SkippedSampleReport(L.Callback):
    """Unreadable and truncated training samples, as the DataModule's collate counts them in each batch: logs
    ``data/skipped`` and ``data/truncated`` per epoch (summed over ranks) and, at each epoch's end,
    ``data/skipped/<source>/<reason>`` with a one-line summary. Every lynx_zoo model adds it
    (``LynxModel.configure_callbacks``)."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()  # this epoch's unreadable samples by source/reason (this rank)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not isinstance(batch, dict):
            return
        self.counts.update(batch.get("skipped", {}))
        for key in ("skipped", "truncated"):
            value = float(batch.get(f"num_{key}", 0))
            pl_module.log(
                f"data/{key}", value, reduce_fx="sum", on_step=False, on_epoch=True, batch_size=1, sync_dist=True
            )

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        counts, self.counts = self.counts, Counter()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[dict[str, int]] = [{} for _ in range(torch.distributed.get_world_size())]
            torch.distributed.all_gather_object(gathered, dict(counts))
            counts = sum((Counter(g) for g in gathered), Counter())
        for key, count in sorted(counts.items()):
            pl_module.log(f"data/skipped/{key}", float(count), rank_zero_only=True)
        if counts:
            listed = ", ".join(f"{key}: {count}" for key, count in sorted(counts.items()))
            rank_zero_info(
                f"epoch {trainer.current_epoch}: skipped {sum(counts.values())} unreadable samples ({listed})"
            )
