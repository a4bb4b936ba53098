"""Answer-only logits: the training loss runs the LM head on target positions only, and equals transformers' full
path (every position's logits, then the loss) in value and in every gradient."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_CROSS_ATTN, open_gates

from lynx_zoo import CrossAttnLynx, PrefixLynx
from lynx_zoo.data import Sample
from lynx_zoo.fusion.base import model_inputs

CA = {"cross_attn": TINY_CROSS_ATTN}
QA = [
    ("what color is the circle?", "red"),
    ("how many shapes are there in the picture?", "three small shapes and a big one"),
    ("is it big?", "no"),
]


def labelled_batch(model, video: bool = False):
    g = torch.Generator().manual_seed(3)
    shape = (5, 3, 32, 32) if video else (3, 32, 32)
    samples = [Sample(q, a, image=torch.randn(*shape, generator=g)) for q, a in QA]
    samples[1].history = [("what is this?", "a drawing of shapes")]
    return model.processor(samples)


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("cls", [PrefixLynx, CrossAttnLynx])
@pytest.mark.parametrize("video", [False, True], ids=["images", "videos"])
def test_loss_and_gradients_equal_the_full_logits_path(make_tiny, one_thread, cls, video):
    model = make_tiny(cls, llm={"trainable": True}, **(CA if cls is CrossAttnLynx else {}))
    if cls is CrossAttnLynx:
        open_gates(model, 0.7, 0.4)
    batch = model_inputs(labelled_batch(model, video))
    full = model(**batch, return_logits=True)
    full.loss.backward()
    reference = grads(model)
    model.zero_grad()
    answer_only = model(**batch)
    answer_only.loss.backward()
    assert answer_only.logits is None
    torch.testing.assert_close(answer_only.loss, full.loss, rtol=1e-5, atol=1e-5)
    ours = grads(model)
    assert ours.keys() == reference.keys() and len(ours) > 10  # the LLM is trainable: every weight has a gradient
    for name, grad in reference.items():
        torch.testing.assert_close(ours[name], grad, rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


def test_the_head_runs_on_the_target_positions_only(make_tiny, one_thread):
    model = make_tiny()
    batch = labelled_batch(model)
    rows = []
    hook = model.llm.get_output_embeddings().register_forward_hook(lambda m, args, out: rows.append(args[0].shape))
    model(**model_inputs(batch)).loss.backward()
    hook.remove()
    targets = int((batch["labels"][:, 1:] != -100).sum())
    assert rows == [torch.Size([targets, model.llm_width])]  # no (batch, length, vocabulary) logits
    assert targets < batch["input_ids"].numel() / 2


def test_without_labels_the_logits_are_the_llms_own(make_tiny, one_thread):
    model = make_tiny(adapters={"every": None})
    batch = labelled_batch(model)
    with torch.no_grad():
        ours = model(batch["input_ids"], batch["attention_mask"]).logits
        mask = batch["attention_mask"]
        positions = (mask.cumsum(-1) - 1).clamp(0)
        plain = model.llm(input_ids=batch["input_ids"], attention_mask=mask, position_ids=positions)
    torch.testing.assert_close(ours, plain.logits, rtol=0, atol=0)


def test_an_llm_that_transforms_its_logits_keeps_its_own_loss(make_tiny, one_thread):
    config = dict(model_type="gemma2", hidden_size=32, intermediate_size=64, num_hidden_layers=2, head_dim=16,
                  num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                  final_logit_softcapping=5.0)  # fmt: skip
    with pytest.warns(UserWarning, match="final_logit_softcapping"):
        model = make_tiny(llm={"config": config, "attn_implementation": "eager"}, adapters={"every": None})
    assert not model.answer_only_logits
    batch = model_inputs(labelled_batch(model))
    torch.testing.assert_close(model(**batch).loss, model(**batch, return_logits=True).loss, rtol=0, atol=0)
