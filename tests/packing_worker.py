"""Runs the packed-mixture scenarios of tests/test_packing_distributed.py: ``python tests/packing_worker.py OUT``.

Lightning's launcher re-runs this script once per extra process (gloo on CPU). On 2 processes it trains tiny models
on a mixture of images and text-only samples packed into rows (``pack_tokens``), each run from the same weights:

* ``full``: 6 steps (an epoch of 4 steps, then 2 of the next);
* ``stop``: the same run stopped after step 3 (mid-epoch) with a checkpoint;
* ``resumed``: a fresh trainer resumed from that checkpoint up to step 6.

For PT under DDP, and PT and CA under FSDP2 (``LynxFSDP2Strategy``). Each rank writes the sample ids of every step
and the losses to ``OUT/<run>/rank<R>.json``; rank 0 writes the final (consolidated) weights to
``OUT/<run>/state.pt``. The data (``OUT/data``) is written by the test.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fsdp_worker import build  # noqa: E402  (the same tiny PT and CA, seeded)
from run_helpers import StopAt  # noqa: E402

from lynx_zoo.data import ImageTextSource, MixtureDataModule, TextSource  # noqa: E402
from lynx_zoo.training.distributed import LynxFSDP2Strategy  # noqa: E402

STEPS, STOP_AT, BATCHES_PER_EPOCH, PACK_TOKENS = 6, 3, 4, 64


class StepRecorder(L.Callback):
    """Each step's sample ids, rows and loss on this rank."""

    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any, i: int):
        rows = int(batch["input_ids"].shape[0])
        self.steps.append({"ids": list(batch["ids"]), "rows": rows, "loss": float(outputs["loss"].detach())})


def data(root: Path) -> MixtureDataModule:
    sources = [
        ImageTextSource(str(root / "images.jsonl"), name="images", ratio=0.7, task="vqa"),
        TextSource(str(root / "text.jsonl"), name="text", ratio=0.3),
    ]
    return MixtureDataModule(
        sources, batch_size=4, batches_per_epoch=BATCHES_PER_EPOCH, num_workers=0, seed=4, pack_tokens=PACK_TOKENS
    )


def fit(fusion: str, strategy: str, out: Path, name: str, ckpt_in: Path | None = None) -> None:
    run = out / f"{fusion}-{strategy}" / name
    run.mkdir(parents=True, exist_ok=True)
    model = build(fusion)
    recorder = StepRecorder()
    callbacks: list[L.Callback] = [recorder]
    if name == "stop":
        callbacks += [ModelCheckpoint(dirpath=run, filename="stop", every_n_train_steps=STOP_AT), StopAt(STOP_AT)]
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp" if strategy == "ddp" else LynxFSDP2Strategy(param_dtype=None),
        max_steps=STEPS,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=name == "stop",
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=run,
    )
    trainer.fit(model, data(out / "data"), ckpt_path=ckpt_in)
    (run / f"rank{trainer.global_rank}.json").write_text(json.dumps(recorder.steps))
    if strategy == "fsdp2":
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        state = model.state_dict()
    if trainer.global_rank == 0:
        torch.save({"state": state, "step": trainer.global_step}, run / "state.pt")


def main() -> None:
    out = Path(sys.argv[1])
    for fusion, strategy in (("pt", "ddp"), ("pt", "fsdp2"), ("ca", "fsdp2")):
        fit(fusion, strategy, out, "full")
        fit(fusion, strategy, out, "stop")
        fit(fusion, strategy, out, "resumed", ckpt_in=out / f"{fusion}-{strategy}" / "stop" / "stop.ckpt")


if __name__ == "__main__":
    main()
