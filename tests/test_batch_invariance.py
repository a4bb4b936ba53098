"""Batch-invariant evaluation: the greedy answers of PT and CA models do not depend on the batch size or the
padding it brings. Eight questions of different lengths about images, about videos and about nothing (text
only) are answered one by one, in batches of 3 (3 + 3 + 2) and all at once; every way gives the same answers."""

from __future__ import annotations

import pytest
import torch
from conftest import open_gates

from lynx_zoo import CrossAttnConfig, CrossAttnLynx, PrefixLynx

QUESTIONS = [
    "what color is it?",
    "how many shapes are there?",
    "what shape is the red object in the top left of the picture?",
    "is there a circle?",
    "what color is the big square next to the small blue triangle at the bottom?",
    "where is the triangle?",
    "how many red circles and how many blue squares are there in the picture?",
    "shape?",
]
SETTINGS = dict(preset="greedy", max_new_tokens=6, min_new_tokens=6)


def batched(model, media: torch.Tensor | None, kind: str, size: int) -> list[str]:
    answers = []
    for start in range(0, len(QUESTIONS), size):
        chunk = slice(start, start + size)
        inputs = {} if media is None else {kind: media[chunk]}
        answers += model.generate(**inputs, prompts=QUESTIONS[chunk], **SETTINGS)
    return answers


@pytest.fixture(params=["PT", "CA"])
def model(request, make_tiny):
    if request.param == "PT":
        return make_tiny(PrefixLynx).eval()
    model = make_tiny(
        CrossAttnLynx,
        adapters={"every": None},
        cross_attn=CrossAttnConfig(every=2, start=1, num_heads=2, head_dim=8, ff_mult=2),
    )
    open_gates(model, 1.0, 1.0)  # closed gates would make the images irrelevant
    return model.eval()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["images", "videos", "text"])
def test_greedy_answers_do_not_depend_on_batch_size_or_padding(model, kind):
    g = torch.Generator().manual_seed(11)
    shapes = {"images": (len(QUESTIONS), 3, 32, 32), "videos": (len(QUESTIONS), 5, 3, 32, 32)}
    media = torch.randn(shapes[kind], generator=g) if kind in shapes else None
    lengths = {len(model.tokenizer(q)["input_ids"]) for q in QUESTIONS}
    assert len(lengths) >= 6  # prompts of many lengths: every batch pads some rows
    alone = batched(model, media, kind, 1)
    assert all(a.strip() for a in alone)
    assert len(set(alone)) > 1  # the answers tell the inputs apart, so that a mix-up would show
    assert batched(model, media, kind, 3) == alone
    assert batched(model, media, kind, 8) == alone
