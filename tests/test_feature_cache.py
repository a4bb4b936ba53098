"""The frozen-vision feature cache: ``cache-features`` writes the tower's tokens once; training reads them back,
never runs the tower, and gets the loss of the uncached path; a cache made by another tower is refused."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import yaml
from conftest import TINY_CROSS_ATTN, open_gates, tiny_configs
from media import save_photos, write_clip, write_jsonl
from run_helpers import Recorder, trainer
from safetensors.torch import save_file

from lynx_zoo import CrossAttnLynx, PrefixLynx
from lynx_zoo.cli import main
from lynx_zoo.data import (
    DataError,
    ImageTextSource,
    InstructionTemplates,
    LoadContext,
    MixtureDataModule,
    VideoQASource,
)
from lynx_zoo.data.feature_cache import FeatureCacheSource
from lynx_zoo.fusion.base import model_inputs


@pytest.fixture(scope="module")
def tower_config(tmp_path_factory):
    """A model config whose tower loads fixed weights from a file (so the command and the tests build the same one)."""
    root = tmp_path_factory.mktemp("tower")
    torch.manual_seed(11)
    model = PrefixLynx(**tiny_configs())
    save_file(model.vision.model.state_dict(), str(root / "tower.safetensors"))
    configs = tiny_configs(vision={"checkpoint_path": str(root / "tower.safetensors")})
    init_args = {name: dataclasses.asdict(value) for name, value in configs.items()}
    path = root / "model.yaml"
    path.write_text(yaml.safe_dump({"model": {"class_path": "lynx_zoo.PrefixLynx", "init_args": init_args}}))
    return path, configs


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    photos = save_photos(root)
    (root / "broken.jpg").write_bytes(b"not an image")
    images = [
        {"image": photos[i % 5], "question": "what is in the picture?", "answer": f"thing {i}", "id": f"i{i}"}
        for i in range(9)
    ]
    images.append({"image": "broken.jpg", "question": "what?", "answer": "x", "id": "broken"})
    write_jsonl(root / "images.jsonl", images)
    write_clip(root / "clip.mp4")
    write_jsonl(root / "clips.jsonl", [{"video": "clip.mp4", "question": "what moves?", "answer": f"a shape {i}",
                                        "id": f"v{i}"} for i in range(4)])  # fmt: skip
    return root


def cache(tmp_path, config, kind, manifest, dtype="float32", task="vqa"):
    out = tmp_path / f"{kind}-cache"
    args = ["cache-features", kind, str(manifest), "--config", str(config), "--output", str(out), "--dtype", dtype]
    assert main([*args, "--task", task, "--batch-size", "3", "--shard-size", "4"]) == 0
    return out


def test_the_command_writes_shards_with_an_index_and_counts_skips(tower_config, media, tmp_path, capsys):
    out = cache(tmp_path, tower_config[0], "image_text", media / "images.jsonl", dtype="float16")
    assert "9 image samples' tokens" in capsys.readouterr().out
    index = json.loads((out / "features.json").read_text())
    assert [s["samples"] for s in index["shards"]] == [4, 4, 1]
    assert index["skipped"] == {"images/unreadable_image": 1} and index["media"] == "image"
    assert index["tower"]["tokens"] == 16 + 1 and index["tower"]["width"] == 32  # 4x4 patches and the CLS token
    source = FeatureCacheSource(str(out))
    source.prepare(LoadContext(lambda image: image))
    assert len(source) == 9 and source.chunk_sizes() == [4, 4, 1] and source.task == "vqa"
    sample = source.load(5, "5")
    assert sample.id == "i5" and sample.answer == "thing 5" and sample.image is None
    assert sample.vision_tokens.shape == (17, 32) and sample.vision_tokens.dtype == torch.float16
    assert not (tmp_path / "image_text-cache.partial").exists()
    with pytest.raises(SystemExit, match="exists"):
        cache(tmp_path, tower_config[0], "image_text", media / "images.jsonl")


@pytest.mark.parametrize("cls", [PrefixLynx, CrossAttnLynx])
@pytest.mark.parametrize("kind", ["image_text", "video_qa"])
def test_training_on_the_cache_gives_the_loss_of_the_images(tower_config, media, tmp_path, one_thread, cls, kind):
    config, configs = tower_config
    extra = {"cross_attn": TINY_CROSS_ATTN} if cls is CrossAttnLynx else {}
    torch.manual_seed(0)
    model = cls(**configs, **extra)
    open_gates(model, 0.7)
    manifest = media / ("images.jsonl" if kind == "image_text" else "clips.jsonl")
    cached = FeatureCacheSource(str(cache(tmp_path, config, kind, manifest)))
    direct = (ImageTextSource if kind == "image_text" else VideoQASource)(str(manifest), task="vqa")
    transform = model.processor.image_transform
    context = LoadContext(transform, InstructionTemplates.from_file(), training=False)  # segment-centre frames
    for source in (cached, direct):
        source.prepare(context)
    cached.check_tower(model.vision)
    pairs = [(cached.load(i, f"s{i}"), direct.load(i, f"s{i}")) for i in range(4)]
    assert all(a.instruction == b.instruction and a.answer == b.answer for a, b in pairs)
    calls = []
    hook = model.vision.register_forward_hook(lambda *args: calls.append(1))
    from_cache = model(**model_inputs(model.processor([a for a, _ in pairs]))).loss
    assert calls == []  # the tower never ran
    from_media = model(**model_inputs(model.processor([b for _, b in pairs]))).loss
    hook.remove()
    assert calls == [1]
    torch.testing.assert_close(from_cache, from_media, rtol=1e-5, atol=1e-5)


def test_a_mixture_trains_on_the_cache_without_the_tower(tower_config, media, tmp_path):
    config, configs = tower_config
    out = cache(tmp_path, config, "image_text", media / "images.jsonl", dtype="float16")
    torch.manual_seed(0)
    model = PrefixLynx(**configs)
    model.vision.forward = None  # calling the tower would fail
    recorder = Recorder()
    data = MixtureDataModule([FeatureCacheSource(str(out), name="cached")], batch_size=3, batches_per_epoch=3,
                             num_workers=0, pack_tokens=64)  # fmt: skip
    run = trainer(tmp_path, max_epochs=1, callbacks=[recorder])
    run.fit(model, datamodule=data)
    assert sorted(i for ids in recorder.ids for i in ids) == sorted(f"i{i}" for i in range(9))  # each sample once
    assert torch.isfinite(run.callback_metrics["train/loss"])


def test_a_cache_of_another_tower_or_with_random_crops_is_refused(tower_config, media, tmp_path):
    config, configs = tower_config
    source = FeatureCacheSource(str(cache(tmp_path, config, "image_text", media / "images.jsonl")))
    torch.manual_seed(0)
    with pytest.raises(DataError, match="other weights"):
        source.check_tower(PrefixLynx(**tiny_configs()).vision)  # random weights
    with pytest.raises(DataError, match="image_size=32, the model's has 48"):
        source.check_tower(PrefixLynx(**tiny_configs(vision={"image_size": 48})).vision)
    cropping = tiny_configs(vision={"checkpoint_path": configs["vision"].checkpoint_path, "train_crop": True})
    with pytest.raises(DataError, match="random crops"):
        source.check_tower(PrefixLynx(**cropping).vision)
    with pytest.raises(DataError, match="not a feature cache"):
        FeatureCacheSource(str(tmp_path / "nothing")).prepare(LoadContext(lambda image: image))
