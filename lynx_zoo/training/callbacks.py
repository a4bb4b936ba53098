"""Callbacks of the zoo's runs (the one every model adds, for skipped samples, is the model's own:
:class:`~lynx_zoo.skipped_samples.SkippedSampleReport`)."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from lynx_zoo.data.answers import majority_rates


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
