"""Fault injection: every way a bad file, a crash or a mistyped value can hit a run, and what the zoo does about it.

Each case asserts its outcome: skipped and counted (the run goes on, nothing good is lost), or one clear error
naming the file or key, the value and what was expected. The fast part runs sources, models and the command line
in this process; the slow part (``@pytest.mark.slow``) kills real ``python -m lynx_zoo fit`` runs with SIGKILL, in
the middle of training and in the middle of a checkpoint save, and checks that ``--ckpt_path last`` ends with the
same weights as an uninterrupted run. ``docs/faults.md`` lists every fault tried here and its outcome.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from conftest import REPO, tiny_checkpoint
from eval_fixtures import ChatServer
from lightning.pytorch.callbacks import ModelCheckpoint
from media import photo, save_photos, to_tensor, write_broken_images, write_clip, write_jsonl
from PIL import Image
from run_helpers import StopAt, trainer

from lynx_zoo.checkpoints import read_torch_checkpoint
from lynx_zoo.cli import main
from lynx_zoo.data import (
    DataError,
    ImageTextSource,
    LoadContext,
    MixtureDataModule,
    PromptCutWarning,
    Sample,
    ShardSource,
    Skipped,
    TextSource,
    VideoQASource,
    VQADataModule,
)
from lynx_zoo.data.images import open_rgb
from lynx_zoo.data.processor import PromptConfig
from lynx_zoo.errors import CheckpointError, ConfigError, MediaError, ResumeError, TrainingFailed
from lynx_zoo.evaluation.judges import JudgeBudget, JudgeBudgetExceeded, OpenAIChatJudge, judge_all
from lynx_zoo.evaluation.report import markdown_table
from lynx_zoo.evaluation.runner import Benchmark, Evaluator, Variant, parse_variant
from lynx_zoo.optim import OptimizerConfig
from lynx_zoo.training.checkpoint_io import AtomicCheckpointIO

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = REPO / "configs" / "tiny.yaml"
BAD_IMAGES = ("bomb", "truncated", "empty", "text", "missing")
REASONS = {"bomb": "oversized_image"} | {fault: "unreadable_image" for fault in BAD_IMAGES[1:]}


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict:
    """Good photographs, the broken image files, a good and a broken clip, and a manifest per bad image."""
    root = tmp_path_factory.mktemp("faults")
    good = save_photos(root / "img")
    broken = write_broken_images(root / "img")
    write_clip(root / "clip.mp4")
    (root / "cut.mp4").write_bytes((root / "clip.mp4").read_bytes()[:600])
    return {"root": root, "good": good, "broken": broken}


def image_source(media: dict, fault: str, strict: bool = False, cap: int | None = 89_478_485) -> ImageTextSource:
    """A manifest of the good photographs with the bad image ``fault`` as its second record."""
    files = [media["good"][0], media["broken"][fault], *media["good"][1:]]
    records = [{"image": f"img/{f}", "question": "what is it?", "answer": "a photo", "id": f} for f in files]
    manifest = write_jsonl(media["root"] / f"{fault}.jsonl", records)
    source = ImageTextSource(str(manifest), name=fault)
    source.prepare(LoadContext(to_tensor, strict=strict, max_image_pixels=cap))
    return source


# ------------------------------------------------------------------------------------------ 1. skip and count
@pytest.mark.parametrize("fault", BAD_IMAGES)
def test_a_bad_image_is_skipped_counted_and_named(media, fault):
    source = image_source(media, fault)
    samples = [source[i] for i in range(len(source))]
    skipped = [s for s in samples if isinstance(s, Skipped)]
    assert len(skipped) == 1 and sum(isinstance(s, Sample) for s in samples) == len(media["good"])
    assert skipped[0].reason == REASONS[fault] and media["broken"][fault] in skipped[0].detail
    if fault == "bomb":  # refused from its header, the cap named
        assert "max_image_pixels=89478485" in skipped[0].detail


@pytest.mark.parametrize("fault", BAD_IMAGES)
def test_strict_mode_names_the_file_for_every_kind_of_bad_image(media, fault):
    source = image_source(media, fault, strict=True)
    assert isinstance(source[0], Sample)
    with pytest.raises(DataError, match=media["broken"][fault]):
        source[1]


def test_the_pixel_cap_is_configurable_and_named(media):
    source = image_source(media, "truncated", cap=48 * 48 - 1)  # the photographs are 48 x 48
    first = source[0]
    assert isinstance(first, Skipped) and first.reason == "oversized_image"
    assert "48x48 = 2,304 pixels, over the cap max_image_pixels=2,303" in first.detail
    with pytest.raises(ConfigError, match="max_image_pixels: expected a positive number or null, got 0"):
        LoadContext(to_tensor, max_image_pixels=0)


def test_a_degenerate_or_bomb_image_never_reaches_the_decoder(media):
    with pytest.raises(MediaError, match=r"bomb.png: .*400000000 pixels"):
        open_rgb(media["root"] / "img" / "bomb.png")
    with pytest.raises(MediaError, match="not-there.png: no such image file"):
        open_rgb(media["root"] / "not-there.png")
    with pytest.raises(TypeError):  # a programming error is not a bad file
        open_rgb()


def test_an_unreadable_image_in_memory_is_named_once_without_the_buffer():
    with pytest.raises(MediaError) as raised:
        open_rgb(data=b"just some text", where="shard-3/c.png")
    assert str(raised.value) == (
        "shard-3/c.png: not a readable image (UnidentifiedImageError: cannot identify image file)"
    )


def test_bad_images_inside_tar_shards_are_skipped_and_counted(media, tmp_path):
    import io
    import tarfile

    members = {"a.jpg": media["root"] / "img" / media["good"][1], "b.png": media["root"] / "img" / "bomb.png"}
    members["c.png"] = media["root"] / "img" / "text.png"
    with tarfile.open(tmp_path / "pairs-000000.tar", "w") as tar:
        for name, path in members.items():
            for member, payload in ((name, path.read_bytes()), (name.split(".")[0] + ".txt", b"a caption")):
                info = tarfile.TarInfo(member)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    source = ShardSource(str(tmp_path / "pairs-000000.tar"))
    source.prepare(LoadContext(to_tensor))
    loaded = {source.where(i).rpartition(":")[2]: source[i] for i in range(len(source))}
    assert isinstance(loaded["a"], Sample)
    assert (loaded["b"].reason, loaded["c"].reason) == ("oversized_image", "unreadable_image")
    assert "pairs-000000.tar:b.png" in loaded["b"].detail


def test_bad_and_truncated_videos_are_skipped_and_num_frames_0_is_an_error(media):
    videos = ("clip.mp4", "cut.mp4", "img/text.png", "gone.mp4")
    records = [{"video": v, "question": "what happens?", "answer": "it moves"} for v in videos]
    manifest = write_jsonl(media["root"] / "videos.jsonl", records)
    source = VideoQASource(str(manifest))
    source.prepare(LoadContext(to_tensor, num_frames=3, training=False))
    loaded = [source[i] for i in range(len(videos))]
    assert isinstance(loaded[0], Sample) and loaded[0].image.shape[0] == 3
    assert [s.reason for s in loaded[1:]] == ["unreadable_video"] * 3
    assert "cut.mp4" in loaded[1].detail and "text.png" in loaded[2].detail and "not found" in loaded[3].detail
    with pytest.raises(ConfigError, match="video data needs vision.num_frames >= 1 frames per clip, got 0"):
        VideoQASource(str(manifest)).prepare(LoadContext(to_tensor, num_frames=0))


class Flaky(TextSource):
    """A source whose records fail in the ways a user's own source might."""

    def load(self, index: int, seed: str) -> Sample:
        failure = self.records[index].get("failure")
        if failure == "runtime":
            raise RuntimeError("the record's remote copy is gone")
        if failure == "key":
            raise KeyError("transcript")
        if failure == "bug":
            raise TypeError("unsupported operand type(s) for +: 'int' and 'str'")
        return super().load(index, seed)


def test_any_error_of_one_record_is_skipped_but_a_programming_error_surfaces(tmp_path):
    records = [{"instruction": "say hi", "answer": "hi", "failure": f} for f in ("", "runtime", "key", "bug")]
    source = Flaky(str(write_jsonl(tmp_path / "flaky.jsonl", records)), name="flaky")
    source.prepare(LoadContext(to_tensor))
    assert isinstance(source[0], Sample)
    assert [source[i].reason for i in (1, 2)] == ["load_error", "load_error"]
    assert "flaky.jsonl: sample 1: RuntimeError: the record's remote copy is gone" in source[1].detail
    with pytest.raises(TypeError, match="unsupported operand"):
        source[3]
    strict = Flaky(str(tmp_path / "flaky.jsonl"), name="flaky")
    strict.prepare(LoadContext(to_tensor, strict=True))
    with pytest.raises(DataError, match="flaky.jsonl: sample 1: RuntimeError"):
        strict[1]


def test_malformed_manifest_lines_are_skipped_and_counted_by_reason(media):
    good = {"image": f"img/{media['good'][0]}", "question": "q?", "answer": "a"}
    lines = [good, "{not json", {**good, "answer": 3}, {**good, "answer": "  "}, {**good, "image": None}, good]
    source = ImageTextSource(str(write_jsonl(media["root"] / "lines.jsonl", lines)), name="lines")
    source.prepare(LoadContext(to_tensor))
    assert len(source) == 2
    assert dict(source.skipped_lines) == {"malformed_line": 1, "missing_field": 2, "empty_answer": 1}


# ------------------------------------------------------------------------------- 1, 3. the counts reach a run
def data_module(media: dict, bad: int, good: int, **options) -> VQADataModule:
    """Training data of ``good`` readable and ``bad`` unreadable images (and two malformed lines), held-out data of
    one readable and one unreadable image."""
    photos = [f"img/{f}" for f in media["good"]]
    train = [{"image": photos[i % len(photos)], "question": "what is it?", "answer": "a photo"} for i in range(good)]
    train += [{"image": "img/truncated.png", "question": "what is it?", "answer": "a photo"}] * bad
    val = [
        {"image": photos[0], "question": "q?", "answer": "a"},
        {"image": "img/bomb.png", "question": "q?", "answer": "a"},
    ]
    root = media["root"]
    write_jsonl(root / "train.jsonl", [*train, "{broken", {"image": photos[0], "answer": ""}])
    write_jsonl(root / "val.jsonl", val)
    return VQADataModule(str(root / "train.jsonl"), str(root / "val.jsonl"), batch_size=4, num_workers=0, **options)


def fit(model: L.LightningModule, data: L.LightningDataModule, tmp_path: Path, **options) -> L.Trainer:
    run = trainer(tmp_path, limit_val_batches=1.0, num_sanity_val_steps=0, **options)
    run.fit(model, data)
    return run


def test_every_skip_is_in_the_metrics_training_validation_and_manifest_lines(make_tiny, media, tmp_path):
    run = fit(make_tiny(), data_module(media, bad=1, good=7), tmp_path, max_epochs=1)
    metrics = {k: float(v) for k, v in run.callback_metrics.items() if k.startswith("data/skipped")}
    assert metrics["data/skipped/train/unreadable_image"] == 1 and metrics["data/skipped"] == 1
    assert metrics["data/skipped_val/val/oversized_image"] == 1
    assert metrics["data/skipped_lines/train/malformed_line"] == 1
    assert metrics["data/skipped_lines/train/empty_answer"] == 1
    assert run.global_step == 2


def test_more_than_the_allowed_share_of_skipped_samples_fails_the_run(make_tiny, media, tmp_path):
    with pytest.raises(TrainingFailed, match=r"dropped 5 of 8 samples \(62%\), more than data.max_skipped_share=0.5"):
        fit(make_tiny(), data_module(media, bad=5, good=3), tmp_path, max_epochs=1)
    run = fit(make_tiny(), data_module(media, bad=5, good=3, max_skipped_share=0.7), tmp_path, max_epochs=1)
    assert run.global_step == 2
    with pytest.raises(ConfigError, match="data.max_skipped_share: expected a share between 0 and 1, got 1.5"):
        data_module(media, bad=0, good=1, max_skipped_share=1.5)


def test_a_run_without_an_optimizer_step_fails_with_the_reason(make_tiny, media, tmp_path):
    all_bad = data_module(media, bad=8, good=0, max_skipped_share=1.0)
    with pytest.raises(TrainingFailed, match="no optimizer step: all 2 training batches of this run were empty"):
        fit(make_tiny(), all_bad, tmp_path, max_epochs=1)
    too_few = data_module(media, bad=0, good=3)  # fewer samples than one batch (drop_last)
    with pytest.raises(TrainingFailed, match=r"gave no batch \(3 training samples for batches of 4, the last"):
        fit(make_tiny(), too_few, tmp_path, max_epochs=1)


def test_video_data_with_num_frames_0_is_an_error_not_a_run_of_skips(make_tiny, media, tmp_path):
    manifest = write_jsonl(media["root"] / "clips.jsonl", [{"video": "clip.mp4", "question": "q?", "answer": "a"}] * 4)
    data = MixtureDataModule([VideoQASource(str(manifest), name="clips")], batch_size=2, num_workers=0)
    with pytest.raises(ConfigError, match="source clips: video data needs vision.num_frames >= 1"):
        fit(make_tiny(vision={"num_frames": 0}), data, tmp_path, max_steps=1)


def test_image_size_not_divisible_by_the_patch_is_an_error_naming_both(make_tiny):
    with pytest.raises(
        ConfigError, match=r"vision.image_size: 30 is not a multiple of the patch size 8 .*use 24 or 32"
    ):
        make_tiny(vision={"image_size": 30})


# ------------------------------------------------------------------------------------------- 4. generate
def test_a_long_prompt_loses_its_start_with_a_warning_never_its_question(make_tiny):
    model = make_tiny(prompt=PromptConfig(max_length=32))
    words = "the big red circle is left of a small blue square " * 500  # about 5000 tokens
    with pytest.warns(PromptCutWarning, match=r"prompt.max_length=32: 1 of 1 prompts were longer \(up to \d{4} tokens"):
        batch = model.processor.prompts([Sample(words + "how many shapes are there?")])
    kept = model.tokenizer.convert_ids_to_tokens(batch["input_ids"][0])
    assert kept[-8:] == ["how", "many", "shapes", "are", "there", "?", "bot", ":"]  # the question and the cue stay
    assert batch["num_cut"] == 1 and batch["input_ids"].shape[1] == 32
    with pytest.warns(PromptCutWarning):
        answers = model.generate([photo("coffee")], [words + "how many shapes are there?"], max_new_tokens=2)
    assert len(answers) == 1


def test_an_empty_batch_answers_nothing_and_degenerate_images_are_named(make_tiny, media):
    model = make_tiny()
    assert model.generate([], []) == [] and model.generate(prompts=[]) == []
    with pytest.raises(ValueError, match="image 1: a degenerate PIL image of 0x5 pixels"):
        model.generate([photo("coffee"), Image.new("RGB", (0, 5))], ["a?", "b?"])
    with pytest.raises(ValueError, match=r"image 0: a tensor must be \(3, H, W\) and transformed, got \(3, 0, 5\)"):
        model.generate([torch.zeros(3, 0, 5)], ["a?"])
    with pytest.raises(OSError, match=r"bomb.png: .*(max_image_pixels=89478485)"):
        model.generate([media["root"] / "img" / "bomb.png"], ["a?"])
    with pytest.raises(OSError, match="truncated.png: not a readable image"):
        model.generate([media["root"] / "img" / "truncated.png"], ["a?"])


# ------------------------------------------------------------------------------------------ 5. evaluation
@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "runs/alpha/checkpoints/last.ckpt", 0, "PrefixLynx")


def open_vqa(media: dict) -> Path:
    good = [f"img/{f}" for f in media["good"][:3]]
    questions = [{"image": good[0], "question": "what is it?", "answer": "a cup", "id": "q0", "category": "object"}]
    questions.append({"image": "img/truncated.png", "question": "what is it?", "answer": "a cat", "id": "q1"})
    questions += [
        {"image": g, "question": "what is it?", "answer": "a cup", "id": f"q{i + 2}"} for i, g in enumerate(good)
    ]
    return write_jsonl(media["root"] / "open.jsonl", questions)


def test_an_unreadable_benchmark_image_is_skipped_and_recorded(media, tiny_ckpt, tmp_path):
    evaluator = Evaluator(tmp_path, judge=None, batch_size=2)  # vqa: exact match
    variant = parse_variant(str(tiny_ckpt))  # named after its run folder: runs/alpha/checkpoints/last.ckpt
    path = evaluator.run([variant], [Benchmark("vqa", "open", open_vqa(media))])[0]
    record = json.loads(path.read_text())
    assert path.name == "alpha__open.json"
    assert record["num_samples"] == 5 and record["num_skipped"] == 1 and record["num_judged"] == 4
    assert record["skipped"] == [{"id": "q1", "image": "img/truncated.png", "error": record["skipped"][0]["error"]}]
    assert "truncated.png: not a readable image" in record["skipped"][0]["error"]
    rows = [json.loads(line) for line in (tmp_path / record["predictions"]).read_text().splitlines()]
    assert [r["verdict"] == "skipped" for r in rows] == [False, True, False, False, False]
    assert rows[1]["prediction"] is None and "truncated.png" in rows[1]["error"]


def unreachable_judge() -> OpenAIChatJudge:
    import socket

    with socket.socket() as probe:  # a free port nobody listens on: every connection is refused
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return OpenAIChatJudge(f"http://127.0.0.1:{port}/v1", "judge", api_key_env=None, max_retries=1, backoff=0.01)


def test_an_unreachable_judge_ends_the_run_after_its_failure_budget(media, tiny_ckpt, tmp_path):
    evaluator = Evaluator(tmp_path, judge=unreachable_judge(), judge_budget=JudgeBudget(max_consecutive_failures=2))
    started = time.monotonic()
    with pytest.raises(JudgeBudgetExceeded, match=r"stopped after 2 of 4 judgements: 2 failures in a row") as caught:
        evaluator.run([Variant("alpha", str(tiny_ckpt))], [Benchmark("openvqa", "open", open_vqa(media))])
    assert time.monotonic() - started < 60
    assert "ConnectionRefusedError" in str(caught.value) or "Connection refused" in str(caught.value)
    rows = [json.loads(line) for line in (tmp_path / "alpha__open.predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and all(r["prediction"] is not None for r in rows if r["verdict"] != "skipped")
    assert not (tmp_path / "alpha__open.json").exists()  # no results that could be read as 0 %


def test_the_command_line_ends_non_zero_naming_the_judge(media, tiny_ckpt, tmp_path):
    judge = unreachable_judge()
    args = ["evaluate", f"alpha={tiny_ckpt}", "--openvqa", f"open={open_vqa(media)}", "--results", str(tmp_path)]
    args += ["--judge", "openai", "--judge-url", judge.url.removesuffix("/chat/completions"), "--judge-model", "j"]
    args += ["--judge-api-key-env", "", "--judge-retries", "0", "--judge-max-failures", "3"]
    with pytest.raises(SystemExit) as exit_:
        main(args)
    message = str(exit_.value)
    assert message.startswith("python -m lynx_zoo evaluate: error: judge openai:j@http://127.0.0.1:")
    assert "3 failures in a row" in message and "\n" not in message


def test_judge_failures_are_their_own_column_never_zero_accuracy(media, tiny_ckpt, tmp_path):
    with ChatServer() as server:
        server.script.extend([("content", "Perhaps")] * 4)  # every reply is neither yes nor no
        judge = OpenAIChatJudge(server.base_url, "judge", api_key_env=None, max_retries=0)
        evaluator = Evaluator(tmp_path, judge=judge, judge_budget=JudgeBudget(max_consecutive_failures=None))
        (path,) = evaluator.run([Variant("alpha", str(tiny_ckpt))], [Benchmark("openvqa", "open", open_vqa(media))])
    record = json.loads(path.read_text())
    assert record["judge_failures"] == 4 and record["num_judged"] == 0 and record["num_skipped"] == 1
    assert record["summary"]["overall"] is None  # nothing judged: no accuracy, not 0.0
    from lynx_zoo.evaluation.report import load_results

    table = markdown_table(load_results([path]), tmp_path)
    assert "| variant | open: overall | open: all | open: object | open: judge failures | open: skipped |" in table
    assert "| – | – | – | 4 of 5 | 1 of 5 |" in table


def test_a_judge_time_limit_ends_the_run(tmp_path):
    with ChatServer() as server:
        server.script.extend([("sleep", 0.3)] * 3)
        judge = OpenAIChatJudge(server.base_url, "judge", api_key_env=None, max_retries=0)
        budget = JudgeBudget(max_consecutive_failures=None, max_seconds=0.5)
        with pytest.raises(JudgeBudgetExceeded, match=r"stopped after 2 of 3 judgements: judging took \d s, over"):
            judge_all(judge, [("q", "a", "a")] * 3, budget=budget)


# ----------------------------------------------------------------------------------- 6. configs, checkpoints
def fit_error(tmp_path: Path, *args: str) -> str:
    """The one-line error of ``python -m lynx_zoo fit`` (run in this process) on the tiny config with ``args``."""
    options = [f"--trainer.default_root_dir={tmp_path / 'run'}", f"--data.init_args.root={tmp_path / 'shapes'}"]
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(TINY), *options, *args])
    message = str(exit_.value)
    assert message.startswith("python -m lynx_zoo fit: error: ") and "\n" not in message, message
    return message.removeprefix("python -m lynx_zoo fit: error: ")


def overlay(tmp_path: Path, text: str) -> str:
    path = tmp_path / "overlay.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--model.class_path=NoSuchFusion"], "unknown model class 'NoSuchFusion': valid choices: CrossAttnLynx,"),
        (["--data.class_path=NoSuchData"], "unknown data class 'NoSuchData': valid choices: MixtureDataModule,"),
        (["--model=lynx_zoo.NoSuch"], "unknown model class 'lynx_zoo.NoSuch'"),
        (["--model.init_args.optimizer.lr=-0.001"], "optimizer.lr: expected a positive number, got -0.001"),
        (
            ["--model.init_args.adapters.layers=[0,7]"],
            "adapters.layers: [7] out of range for an LLM with 4 layers (expected 0..3), got [0, 7]",
        ),
        (["--model.init_args.vision.image_size=30"], "vision.image_size: 30 is not a multiple of the patch size 8"),
        (["--data.init_args.max_skipped_share=-1"], "data.max_skipped_share: expected a share between 0 and 1"),
    ],
)
def test_a_bad_config_value_is_one_line_naming_key_value_and_expectation(tmp_path, args, expected):
    assert expected in fit_error(tmp_path, *args)


def test_a_strict_error_in_a_dataloader_worker_is_one_line_naming_the_file(tmp_path):
    from lynx_zoo.data.shapes import write_shapes_vqa

    write_shapes_vqa(tmp_path / "shapes", num_train=32, num_val=8, image_size=32, seed=0)
    (tmp_path / "shapes" / "params.txt").write_text("num_train=32 num_val=8 image_size=32 seed=0")  # as prepare_data
    for image in (tmp_path / "shapes" / "images").glob("train_*.png"):
        image.write_bytes(b"")  # every training image: the first batch meets one
    message = fit_error(tmp_path, "--data.init_args.strict=true", "--data.init_args.num_workers=1")
    assert message.startswith("source train: ") and "Traceback" not in message
    assert re.search(r"train.jsonl: cannot read \S+/images/train_\d{6}.png: not a readable image \(Unid", message)


def test_an_unknown_class_in_yaml_and_a_misspelt_section_are_named(tmp_path):
    message = fit_error(tmp_path, "--config", overlay(tmp_path, "model:\n  class_path: NoSuchModel\n"))
    assert message.startswith("unknown model class 'NoSuchModel': valid choices: CrossAttnLynx, PrefixLynx")
    message = fit_error(tmp_path, "--config", overlay(tmp_path, "model:\n  init_args:\n    optimizr: {lr: 0.1}\n"))
    assert message.startswith("unknown option 'optimizr' for PrefixLynx: did you mean 'optimizer'?")


def test_out_of_range_optimizer_values_name_the_key():
    for values, key in (({"min_lr": 1.0}, "min_lr"), ({"warmup_ratio": 2.0}, "warmup_ratio"), ({"eps": 0}, "eps")):
        with pytest.raises(ConfigError, match=f"optimizer.{key}: expected"):
            OptimizerConfig(**values)


@pytest.mark.parametrize("kind", ["empty", "truncated", "not a checkpoint"])
def test_a_broken_checkpoint_is_named_in_one_line(tmp_path, tiny_ckpt, make_tiny, kind):
    broken = tmp_path / "broken.ckpt"
    data = tiny_ckpt.read_bytes()
    broken.write_bytes({"empty": b"", "truncated": data[: len(data) // 3], "not a checkpoint": b"PK\x03\x04 no"}[kind])
    message = fit_error(tmp_path, "--ckpt_path", str(broken))
    assert "broken.ckpt" in message and ("empty file" in message or "not a readable checkpoint" in message)
    with pytest.raises(CheckpointError, match="broken.ckpt"):
        read_torch_checkpoint(broken)
    with pytest.raises(CheckpointError, match="broken.ckpt"):  # init_from reads it the same way
        make_tiny().load_weights(str(broken))


def test_ckpt_path_last_without_a_checkpoint_stops_saying_where_it_looked(tmp_path):
    message = fit_error(tmp_path, "--ckpt_path", "last")
    assert message == (
        f"--ckpt_path last: no checkpoint to resume in {tmp_path / 'run' / 'checkpoints'} (missing); to start a fresh "
        "run, leave out --ckpt_path"
    )
    assert ResumeError.__mro__[1].__name__ == "ReportedError"


def test_the_next_save_removes_what_a_killed_save_left_behind(tmp_path):
    stale = tmp_path / ".last.ckpt.0123abcd.tmp"
    stale.write_bytes(b"half a checkpoint")
    os.utime(stale, (time.time() - 60, time.time() - 60))
    plugin = AtomicCheckpointIO()
    in_progress = tmp_path / ".epoch=1.ckpt.89abcdef.tmp"  # another save, still being written: kept
    in_progress.write_bytes(b"being written")
    plugin.save_checkpoint({"step": 1}, tmp_path / "last.ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == [in_progress.name, "last.ckpt"]
    assert plugin.load_checkpoint(tmp_path / "last.ckpt") == {"step": 1}


# ---------------------------------------------------------------------------------------- 2. resume
class BatchIds(L.Callback):
    """The sample ids of each training batch."""

    def __init__(self) -> None:
        self.ids: list[list[str]] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.ids.append(list(batch["ids"]))


@pytest.mark.parametrize("stop", [3, 4], ids=["mid-epoch", "at-a-limited-epochs-end"])
def test_the_vqa_loader_resumes_with_the_next_unseen_batch(make_tiny, shapes_root, tmp_path, stop):
    def data() -> VQADataModule:
        return VQADataModule(str(shapes_root / "train.jsonl"), batch_size=16, num_workers=0, seed=3)

    full, first, rest = BatchIds(), BatchIds(), BatchIds()
    options = dict(max_steps=10, limit_train_batches=4)  # epochs of 4 of the 16 batches
    model = make_tiny()
    trainer(tmp_path / "full", callbacks=[full], **options).fit(model, datamodule=data())
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=stop, filename="{step}")
    trainer(tmp_path / "a", callbacks=[first, checkpoint, StopAt(stop)], enable_checkpointing=True, **options).fit(
        make_tiny(), datamodule=data()
    )
    resumed = make_tiny()
    trainer(tmp_path / "b", callbacks=[rest], **options).fit(
        resumed, datamodule=data(), ckpt_path=tmp_path / "ckpt" / f"step={stop}.ckpt"
    )
    assert first.ids == full.ids[:stop] and rest.ids == full.ids[stop:]  # nothing repeated or missed
    assert full.ids[:4] != full.ids[4:8]  # each epoch its own order
    for (name, a), b in zip(model.trainable_parameters(), [p for _, p in resumed.trainable_parameters()]):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda m, name=name: f"{name}: {m}")


# ------------------------------------------------------------------------------ 2. kill and resume (slow)
def fit_process(root: Path, shapes: Path, *overlays: Path, resume: bool = False) -> subprocess.Popen:
    """A real ``python -m lynx_zoo fit`` of the tiny config for 12 steps (3 epochs of 4 batches), checkpointing
    every 2 steps into ``root/checkpoints``."""
    args = [sys.executable, "-m", "lynx_zoo", "fit", "--config", str(TINY)]
    args += [a for o in overlays for a in ("--config", str(o))]
    args += [f"--trainer.default_root_dir={root}", f"--data.init_args.root={shapes}", "--data.init_args.num_train=8"]
    args += ["--trainer.max_steps=12", "--trainer.enable_progress_bar=false"]
    args += ["--ckpt_path", "last"] if resume else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(args, cwd=root.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finished(process: subprocess.Popen) -> str:
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-3000:]
    return output


def killed_at(process: subprocess.Popen, marker: Path) -> None:
    """SIGKILL ``process`` once it wrote ``marker`` (it then waits where the test wants it killed)."""
    deadline = time.monotonic() + 300
    while not marker.exists():
        assert process.poll() is None, process.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "the run never reached the point where it is killed"
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def callbacks_overlay(path: Path, *extra: dict, plugins: list[dict] | None = None) -> Path:
    checkpoint = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint"}
    checkpoint["init_args"] = {"save_last": True, "every_n_train_steps": 2}
    trainer_config: dict = {"callbacks": [checkpoint, *extra]}
    if plugins is not None:
        trainer_config["plugins"] = plugins
    path.write_text(yaml.safe_dump({"trainer": trainer_config}))
    return path


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    """The reference: the same run, never killed."""
    root = tmp_path_factory.mktemp("resume")
    shapes = root / "shapes"
    finished(fit_process(root / "reference", shapes, callbacks_overlay(root / "checkpoints.yaml")))
    return {"root": root, "shapes": shapes, "weights": weights(root / "reference" / "checkpoints" / "last.ckpt")}


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


@pytest.mark.slow
def test_a_run_killed_mid_training_resumes_to_the_same_weights(uninterrupted):
    root, shapes = uninterrupted["root"], uninterrupted["shapes"]
    run, marker = root / "killed", root / "paused"
    pause = {"class_path": "run_helpers.PauseAt", "init_args": {"step": 7, "marker": str(marker)}}
    killed_at(fit_process(run, shapes, callbacks_overlay(root / "pause.yaml", pause)), marker)
    assert read_torch_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == 6  # mid-epoch 2 of 3
    output = finished(fit_process(run, shapes, callbacks_overlay(root / "checkpoints.yaml"), resume=True))
    assert f"Restored all states from the checkpoint at {run / 'checkpoints' / 'last.ckpt'}" in output
    assert "not resumable" not in output and "version_1" in str(list((run / "lightning_logs").iterdir()))
    resumed = read_torch_checkpoint(run / "checkpoints" / "last.ckpt")
    assert resumed["global_step"] == 12
    assert_same_weights(resumed["state_dict"], uninterrupted["weights"])


@pytest.mark.slow
def test_a_run_killed_during_a_save_resumes_from_the_previous_checkpoint(uninterrupted):
    root, shapes = uninterrupted["root"], uninterrupted["shapes"]
    run, marker = root / "killed_saving", root / "saving"
    stall = [{"class_path": "run_helpers.StallingCheckpointIO", "init_args": {"step": 4, "marker": str(marker)}}]
    killed_at(fit_process(run, shapes, callbacks_overlay(root / "stall.yaml", plugins=stall)), marker)
    leftovers = [p.name for p in (run / "checkpoints").glob(".*.tmp")]
    assert len(leftovers) == 1, leftovers
    assert read_torch_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == 2  # the previous one, whole
    finished(fit_process(run, shapes, callbacks_overlay(root / "checkpoints.yaml"), resume=True))
    assert list((run / "checkpoints").glob(".*.tmp")) == []  # the next save removed it
    assert_same_weights(weights(run / "checkpoints" / "last.ckpt"), uninterrupted["weights"])


@pytest.mark.slow
def test_a_bad_value_exits_non_zero_with_one_line_from_a_real_process(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-m", "lynx_zoo", "fit", "--config", str(TINY), "--model.init_args.optimizer.lr=-1"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert errors == ["python -m lynx_zoo fit: error: optimizer.lr: expected a positive number, got -1.0"]
    assert "Traceback" not in result.stderr


def test_ckpt_path_last_leaves_checkpoints_in_an_object_store_to_lightning(tmp_path):
    from types import SimpleNamespace

    from lynx_zoo.training.resume import resolve_last

    remote = SimpleNamespace(checkpoint_callbacks=[ModelCheckpoint(dirpath="memory://run/checkpoints")])
    assert resolve_last(remote) is None  # Lightning's own "last" looks there
    local = SimpleNamespace(checkpoint_callbacks=[ModelCheckpoint(dirpath=str(tmp_path / "checkpoints"))])
    with pytest.raises(ResumeError, match="checkpoints"):
        resolve_last(local)


def test_a_model_outside_a_trainer_has_no_attached_trainer(make_tiny):
    from lynx_zoo.fusion.scale_out import attached_trainer

    model = make_tiny()
    assert attached_trainer(model) is None
    run = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    model.trainer = run
    assert attached_trainer(model) is run
