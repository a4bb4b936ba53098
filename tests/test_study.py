"""The frozen-LLM study: its data (a detail only the higher resolution shows, held-out phrasings, text that states
every answer), its configs (built on the meta device with the counts their cards state; a frozen LLM gets no
gradient), and the study command end to end (resumable, results per row and seed, the report)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import REPO

from lynx_zoo.hub.config import model_config_from_files
from lynx_zoo.hub.variants import VARIANTS
from lynx_zoo.recipes.shapes_study import (
    PATTERNS,
    PHRASINGS,
    TRAIN_PHRASINGS,
    ShapesStudyDataModule,
    caption,
    draw_scene,
    render,
    shapes_study_tokenizer,
    write_shapes_study,
)
from lynx_zoo.recipes.study import ROWS
from lynx_zoo.vision import VisionConfig, VisionEncoder

CARDS = REPO / "model_cards"
STUDY_VARIANTS = sorted(v for v in VARIANTS if v.startswith("lynx-study-"))
# reference sizes at the study LLM's width 128 (independent of the code that builds them)
BOTTLENECK = 2 * 128 * 64 + 64 + 128 + 2 * 128 + 1  # down + up, their biases, the LayerNorm, the scale
LORA_LAYER = 4 * 8 * (128 + 128)  # rank-8 A and B on q, k, v and o (each 128 x 128)
XATTN = 2 * 128 + (128 * 128 + 128 * 256 + 128 * 128) + 2 + 2 * 128 + 2 * 128 * 256  # LN, q/kv/out, gates, LN + FF
LLM = 58 * 128 * 2 + 4 * (4 * 128 * 128 + 3 * 128 * 512 + 2 * 128) + 128  # embeddings, head, 4 layers, final norm
# row -> (adapter parameters, fusion-block parameters, LLM trains)
EXPECTED = {
    "pt-adapters-every-2nd": (2 * BOTTLENECK, 0, False),
    "pt-adapters-every-layer": (4 * BOTTLENECK, 0, False),
    "pt-adapters-none": (0, 0, False),
    "pt-lora": (4 * LORA_LAYER, 0, False),
    "ca-frozen": (0, 2 * XATTN, False),
    "ca-trainable-llm": (0, 2 * XATTN, True),
    "pt-low-res": (2 * BOTTLENECK, 0, False),
    "pt-single-prompt": (2 * BOTTLENECK, 0, False),
}


@pytest.fixture(scope="module")
def study_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("study_data")
    write_shapes_study(root, num_train=40, num_val=12, num_text=20, seed=3)
    return root


def manifest(root: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (root / name).read_text().splitlines()]


# ----------------------------------------------------------------------------------------------- the data
def test_the_patterns_need_the_higher_resolution(one_thread):
    """At 64 px the three patterns of an object differ; shrunk to 32 px by the model's transform they are one tint."""
    import random

    objects = draw_scene(random.Random(0))
    images = {}
    for pattern in PATTERNS:
        scene = render([{**o, "pattern": pattern} for o in objects], 64, (230, 230, 230))
        images[pattern] = {
            size: VisionEncoder(
                VisionConfig(image_size=size, model_kwargs=dict(patch_size=16, embed_dim=32, depth=1, num_heads=2))
            ).image_transform()(scene)
            for size in (64, 32)
        }
    for a, b in [(PATTERNS[0], PATTERNS[1]), (PATTERNS[0], PATTERNS[2]), (PATTERNS[1], PATTERNS[2])]:
        high = (images[a][64] - images[b][64]).abs().max()
        low = (images[a][32] - images[b][32]).abs()
        # away from the objects' edges (one pixel of the small image) the patterns are indistinguishable
        interior = low[:, 1:-1, 1:-1].flatten(1).quantile(0.9, dim=1).max()
        assert high > 1.0 and interior < 0.05 * high, (a, b, float(high), float(interior))


def test_every_question_in_every_phrasing_and_every_caption_uses_the_tokenizer_words(study_data):
    tokenizer = shapes_study_tokenizer()
    for name in ("train_diverse.jsonl", "val_held_out_phrasings.jsonl", "text_train.jsonl"):
        for record in manifest(study_data, name):
            for text in (record.get("question") or record["instruction"], record["answer"]):
                ids = tokenizer(text, add_special_tokens=False)["input_ids"]
                assert tokenizer.unk_token_id not in ids, text


def test_held_out_phrasings_are_never_trained_on(study_data):
    def template_of(question: str, category: str) -> int:
        for i, template in enumerate(PHRASINGS[category]):
            pattern = re.escape(template).replace(r"\{shape\}", r"\w+").replace(r"\{colour\}", r"\w+")
            if re.fullmatch(pattern, question):
                return i
        raise AssertionError(question)

    used = {}
    for name in ("train_single.jsonl", "train_diverse.jsonl", "val.jsonl", "val_held_out_phrasings.jsonl"):
        used[name] = {template_of(r["question"], r["category"]) for r in manifest(study_data, name)}
    assert used["train_single.jsonl"] == used["val.jsonl"] == {0}
    assert used["train_diverse.jsonl"] == set(range(TRAIN_PHRASINGS))
    assert used["val_held_out_phrasings.jsonl"] == set(range(TRAIN_PHRASINGS, len(PHRASINGS["colour"])))
    # the same images, questions and answers in either phrasing
    single, diverse = manifest(study_data, "train_single.jsonl"), manifest(study_data, "train_diverse.jsonl")
    assert [(r["image"], r["answer"], r["category"]) for r in single] == [
        (r["image"], r["answer"], r["category"]) for r in diverse
    ]
    assert {r["category"] for r in single} == set(PHRASINGS)


def test_text_only_questions_are_answered_by_their_caption(study_data):
    for record in manifest(study_data, "text_train.jsonl"):
        scene, question = record["instruction"].split(" . ")
        assert record["answer"] in scene or record["category"] == "counting"
        if record["category"] == "counting":
            assert scene.count(" and ") + 1 == ["one", "two", "three"].index(record["answer"]) + 1
    import random

    objects = draw_scene(random.Random(1))
    assert caption(objects).startswith(f"a {objects[0]['colour']} {objects[0]['shape']} with {objects[0]['pattern']}")


def test_the_datamodule_mixes_image_and_text_questions_and_rerenders_on_other_settings(tmp_path, make_tiny):
    data = ShapesStudyDataModule(
        root=str(tmp_path / "set"), num_train=8, num_val=4, num_text=8, image_ratio=0.5, text_ratio=0.5, batch_size=4
    )
    data.prepare_data()
    stamp = (tmp_path / "set" / "params.json").read_text()
    data.processor = make_tiny(llm={"tokenizer": "lynx_zoo/shapes-study-words"}).processor
    data.setup("fit")
    kinds = {batch["images"] is None for _, batch in zip(range(8), data.train_dataloader())}
    assert kinds == {True, False}  # text-only batches and image batches
    ShapesStudyDataModule(root=str(tmp_path / "set"), num_train=9, num_val=4, num_text=8).prepare_data()
    assert (tmp_path / "set" / "params.json").read_text() != stamp
    assert len(manifest(tmp_path / "set", "train_single.jsonl")) == 9 * 5
    with pytest.raises(ValueError, match="image_ratio and text_ratio are both 0"):
        ShapesStudyDataModule(image_ratio=0, text_ratio=0)
    with pytest.raises(ValueError, match="phrasings: expected 'single' or 'diverse'"):
        ShapesStudyDataModule(phrasings="many")


# ----------------------------------------------------------------------------------------------- the configs
def card_count(text: str, name: str) -> int:
    match = re.search(rf"^- {re.escape(name)}: ([\d,]+)", text, re.M)
    assert match, name
    return int(match[1].replace(",", ""))


def card_rows(text: str) -> dict[str, int]:
    return {k: int(v.replace(",", "")) for k, v in re.findall(r"^\| ([^|]+) \| ([\d,]+) \| (?:yes|no) \|$", text, re.M)}


def test_every_row_of_the_study_has_a_config_and_a_card():
    rows = {f"lynx-study-{row.name.replace('_', '-')}" for row in ROWS}
    assert rows | {"lynx-study-stage0"} == set(STUDY_VARIANTS)
    for row in ROWS:
        info = VARIANTS[f"lynx-study-{row.name.replace('_', '-')}"]
        assert [(REPO / c).resolve() for c in info.configs] == [p.resolve() for p in row.configs()]


@pytest.mark.parametrize("variant", sorted(EXPECTED))
def test_each_study_config_builds_on_meta_with_the_parameter_counts_its_card_states(variant):
    info = VARIANTS[f"lynx-study-{variant}"]
    config, _ = model_config_from_files(info.config_paths)
    model = config.build_on_meta()
    adapters, blocks, llm_trains = EXPECTED[variant]
    text = (CARDS / f"{info.id}.md").read_text()
    rows = card_rows(text)
    assert sum(p.numel() for a in model.adapter_blocks.values() for p in a.parameters()) == adapters
    assert rows.get("adapters", 0) == adapters
    assert rows.get("fusion blocks", 0) == blocks
    assert rows["LLM (without adapters / fusion blocks)"] == LLM
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert card_count(text, "total parameters") == total
    assert card_count(text, "trainable parameters") == trainable
    vision_side = rows["vision tower"] + rows["bridge"] + rows.get("other (frame positions, ...)", 0)
    assert trainable == vision_side + adapters + blocks + (LLM if llm_trains else 0)
    # a frozen base LLM is referenced by the variant, not stored
    assert card_count(text, "parameters stored in the variant's model.safetensors") == trainable


@pytest.mark.parametrize("row", ROWS, ids=[row.name for row in ROWS])
def test_a_frozen_llm_gets_no_gradient_and_the_trained_parts_do(row, study_data, one_thread):
    config, _ = model_config_from_files(row.configs())
    config = config.replace(llm={"pretrained": False})  # random weights in place of the stage-0 LLM
    torch.manual_seed(0)
    model = config.build()
    data = ShapesStudyDataModule(root=str(study_data), num_train=40, num_val=12, num_text=20, render_seed=3)
    data.processor = model.processor
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    model.train()
    model(batch["input_ids"], batch["attention_mask"], batch["images"], batch["labels"]).loss.backward()
    adapter_params = {id(p) for a in model.adapter_blocks.values() for p in a.parameters()}
    block_params = {id(p) for b in model.fusion_blocks().values() for p in b.parameters()}
    llm_base = [(n, p) for n, p in model.llm.named_parameters() if id(p) not in adapter_params | block_params]
    if config.llm.trainable:
        assert all(p.grad is not None for _, p in llm_base)
    else:
        assert not any(p.requires_grad for _, p in llm_base)
        assert [n for n, p in llm_base if p.grad is not None] == []
    trained = [p for a in model.adapter_blocks.values() for p in a.parameters()]
    trained += [p for b in model.fusion_blocks().values() for p in b.parameters()]
    trained += list(model.bridge.parameters()) + list(model.vision.parameters())
    missing = [p for p in trained if p.grad is None]
    if config.adapters.kind == "lora":  # B starts at zero: no gradient reaches A through it yet
        missing = [p for p in missing if p.shape[0] != config.adapters.rank]
    assert not missing


# ----------------------------------------------------------------------------------------------- the command
@pytest.mark.slow
def test_the_study_command_runs_every_row_and_seed_resumes_and_reports(tmp_path, monkeypatch, capsys):
    from lynx_zoo.cli import main

    monkeypatch.chdir(tmp_path)
    small = ["--data.init_args.num_train=8", "--data.init_args.num_val=2", "--data.init_args.num_text=8"]
    args = ["study", "--out", "runs", "--data", "data", "--report", "report", "--steps", "2", "--stage0-steps", "2"]
    args += ["--rows", "pt_adapters_every_2nd", "ca_frozen", "--seeds", "0", "1", "--", *small]
    main(args)
    first = capsys.readouterr().out
    assert "[4/4] ca_frozen seed 1: training" in first and "stage 0: text-only accuracy" in first
    assert first.index("[2/4] ca_frozen seed 0: training") < first.index("[3/4] pt_adapters_every_2nd seed 1")
    assert (tmp_path / "runs/stage0/llm/config.json").is_file()
    results = sorted(p.name for p in (tmp_path / "runs/results").glob("*.json"))
    assert results == sorted(
        f"{row}-s{seed}__{bench}.json"
        for row in ("pt_adapters_every_2nd", "ca_frozen")
        for seed in (0, 1)
        for bench in ("shapes_study", "shapes_study_held_out")
    )
    record = json.loads((tmp_path / "runs/results/ca_frozen-s1__shapes_study.json").read_text())
    assert record["study"]["row"] == "ca_frozen" and record["study"]["seed"] == 1
    assert record["study"]["paper_row"] == "cross_attn" and record["study"]["steps"] == 2
    assert record["study"]["train_seconds"] > 0 and set(record["chance"]) >= {"overall", "pattern"}
    report = (tmp_path / "report/report.md").read_text()
    metrics, rows = [line for line in report.splitlines() if line.startswith("| [ca_frozen](")][-2:]
    assert metrics.count(" ± ") == 6 and "/configs/study/ca_frozen.yaml) | 2 | " in rows  # mean ± std of 2 seeds
    assert "w/ cross-attn (frozen LLM) 31.79" in report and (tmp_path / "report/shapes_study.png").is_file()

    # run again: nothing retrains; a run whose results are gone is evaluated again from its checkpoint
    (tmp_path / "runs/results/ca_frozen-s1__shapes_study.json").unlink()
    logs = {p: p.stat().st_mtime for p in (tmp_path / "runs").rglob("fit.log")}
    main(args)
    second = capsys.readouterr().out
    assert "stage 0: " in second and "(done)" in second and "[1/4] pt_adapters_every_2nd seed 0: done" in second
    assert "[4/4] ca_frozen seed 1: evaluating" in second and ": training" not in second
    assert {p: p.stat().st_mtime for p in logs} == logs
    assert (tmp_path / "runs/results/ca_frozen-s1__shapes_study.json").is_file()

    # a grid stopped midway: --report-only trains nothing and reports the runs there are, naming the others
    main([*args[: args.index("--seeds")], "--seeds", "0", "1", "2", "--report-only"])
    third = capsys.readouterr().out
    assert ": training" not in third and "stage 0" not in third
    assert "left out: pt_adapters_every_2nd-s2__shapes_study.json" in third
    assert {p: p.stat().st_mtime for p in logs} == logs
    published = sorted(p.name for p in (tmp_path / "report/results/frozen_llm").glob("*.json"))
    assert published == results
