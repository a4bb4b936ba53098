"""The mixture DataModule: ratios, templates, exactly-once shards across ranks and workers, bad input that
never stops a run, mid-epoch resume, and images + videos + text through PT and CA models."""

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from media import save_photos, to_tensor, write_clip, write_jsonl, write_shards
from run_helpers import IdsToFile, Recorder, StopAt, trainer
from torch.utils.data import DataLoader

from lynx_zoo import CrossAttnLynx, PrefixLynx
from lynx_zoo.data import (
    ImageTextSource,
    LynxProcessor,
    MixtureDataModule,
    PromptConfig,
    ShardSource,
    TextSource,
    VideoQASource,
)
from lynx_zoo.data.mixture import MixtureSchedule, MixtureStream
from lynx_zoo.data.shapes import shapes_tokenizer
from lynx_zoo.data.sources import LoadContext


@pytest.fixture(scope="module")
def mixed_data(tmp_path_factory) -> Path:
    """Photos (with 2 unreadable images and a malformed line), clips (one truncated) and text-only data."""
    root = tmp_path_factory.mktemp("mixed")
    photos = save_photos(root)
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    images = [{"image": photos[i % 5], "question": "what color is the circle?", "answer": "red"} for i in range(10)]
    images[3] = {"image": "corrupt.png", "question": "what color is the circle?", "answer": "red"}
    images[7] = {"image": "missing.png", "question": "what color is the circle?", "answer": "red"}
    write_jsonl(root / "images.jsonl", images[:5] + ["{not json"] + images[5:])
    for ext in ("mp4", "webm", "mkv", "mpg"):
        write_clip(root / f"clip.{ext}")
    long = write_clip(root / "long.mkv", num_frames=60).read_bytes()
    (root / "cut.mkv").write_bytes(long[: len(long) // 2])
    clips = [
        {"video": f"clip.{ext}", "question": "how many shapes are there?", "answer": "one"}
        for ext in ("mp4", "webm", "mkv", "mpg")
    ]
    clips.insert(2, {"video": "cut.mkv", "question": "how many shapes are there?", "answer": "one"})
    write_jsonl(root / "clips.jsonl", clips)
    write_jsonl(root / "text.jsonl", [{"instruction": "what shape is a ball?", "answer": "circle"}] * 6)
    return root


def mixture(root: Path, **kwargs) -> MixtureDataModule:
    sources = [
        ImageTextSource(str(root / "images.jsonl"), name="images", ratio=0.5, task="vqa"),
        VideoQASource(str(root / "clips.jsonl"), name="clips", ratio=0.3, task="video_qa"),
        TextSource(str(root / "text.jsonl"), name="text", ratio=0.2),
    ]
    return MixtureDataModule(sources, **{"batch_size": 4, "batches_per_epoch": 12, "num_workers": 0, **kwargs})


def test_mixture_ratios_hold_over_thousands_of_draws(mixed_data):
    data = mixture(mixed_data)
    data.processor, data.num_frames = LynxProcessor(shapes_tokenizer(), PromptConfig(), to_tensor), 5
    data.setup("fit")
    draws = MixtureSchedule(data.sources, 4, 3000, seed=0, rank=0, world_size=1).source_draws(epoch=0)
    shares = np.bincount(draws, minlength=3) / len(draws)
    np.testing.assert_allclose(shares, [0.5, 0.3, 0.2], atol=0.03)


def test_single_vs_diverse_templates_change_only_the_prompts(mixed_data):
    batches = {}
    for diverse in (True, False):
        data = mixture(mixed_data, diverse_prompts=diverse)
        data.processor, data.num_frames = LynxProcessor(shapes_tokenizer(), PromptConfig(), to_tensor), 5
        data.setup("fit")
        batches[diverse] = list(data.train_dataloader())
    instructions = Counter()
    for diverse_batch, single_batch in zip(batches[True], batches[False]):
        assert diverse_batch["source"] == single_batch["source"]
        assert diverse_batch["ids"] == single_batch["ids"] and diverse_batch["answers"] == single_batch["answers"]
        if diverse_batch["images"] is not None:
            torch.testing.assert_close(diverse_batch["images"], single_batch["images"])
        for d, s in zip(diverse_batch["instructions"], single_batch["instructions"]):
            instructions[(d == s, single_batch["source"])] += 1
            if single_batch["source"] == "images":
                assert s == "what color is the circle?"  # the first vqa template is the question itself
            if single_batch["source"] == "clips":
                assert s == "how many shapes are there?"
    assert instructions[(False, "images")] > 0 and instructions[(False, "clips")] > 0  # paraphrases were drawn
    assert instructions[(False, "text")] == 0  # a task without templates keeps its instruction


def test_shards_are_read_exactly_once_per_epoch_across_2_ranks_and_2_workers(tmp_path):
    keys = write_shards(tmp_path, num_shards=8, per_shard=6, size=16)
    processor = LynxProcessor(shapes_tokenizer(), PromptConfig(), to_tensor)
    seen: list[str] = []
    for rank in (0, 1):
        source = ShardSource(str(tmp_path / "pairs-*.tar"), name="pairs")
        source.prepare(LoadContext(to_tensor))
        schedule = MixtureSchedule([source], batch_size=4, batches_per_epoch=6, seed=3, rank=rank, world_size=2)
        rank_ids = []
        for batch in DataLoader(MixtureStream(schedule, processor), batch_size=None, num_workers=2):
            rank_ids += batch["ids"]
            assert len({key.split("-")[0] for key in batch["ids"]}) <= 2  # consecutive members of a shard
        # the workers' batches arrive in schedule order
        planned = [source.locate(int(i)) for _, _, indices in schedule.epoch_plan(0) for i in indices]
        assert rank_ids == [shard.keys[position] for shard, position in planned]
        seen += rank_ids
    assert sorted(seen) == sorted(keys) and len(seen) == len(set(seen)) == 48


def expected_skips(data: MixtureDataModule, epoch: int) -> Counter:
    """What the schedule will load of the bad records: images 3 and 7 (corrupt, missing), clip 2 (truncated)."""
    bad = {("images", 3): "unreadable_image", ("images", 7): "unreadable_image", ("clips", 2): "unreadable_video"}
    counts = Counter()
    for _, source, indices in data.stream.schedule.epoch_plan(epoch):
        name = data.sources[source].name
        for i in indices:
            if (name, int(i)) in bad:
                counts[f"{name}/{bad[(name, int(i))]}"] += 1
    return counts


@pytest.mark.slow
@pytest.mark.parametrize("fusion", [PrefixLynx, CrossAttnLynx])
def test_bad_input_never_stops_a_run_and_the_skips_are_counted_exactly(make_tiny, mixed_data, tmp_path, fusion):
    model = make_tiny(fusion)
    data = mixture(mixed_data)
    recorder = Recorder()
    run = trainer(tmp_path, max_epochs=1, callbacks=[recorder])
    run.fit(model, datamodule=data)
    assert len(recorder.ids) == 12  # the epoch ran to its end
    assert set(recorder.sources) == {"images", "clips", "text"}  # images, videos and text in one run
    expected = expected_skips(data, 0)
    assert expected["images/unreadable_image"] > 0 and expected["clips/unreadable_video"] > 0
    logged = {k.removeprefix("data/skipped/"): int(v) for k, v in run.callback_metrics.items() if "skipped/" in k}
    assert logged == dict(expected)
    assert data.skipped_lines == {"images/malformed_line": 1}
    assert torch.isfinite(run.callback_metrics["train/loss"])


def test_strict_mode_names_the_file(make_tiny, mixed_data, tmp_path):
    from lynx_zoo.data.manifest import ManifestError

    with pytest.raises(ManifestError, match=r"images.jsonl:6: not valid JSON"):
        trainer(tmp_path, max_steps=1).fit(make_tiny(), datamodule=mixture(mixed_data, strict=True))


@pytest.mark.slow
@pytest.mark.parametrize("stop", [3, 5], ids=["mid-epoch", "at-the-epoch-end"])
def test_stop_and_resume_continues_with_the_next_unseen_batches(make_tiny, mixed_data, tmp_path, stop):
    full, first, rest = Recorder(), Recorder(), Recorder()
    model = make_tiny()
    trainer(tmp_path / "full", max_steps=8, callbacks=[full]).fit(
        model, datamodule=mixture(mixed_data, batches_per_epoch=5, num_workers=2)
    )
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=stop, filename="{step}")
    # the same run (max_steps=8: the same LR schedule), stopped after step `stop` (epochs have 5 batches)
    trainer(tmp_path / "a", max_steps=8, callbacks=[first, checkpoint, StopAt(stop)], enable_checkpointing=True).fit(
        make_tiny(), datamodule=mixture(mixed_data, batches_per_epoch=5, num_workers=2)
    )
    resumed = make_tiny()
    trainer(tmp_path / "b", max_steps=8, callbacks=[rest]).fit(
        resumed,
        datamodule=mixture(mixed_data, batches_per_epoch=5, num_workers=2),
        ckpt_path=tmp_path / "ckpt" / f"step={stop}.ckpt",
    )
    assert first.ids == full.ids[:stop]
    assert rest.ids == full.ids[stop:]  # the rest of epoch 0 (if any), then epoch 1: nothing repeated or missed
    for (name, a), b in zip(model.trainable_parameters(), [p for _, p in resumed.trainable_parameters()]):
        torch.testing.assert_close(a, b, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.slow
def test_held_out_image_and_video_sources_are_validated_with_per_category_accuracy(make_tiny, mixed_data, tmp_path):
    held_out = [
        ImageTextSource(str(mixed_data / "images.jsonl"), name="images_val", task="vqa"),
        VideoQASource(str(mixed_data / "clips.jsonl"), name="clips_val", task="video_qa"),
    ]
    data = mixture(mixed_data, val_sources=held_out, batches_per_epoch=2)
    run = trainer(tmp_path, max_epochs=1, limit_val_batches=None, num_sanity_val_steps=0)
    run.fit(make_tiny(CrossAttnLynx), datamodule=data)
    metrics = run.callback_metrics
    assert {"val/loss/dataloader_idx_0", "val/loss/dataloader_idx_1"} <= set(metrics)
    assert 0.0 <= float(metrics["val/acc/all"]) <= 1.0  # the manifests have no categories: one "all" metric


@pytest.mark.slow
def test_a_ddp_run_on_2_ranks_with_2_workers_each_reads_every_shard_sample_once(make_tiny, tmp_path):
    keys = write_shards(tmp_path / "shards", num_shards=8, per_shard=6, size=16)
    source = ShardSource(str(tmp_path / "shards" / "*.tar"), name="pairs")
    data = MixtureDataModule([source], batch_size=4, num_workers=2, seed=5)  # 48 pairs: 6 batches per rank
    run = trainer(tmp_path, max_epochs=1, strategy="ddp_spawn", devices=2, callbacks=[IdsToFile(tmp_path)])
    run.fit(make_tiny(), datamodule=data)
    per_rank = [(tmp_path / f"rank{r}.txt").read_text().split() for r in (0, 1)]
    assert len(per_rank[0]) == len(per_rank[1]) == 24
    seen = per_rank[0] + per_rank[1]
    assert sorted(seen) == sorted(keys) and len(set(seen)) == 48


@pytest.mark.slow
def test_reloaded_dataloaders_go_on_to_the_next_epoch_of_the_mixture(make_tiny, mixed_data, tmp_path):
    plain, reloaded = Recorder(), Recorder()
    trainer(tmp_path / "a", max_epochs=3, callbacks=[plain]).fit(
        make_tiny(), datamodule=mixture(mixed_data, batches_per_epoch=2)
    )
    trainer(tmp_path / "b", max_epochs=3, callbacks=[reloaded], reload_dataloaders_every_n_epochs=1).fit(
        make_tiny(), datamodule=mixture(mixed_data, batches_per_epoch=2)
    )
    assert reloaded.ids == plain.ids and len(plain.ids) == 6
    assert plain.ids[0:2] != plain.ids[2:4] != plain.ids[4:6]  # three different epochs, not one repeated


@pytest.mark.slow
@pytest.mark.parametrize("fusion", [PrefixLynx, CrossAttnLynx])
def test_ddp_trains_on_text_only_image_and_video_batches_alike(make_tiny, mixed_data, tmp_path, fusion):
    # DDP (find_unused_parameters off) wants a gradient for every trainable parameter at every step
    recorder = Recorder()
    run = trainer(tmp_path, max_steps=6, strategy="ddp", devices=1, callbacks=[recorder])
    run.fit(make_tiny(fusion), datamodule=mixture(mixed_data, batches_per_epoch=6))
    assert {"images", "clips", "text"} <= set(recorder.sources)


def test_the_ranks_of_a_step_draw_the_same_source(mixed_data):
    """Under FSDP every rank of a step must run the same parts of the model: one modality per step."""
    data = mixture(mixed_data)
    data.processor, data.num_frames = LynxProcessor(shapes_tokenizer(), PromptConfig(), to_tensor), 5
    data.setup("fit")
    for world in (1, 2, 4):
        schedule = MixtureSchedule(data.sources, 1, 3000 // world, seed=3, rank=0, world_size=world)
        draws = schedule.source_draws(epoch=1).reshape(-1, world)
        assert (draws == draws[:, :1]).all()
        np.testing.assert_allclose(np.bincount(draws[:, 0], minlength=3) / len(draws), [0.5, 0.3, 0.2], atol=0.04)
