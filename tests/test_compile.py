"""The ``torch.compile`` switch: compiled blocks (with the adapters and cross-attention blocks in their hooks) give
the eager model's loss and gradients, on padded and packed batches, and a run turns it on with a callback."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_CROSS_ATTN, loss_and_grads, open_gates
from run_helpers import trainer

from lynx_zoo import CrossAttnLynx, PrefixLynx, ShapesVQADataModule
from lynx_zoo.data import Sample
from lynx_zoo.data.packing import PackingCollate
from lynx_zoo.training import CompileRegions, compile_regions
from lynx_zoo.training.compile import is_compiled

CA = {"cross_attn": TINY_CROSS_ATTN}
QA = [("what color is the circle?", "red"), ("how many shapes are there?", "three"), ("is it big?", "no, small")]


@pytest.mark.parametrize("cls", [PrefixLynx, CrossAttnLynx])
def test_compiled_blocks_give_the_eager_loss_and_gradients(make_tiny, one_thread, cls):
    torch._dynamo.reset()
    model = make_tiny(cls, **(CA if cls is CrossAttnLynx else {}))
    open_gates(model, 0.7)
    g = torch.Generator().manual_seed(0)
    samples = [Sample(q, a, image=torch.randn(3, 32, 32, generator=g)) for q, a in QA]
    batches = [model.processor(samples), PackingCollate(model.processor, 64, model.media_tokens_in_sequence)(samples)]
    eager = [loss_and_grads(model, batch) for batch in batches]
    regions = ["llm_layers", "vision_blocks", "bridge_layers"]
    assert compile_regions(model, regions, backend="aot_eager") == 4 + 2 + 1
    for (loss, grads), batch in zip(eager, batches):
        compiled_loss, compiled_grads = loss_and_grads(model, batch)
        torch.testing.assert_close(compiled_loss, loss, rtol=1e-5, atol=1e-6)
        assert compiled_grads.keys() == grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-6)
    assert all(is_compiled(layer) for layer in model.llm.model.layers)


def test_a_run_compiles_with_the_callback(make_tiny, shapes_root, tmp_path):
    torch._dynamo.reset()
    model = make_tiny()
    data = ShapesVQADataModule(root=str(shapes_root), num_train=64, image_size=32, batch_size=4, num_workers=0)
    run = trainer(tmp_path, max_steps=2, callbacks=[CompileRegions(["llm_layers"], backend="aot_eager")])
    run.fit(model, data)
    assert all(is_compiled(layer) for layer in model.llm.model.layers)
    assert torch.isfinite(run.callback_metrics["train/loss"])
    with pytest.raises(ValueError, match="unknown region 'decoder'"):
        CompileRegions(["decoder"])
