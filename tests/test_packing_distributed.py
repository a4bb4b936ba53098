"""Packing on 2 gloo ranks (DDP, FSDP2): each sample read once across the ranks, and a run stopped mid-epoch and
resumed sees the same batches and reaches the same weights as the uninterrupted run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from media import save_photos, write_jsonl

TESTS = Path(__file__).resolve().parent
RUNS = ["pt-ddp", "pt-fsdp2", "ca-fsdp2"]
STEPS, STOP_AT = 6, 3  # packing_worker.py's


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("packed_runs")
    photos = save_photos(out / "data")
    images = [{"image": photos[i % 5], "question": "what is in the picture?", "answer": "a photograph of something "
               + "else " * (i % 7), "id": f"img{i}"} for i in range(60)]  # fmt: skip
    write_jsonl(out / "data" / "images.jsonl", images)
    texts = [{"instruction": "say a word " + "please " * (i % 5), "answer": f"word {i}", "id": f"txt{i}"}
             for i in range(30)]  # fmt: skip
    write_jsonl(out / "data" / "text.jsonl", texts)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS.parent), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run(
        [sys.executable, str(TESTS / "packing_worker.py"), str(out)], env=env, capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def steps(runs: Path, run: str, name: str, rank: int) -> list[dict]:
    return json.loads((runs / run / name / f"rank{rank}.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("run", RUNS)
def test_each_sample_is_read_once_across_the_ranks_in_packed_rows(runs, run):
    per_rank = [steps(runs, run, "full", rank) for rank in (0, 1)]
    assert [len(s) for s in per_rank] == [STEPS, STEPS]
    ids = [i for rank in per_rank for step in rank for i in step["ids"]]
    assert len(ids) == 2 * STEPS * 4 and len(set(ids)) == len(ids)  # 48 reads of 90 samples: none twice
    assert any(step["rows"] < len(step["ids"]) for rank in per_rank for step in rank)  # samples shared rows
    for step0, step1 in zip(*per_rank):  # the ranks of a step read the same source (one modality per step)
        assert {i[:3] for i in step0["ids"] + step1["ids"]} in ({"img"}, {"txt"})


@pytest.mark.slow
@pytest.mark.parametrize("run", RUNS)
def test_a_packed_run_stopped_mid_epoch_resumes_exactly(runs, run):
    for rank in (0, 1):
        full, stop, resumed = (steps(runs, run, name, rank) for name in ("full", "stop", "resumed"))
        assert [s["ids"] for s in stop] == [s["ids"] for s in full[:STOP_AT]]
        assert [s["ids"] for s in resumed] == [s["ids"] for s in full[STOP_AT:]]  # nothing repeated or missed
        assert [s["loss"] for s in resumed] == pytest.approx([s["loss"] for s in full[STOP_AT:]], rel=1e-6)
    full, resumed = (torch.load(runs / run / name / "state.pt", weights_only=True) for name in ("full", "resumed"))
    assert full["step"] == resumed["step"] == STEPS
    for name, value in full["state"].items():
        torch.testing.assert_close(
            resumed["state"][name], value, rtol=1e-6, atol=1e-7, msg=lambda m, name=name: f"{name}: {m}"
        )
