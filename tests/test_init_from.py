"""init_from: weights of one run start another (stage 2 from stage 1, 420 px from 224 px)."""

import pytest
import torch

from lynx_zoo import CrossAttnLynx, PrefixLynx
from lynx_zoo.fusion.cross_attn import CrossAttnConfig


def save(model, path):
    torch.save({"state_dict": model.state_dict()}, path)
    return str(path)


def test_low_resolution_checkpoint_starts_a_high_resolution_model(make_tiny, tmp_path):
    low = make_tiny(vision={"image_size": 32, "trainable": True})  # 4x4 patches + CLS
    path = save(low, tmp_path / "low.ckpt")
    high = make_tiny(seed=1, vision={"image_size": 64, "trainable": True}, init_from=path)  # 8x8 + CLS
    high.setup("fit")
    assert high.vision.model.pos_embed.shape == (1, 65, 32)
    torch.testing.assert_close(high.vision.model.pos_embed[:, :1], low.vision.model.pos_embed[:, :1])
    for name in ("bridge.latents", "llm.model.layers.0.adapter.up.weight", "vision.model.blocks.0.attn.qkv.weight"):
        torch.testing.assert_close(high.get_parameter(name), low.get_parameter(name))
    tokens = high.encode_images(torch.randn(2, 3, 64, 64))
    assert tokens.shape == (2, 4, 32) and torch.isfinite(tokens).all()
    # only once: a second fit() keeps the weights it has trained
    high.bridge.latents.data.add_(1.0)
    high.setup("fit")
    assert not torch.allclose(high.bridge.latents, low.bridge.latents)


def test_pt_weights_start_a_ca_model_but_not_the_reverse(make_tiny, tmp_path):
    pt = make_tiny(adapters={"every": None})
    ca_args = {"cross_attn": CrossAttnConfig(every=2, start=1, num_heads=2, head_dim=8), "adapters": {"every": None}}
    ca = make_tiny(CrossAttnLynx, seed=1, init_from=save(pt, tmp_path / "pt.ckpt"), **ca_args)
    ca.setup("fit")
    torch.testing.assert_close(ca.bridge.latents, pt.bridge.latents)
    assert list(ca.fusion_blocks().values())[0].attn_gate.item() == 0.0  # new parts start fresh
    back = make_tiny(PrefixLynx, adapters={"every": None}, init_from=save(ca, tmp_path / "ca.ckpt"))
    with pytest.raises(ValueError, match=r"init_from .*ca.ckpt: does not fit this model.*gated_xattn"):
        back.setup("fit")
