"""Every strategy config composes with every model config (parsed, not built), and each builds its strategy."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
from conftest import CONFIG_ROOT, CONFIGS, config_args
from lightning.pytorch.strategies import FSDPStrategy

from lynx_zoo.hub.config import fit_parser
from lynx_zoo.training.checkpoint_io import AtomicCheckpointIO
from lynx_zoo.training.distributed import LynxFSDP2Strategy, fsdp1_auto_wrap_policy

STRATEGIES = sorted((CONFIG_ROOT / "strategy").glob("*.yaml"))


def test_the_five_strategies_are_there():
    assert [p.stem for p in STRATEGIES] == ["ddp", "fsdp1", "fsdp2", "fsdp2_activation_ckpt", "single"]


def parse(paths: list[Path]):
    return fit_parser().parse_args(config_args(paths))


@pytest.mark.slow
@pytest.mark.parametrize("configs", CONFIGS, ids=lambda ps: "+".join(p.stem for p in ps))
def test_every_strategy_config_composes_with_the_model_config(configs):
    base = parse(configs)
    for strategy in STRATEGIES:
        config = parse([*configs, strategy])
        assert config.model.class_path.startswith("lynx_zoo.")
        # the strategy config wins over whatever the model config chose; the model's settings stay
        value = config.trainer.strategy
        assert value == "auto" if strategy.stem == "single" else value != "auto", strategy.stem
        assert config.model == base.model and config.data == base.data, strategy.stem


def build_strategy(strategy: Path):
    """The strategy object and the plugins of a strategy config (laid over the tiny config)."""
    config = parse([CONFIG_ROOT / "tiny.yaml", strategy])
    plugins = [
        getattr(importlib.import_module(p.class_path.rpartition(".")[0]), p.class_path.rpartition(".")[2])()
        for p in config.trainer.plugins or []
    ]
    value = config.trainer.strategy
    if isinstance(value, str):
        return value, plugins
    module, _, name = value.class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)(**vars(value.init_args)), plugins


def test_strategy_configs_build_their_strategies():
    built = {p.stem: build_strategy(p) for p in STRATEGIES}
    assert built["single"][0] == "auto" and built["ddp"][0] == "ddp"
    assert all(isinstance(built[k][1][0], AtomicCheckpointIO) for k in ("single", "ddp"))
    fsdp2, ckpt = built["fsdp2"][0], built["fsdp2_activation_ckpt"][0]
    assert isinstance(fsdp2, LynxFSDP2Strategy) and isinstance(ckpt, LynxFSDP2Strategy)
    assert (fsdp2.activation_checkpointing, ckpt.activation_checkpointing) == (False, True)
    assert str(fsdp2.mp_policy.param_dtype) == "torch.bfloat16"
    fsdp1 = built["fsdp1"][0]
    assert isinstance(fsdp1, FSDPStrategy)
    assert fsdp1.kwargs["auto_wrap_policy"] is fsdp1_auto_wrap_policy
    assert fsdp1.kwargs["use_orig_params"]  # Lightning's default
