"""Data: samples, the processor (prompt format, tokens, labels) and the DataModules."""

from typing import TYPE_CHECKING

from lynx_zoo.lazy import lazy_exports

if TYPE_CHECKING:
    from lynx_zoo.data.datamodule import ShapesVQADataModule, VQADataModule
    from lynx_zoo.data.manifest import ManifestError, read_manifest
    from lynx_zoo.data.mixture import MixtureDataModule
    from lynx_zoo.data.processor import IGNORE_INDEX, LynxProcessor, PromptConfig, PromptCutWarning, Sample, Skipped
    from lynx_zoo.data.sources import (
        ConversationSource,
        DataError,
        ImageTextSource,
        LoadContext,
        ShardSource,
        Source,
        TextSource,
        VideoQASource,
    )
    from lynx_zoo.data.templates import InstructionTemplates

__getattr__, __dir__ = lazy_exports(__name__, __file__)


def import_config_classes() -> None:
    """Import every DataModule and source of the zoo, so that a config may name one by its short class name
    (``class_path: MixtureDataModule``): LightningCLI finds subclasses among the classes imported."""
    from lynx_zoo.data import datamodule, mixture, sources  # noqa: F401


__all__ = [
    "IGNORE_INDEX",
    "import_config_classes",
    "LynxProcessor",
    "ConversationSource",
    "DataError",
    "ImageTextSource",
    "InstructionTemplates",
    "LoadContext",
    "MixtureDataModule",
    "ShardSource",
    "Source",
    "TextSource",
    "VideoQASource",
    "ManifestError",
    "PromptConfig",
    "PromptCutWarning",
    "Sample",
    "ShapesVQADataModule",
    "Skipped",
    "VQADataModule",
    "read_manifest",
]
