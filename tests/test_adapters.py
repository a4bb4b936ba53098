import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lynx_zoo.adapters import AdapterConfig, BottleneckAdapter, decoder_layers, insert_adapters


def llama(layers: int = 6) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(config)


@pytest.mark.parametrize(
    "config, expected",
    [
        (AdapterConfig(every=1), [0, 1, 2, 3, 4, 5]),
        (AdapterConfig(every=2), [0, 2, 4]),
        (AdapterConfig(every=2, start=1), [1, 3, 5]),
        (AdapterConfig(every=4, start=3), [3]),
        (AdapterConfig(layers=[5, 0, 2]), [0, 2, 5]),
        (AdapterConfig(every=None), []),
    ],
)
def test_adapters_go_exactly_where_asked(config, expected):
    model = llama()
    assert list(insert_adapters(model, config, width=32)) == expected
    has_adapter = [i for i, layer in enumerate(decoder_layers(model)) if hasattr(layer, "adapter")]
    assert has_adapter == expected
    names = {n.split(".adapter.")[0] for n, _ in model.named_parameters() if ".adapter." in n}
    assert names == {f"model.layers.{i}" for i in expected}


def test_lynx_adapter_init():
    adapter = BottleneckAdapter(4096, 2048)
    assert adapter.scale.item() == 1.0
    assert adapter.down.weight.shape == (2048, 4096) and adapter.up.weight.shape == (4096, 2048)
    assert torch.count_nonzero(adapter.down.bias) == 0 and torch.count_nonzero(adapter.up.bias) == 0
    assert abs(adapter.down.weight.std().item() - 0.02) < 1e-3
    assert isinstance(adapter.norm, torch.nn.LayerNorm)


def test_adapter_changes_output_and_zero_scale_restores_base():
    base = llama()
    ids = torch.randint(0, 50, (2, 7))
    reference = base(ids).logits
    insert_adapters(base, AdapterConfig(every=2), width=32)
    assert not torch.allclose(base(ids).logits, reference)
    for layer in decoder_layers(base)[::2]:
        layer.adapter.scale.data.zero_()
    torch.testing.assert_close(base(ids).logits, reference)


def test_adapter_state_dict_keeps_hf_names():
    model = llama()
    before = set(model.state_dict())
    insert_adapters(model, AdapterConfig(every=3), width=32)
    after = set(model.state_dict())
    assert before <= after
    assert all(".adapter." in k for k in after - before)


def test_bad_placement_is_named():
    with pytest.raises(ValueError, match=r"adapters.layers: \[9\] out of range for an LLM with 6 layers"):
        insert_adapters(llama(), AdapterConfig(layers=[1, 9]), width=32)
    with pytest.raises(ValueError, match="adapters.every"):
        insert_adapters(llama(), AdapterConfig(every=0), width=32)
    with pytest.raises(ValueError, match="adapters.start"):
        insert_adapters(llama(), AdapterConfig(every=2, start=6), width=32)
