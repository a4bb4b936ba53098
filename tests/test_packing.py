"""Packed rows: several samples per row, each with its own visual tokens and positions, attention kept inside each
sample; the loss and its gradients equal the unpacked batch's (PT and CA, images and videos); the mixture packs its
batches without changing which samples they hold."""

from __future__ import annotations

import pickle

import pytest
import torch
from conftest import TINY_CROSS_ATTN, loss_and_grads, open_gates
from media import save_photos, write_jsonl
from run_helpers import Recorder, trainer

from lynx_zoo import CrossAttnLynx, PrefixLynx
from lynx_zoo.data import IGNORE_INDEX, ImageTextSource, MixtureDataModule, Sample, TextSource
from lynx_zoo.data.packing import PackedRows, PackingCollate, assign_rows
from lynx_zoo.fusion.base import model_inputs

CA = {"cross_attn": TINY_CROSS_ATTN}
QA = [
    ("what color is the circle?", "red"),
    ("how many shapes are there in the picture?", "three small shapes and a big one"),
    ("is it big?", "no"),
    ("what shape is at the top left?", "a blue triangle"),
    ("describe the picture in a few words please", "a red circle beside a green square on white"),
]


def samples(video: bool = False, text_only: bool = False) -> list[Sample]:
    g = torch.Generator().manual_seed(7)
    shape = (5, 3, 32, 32) if video else (3, 32, 32)
    out = [Sample(q, a, image=None if text_only else torch.randn(*shape, generator=g), id=str(i)) for i, (q, a) in
           enumerate(QA)]  # fmt: skip
    out[3].history = [("what is this?", "a drawing of shapes")]
    return out


def build(make_tiny, cls):
    model = make_tiny(cls, llm={"trainable": True}, **(CA if cls is CrossAttnLynx else {}))
    open_gates(model, 0.7, 0.4)  # CA: open gates, so the media matter
    return model


def packer(model, max_tokens: int = 64) -> PackingCollate:
    return PackingCollate(model.processor, max_tokens, model.media_tokens_in_sequence)


def test_rows_take_every_sample_once_within_the_budget_and_end_close_together():
    lengths = [50, 7, 31, 64, 12, 12, 40, 3, 22, 18, 9, 44]
    rows = assign_rows(lengths, 64)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    fills = [sum(lengths[i] for i in row) for row in rows]
    assert max(fills) <= 64 and len(rows) <= -(-sum(lengths) // 64) + 2
    assert 1 - sum(fills) / (len(rows) * max(fills)) < 0.05  # under 5 % padding
    rng = torch.Generator().manual_seed(0)  # heavy-tailed lengths, 16 at a time: the padding stays small
    for _ in range(20):
        lengths = (torch.empty(16).log_normal_(4.5, 0.8, generator=rng).clamp(4, 700)).long().tolist()
        fills = [sum(lengths[i] for i in row) for row in assign_rows(lengths, 1536)]
        assert max(fills) <= 1536 and 1 - sum(fills) / (len(fills) * max(fills)) < 0.1
    with pytest.raises(ValueError, match="does not fit a row of max_tokens=32"):
        assign_rows([40], 32)


def test_a_packed_batch_restarts_positions_and_keeps_each_samples_labels(make_tiny, one_thread):
    model = make_tiny()
    plain, packed = model.processor(samples()), packer(model)(samples())
    rows = PackedRows.of(packed)
    visual = model.media_tokens_in_sequence(1)
    assert rows.num_samples == 5 and packed["num_samples"] == 5 and len(packed["ids"]) == 5
    assert packed["images"].shape[0] == 5 and packed["input_ids"].shape[0] < 5
    for r in range(packed["input_ids"].shape[0]):
        for k in range(1, int(rows.segment_ids[r].max()) + 1):
            where = rows.segment_ids[r] == k
            length = int(where.sum())
            assert rows.position_ids[r, where].tolist() == list(range(length))  # restarts at each sample
            sample = packed["ids"][int(rows.sample_slots()[r, k - 1])]
            i = plain["ids"].index(sample)
            text = plain["attention_mask"][i].bool()
            assert packed["input_ids"][r, where][visual:].tolist() == plain["input_ids"][i, text].tolist()
            assert packed["labels"][r, where][visual:].tolist() == plain["labels"][i, text].tolist()
            assert (packed["labels"][r, where][:visual] == IGNORE_INDEX).all()  # the visual slots take no loss
    real = int(plain["attention_mask"].sum()) + 5 * visual
    assert packed["padded_tokens"] == packed["input_ids"].numel() - real


@pytest.mark.parametrize("cls", [PrefixLynx, CrossAttnLynx])
@pytest.mark.parametrize("kind", ["images", "videos", "text"])
def test_packed_loss_and_gradients_equal_the_unpacked_batch(make_tiny, one_thread, cls, kind):
    model = build(make_tiny, cls)
    data = samples(video=kind == "videos", text_only=kind == "text")
    packed = packer(model)(data)
    assert packed["input_ids"].shape[0] < len(data)  # samples really share rows
    loss, grads = loss_and_grads(model, packed)
    reference_loss, reference = loss_and_grads(model, model.processor(data))
    torch.testing.assert_close(loss, reference_loss, rtol=1e-5, atol=1e-5)
    assert grads.keys() == reference.keys()
    for name, grad in reference.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("cls", [PrefixLynx, CrossAttnLynx])
def test_attention_never_crosses_samples(make_tiny, one_thread, cls):
    model = build(make_tiny, cls)
    data = samples()
    batch = packer(model, 200)(data)  # one row for all
    assert batch["input_ids"].shape[0] == 1
    rows = PackedRows.of(batch)
    with torch.no_grad():
        before = model(**model_inputs(batch), return_logits=True).logits
        changed = dict(batch, images=batch["images"].clone())
        changed["images"][2] += torch.randn_like(changed["images"][2])  # the third sample's image
        after = model(**model_inputs(changed), return_logits=True).logits
    third = rows.segment_ids[0] == 3
    assert not torch.allclose(before[0, third], after[0, third])
    torch.testing.assert_close(before[0, ~third], after[0, ~third], rtol=0, atol=0)


def test_a_sample_longer_than_a_row_is_a_configuration_error(make_tiny):
    model = make_tiny()
    with pytest.raises(ValueError, match="more than a row's max_tokens=8"):
        packer(model, 8)(samples())


@pytest.fixture(scope="module")
def photo_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    photos = save_photos(root)
    questions = [q for q, _ in QA]
    answers = [a for _, a in QA]
    images = [
        {"image": photos[i % 5], "question": questions[i % 5], "answer": answers[(i * 3) % 5], "id": f"img{i}"}
        for i in range(16)
    ]
    write_jsonl(root / "images.jsonl", images)
    texts = [{"instruction": questions[i % 5], "answer": answers[i % 5], "id": f"txt{i}"} for i in range(8)]
    write_jsonl(root / "text.jsonl", texts)
    return root


def mixture(root, **kwargs) -> MixtureDataModule:
    sources = [
        ImageTextSource(str(root / "images.jsonl"), name="images", ratio=0.7, task="vqa"),
        TextSource(str(root / "text.jsonl"), name="text", ratio=0.3),
    ]
    return MixtureDataModule(sources, **{"batch_size": 4, "batches_per_epoch": 6, "num_workers": 0, **kwargs})


@pytest.mark.parametrize("cls", [PrefixLynx, CrossAttnLynx])
def test_the_mixture_packs_the_same_samples_its_padded_batches_hold(make_tiny, photo_data, tmp_path, cls):
    padded, packed = Recorder(), Recorder()
    trainer(tmp_path / "a", max_epochs=1, callbacks=[padded]).fit(build(make_tiny, cls), datamodule=mixture(photo_data))
    run, data = trainer(tmp_path / "b", max_epochs=1, callbacks=[packed]), mixture(photo_data, pack_tokens=64)
    run.fit(build(make_tiny, cls), datamodule=data)
    assert packed.sources == padded.sources and set(padded.sources) == {"images", "text"}
    assert [sorted(ids) for ids in packed.ids] == [sorted(ids) for ids in padded.ids]
    assert torch.isfinite(run.callback_metrics["train/loss"])
    # the stream goes to every dataloader worker: its packing collate carries a table of visual tokens, not the model
    assert isinstance(data.stream.collate, PackingCollate) and cls.__name__.encode() not in pickle.dumps(data.stream)
