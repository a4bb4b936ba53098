"""Callbacks of the zoo."""

from __future__ import annotations

from collections import Counter

import lightning as L
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
