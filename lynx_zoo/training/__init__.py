"""Training pieces: the optimiser, callbacks, and (in :mod:`lynx_zoo.training.distributed`) scale-out."""

from lynx_zoo.training.callbacks import HeldOutReport, SkippedSampleReport
from lynx_zoo.training.compile import CompileRegions, compile_regions
from lynx_zoo.training.optim import OptimizerConfig, build_optimizer, lr_factor

__all__ = [
    "CompileRegions",
    "HeldOutReport",
    "OptimizerConfig",
    "SkippedSampleReport",
    "build_optimizer",
    "compile_regions",
    "lr_factor",
]
