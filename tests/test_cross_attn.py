import pytest
import torch

from lynx_zoo import CrossAttnLynx, PrefixLynx
from lynx_zoo.data import Sample
from lynx_zoo.fusion.cross_attn import CrossAttnConfig, GatedCrossAttentionBlock

CA = {"cross_attn": CrossAttnConfig(every=2, start=1, num_heads=2, head_dim=8, ff_mult=2), "adapters": {"every": None}}


def samples(n=2):
    qa = [("what color is the circle?", "red"), ("how many shapes are there?", "three")]
    return [Sample(q, a, image=torch.randn(3, 32, 32)) for q, a in qa[:n]]


def open_gates(model):
    for block in model.fusion_blocks().values():
        block.attn_gate.data.fill_(1.0)
        block.ff_gate.data.fill_(1.0)


def test_blocks_go_where_asked(make_tiny):
    model = make_tiny(CrossAttnLynx, **CA)
    assert list(model.fusion_blocks()) == [1, 3]
    layers = model.llm.model.layers
    assert [i for i, layer in enumerate(layers) if hasattr(layer, "gated_xattn")] == [1, 3]
    assert CrossAttnConfig().layer_indices(32) == [3, 7, 11, 15, 19, 23, 27, 31]  # OpenFlamingo on LLaMA-7B


@pytest.mark.slow
def test_closed_gates_give_exactly_the_frozen_llm(make_tiny):
    model = make_tiny(CrossAttnLynx, **CA)
    batch = model.processor(samples())
    ours = model(batch["input_ids"], batch["attention_mask"], batch["images"]).logits
    position_ids = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    plain = model.llm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=position_ids)
    torch.testing.assert_close(ours, plain.logits, rtol=0, atol=0)
    open_gates(model)
    assert not torch.allclose(model(batch["input_ids"], batch["attention_mask"], batch["images"]).logits, plain.logits)


def test_tokens_before_the_image_get_nothing_from_it(make_tiny):
    model = make_tiny(CrossAttnLynx, **CA)
    open_gates(model)
    batch = model.processor(samples(1))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    at = torch.tensor([[5]])  # the image appears before the 6th text token
    image = batch["images"]
    a = model(ids, mask, image, media_positions=at).logits
    b = model(ids, mask, image + 3.0, media_positions=at).logits
    torch.testing.assert_close(a[:, :5], b[:, :5], rtol=0, atol=0)
    assert not torch.allclose(a[:, 5:], b[:, 5:])


def test_each_token_reads_only_the_latest_media():
    torch.manual_seed(0)
    block = GatedCrossAttentionBlock(16, num_heads=2, head_dim=8, ff_mult=2)
    block.attn_gate.data.fill_(1.0)
    x = torch.randn(1, 8, 16)
    positions = torch.arange(8)[None]
    media = torch.randn(1, 2, 3, 16)  # two images (or frames) of 3 tokens each
    block.media, block.media_positions = media, torch.tensor([[2, 5]])
    out = block(x, positions)
    changed = media.clone()
    changed[:, 0] += 1.0
    block.media = changed
    out2 = block(x, positions)
    torch.testing.assert_close(out[:, :2], x[:, :2])  # before any media: untouched
    assert not torch.allclose(out[:, 2:5], out2[:, 2:5])  # tokens 2-4 read the first image
    torch.testing.assert_close(out[:, 5:], out2[:, 5:])  # tokens 5-7 read only the second


@pytest.mark.parametrize(
    "llm_trainable, prefixes",
    [
        (False, ("bridge.", "llm.model.layers.1.gated_xattn.", "llm.model.layers.3.gated_xattn.", "frame_position")),
        (True, ("bridge.", "llm.", "frame_position")),
    ],
)
def test_gradients_reach_only_the_configured_parts(make_tiny, llm_trainable, prefixes):
    model = make_tiny(CrossAttnLynx, llm={"trainable": llm_trainable}, **CA)
    open_gates(model)  # with closed gates no gradient could reach the visual side
    batch = model.processor(samples())
    model(batch["input_ids"], batch["attention_mask"], batch["images"], batch["labels"]).loss.backward()
    for name, param in model.named_parameters():
        expected = name.startswith(prefixes)
        assert param.requires_grad == expected, name
        assert (param.grad is not None) == (expected and name != "frame_position"), name  # no video here


@pytest.mark.slow
def test_generation_with_greedy_and_beams(make_tiny):
    model = make_tiny(CrossAttnLynx, **CA)
    open_gates(model)
    images = torch.randn(2, 3, 32, 32)
    prompts = ["what color is the circle?", "how many shapes are there?"]
    greedy = model.generate(images, prompts, max_new_tokens=3)
    assert model.generate(images, prompts, max_new_tokens=3, num_beams=1) == greedy
    assert len(model.generate(images, prompts, max_new_tokens=3, num_beams=3)) == 2


def test_pt_and_ca_share_everything_but_the_fusion(make_tiny):
    pt, ca = make_tiny(PrefixLynx, adapters={"every": None}), make_tiny(CrossAttnLynx, **CA)
    pt_names = set(pt.state_dict())
    ca_names = set(ca.state_dict())
    assert pt_names <= ca_names
    assert all(".gated_xattn." in n for n in ca_names - pt_names)


def text_only(model):
    qa = [("what shape is a ball?", "circle"), ("what color is grass?", "green")]
    return model.processor([Sample(q, a) for q, a in qa])


def test_text_only_batches_run_the_gated_feed_forward_as_openflamingo(make_tiny):
    model = make_tiny(CrossAttnLynx, **CA)
    batch = text_only(model)
    assert batch["images"] is None
    position_ids = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    plain = model.llm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=position_ids)
    # gates closed: exactly the frozen LLM, text-only too
    closed = model(batch["input_ids"], batch["attention_mask"], None, batch["labels"])
    torch.testing.assert_close(closed.logits, plain.logits, rtol=0, atol=0)
    # ... and the feed-forward's gate already learns from text: its gradient is the feed-forward's output
    closed.loss.backward()
    for block in model.fusion_blocks().values():
        assert block.ff_gate.grad is not None and block.ff_gate.grad.abs().item() > 0
        assert all(p.grad is None for p in (block.attn_gate, block.to_q.weight, block.to_kv.weight))
    # gates open: the feed-forward changes every token of a text-only batch and its weights get gradient
    model.zero_grad()
    open_gates(model)
    opened = model(batch["input_ids"], batch["attention_mask"], None, batch["labels"])
    assert not torch.allclose(opened.logits, plain.logits)
    opened.loss.backward()
    for block in model.fusion_blocks().values():
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in block.ff.parameters())
        assert block.to_q.weight.grad is None  # no media: the attention contributes nothing


def test_tokens_before_the_media_pass_through_the_feed_forward_but_read_nothing():
    torch.manual_seed(0)
    block = GatedCrossAttentionBlock(16, num_heads=2, head_dim=8, ff_mult=2)
    block.attn_gate.data.fill_(1.0)
    block.ff_gate.data.fill_(1.0)
    x = torch.randn(1, 6, 16)
    block.media, block.media_positions = torch.randn(1, 1, 3, 16), torch.tensor([[3]])
    out = block(x, torch.arange(6)[None])
    # before the image: x + tanh(1) * FF(x) exactly (a zero attention output, then the gated feed-forward)
    torch.testing.assert_close(out[:, :3], x[:, :3] + torch.tanh(torch.ones(1)) * block.ff(x[:, :3]))
    block.media = None  # a text-only call: the same for every token
    torch.testing.assert_close(block(x, torch.arange(6)[None]), x + torch.tanh(torch.ones(1)) * block.ff(x))
