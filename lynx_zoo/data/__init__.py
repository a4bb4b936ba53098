"""Data: samples, the processor (prompt format, tokens, labels) and the DataModules."""

from lynx_zoo.data.datamodule import ShapesVQADataModule, VQADataModule
from lynx_zoo.data.manifest import ManifestDataset, ManifestError, read_manifest
from lynx_zoo.data.processor import IGNORE_INDEX, LynxProcessor, PromptConfig, Sample

__all__ = [
    "IGNORE_INDEX",
    "LynxProcessor",
    "ManifestDataset",
    "ManifestError",
    "PromptConfig",
    "Sample",
    "ShapesVQADataModule",
    "VQADataModule",
    "read_manifest",
]
