"""Training pieces: the optimiser, callbacks, and (in :mod:`lynx_zoo.training.distributed`) scale-out."""

from typing import TYPE_CHECKING

from lynx_zoo.lazy import lazy_exports

if TYPE_CHECKING:
    from lynx_zoo.training.callbacks import HeldOutReport, SkippedSampleReport
    from lynx_zoo.training.compile import CompileRegions, compile_regions
    from lynx_zoo.training.optim import OptimizerConfig, build_optimizer, lr_factor

__getattr__, __dir__ = lazy_exports(__name__, __file__)

__all__ = [
    "CompileRegions",
    "HeldOutReport",
    "OptimizerConfig",
    "SkippedSampleReport",
    "build_optimizer",
    "compile_regions",
    "lr_factor",
]
