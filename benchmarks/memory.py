"""Memory per rank: FSDP2 (``LynxFSDP2Strategy``) on 2 CPU processes (gloo) vs 1 process without sharding.

The model is that of benchmarks/train_step.py with its LLM trainable (so that gradients and AdamW state are
large): per rank, the bytes of parameters, gradients and optimizer state it holds (local shards) after a few
training steps, and the peak resident memory of the process (which includes torch's own ~0.5 GB).

    python benchmarks/memory.py
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
from scale_common import lynx_model, measuring_trainer, report
from torch.utils.data import DataLoader

from lynx_zoo.training.distributed import LynxFSDP2Strategy


def local_bytes(tensors: list[torch.Tensor]) -> int:
    return sum((t.to_local() if hasattr(t, "to_local") else t).nbytes for t in tensors)


class Measure(L.Callback):
    """Bytes held by this rank right before the last optimizer step (gradients present, optimizer state built)."""

    def __init__(self) -> None:
        self.facts: dict[str, Any] = {}

    def on_before_optimizer_step(self, trainer: L.Trainer, module: L.LightningModule, optimizer: Any) -> None:
        params = list(module.parameters())
        states = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.ndim > 0]
        self.facts = {
            "param_MB": local_bytes(params) / 2**20,
            "grad_MB": local_bytes([p.grad for p in params if p.grad is not None]) / 2**20,
            "optimizer_MB": local_bytes(states) / 2**20,
        }


def worker(devices: int, out: Path) -> None:
    model = lynx_model(llm_trainable=True)
    measure = Measure()
    strategy = LynxFSDP2Strategy(param_dtype=None) if devices > 1 else "auto"
    trainer = measuring_trainer(3, measure, devices=devices, strategy=strategy, use_distributed_sampler=False)
    ids = torch.randint(4, len(model.tokenizer), (2, 16))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "images": torch.randn(2, 3, 224, 224)}
    trainer.fit(model, DataLoader([{**batch, "labels": ids}] * 3, batch_size=None))
    facts = measure.facts | {"peak_rss_MB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    facts["state_MB"] = facts["param_MB"] + facts["grad_MB"] + facts["optimizer_MB"]
    everyone = [facts]
    if devices > 1:
        everyone = [None] * devices
        torch.distributed.all_gather_object(everyone, facts)
    if trainer.global_rank == 0:
        out.write_text(json.dumps(everyone))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.out)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for devices in (1, 2):
            out = Path(tmp) / f"{devices}.json"
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            command = [sys.executable, __file__, "--worker", str(devices), "--out", str(out)]
            subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
            for rank, facts in enumerate(json.loads(out.read_text())):
                run = "1 process" if devices == 1 else "FSDP2, 2 processes"
                rows.append({"run": run, "rank": rank, **facts})
    single = rows[0]["state_MB"]
    for row in rows:
        row["state_vs_1_process"] = row["state_MB"] / single
    columns = ["run", "rank", "param_MB", "grad_MB", "optimizer_MB", "state_MB", "state_vs_1_process", "peak_rss_MB"]
    report("memory", rows, columns)


if __name__ == "__main__":
    main()
