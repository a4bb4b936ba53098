"""LoRA through peft as the second adapter kind: placement, what trains, stable names, export of the LoRA weights
only, and the merged copy of the base LLM for serving."""

from __future__ import annotations

import json

import pytest
import torch
from hub_fixtures import fixed_inputs, make_model, outputs, write_bases
from peft.tuners.lora import LoraLayer
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from lynx_zoo import AdapterConfig, CrossAttnConfig, CrossAttnLynx, PrefixLynx, load_model
from lynx_zoo.adapters import decoder_layers
from lynx_zoo.hub.export import export_merged_variant, export_variant, save_llm

TARGETS = ("q_proj", "v_proj", "down_proj")


def lora(**fields) -> AdapterConfig:
    return AdapterConfig(**{"kind": "lora", "rank": 4, "target_modules": TARGETS, **fields})


def wrapped_layers(model) -> dict[int, set[str]]:
    """Decoder layer -> the names of its modules that peft wrapped with LoRA."""
    found: dict[int, set[str]] = {}
    for index, layer in enumerate(decoder_layers(model.llm)):
        names = {path.rpartition(".")[2] for path, m in layer.named_modules() if isinstance(m, LoraLayer)}
        if names:
            found[index] = names
    return found


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict:
    return write_bases(tmp_path_factory.mktemp("bases"))


@pytest.mark.parametrize(
    "placement, expected",
    [
        (dict(every=1), [0, 1, 2, 3]),
        (dict(every=2), [0, 2]),
        (dict(every=2, start=1), [1, 3]),
        (dict(every=4, start=3), [3]),
        (dict(layers=[3, 0]), [0, 3]),
        (dict(every=None), []),
    ],
)
def test_lora_goes_exactly_on_the_layers_asked_for_and_only_on_the_target_modules(make_tiny, placement, expected):
    model = make_tiny(adapters=lora(**placement))
    assert model.adapter_layers == expected
    assert wrapped_layers(model) == {i: set(TARGETS) for i in expected}
    # nothing outside the decoder layers is wrapped, and each wrapped module holds one rank-4 update
    assert sum(1 for _ in model.llm.modules() if isinstance(_, LoraLayer)) == len(expected) * len(TARGETS)
    for index in expected:
        a = decoder_layers(model.llm)[index].self_attn.q_proj.lora_A["default"].weight
        assert a.shape == (4, 32)


def test_only_the_lora_weights_and_the_vision_side_train_and_the_llm_gets_no_gradient(make_tiny):
    model = make_tiny(adapters=lora(every=2))
    trainable = {name for name, _ in model.trainable_parameters()}
    in_llm = {name for name in trainable if name.startswith("llm.")}
    assert in_llm and all(".lora_A.default." in n or ".lora_B.default." in n for n in in_llm)
    assert {n for n in trainable if not n.startswith("llm.")} == {
        n for n, _ in model.named_parameters() if n.startswith(("bridge.", "frame_position"))
    }
    with torch.no_grad():  # B starts at zero; give it a value so that A gets a gradient too
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.normal_(0, 0.1)
    ids = torch.randint(4, 30, (2, 6))
    model(ids, torch.ones_like(ids), torch.randn(2, 3, 32, 32), ids).loss.backward()
    for name, param in model.named_parameters():
        if name in trainable and name != "frame_position":  # (the frame embedding is for videos)
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        if name.startswith("llm.") and name not in trainable:
            assert param.grad is None, name


def test_untrained_lora_is_exactly_the_llm_and_state_dict_names_stay_those_of_the_checkpoint(make_tiny):
    plain = make_tiny(adapters=AdapterConfig(every=None))
    with_lora = make_tiny(adapters=lora(every=1))
    added = set(with_lora.state_dict()) - set(plain.state_dict())
    assert set(plain.state_dict()) <= set(with_lora.state_dict())  # the base weights keep their HF names
    assert added and all(".lora_A.default." in k or ".lora_B.default." in k for k in added)
    assert not any("base_layer" in k for k in with_lora.state_dict())
    # a checkpoint without LoRA loads into the LoRA model (init_from), and B = 0 changes nothing
    with_lora.load_state_dict(plain.state_dict(), strict=False)
    inputs = fixed_inputs()
    torch.testing.assert_close(with_lora.eval()(**inputs).logits, plain.eval()(**inputs).logits, rtol=0, atol=0)
    # and a LoRA state dict round-trips exactly
    again = make_tiny(seed=3, adapters=lora(every=1))
    again.load_state_dict(with_lora.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), with_lora.state_dict().values()))


def test_lora_dropout_trains_with_the_model_while_the_frozen_llm_stays_in_eval_mode(make_tiny):
    model = make_tiny(adapters=lora(every=2, dropout=0.1))
    dropouts = [m for w in model.adapter_blocks.values() for m in w.modules() if isinstance(m, torch.nn.Dropout)]
    assert len(dropouts) == 2 * len(TARGETS)
    model.train()
    assert not model.llm.training and all(d.training for d in dropouts)
    model.eval()
    assert not any(d.training for d in dropouts)


def test_export_stores_the_lora_weights_only_and_reloads_them(tmp_path, bases):
    model = make_model(bases, adapters=lora(every=2))
    folder = export_variant(model, tmp_path / "variant")
    with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
        llm_keys = {k for k in handle.keys() if k.startswith("llm.")}
    lora_keys = {n for n, _ in model.named_parameters() if ".lora_" in n}
    assert llm_keys == lora_keys  # the frozen base LLM is referenced, not copied
    config = json.loads((folder / "config.json").read_text())
    assert config["init_args"]["adapters"]["kind"] == "lora" and config["init_args"]["adapters"]["rank"] == 4
    reloaded = load_model(folder)
    inputs = fixed_inputs()
    assert torch.equal(reloaded(**inputs).logits, model(**inputs).logits)
    assert (
        "| adapter kind | LoRA (peft): rank 4, alpha 16, dropout 0, on q_proj, v_proj, down_proj |"
        in (folder / "README.md").read_text()
    )


@pytest.mark.parametrize("fusion", ["pt", "ca"])
def test_merged_into_a_copy_of_the_base_llm_it_gives_the_unmerged_logits(tmp_path, bases, fusion):
    extra = {"cross_attn": CrossAttnConfig(every=2, start=1, num_heads=2, head_dim=8)} if fusion == "ca" else {}
    cls = CrossAttnLynx if fusion == "ca" else PrefixLynx
    model = make_model(bases, cls=cls, adapters=lora(every=1), **extra)
    inputs = fixed_inputs()
    logits, answers = outputs(model, inputs)
    folder = export_merged_variant(model, tmp_path / "variant", tmp_path / "merged_llm")
    merged = load_model(folder)
    assert merged.adapter_layers == [] and not any(isinstance(m, LoraLayer) for m in merged.modules())
    merged_logits, merged_answers = outputs(merged, inputs)
    torch.testing.assert_close(merged_logits, logits, rtol=0, atol=1e-5)
    assert merged_answers == answers
    # the merged LLM is a plain transformers folder, free of the zoo's inserted blocks and of peft
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "merged_llm")
    assert not any("lora" in k or "gated_xattn" in k or "base_layer" in k for k in hf.state_dict())
    config = json.loads((folder / "config.json").read_text())["init_args"]
    assert config["llm"]["model"] == str((tmp_path / "merged_llm").resolve()) and config["adapters"]["every"] is None
    # the unmerged model is left as it was
    assert wrapped_layers(model) == {i: set(TARGETS) for i in range(4)}


def test_merging_a_model_without_lora_is_refused(tmp_path, make_tiny):
    with pytest.raises(ValueError, match="merge LoRA: the model has no LoRA adapters"):
        export_merged_variant(make_tiny(), tmp_path / "variant", tmp_path / "llm")


def test_save_llm_writes_a_base_that_a_frozen_row_loads(tmp_path, make_tiny):
    trained = make_tiny(llm={"trainable": True}, adapters=AdapterConfig(every=None))
    folder = save_llm(trained, tmp_path / "llm")
    frozen = make_tiny(llm={"model": str(folder), "pretrained": True}, adapters=lora(every=2))
    assert all(torch.equal(frozen.llm.state_dict()[k], v) for k, v in trained.llm.state_dict().items())


def test_bad_lora_settings_are_named(make_tiny):
    with pytest.raises(ValueError, match=r"adapters: rank configure lora adapters, but adapters.kind is 'bottleneck'"):
        AdapterConfig(rank=4)
    with pytest.raises(ValueError, match=r"adapters: bottleneck configure bottleneck adapters, but adapters.kind is"):
        AdapterConfig(kind="lora", bottleneck=16)
    with pytest.raises(ValueError, match=r"adapters.kind: expected one of \['bottleneck', 'lora'\], got 'prefix'"):
        AdapterConfig(kind="prefix")
    with pytest.raises(ValueError, match="adapters.rank: expected a positive integer"):
        AdapterConfig(kind="lora", rank=0)
    with pytest.raises(ValueError, match=r"adapters.target_modules \['qkv'\]"):
        make_tiny(adapters=lora(target_modules=("qkv",)))
    with pytest.raises(ValueError, match=r"llm.trainable is true"):
        make_tiny(llm={"trainable": True}, adapters=lora())
    with pytest.raises(ValueError, match=r"adapters.layers: \[7\] out of range"):
        make_tiny(adapters=lora(layers=[7]))
