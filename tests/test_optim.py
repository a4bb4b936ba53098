import pytest
import torch

from lynx_zoo.optim import OptimizerConfig, build_optimizer, lr_factor


def test_warmup_then_linear_decay_to_the_floor():
    config = OptimizerConfig(lr=1e-4, min_lr=1e-5, warmup_ratio=0.05)
    lrs = [config.lr * lr_factor(step, 1000, config) for step in range(1001)]
    assert lrs[0] == pytest.approx(1e-5)
    assert lrs[50] == pytest.approx(1e-4)
    assert max(lrs) == pytest.approx(1e-4)
    assert lrs[525] == pytest.approx(5.5e-5)
    assert lrs[1000] == pytest.approx(1e-5)
    assert all(a <= b for a, b in zip(lrs[:50], lrs[1:51]))
    assert all(a >= b for a, b in zip(lrs[50:], lrs[51:]))


def test_adamw_groups_and_lynx_hyperparameters():
    layer = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    optimizer, scheduler = build_optimizer(list(layer.named_parameters()), 100, OptimizerConfig())
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.01 and [p.shape for p in decay["params"]] == [(4, 4)]
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 3
    assert decay["betas"] == (0.9, 0.999) and decay["eps"] == 1e-8


def test_nothing_trainable_is_an_error():
    with pytest.raises(ValueError, match="nothing to train"):
        build_optimizer([], 10, OptimizerConfig())
