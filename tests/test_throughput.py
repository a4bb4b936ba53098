"""The FLOP formula against torch's FLOP counter, and throughput/MFU logged during a fit."""

from __future__ import annotations

import csv

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.flop_counter import FlopCounterMode

from lynx_zoo import CrossAttnConfig, CrossAttnLynx, PrefixLynx, ShapesVQADataModule
from lynx_zoo.training.throughput import LynxThroughputMonitor, lynx_step_flops

WIDER_LLM = dict(
    model_type="llama",
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=256,
)


@pytest.mark.parametrize(
    "cls, llm_trainable",
    [(PrefixLynx, False), (PrefixLynx, True), (CrossAttnLynx, False)],
    ids=["pt_frozen_llm", "pt_trainable_llm", "ca_frozen_llm"],
)
@pytest.mark.slow
def test_step_flops_match_torch_flop_counter(make_tiny, cls, llm_trainable):
    extra = dict(cross_attn=CrossAttnConfig(every=2, start=1, num_heads=4, head_dim=32)) if cls is CrossAttnLynx else {}
    model = make_tiny(
        cls,
        llm=dict(config=WIDER_LLM, trainable=llm_trainable),
        bridge=dict(num_queries=16, num_heads=4, head_dim=32),
        **extra,
    )
    ids = torch.randint(4, 30, (2, 64))
    batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), images=torch.randn(2, 3, 32, 32), labels=ids)
    with FlopCounterMode(display=False) as forward:
        model(**batch)
    with FlopCounterMode(display=False) as step:
        model(**batch).loss.backward()
    assert lynx_step_flops(model, 2, 64, backward=False) == pytest.approx(forward.get_total_flops(), rel=0.06)
    assert lynx_step_flops(model, 2, 64) == pytest.approx(step.get_total_flops(), rel=0.06)
    # a frozen LLM's backward costs its input gradients only: far less than 6 N T
    ratio = step.get_total_flops() / forward.get_total_flops()
    assert (2.0 < ratio < 2.3) if not llm_trainable else (2.8 < ratio < 3.1)


@pytest.mark.slow
def test_throughput_and_mfu_are_logged_during_fit(make_tiny, shapes_root, tmp_path):
    model = make_tiny()
    data = ShapesVQADataModule(
        root=str(shapes_root), num_train=64, num_val=16, image_size=32, batch_size=8, num_workers=0
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=4,
        log_every_n_steps=1,
        logger=CSVLogger(tmp_path),
        callbacks=[LynxThroughputMonitor(window_size=2, peak_flops=1e12)],
        limit_val_batches=0,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(model, data)
    rows = list(csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))))
    logged = {k for row in rows for k, v in row.items() if v}
    for key in ("samples_per_sec", "items_per_sec", "flops_per_sec", "mfu"):
        assert f"train/device/{key}" in logged, sorted(logged)
    mfu = [float(row["train/device/mfu"]) for row in rows if row.get("train/device/mfu")]
    assert all(0 < value < 1 for value in mfu)
