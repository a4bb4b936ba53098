"""Two-stage training through the CLI: alignment on tar-shard pairs at 32 px, then instruction tuning on an
image + video + text mixture at 48 px, started from the stage-1 weights (fresh optimiser)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from media import save_photos, write_clip, write_shards

REPO = Path(__file__).resolve().parents[1]


def fit(*configs: Path) -> None:
    args = [arg for config in configs for arg in ("--config", str(config))]
    result = subprocess.run(
        [sys.executable, "-m", "lynx_zoo", "fit", *args], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]


def overlay(path: Path, content: dict) -> Path:
    path.write_text(yaml.safe_dump(content))
    return path


@pytest.mark.slow
def test_stage_two_starts_from_stage_one_at_a_higher_resolution(tmp_path):
    write_shards(tmp_path / "pairs", num_shards=4, per_shard=8)
    photos = save_photos(tmp_path)
    (tmp_path / "vqa.jsonl").write_text(
        "".join(json.dumps({"image": p, "question": "what color is it?", "answer": "red"}) + "\n" for p in photos)
    )
    write_clip(tmp_path / "clip.mp4")
    write_clip(tmp_path / "clip.webm")
    clips = [
        {"video": f"clip.{ext}", "question": "how many shapes are there?", "answer": "one"} for ext in ("mp4", "webm")
    ]
    (tmp_path / "clips.jsonl").write_text("".join(json.dumps(c) + "\n" for c in clips))
    (tmp_path / "text.jsonl").write_text(
        json.dumps({"instruction": "what shape is a ball?", "answer": "circle"}) + "\n"
    )

    def checkpoint(stage: str) -> dict:
        options = {"dirpath": str(tmp_path / stage / "checkpoints"), "save_last": True}
        return {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": options}

    stage1 = {
        "trainer": {"max_steps": 4, "default_root_dir": str(tmp_path / "stage1"), "callbacks": [checkpoint("stage1")]},
        "data": {
            "class_path": "MixtureDataModule",
            "init_args": {
                "sources": [{"class_path": "ShardSource", "init_args": {"shards": str(tmp_path / "pairs" / "*.tar")}}],
                "batch_size": 4,
                "num_workers": 0,
            },
        },
    }
    fit(REPO / "configs" / "tiny.yaml", overlay(tmp_path / "stage1.yaml", stage1))
    stage1_last = tmp_path / "stage1" / "checkpoints" / "last.ckpt"

    sources = [
        {
            "class_path": "ImageTextSource",
            "init_args": {"manifest": str(tmp_path / "vqa.jsonl"), "task": "vqa", "ratio": 0.4},
        },
        {"class_path": "VideoQASource", "init_args": {"manifest": str(tmp_path / "clips.jsonl"), "ratio": 0.4}},
        {"class_path": "TextSource", "init_args": {"manifest": str(tmp_path / "text.jsonl"), "ratio": 0.2}},
    ]
    stage2 = {
        "trainer": {"max_steps": 4, "default_root_dir": str(tmp_path / "stage2"), "callbacks": [checkpoint("stage2")]},
        "model": {"init_args": {"vision": {"image_size": 48}, "init_from": str(stage1_last)}},
        "data": {
            "class_path": "MixtureDataModule",
            "init_args": {"sources": sources, "batch_size": 2, "batches_per_epoch": 4, "num_workers": 0},
        },
    }
    fit(REPO / "configs" / "tiny.yaml", overlay(tmp_path / "stage2.yaml", stage2))

    first = torch.load(stage1_last, map_location="cpu", weights_only=True)
    second = torch.load(tmp_path / "stage2" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert first["state_dict"]["vision.model.pos_embed"].shape[1] == 4 * 4 + 1  # 32 px, patch 8
    assert second["state_dict"]["vision.model.pos_embed"].shape[1] == 6 * 6 + 1  # 48 px: resampled
    assert second["global_step"] == 4  # stage 2 counts its own steps
    steps = {int(s["step"]) for s in second["optimizer_states"][0]["state"].values()}
    assert steps == {4}  # a fresh optimiser: 4 updates, not 8
