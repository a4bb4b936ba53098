"""``python -m lynx_zoo stages``: a grid row under the paper's protocol (stage 1 at 224 px, stage 1 continued at
the row's resolution, stage 2), each stage from the last checkpoint of the one before, through the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from media import save_photos, write_jsonl

from lynx_zoo.cli import main
from lynx_zoo.data.sources import ImageTextSource, TextSource
from lynx_zoo.recipes.stages import has_text_data

REPO = Path(__file__).resolve().parents[1]
CA_TRAINABLE = REPO / "configs" / "grid" / "ca_vicuna_420_trainable_llm.yaml"


class CaptionsAsText(ImageTextSource):
    """A source of an outside package that declares its samples text-only."""

    text_only = True


def stages(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lynx_zoo", "stages", *args], cwd=REPO, capture_output=True, text=True, timeout=900
    )


def overlay(path: Path, content: dict) -> Path:
    path.write_text(yaml.safe_dump(content))
    return path


def mixture(manifests: dict[str, Path], text: Path | None = None, val: Path | None = None) -> dict:
    sources = [
        {"class_path": "ImageTextSource", "init_args": {"manifest": str(m), "name": n, "task": "vqa"}}
        for n, m in manifests.items()
    ]
    if text is not None:
        sources.append({"class_path": "TextSource", "init_args": {"manifest": str(text), "name": "text"}})
    init_args = {"sources": sources, "batch_size": 2, "batches_per_epoch": 2, "num_workers": 0}
    if val is not None:
        init_args["val_sources"] = [{"class_path": "ImageTextSource", "init_args": {"manifest": str(val), "name": "v"}}]
    return {"data": {"class_path": "MixtureDataModule", "init_args": init_args}}


@pytest.fixture
def tiny_row(tmp_path) -> dict:
    """The real CA trainable-LLM grid row on the tiny model; the tiny model's own resolution (48 px) stands in
    for the real base's 420, and tiny data overlays for the stage mixtures."""
    photos = save_photos(tmp_path)
    records = [{"image": p, "question": "what is shown?", "answer": p.split(".")[0]} for p in photos]
    vqa = write_jsonl(tmp_path / "vqa.jsonl", records)
    text = write_jsonl(tmp_path / "text.jsonl", [{"instruction": "what shape is a ball?", "answer": "circle"}])
    base = overlay(
        tmp_path / "tiny_48.yaml",
        # the release's sampled evaluation settings (seeded) run in stage 2's validation
        {"model": {"init_args": {"vision": {"image_size": 48}, "eval_generation": {"max_new_tokens": 2, "seed": 42}}}},
    )
    return dict(
        configs=[REPO / "configs" / "tiny.yaml", base, CA_TRAINABLE],
        stage1=overlay(tmp_path / "data1.yaml", mixture({"pairs": vqa})),
        stage2=overlay(tmp_path / "data2.yaml", mixture({"vqa": vqa}, text=text, val=vqa)),
        no_text=overlay(tmp_path / "no_text.yaml", mixture({"vqa": vqa})),
    )


def config_args(configs: list[Path]) -> list[str]:
    return [arg for c in configs for arg in ("--config", str(c))]


@pytest.mark.slow
def test_a_grid_row_runs_its_three_stages_through_the_cli(tiny_row, tmp_path):
    out = tmp_path / "run"
    extra = ["--", "--trainer.max_steps=2", "--trainer.limit_val_batches=1", "--trainer.log_every_n_steps=1"]
    result = stages(
        *config_args(tiny_row["configs"]),
        *("--out", str(out), "--stage1-data", str(tiny_row["stage1"]), "--stage2-data", str(tiny_row["stage2"])),
        *extra,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((out / "stages.json").read_text())
    assert [r["stage"] for r in record] == ["stage1_224", "stage1_420", "stage2"]
    ckpts = [torch.load(r["checkpoint"], map_location="cpu", weights_only=True) for r in record]
    # stage 1 at 224 px (28 x 28 patches of 8 px), then the row's 48 px (6 x 6), the position embedding resampled
    grids = [c["state_dict"]["vision.model.pos_embed"].shape[1] for c in ckpts]
    assert grids == [28 * 28 + 1, 6 * 6 + 1, 6 * 6 + 1]
    assert all(c["hyper_parameters"]["_class_path"].endswith("CrossAttnLynx") for c in ckpts)
    # each stage: its own steps and a fresh optimiser, started from the previous stage's last checkpoint
    assert [c["global_step"] for c in ckpts] == [2, 2, 2]
    assert all({int(s["step"]) for s in c["optimizer_states"][0]["state"].values()} == {2} for c in ckpts)
    inits = [yaml.safe_load((out / r["stage"] / "stage.yaml").read_text())["model"]["init_args"] for r in record]
    assert [i["init_from"] for i in inits] == [None, record[0]["checkpoint"], record[1]["checkpoint"]]
    # the learning rates of the stage overlays (1e-4, 1e-5, 2e-5 at their peaks)
    assert [c["hyper_parameters"]["optimizer"]["lr"] for c in ckpts] == [1e-4, 1e-5, 2e-5]
    # stage 2 trained the LLM and the cross-attention blocks further (text-only batches included)
    key = "llm.model.layers.3.gated_xattn.ff.1.weight"
    assert not torch.equal(ckpts[1]["state_dict"][key], ckpts[2]["state_dict"][key])


def test_the_224_row_skips_the_high_resolution_stage(tiny_row, tmp_path, capsys):
    configs = [REPO / "configs" / "tiny.yaml", REPO / "configs" / "grid" / "pt_vicuna_224.yaml"]
    assert main(["stages", *config_args(configs), "--out", str(tmp_path / "run"), "--dry-run"]) == 0
    assert [line for line in capsys.readouterr().out.splitlines() if line.startswith("# ")] == [
        "# stage1_224",
        "# stage2",
    ]
    stage2 = yaml.safe_load((tmp_path / "run" / "stage2" / "stage.yaml").read_text())
    assert stage2["model"]["init_args"]["init_from"] == str(tmp_path / "run" / "stage1_224" / "checkpoints/last.ckpt")
    assert stage2["model"]["init_args"]["vision"]["image_size"] == 224
    assert not (tmp_path / "run" / "stage1_224" / "checkpoints").exists()  # a dry run trains nothing


def test_the_ca_trainable_llm_row_needs_text_data_in_stage_two(tiny_row, tmp_path, capsys):
    args = ["stages", *config_args(tiny_row["configs"]), "--out", str(tmp_path / "run"), "--dry-run"]
    with pytest.raises(SystemExit, match=r"its stage-2 data has no text-only source \(TextSource\)"):
        main([*args, "--stage1-data", str(tiny_row["stage1"]), "--stage2-data", str(tiny_row["no_text"])])
    # the default stage-2 mixture of the real Lynx has text (FLAN, Baize): the real row plans its three stages
    real = [REPO / "configs" / "pt_vicuna_420.yaml", CA_TRAINABLE]
    assert main(["stages", *config_args(real), "--out", str(tmp_path / "real"), "--dry-run"]) == 0
    assert capsys.readouterr().out.count("-m lynx_zoo fit") == 3


def test_text_data_is_what_a_source_declares_not_its_class_name():
    def mixture_of(*classes: type) -> dict:
        return {"init_args": {"sources": [{"class_path": f"{c.__module__}.{c.__qualname__}"} for c in classes]}}

    assert has_text_data(mixture_of(ImageTextSource, TextSource))
    assert has_text_data(mixture_of(CaptionsAsText))
    assert not has_text_data(mixture_of(ImageTextSource))
    with pytest.raises(ValueError, match="'builtins.dict' is not a data source"):
        has_text_data(mixture_of(dict))
