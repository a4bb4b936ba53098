"""``ExportVariant``: export and register the trained model locally when ``fit`` ends."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from lynx_zoo.hub.export import export_variant, full_state_dict
from lynx_zoo.hub.variants import register_local, variants_home


def run_variant_name(default_root_dir: str) -> str:
    """``runs/demo`` -> ``lynx-demo``, ``runs/demo_ca`` -> ``lynx-demo-ca``, ``runs/lynx_stage2`` -> ``lynx-stage2``
    (the ids of the variants table)."""
    name = Path(default_root_dir).name.replace("_", "-")
    return name if name.startswith("lynx-") else f"lynx-{name}"


class ExportVariant(L.Callback):
    """When ``fit`` finishes, export the model as a variant folder and register it under ``name``, so that
    ``lynx_zoo.load_model(name)`` loads it. Under FSDP2 the full weights are gathered first.

    Args:
        name: the variant name (default: the run folder's name with ``-`` for ``_``, prefixed ``lynx-``,
            e.g. ``runs/demo`` -> ``lynx-demo``; config overlays that change the run folder get their own name).
        out: the folder to write (default: ``$LYNX_ZOO_VARIANTS/<name>``, see ``lynx_zoo.hub.variants``).
    """

    def __init__(self, name: str | None = None, out: str | None = None) -> None:
        self.name = name
        self.out = out

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.interrupted:
            return
        # every rank takes part in gathering a sharded (FSDP2) model's weights; rank 0 writes them
        state = full_state_dict(pl_module)
        if not trainer.is_global_zero:
            return
        name = self.name or run_variant_name(trainer.default_root_dir)
        out = Path(self.out) if self.out else variants_home() / name
        folder = export_variant(pl_module, out, name=name, state=state)
        register_local(name, folder)
        rank_zero_info(f"Exported variant {name!r} to {folder}: lynx_zoo.load_model({name!r})")
