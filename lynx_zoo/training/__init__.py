"""Training pieces: the optimiser and callbacks."""

from lynx_zoo.training.optim import OptimizerConfig, build_optimizer, lr_factor

__all__ = ["OptimizerConfig", "build_optimizer", "lr_factor"]
from lynx_zoo.training.callbacks import HeldOutReport, majority_rates  # noqa: E402

__all__ += ["HeldOutReport", "majority_rates"]
