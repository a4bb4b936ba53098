"""Prepared (LitData) data sets: every source kind round-trips through ``data prepare`` into training, bad records
are counted exactly at prepare and at read, an interrupted prepare is never read, each sample is read once per
pass across 2 ranks x 2 workers, a resumed run reaches the same weights, ratios hold, and the schedule's memory
does not grow with the data set."""

import io
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import tracemalloc
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from media import photo, save_photos, to_tensor, write_clip, write_jsonl, write_shards
from run_helpers import IdsToFile, Recorder, StopAt, trainer

from lynx_zoo.data import (
    ConversationSource,
    DataError,
    ImageTextSource,
    LoadContext,
    LynxProcessor,
    MixtureDataModule,
    PromptConfig,
    Sample,
    ShardSource,
    Skipped,
    TextSource,
    VideoQASource,
)
from lynx_zoo.data.mixture import MixtureSchedule
from lynx_zoo.data.prepare import main as data_main
from lynx_zoo.data.prepared import PreparedSource
from lynx_zoo.data.shapes import shapes_tokenizer
from lynx_zoo.data.sources import Source
from lynx_zoo.training.lightning_cli import LynxCLI

REPO = Path(__file__).resolve().parents[1]


def add_tar_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    """Inputs of every kind, each with known bad records (the counts each test expects are written beside)."""
    root = tmp_path_factory.mktemp("raw")
    files = save_photos(root)
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    images = [
        {"id": f"img{i}", "image": files[i % 5], "question": "what is shown?", "answer": files[i % 5].split(".")[0],
         "category": "colour" if i % 2 else "count"}
        for i in range(12)
    ]  # fmt: skip
    images[3]["image"], images[7]["image"] = "corrupt.png", "missing.png"
    empty = {"id": "empty", "image": files[0], "question": "what?", "answer": "  "}
    write_jsonl(root / "images.jsonl", images[:5] + ["{not json"] + images[5:] + [empty])

    turns = [
        {"from": "human", "value": "<image>\nWhat is in the picture?"},
        {"from": "gpt", "value": "A photograph."},
        {"from": "human", "value": "Is it sharp?"},
        {"from": "gpt", "value": "Yes."},
    ]
    conversations = [
        {"id": "c0", "image": files[0], "conversations": turns},
        {"id": "c1", "image": files[1], "conversations": turns[:1]},  # no answer
        {"id": "c2", "image": files[2], "conversations": [turns[0], {"from": "gpt", "value": " "}]},
        {"id": "c3", "image": "missing.jpg", "conversations": turns},
        *[{"id": f"c{i}", "image": files[i % 5], "conversations": turns[: 2 + 2 * (i % 2)]} for i in range(4, 9)],
    ]
    (root / "llava.json").write_text(json.dumps(conversations))

    write_clip(root / "clip.mp4")
    write_clip(root / "clip.webm")
    long = write_clip(root / "long.mkv", num_frames=60).read_bytes()
    (root / "cut.mkv").write_bytes(long[: len(long) // 2])
    clips = [
        {"id": f"v{i}", "video": name, "question": "how many shapes?", "answer": "one"}
        for i, name in enumerate(["clip.mp4", "clip.webm", "cut.mkv", "clip.mp4", "clip.webm"])
    ]
    write_jsonl(root / "clips.jsonl", clips)

    texts = [{"id": f"t{i}", "instruction": f"say {i}", "answer": f"number {i}"} for i in range(8)]
    write_jsonl(root / "text.jsonl", texts + [{"id": "t-bad", "answer": "no instruction"}])

    write_shards(root / "shards", num_shards=3, per_shard=6, size=32)
    with tarfile.open(root / "shards" / "pairs-000003.tar", "w") as tar:
        good = io.BytesIO()
        photo("coffee", 32).save(good, format="JPEG")
        add_tar_member(tar, "lonely.jpg", good.getvalue())  # no caption
        add_tar_member(tar, "badjson.jpg", good.getvalue())
        add_tar_member(tar, "badjson.json", b"{broken")
        add_tar_member(tar, "blank.jpg", good.getvalue())
        add_tar_member(tar, "blank.txt", b"   ")
        add_tar_member(tar, "broken.jpg", b"\xff\xd8\xff" + b"\x00" * 64)
        add_tar_member(tar, "broken.txt", b"a broken photo")
        add_tar_member(tar, "fine.jpg", good.getvalue())
        add_tar_member(tar, "fine.txt", b"a cup of coffee")
    return root


# kind -> (inputs, skips expected in the report)
KINDS = {
    "image_text": (["images.jsonl"], {"malformed_line": 1, "empty_answer": 1, "unreadable_image": 2}),
    "conversation": (["llava.json"], {"malformed_line": 1, "empty_answer": 1, "unreadable_image": 1}),
    "video_qa": (["clips.jsonl"], {"unreadable_video": 1}),
    "text": (["text.jsonl"], {"missing_field": 1}),
    "shards": (
        ["shards/pairs-{000000..000003}.tar"],
        {"incomplete_sample": 1, "malformed_line": 1, "empty_answer": 1, "unreadable_image": 1},
    ),
}


@pytest.fixture(scope="module")
def prepared(raw, tmp_path_factory) -> dict[str, Path]:
    """Each kind prepared (2 worker processes, small chunks so that every data set has several)."""
    out = tmp_path_factory.mktemp("prepared")
    folders = {}
    for kind, (inputs, _) in KINDS.items():
        folder = out / kind
        argv = ["prepare", kind, *[str(raw / i) for i in inputs], "--output", str(folder), "--workers", "2"]
        assert data_main([*argv, "--chunk-size", "3", "--lines-per-block", "4"]) == 0
        folders[kind] = folder
    return folders


def direct_source(kind: str, raw: Path) -> Source:
    if kind == "shards":
        return ShardSource(str(raw / "shards" / "pairs-{000000..000003}.tar"), name=kind)
    cls = {"image_text": ImageTextSource, "conversation": ConversationSource, "video_qa": VideoQASource}
    return cls.get(kind, TextSource)(str(raw / KINDS[kind][0][0]), name=kind)


def samples_by_id(source: Source) -> dict[str, Sample]:
    source.prepare(LoadContext(to_tensor, num_frames=4, training=False))
    loaded = [source.load(i, str(i)) for i in range(len(source))]
    return {s.id: s for s in loaded if isinstance(s, Sample)}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_prepare_reports_exactly_the_bad_records_and_keeps_every_good_sample_as_it_was(prepared, raw, kind):
    report = json.loads((prepared[kind] / "prepare_report.json").read_text())
    assert report["complete"] and report["kind"] == kind
    assert report["skipped"] == KINDS[kind][1]
    assert all(examples for examples in report["skipped_examples"].values())
    direct, stored = samples_by_id(direct_source(kind, raw)), samples_by_id(PreparedSource(str(prepared[kind])))
    assert report["samples"] == len(stored) and sorted(stored) == sorted(direct) and report["chunks"] > 1
    for sample_id, expected in direct.items():
        got = stored[sample_id]
        assert (got.instruction, got.answer, got.category, got.history) == (
            expected.instruction,
            expected.answer,
            expected.category,
            expected.history,
        )
        if expected.image is None:
            assert got.image is None
        else:  # the same bytes, decoded the same way (video: the same 4 evaluation frames)
            torch.testing.assert_close(got.image, expected.image, rtol=0, atol=0)


def test_prepared_categories_come_from_the_report(prepared):
    source = PreparedSource(str(prepared["image_text"]))
    source.prepare(LoadContext(to_tensor))
    assert source.categories == ["colour", "count"] and len(source) == 10


@pytest.mark.slow
def test_prepare_then_train_on_every_kind_with_a_tiny_model(make_tiny, prepared, tmp_path):
    sources = [PreparedSource(str(folder), name=kind, task="vqa") for kind, folder in prepared.items()]
    data = MixtureDataModule(sources, batch_size=2, batches_per_epoch=16, num_workers=0, seed=1)
    recorder = Recorder()
    run = trainer(tmp_path, max_epochs=1, callbacks=[recorder])
    run.fit(make_tiny(), datamodule=data)
    assert len(recorder.ids) == 16 and set(recorder.sources) == set(KINDS)
    assert torch.isfinite(run.callback_metrics["train/loss"])


def corrupt_first_copy(folder: Path, payload: bytes) -> None:
    """Overwrites the first stored copy of ``payload`` in the data set's chunk files with zeros."""
    for chunk in sorted(folder.glob("chunk-*.bin")):
        data = chunk.read_bytes()
        at = data.find(payload)
        if at >= 0:
            chunk.write_bytes(data[:at] + b"\x00" * len(payload) + data[at + len(payload) :])
            return
    raise AssertionError("payload not stored")


def test_a_sample_that_cannot_be_read_at_training_time_is_skipped_and_counted_exactly(prepared, raw, tmp_path):
    folder = tmp_path / "images"
    shutil.copytree(prepared["image_text"], folder)
    corrupt_first_copy(folder, (raw / "chelsea.png").read_bytes())
    processor = LynxProcessor(shapes_tokenizer(), PromptConfig(), to_tensor)
    source = PreparedSource(str(folder), name="images")
    data = MixtureDataModule([source], batch_size=3, batches_per_epoch=8, num_workers=2, seed=4)
    data.processor = processor
    data.setup("fit")
    bad = [i for i in range(len(source)) if isinstance(source.load(i, "x"), Skipped)]
    assert len(bad) == 1 and source.load(bad[0], "x").reason == "unreadable_image"
    planned = sum(int(i) == bad[0] for _, _, indices in data.stream.schedule.epoch_plan(0) for i in indices)
    assert planned > 0  # 24 draws from 8 samples: each is read 3 times
    counted = Counter()
    for batch in data.train_dataloader():
        counted.update(batch["skipped"])
    assert counted == {"images/unreadable_image": planned}


def test_a_folder_that_is_not_a_finished_prepared_data_set_is_refused(prepared, tmp_path):
    with pytest.raises(DataError, match="not a finished prepared data set"):
        PreparedSource(str(tmp_path)).prepare(LoadContext(to_tensor))
    folder = tmp_path / "pickled"
    shutil.copytree(prepared["text"], folder)
    index = json.loads((folder / "index.json").read_text())
    index["config"]["data_format"] = ["str", "pickle", "str"]  # a data set that would unpickle what it holds
    (folder / "index.json").write_text(json.dumps(index))
    with pytest.raises(DataError, match="not a lynx_zoo prepared data set"):
        PreparedSource(str(folder)).prepare(LoadContext(to_tensor))
    assert data_main(["prepare", "text", str(prepared["text"] / "nothing.jsonl"), "--output", str(tmp_path / "o")]) == 1
    argv = ["prepare", "text", str(Path(__file__).parent / "missing.jsonl"), "--output", str(prepared["text"])]
    assert data_main(argv) == 1  # the data set is there: only --overwrite replaces it


@pytest.mark.slow
def test_an_interrupted_prepare_is_never_read_and_a_rerun_starts_again(raw, tmp_path):
    clip = write_clip(tmp_path / "long.mp4", num_frames=80)
    lines = [{"id": f"v{i}", "video": clip.name, "question": "what?", "answer": "a clip"} for i in range(300)]
    manifest = write_jsonl(tmp_path / "many.jsonl", lines)
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "lynx_zoo", "data", "prepare", "video_qa", str(manifest), "--output", str(out)]
    argv += ["--workers", "1", "--chunk-size", "2", "--lines-per-block", "10"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    job = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)  # fmt: skip
    staging = tmp_path / "out.partial" / "data"
    deadline = time.time() + 120
    while not list(staging.glob("chunk-*.bin")) and time.time() < deadline and job.poll() is None:
        time.sleep(0.05)
    assert job.poll() is None, "the prepare finished before it could be interrupted"
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    assert not out.exists()
    with pytest.raises(DataError, match=r"out.partial: run it again"):
        PreparedSource(str(out)).prepare(LoadContext(to_tensor))
    with pytest.raises(DataError, match="not a finished prepared data set"):
        PreparedSource(str(staging)).prepare(LoadContext(to_tensor))
    assert data_main(["prepare", "video_qa", str(manifest), "--output", str(out), "--chunk-size", "50"]) == 0
    assert not (tmp_path / "out.partial").exists()
    source = PreparedSource(str(out))
    source.prepare(LoadContext(to_tensor, num_frames=2))
    assert sorted(source.dataset[i]["id"] for i in range(len(source))) == sorted(line["id"] for line in lines)


@pytest.mark.slow
def test_the_command_line_prepares_a_manifest(raw, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "lynx_zoo", "data", "prepare", "text", str(raw / "text.jsonl"), "--output",
         str(tmp_path / "text")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "8 samples" in result.stdout and "missing_field 1" in result.stdout


@pytest.mark.slow
def test_2_ranks_x_2_workers_read_each_prepared_sample_once_per_pass_over_two_passes(make_tiny, tmp_path):
    keys = write_shards(tmp_path / "shards", num_shards=8, per_shard=12, size=16)
    folder = tmp_path / "pairs"
    argv = ["prepare", "shards", str(tmp_path / "shards" / "*.tar"), "--output", str(folder), "--chunk-size", "5"]
    assert data_main(argv) == 0
    data = MixtureDataModule([PreparedSource(str(folder))], batch_size=4, num_workers=2, seed=5)  # 12 batches/rank
    run = trainer(tmp_path, max_epochs=2, strategy="ddp_spawn", devices=2, callbacks=[IdsToFile(tmp_path, True)])
    run.fit(make_tiny(), datamodule=data)
    passes = []
    for epoch in (0, 1):
        per_rank = [(tmp_path / f"rank{r}-epoch{epoch}.txt").read_text().split() for r in (0, 1)]
        assert len(per_rank[0]) == len(per_rank[1]) == 48
        passes.append(per_rank[0] + per_rank[1])
        assert sorted(passes[-1]) == sorted(keys)  # 96 samples, each once
    assert passes[0] != passes[1]  # a fresh order in the second pass


def test_ratios_hold_within_002_over_3000_batches_and_each_source_is_read_once_per_pass(tmp_path):
    sources = []
    for name, ratio in (("a", 0.5), ("b", 0.3), ("c", 0.2)):
        manifest = write_jsonl(tmp_path / f"{name}.jsonl", [{"id": f"{name}{i}", "instruction": "hi", "answer": "yo"}
                                                            for i in range(30)])  # fmt: skip
        assert data_main(["prepare", "text", str(manifest), "--output", str(tmp_path / name), "--chunk-size", "7"]) == 0
        sources.append(PreparedSource(str(tmp_path / name), ratio=ratio))
    data = MixtureDataModule(sources, batch_size=1, batches_per_epoch=3000, num_workers=0, seed=2)
    data.processor = LynxProcessor(shapes_tokenizer(), PromptConfig(), to_tensor)
    data.setup("fit")
    read = {"a": [], "b": [], "c": []}
    for batch in data.train_dataloader():
        read[batch["source"]] += batch["ids"]
    shares = np.array([len(read[name]) for name in "abc"]) / 3000
    np.testing.assert_allclose(shares, [0.5, 0.3, 0.2], atol=0.02)
    for name, ids in read.items():
        for start in range(0, len(ids) - 29, 30):  # every whole pass holds each sample once
            assert sorted(ids[start : start + 30]) == sorted(f"{name}{i}" for i in range(30))


@pytest.mark.slow
@pytest.mark.parametrize("stop", [3, 7], ids=["mid-epoch", "mid-second-epoch"])
def test_a_run_resumed_mid_epoch_on_prepared_data_reaches_the_same_weights(make_tiny, prepared, tmp_path, stop):
    def mixture() -> MixtureDataModule:
        sources = [
            PreparedSource(str(prepared["image_text"]), name="images", ratio=0.5, task="vqa"),
            PreparedSource(str(prepared["video_qa"]), name="clips", ratio=0.2),
            PreparedSource(str(prepared["text"]), name="text", ratio=0.3),
        ]
        return MixtureDataModule(sources, batch_size=2, batches_per_epoch=5, num_workers=2, seed=3)

    full, first, rest = Recorder(), Recorder(), Recorder()
    model = make_tiny()
    trainer(tmp_path / "full", max_steps=9, callbacks=[full]).fit(model, datamodule=mixture())
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=stop, filename="{step}")
    trainer(tmp_path / "a", max_steps=9, callbacks=[first, checkpoint, StopAt(stop)], enable_checkpointing=True).fit(
        make_tiny(), datamodule=mixture()
    )
    resumed = make_tiny()
    trainer(tmp_path / "b", max_steps=9, callbacks=[rest]).fit(
        resumed, datamodule=mixture(), ckpt_path=tmp_path / "ckpt" / f"step={stop}.ckpt"
    )
    assert first.ids == full.ids[:stop] and rest.ids == full.ids[stop:]
    for (name, a), b in zip(model.trainable_parameters(), [p for _, p in resumed.trainable_parameters()]):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda m, name=name: f"{name}: {m}")


def test_a_source_streamed_from_a_uri_stays_within_its_cache_limit(tmp_path):
    long = "word " * 4000  # ~20 KB a record: 10 records a chunk, ~200 KB chunks, 4 MB in all
    records = [{"id": f"t{i}", "instruction": f"repeat {i}", "answer": long} for i in range(200)]
    manifest = write_jsonl(tmp_path / "long.jsonl", records)
    assert data_main(["prepare", "text", str(manifest), "--output", str(tmp_path / "local"), "--chunk-size", "10"]) == 0
    cache = tmp_path / "cache"
    remote = PreparedSource(f"local:{tmp_path / 'local'}", cache_dir=str(cache), max_cache_size="1MB")
    local = PreparedSource(str(tmp_path / "local"))
    for source in (remote, local):
        source.prepare(LoadContext(to_tensor))
    schedule = MixtureSchedule([remote], batch_size=10, batches_per_epoch=20, seed=0, rank=0, world_size=1)

    def cached_bytes() -> int:
        total = 0
        for chunk in cache.rglob("chunk-*.bin"):
            try:
                total += chunk.stat().st_size
            except FileNotFoundError:  # deleted meanwhile
                pass
        return total

    peak, read = 0, []
    for _, _, indices in schedule.epoch_plan(0):
        for i in indices:
            sample = remote.load(int(i), "x")
            assert sample.instruction == local.load(int(i), "x").instruction and sample.answer == long.strip()
            read.append(sample.id)
        peak = max(peak, cached_bytes())
    assert sorted(read) == sorted(r["id"] for r in records)
    chunk_bytes = json.loads((tmp_path / "local" / "prepare_report.json").read_text())["bytes"] / 20
    assert peak <= 2**20 + 2 * chunk_bytes  # the limit, plus the chunk being read and the one being fetched


class Huge(Source):
    """A source of 10^10 samples in 10^5 chunks (nothing loads: only the schedule is built)."""

    def __len__(self) -> int:
        return 10**10

    def chunk_sizes(self) -> list[int]:
        return [10**5] * 10**5


def test_the_schedule_holds_nothing_that_grows_with_the_samples_or_the_batches():
    tracemalloc.start()
    schedule = MixtureSchedule([Huge(name="a"), Huge(name="b", ratio=0.5)], 8, 10**7, 0, rank=5, world_size=32,
                               num_workers=4)  # fmt: skip
    far = list(itertools.islice(schedule.epoch_plan(0, start=200_000, step=4), 3))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert [j for j, _, _ in far] == [200_000, 200_004, 200_008]
    assert all(len(indices) == 8 and 0 <= indices.min() and indices.max() < 10**10 for _, _, indices in far)
    assert peak < 30e6  # 10^10 samples, 3.2 * 10^8 batches an epoch: a permutation of either would be GBs


def test_the_stage1_config_on_prepared_data_parses_with_the_lynx_model():
    class ParseOnly(LynxCLI):
        def instantiate_classes(self) -> None:
            pass

    configs = ["pt_vicuna_420.yaml", "stages/stage1_224.yaml", "data/prepared/lynx_stage1.yaml"]
    cli = ParseOnly(args=[arg for c in configs for arg in ("--config", str(REPO / "configs" / c))], run=False)
    sources = cli.config.data.init_args.sources
    assert {s.class_path for s in sources} == {"lynx_zoo.data.prepared.PreparedSource"}
    assert sources[0].init_args.path.startswith("s3://") and sources[0].init_args.ratio == 30.5
