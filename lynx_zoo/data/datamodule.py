"""DataModules shared by every model of the zoo.

The model owns the processor (tokenizer, prompt format, image transform); the DataModule takes it
from the model it is trained with (or from ``processor=``) so that one DataModule serves PT and CA
models alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from torch.utils.data import DataLoader

from lynx_zoo.data.processor import LynxProcessor
from lynx_zoo.data.shapes import write_shapes_vqa
from lynx_zoo.data.sources import ImageTextSource, LoadContext


def attached_model(datamodule: L.LightningDataModule) -> Any:
    """The lynx_zoo model a DataModule is trained with (its processor and vision settings shape the data)."""
    model = datamodule.trainer.lightning_module if datamodule.trainer is not None else None
    if not hasattr(model, "processor"):
        raise RuntimeError(
            f"{type(datamodule).__name__} needs a processor: attach it to a lynx_zoo model's trainer "
            "or set `datamodule.processor = model.processor`"
        )
    return model


class VQADataModule(L.LightningDataModule):
    """Image + question + answer data from JSONL manifests (see :mod:`lynx_zoo.data.manifest`).

    Args:
        train_manifest: manifest of the training split.
        val_manifest: manifest of the held-out split (validation loss and generated-answer accuracy).
        image_root: folder the manifests' image paths are relative to (default: each manifest's folder).
        batch_size: samples per batch and device.
        num_workers: DataLoader worker processes (decoding and transforms run there).
        strict: raise on an unreadable image or a malformed manifest line instead of skipping it.
    """

    def __init__(
        self,
        train_manifest: str,
        val_manifest: str | None = None,
        image_root: str | None = None,
        batch_size: int = 8,
        num_workers: int = 2,
        strict: bool = False,
    ) -> None:
        super().__init__()
        self.train_manifest = train_manifest
        self.val_manifest = val_manifest
        self.image_root = image_root
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.strict = strict
        self.processor: LynxProcessor | None = None
        self.train_set: ImageTextSource | None = None
        self.val_set: ImageTextSource | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.processor is None:
            self.processor = attached_model(self).processor
        if stage in (None, "fit") and self.train_set is None:
            self.train_set = self._source(self.train_manifest, training=True)
        if self.val_manifest and self.val_set is None:
            self.val_set = self._source(self.val_manifest, training=False)

    def _source(self, manifest: str, training: bool) -> ImageTextSource:
        source = ImageTextSource(manifest, root=self.image_root, name=Path(manifest).stem)
        transform = self.processor.train_image_transform if training else self.processor.image_transform
        frames = self.processor.image_transform
        source.prepare(LoadContext(transform, training=training, strict=self.strict, frame_transform=frames))
        return source

    @property
    def categories(self) -> list[str]:
        """Categories of the held-out split, for per-category metrics."""
        if self.val_set is not None:
            return self.val_set.categories
        return []

    def _loader(self, dataset: ImageTextSource, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            collate_fn=self.processor,
            persistent_workers=self.num_workers > 0,
            drop_last=shuffle,
        )

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.val_set, shuffle=False) if self.val_set is not None else []

    def test_dataloader(self) -> DataLoader | list:
        return self.val_dataloader()


class ShapesVQADataModule(VQADataModule):
    """The built-in rendered-shapes VQA set (:mod:`lynx_zoo.data.shapes`), written under ``root`` on
    first use and then read through the same manifest path as any real data set.

    Args:
        root: folder of the rendered set (created if missing).
        num_train: training images (four questions each).
        num_val: held-out images (four questions each).
        image_size: rendered image size in pixels.
        seed: seed of the renderer.
    """

    def __init__(
        self,
        root: str = "data/shapes_vqa",
        num_train: int = 8000,
        num_val: int = 250,
        image_size: int = 64,
        seed: int = 0,
        batch_size: int = 32,
        num_workers: int = 2,
        strict: bool = False,
    ) -> None:
        super().__init__(
            train_manifest=str(Path(root) / "train.jsonl"),
            val_manifest=str(Path(root) / "val.jsonl"),
            batch_size=batch_size,
            num_workers=num_workers,
            strict=strict,
        )
        self.root = Path(root)
        self.num_train, self.num_val, self.image_size, self.seed = num_train, num_val, image_size, seed

    def prepare_data(self) -> None:
        stamp = self.root / "params.txt"
        params = f"num_train={self.num_train} num_val={self.num_val} image_size={self.image_size} seed={self.seed}"
        if stamp.is_file() and stamp.read_text() == params and (self.root / "val.jsonl").is_file():
            return
        write_shapes_vqa(self.root, self.num_train, self.num_val, self.image_size, self.seed)
        stamp.write_text(params)
