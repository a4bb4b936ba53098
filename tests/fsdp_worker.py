"""Runs the FSDP2 scenarios of tests/test_distributed.py: ``python tests/fsdp_worker.py OUT [FUSION ...]``.

Lightning's launcher re-runs this script once per extra process (gloo on CPU). On 2 processes it trains a
tiny PT, a tiny CA and a tiny PT model with LoRA adapters (peft) these ways, each from the same initial weights
and data:

* ``full``: 4 steps without a stop; per step, the loss (mean over ranks) and the final weights (consolidated);
  also the local share of the parameters and of the optimizer state, and which parameters got gradients;
* ``stop``: the same run stopped after step 2 and saved as a sharded checkpoint;
* ``resumed``: a fresh process state resumed from that checkpoint up to step 4;
* ``ckpt``: the ``full`` run with activation checkpointing of the decoder layers;
* ``unreadable`` / ``unreadable_ddp`` (PT, FSDP2 / DDP): rank 1's first batch has no sample left.

The ``full`` run also exports its variant (``ExportVariant``, gathered from the shards) to ``full-variant/``.

``fit(fusion, 1, ...)`` is the reference: the whole global batch in one process, no FSDP.
Results go to ``OUT/<fusion>/<run>.pt`` (written by rank 0).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.utils.data import DataLoader, Dataset, DistributedSampler, default_collate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import tiny_configs  # noqa: E402

from lynx_zoo import AdapterConfig, CrossAttnConfig, CrossAttnLynx, PrefixLynx  # noqa: E402
from lynx_zoo.data.processor import IGNORE_INDEX  # noqa: E402
from lynx_zoo.hub import ExportVariant  # noqa: E402
from lynx_zoo.training.distributed import LynxFSDP2Strategy, local_parameter_count  # noqa: E402

GLOBAL_BATCH, NUM_SAMPLES, TEXT_LEN, PAD, STEPS, STOP_AT = 8, 16, 12, 3, 4, 2


class FixedLengthSet(Dataset):
    """Random token sequences of one length behind the same left padding, every real token a target: each
    rank's mean loss weighs its samples as the single process's mean over the global batch does."""

    def __init__(self, vocab: int, image_size: int) -> None:
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(4, vocab, (NUM_SAMPLES, TEXT_LEN), generator=g)
        self.images = torch.randn(NUM_SAMPLES, 3, image_size, image_size, generator=g)

    def __len__(self) -> int:
        return NUM_SAMPLES

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.ids[i]
        mask = torch.ones_like(ids)
        mask[:PAD] = 0
        labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels, "images": self.images[i]}


class FixedLengthData(L.LightningDataModule):
    """Shuffled by epoch with one permutation for any world size: rank ``r`` of ``w`` reads every ``w``-th
    sample of it, so ``w`` ranks with batch ``8 / w`` see the single process's batches of 8. With
    ``unreadable_on_rank``, that rank's first batch lost every sample (as when all its images are corrupt)."""

    def __init__(self, data: Dataset, unreadable_on_rank: int | None = None) -> None:
        super().__init__()
        self.data = data
        self.unreadable_on_rank = unreadable_on_rank

    def train_dataloader(self) -> DataLoader:
        world, rank = self.trainer.world_size, self.trainer.global_rank
        sampler = DistributedSampler(self.data, num_replicas=world, rank=rank, shuffle=True, seed=0)
        collate = EmptyFirstBatch() if rank == self.unreadable_on_rank else None
        return DataLoader(self.data, batch_size=GLOBAL_BATCH // world, sampler=sampler, collate_fn=collate)


class EmptyFirstBatch:
    """Collates as usual, but the first batch comes out with no sample left."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        batch = default_collate(samples)
        self.calls += 1
        return {k: v[:0] for k, v in batch.items()} if self.calls == 1 else batch


FUSIONS = ("pt", "ca", "lora")
LORA = AdapterConfig(kind="lora", every=1, rank=4, target_modules=("q_proj", "v_proj", "down_proj"))


def build(fusion: str) -> L.LightningModule:
    L.seed_everything(0, verbose=False)
    if fusion == "pt":
        return PrefixLynx(**tiny_configs())
    if fusion == "lora":
        model = PrefixLynx(**tiny_configs(adapters=LORA))
        with torch.no_grad():  # B starts at zero (no update yet): give the updates a value, as after some training
            for name, param in model.named_parameters():
                if ".lora_B." in name:
                    param.normal_(0, 0.1)
        return model
    return CrossAttnLynx(**tiny_configs(), cross_attn=CrossAttnConfig(every=2, start=1, num_heads=2, head_dim=8))


class Recorder(L.Callback):
    """Losses (mean over ranks) per step; on the first step, which parameters have gradients and how much of
    the optimizer state this rank holds; optionally stop after ``stop_at`` steps."""

    def __init__(self, stop_at: int | None = None) -> None:
        self.losses: list[float] = []
        self.facts: dict[str, Any] = {}
        self.stop_at = stop_at

    def on_before_optimizer_step(self, trainer: L.Trainer, module: L.LightningModule, optimizer: Any) -> None:
        if self.facts:
            return
        params = list(module.named_parameters())
        self.facts["frozen_with_grad"] = [n for n, p in params if not p.requires_grad and p.grad is not None]
        self.facts["trainable_without_grad"] = [n for n, p in params if p.requires_grad and p.grad is None]

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, *args: Any) -> None:
        self.losses.append(float(trainer.strategy.reduce(outputs["loss"].detach(), reduce_op="mean")))
        if len(self.losses) == 1:
            optimizer = trainer.optimizers[0]
            states = [s["exp_avg"] for s in optimizer.state.values()]
            local = [s.to_local().numel() if hasattr(s, "to_local") else s.numel() for s in states]
            trainable = [p for p in module.parameters() if p.requires_grad]
            self.facts.update(
                optimizer_states=len(states),
                trainable_params=len(trainable),
                optimizer_local=sum(local),
                optimizer_total=sum(s.numel() for s in states),
                params_local_total=local_parameter_count(module),
            )
        if self.stop_at is not None and trainer.global_step >= self.stop_at:
            trainer.should_stop = True


def fit(
    fusion: str,
    devices: int,
    out: Path,
    name: str,
    ckpt_in: Path | None = None,
    ddp: bool = False,
    unreadable_on_rank: int | None = None,
    **strategy: Any,
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model = build(fusion)
    stop_at = STOP_AT if name == "stop" else None
    recorder = Recorder(stop_at)
    # the stopped run checkpoints as a real run does, at the end of its epoch (STOP_AT = one epoch)
    saver = ModelCheckpoint(dirpath=out, filename="stop", save_on_train_epoch_end=True) if stop_at else None
    # the full run exports its variant as ExportVariant does in the configs: gathered from the shards
    exporter = (
        ExportVariant(name=f"{fusion}-{name}", out=str(out / f"{name}-variant"))
        if name == "full" and devices > 1
        else None
    )
    if devices == 1:
        strategy_used: Any = "auto"
    else:
        strategy_used = "ddp" if ddp else LynxFSDP2Strategy(param_dtype=None, **strategy)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy_used,
        max_epochs=STEPS // STOP_AT,  # epoch-based: Lightning resumes an epoch-end checkpoint at the next epoch
        gradient_clip_val=1.0,
        callbacks=[recorder] + [c for c in (saver, exporter) if c is not None],
        logger=False,
        enable_checkpointing=saver is not None,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=out,
        use_distributed_sampler=False,
    )
    data = FixedLengthData(FixedLengthSet(len(model.tokenizer), model.vision_config.image_size), unreadable_on_rank)
    trainer.fit(model, data, ckpt_path=ckpt_in)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options) if devices > 1 and not ddp else model.state_dict()
    if trainer.global_rank == 0:
        result = {"losses": recorder.losses, "state": state, "facts": recorder.facts, "step": trainer.global_step}
        torch.save(result, out / f"{name}.pt")


def main() -> None:
    out = Path(sys.argv[1])
    for fusion in sys.argv[2:] or FUSIONS:
        run = out / fusion
        fit(fusion, 2, run, "full")
        fit(fusion, 2, run, "stop")
        fit(fusion, 2, run, "resumed", ckpt_in=run / "stop.ckpt")
        # adapters (and cross-attention blocks, FSDP units of their own) inside the checkpointed layers
        fit(fusion, 2, run, "ckpt", activation_checkpointing=True)
    if "pt" in (sys.argv[2:] or FUSIONS):
        # a rank whose batch lost every sample still takes part in the collectives (else the other rank waits forever)
        fit("pt", 2, out / "pt", "unreadable", unreadable_on_rank=1)
        fit("pt", 2, out / "pt", "unreadable_ddp", ddp=True, unreadable_on_rank=1)


if __name__ == "__main__":
    main()
