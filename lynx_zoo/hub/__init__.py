"""Pretrained variants: one model loader, export, the variant registry, model cards, the original-release converter."""

from typing import TYPE_CHECKING

from lynx_zoo.lazy import lazy_exports

if TYPE_CHECKING:
    from lynx_zoo.hub.callbacks import ExportVariant
    from lynx_zoo.hub.export import export_checkpoint, export_variant
    from lynx_zoo.hub.loading import BaseModelNotFoundError, VariantError, load_model, load_pretrained
    from lynx_zoo.hub.variants import VARIANTS, VariantInfo, list_variants, register_local, resolve_variant

__getattr__, __dir__ = lazy_exports(__name__, __file__)

__all__ = [
    "VARIANTS",
    "BaseModelNotFoundError",
    "ExportVariant",
    "VariantError",
    "VariantInfo",
    "export_checkpoint",
    "export_variant",
    "list_variants",
    "load_model",
    "load_pretrained",
    "register_local",
    "resolve_variant",
]
