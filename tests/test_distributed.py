"""FSDP2 on 2 CPU processes (gloo) against one process, exact resume from sharded checkpoints, consolidated
export, activation checkpointing, and the strategy's options; for PT, CA and PT with LoRA adapters (peft)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from lynx_zoo import CrossAttnConfig, CrossAttnLynx, PrefixLynx
from lynx_zoo.fusion.scale_out import apply_activation_checkpointing, configure_lynx_model, sharding_units
from lynx_zoo.llm.layers import decoder_layers
from lynx_zoo.training.checkpoint_io import consolidate_checkpoint
from lynx_zoo.training.distributed import (
    LynxFSDP2Strategy,
    fsdp1_auto_wrap_policy,
    surviving_checkpoint,
    swap_in_folder,
)

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
import fsdp_worker  # noqa: E402

FUSIONS = {"pt": PrefixLynx, "ca": CrossAttnLynx, "lora": PrefixLynx}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """The worker's runs on 2 processes, and the 1-process references (in this process)."""
    out = tmp_path_factory.mktemp("fsdp")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "LYNX_ZOO_VARIANTS": str(out / "registry")}
    result = subprocess.run(
        [sys.executable, str(TESTS / "fsdp_worker.py"), str(out)], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    for fusion in FUSIONS:
        fsdp_worker.fit(fusion, 1, out / fusion / "single", "full")
    return out


def load(runs: Path, fusion: str, name: str) -> dict:
    folder = runs / fusion / ("single" if name == "single" else "")
    return torch.load(folder / f"{'full' if name == 'single' else name}.pt", weights_only=False)


def assert_same_weights(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=atol, msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("fusion", FUSIONS)
def test_fsdp2_shards_params_and_optimizer_state_and_skips_frozen(runs, fusion):
    facts = load(runs, fusion, "full")["facts"]
    local, total = facts["params_local_total"]
    assert 0.45 < local / total < 0.55  # each of the 2 ranks holds about half of every parameter
    assert 0.45 < facts["optimizer_local"] / facts["optimizer_total"] < 0.55
    # optimizer state for the trainable parameters only; frozen ones got no gradient, trainable ones did
    assert facts["optimizer_states"] == facts["trainable_params"]
    assert facts["frozen_with_grad"] == [] and facts["trainable_without_grad"] == []
    single = load(runs, fusion, "single")["facts"]
    assert single["optimizer_states"] == facts["optimizer_states"] and single["params_local_total"] == (total, total)


@pytest.mark.slow
@pytest.mark.parametrize("fusion", FUSIONS)
def test_fsdp2_matches_one_process_on_the_same_global_batch(runs, fusion):
    fsdp, single = load(runs, fusion, "full"), load(runs, fusion, "single")
    assert fsdp["step"] == single["step"] == fsdp_worker.STEPS
    torch.testing.assert_close(fsdp["losses"], single["losses"], rtol=1e-5, atol=0)
    assert_same_weights(fsdp["state"], single["state"], atol=1e-5)
    # and training moved the weights
    initial = fsdp_worker.build(fusion).state_dict()
    assert any(not torch.equal(initial[k], v) for k, v in fsdp["state"].items())


@pytest.mark.slow
@pytest.mark.parametrize("fusion", FUSIONS)
def test_stop_and_resume_from_the_sharded_checkpoint_reaches_the_same_weights(runs, fusion):
    full, stop, resumed = (load(runs, fusion, name) for name in ("full", "stop", "resumed"))
    assert (stop["step"], resumed["step"]) == (fsdp_worker.STOP_AT, fsdp_worker.STEPS)
    assert stop["losses"] + resumed["losses"] == full["losses"]
    assert_same_weights(resumed["state"], full["state"], atol=0)
    assert (runs / fusion / "stop.ckpt").is_dir()  # one shard file per rank + metadata
    assert len(list((runs / fusion / "stop.ckpt").glob("*.distcp"))) == 2


@pytest.mark.slow
@pytest.mark.parametrize("fusion", FUSIONS)
def test_sharded_checkpoint_consolidates_into_one_loadable_file(runs, fusion, tmp_path):
    path = consolidate_checkpoint(runs / fusion / "stop.ckpt", tmp_path / "stop.ckpt")
    model = FUSIONS[fusion].load_from_checkpoint(path)
    assert_same_weights(model.state_dict(), load(runs, fusion, "stop")["state"], atol=0)
    with pytest.raises(FileNotFoundError, match="not a sharded checkpoint folder"):
        consolidate_checkpoint(tmp_path, tmp_path / "x.ckpt")


@pytest.mark.slow
@pytest.mark.parametrize("fusion", FUSIONS)
def test_activation_checkpointing_under_fsdp2_changes_nothing(runs, fusion):
    full, ckpt = load(runs, fusion, "full"), load(runs, fusion, "ckpt")
    assert ckpt["losses"] == full["losses"]
    assert_same_weights(ckpt["state"], full["state"], atol=0)


# ------------------------------------------------------------------------------ single process, no spawn
def ca_configs() -> dict:
    return dict(cross_attn=CrossAttnConfig(every=2, start=1, num_heads=2, head_dim=8))


FUSION_CONFIGS = {"pt": {}, "ca": ca_configs(), "lora": {"adapters": fsdp_worker.LORA}}


def grads_and_calls(model: nn.Module, batch: dict) -> tuple[dict[str, torch.Tensor], int]:
    """Gradients of one backward, and how often adapters (bottleneck or LoRA) and cross-attention blocks ran their
    forward."""
    calls = [0]
    for module in model.modules():
        if type(module).__name__ in ("BottleneckAdapter", "GatedCrossAttentionBlock") or isinstance(module, LoraLayer):
            # a pre-hook: the recomputation stops early, once it has what the backward needs
            module.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    model(**batch).loss.backward()
    # (the frame embedding gets no gradient from images: only videos use it)
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, calls[0]


@pytest.mark.parametrize("fusion", FUSIONS)
def test_activation_checkpointing_recomputes_hooks_inside_and_keeps_gradients(make_tiny, fusion):
    extra = FUSION_CONFIGS[fusion]
    plain, checkpointed = make_tiny(FUSIONS[fusion], **extra), make_tiny(FUSIONS[fusion], **extra)
    names = list(checkpointed.state_dict())
    assert apply_activation_checkpointing(checkpointed) == 4
    apply_activation_checkpointing(checkpointed)  # idempotent
    assert list(checkpointed.state_dict()) == names  # no wrapper module: checkpoints keep their keys
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 30, (2, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding: an explicit attention mask, which a KV cache grown twice would not fit
    batch = dict(input_ids=ids, attention_mask=mask, images=torch.randn(2, 3, 32, 32), labels=ids)
    reference, calls = grads_and_calls(plain, batch)
    grads, recomputed_calls = grads_and_calls(checkpointed, batch)
    assert reference.keys() == grads.keys()
    for name in reference:  # adapters, cross-attention blocks and the bridge all get the same gradients
        torch.testing.assert_close(grads[name], reference[name], rtol=1e-5, atol=1e-7, msg=name)
    # the adapters' forward hooks and the cross-attention pre-hooks run again in the backward pass
    assert calls > 0 and recomputed_calls == 2 * calls


def test_activation_checkpointing_keeps_a_kv_cache_out_of_the_recomputed_region(make_tiny):
    plain, checkpointed = make_tiny(), make_tiny()
    apply_activation_checkpointing(checkpointed)
    ids = torch.randint(4, 30, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # an explicit mask, which a cache grown twice by the recomputation would not fit
    grads = []
    for model in (plain, checkpointed):
        out = model.llm(input_ids=ids, attention_mask=mask, labels=ids, use_cache=True)  # a cache, with gradients
        out.loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7, msg=name)
    with torch.no_grad():  # without gradients the layers keep their cache: generation is unchanged
        prompt = {"input_ids": ids, "attention_mask": mask, "max_new_tokens": 4, "do_sample": False}
        assert torch.equal(checkpointed.llm.generate(**prompt), plain.llm.generate(**prompt))


def test_configure_model_without_mesh_or_switch_leaves_the_model_alone(make_tiny):
    model = make_tiny()
    layer_types = [type(layer) for layer in decoder_layers(model.llm)]
    configure_lynx_model(model)
    assert [type(layer) for layer in decoder_layers(model.llm)] == layer_types
    assert all(not hasattr(p, "to_local") for p in model.parameters())


def test_sharding_units_cover_blocks_layers_and_cross_attention(make_tiny):
    model = make_tiny(CrossAttnLynx, **ca_configs())
    units = sharding_units(model)
    layers = decoder_layers(model.llm)
    assert all(layer in units for layer in layers)
    assert [u for u in units if type(u).__name__ == "GatedCrossAttentionBlock"] == list(model.fusion_blocks().values())
    # children before parents: each cross-attention block before its decoder layer, layers before the LLM
    assert units.index(list(model.fusion_blocks().values())[0]) < units.index(layers[1]) < units.index(model.llm)
    assert all(block in units for block in model.vision.model.blocks)
    assert units[-3:] == [model.vision, model.bridge, model.llm]


def test_strategy_options_are_checked():
    strategy = LynxFSDP2Strategy()
    assert strategy.mp_policy.param_dtype == torch.bfloat16 and strategy.mp_policy.reduce_dtype == torch.float32
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        LynxFSDP2Strategy(tensor_parallel_size=2)
    with pytest.raises(ValueError, match="param_dtype: 'bf16' is not a torch dtype"):
        LynxFSDP2Strategy(param_dtype="bf16")


def test_fsdp1_policy_wraps_layers_adapters_and_blocks_on_their_own(make_tiny):
    model = make_tiny(CrossAttnLynx, **ca_configs())
    wrapped = {name for name, module in model.named_modules() if fsdp1_auto_wrap_policy(module, False, 0)}
    assert "llm" in wrapped and "vision" in wrapped and "bridge" in wrapped
    assert {"llm.model.layers.0", "llm.model.layers.0.adapter", "llm.model.layers.1.gated_xattn"} <= wrapped
    assert "vision.model.blocks.0" in wrapped and "bridge.layers.0" in wrapped
    assert "llm.model.embed_tokens" not in wrapped and "" not in wrapped
    assert fsdp1_auto_wrap_policy(model, True, 0)  # always recurse


def test_sharded_folders_are_swapped_in_whole(tmp_path):
    path, staging = tmp_path / "last.ckpt", tmp_path / ".last.ckpt.saving"
    for step in (1, 2):
        staging.mkdir()
        (staging / "shard").write_text(str(step))
        swap_in_folder(staging, path)
        assert (path / "shard").read_text() == str(step) and not staging.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    # killed between the two renames: the previous checkpoint is what a resume finds
    path.rename(tmp_path / ".last.ckpt.old")
    assert (surviving_checkpoint(path) / "shard").read_text() == "2"
    assert surviving_checkpoint(tmp_path / "other.ckpt") == tmp_path / "other.ckpt"


@pytest.mark.slow
@pytest.mark.parametrize("fusion", FUSIONS)
def test_a_variant_exported_from_fsdp2_loads_in_a_fresh_process_with_the_single_process_logits(runs, fusion):
    """ExportVariant gathers the shards: the variant equals the trained model, in a process that never saw FSDP."""
    reference = FUSIONS[fusion](**fsdp_worker.build(fusion).hparams)
    reference.load_state_dict(load(runs, fusion, "full")["state"])
    torch.manual_seed(5)
    ids = torch.randint(4, 30, (2, 7))
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), images=torch.randn(2, 3, 32, 32))
    torch.save(inputs, runs / fusion / "inputs.pt")
    code = (
        "import sys, torch, lynx_zoo\n"
        f"model = lynx_zoo.load_model({str(runs / fusion / 'full-variant')!r})\n"
        f"inputs = torch.load({str(runs / fusion / 'inputs.pt')!r})\n"
        f"torch.save(model(**inputs).logits.detach(), {str(runs / fusion / 'variant-logits.pt')!r})"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    with torch.no_grad():
        expected = reference.eval()(**inputs).logits
    assert torch.equal(torch.load(runs / fusion / "variant-logits.pt"), expected)


@pytest.mark.slow
@pytest.mark.parametrize("run", ["unreadable", "unreadable_ddp"])
def test_a_rank_with_an_all_unreadable_batch_still_takes_part_and_the_run_finishes(runs, run):
    result = load(runs, "pt", run)
    assert result["step"] == fsdp_worker.STEPS  # no hang: the worker's 600 s timeout would have failed the fixture
    initial = fsdp_worker.build("pt").state_dict()
    assert all(torch.isfinite(v).all() for v in result["state"].values())
    assert any(not torch.equal(initial[k], v) for k, v in result["state"].items())
