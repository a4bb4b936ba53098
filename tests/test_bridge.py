import pytest
import torch

from lynx_zoo.bridge import BridgeConfig, PerceiverResampler, build_bridge


@pytest.mark.parametrize("num_tokens", [17, 5 * 17])
def test_resampler_gives_fixed_number_of_llm_width_tokens(num_tokens):
    bridge = build_bridge(BridgeConfig(num_queries=6, depth=2, num_heads=2, head_dim=8), vision_width=24, llm_width=40)
    assert isinstance(bridge, PerceiverResampler)
    out = bridge(torch.randn(3, num_tokens, 24))
    assert out.shape == (3, 6, 40)


def test_resampler_reads_only_its_own_sample():
    bridge = build_bridge(BridgeConfig(num_queries=4, depth=2, num_heads=2, head_dim=8), 16, 32)
    media = torch.randn(2, 9, 16)
    out = bridge(media)
    changed = media.clone()
    changed[1] += torch.randn(9, 16)  # not a constant shift, which the media LayerNorm removes
    out2 = bridge(changed)
    torch.testing.assert_close(out[0], out2[0])
    assert not torch.allclose(out[1], out2[1])


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_projectors_keep_one_token_per_vision_token(kind):
    bridge = build_bridge(BridgeConfig(kind=kind), 24, 40)
    assert bridge(torch.randn(2, 10, 24)).shape == (2, 10, 40)


def test_unknown_bridge_lists_choices():
    with pytest.raises(ValueError, match=r"bridge.kind: unknown bridge 'perceiver'.*'linear', 'mlp', 'resampler'"):
        build_bridge(BridgeConfig(kind="perceiver"), 8, 8)
