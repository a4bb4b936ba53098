"""Pretrained variants: export, safe loading, the variant registry, model cards, the original-release converter."""

from lynx_zoo.hub.callbacks import ExportVariant
from lynx_zoo.hub.export import export_checkpoint, export_variant
from lynx_zoo.hub.loading import BaseModelNotFoundError, VariantError
from lynx_zoo.hub.variants import VARIANTS, VariantInfo, list_variants, load_pretrained, register_local

__all__ = [
    "VARIANTS",
    "BaseModelNotFoundError",
    "ExportVariant",
    "VariantError",
    "VariantInfo",
    "export_checkpoint",
    "export_variant",
    "list_variants",
    "load_pretrained",
    "register_local",
]
