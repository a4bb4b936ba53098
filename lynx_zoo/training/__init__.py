"""Training pieces: callbacks, compiled regions, and (in :mod:`lynx_zoo.training.distributed`) scale-out strategies."""

from typing import TYPE_CHECKING

from lynx_zoo.lazy import lazy_exports

if TYPE_CHECKING:
    from lynx_zoo.training.callbacks import HeldOutReport
    from lynx_zoo.training.compile import CompileRegions, compile_regions

__getattr__, __dir__ = lazy_exports(__name__, __file__)

__all__ = [
    "CompileRegions",
    "HeldOutReport",
    "compile_regions",
]
