"""Visual question answering / captioning data from a JSONL manifest with local image paths.

One JSON object a line: ``{"image": "images/0001.png", "question": "...", "answer": "...",
"category": "colour", "id": "0001"}``; ``image`` is relative to the manifest's folder (or
``image_root``); ``category`` and ``id`` are optional.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from lynx_zoo.data.processor import Sample

log = logging.getLogger(__name__)

REQUIRED_FIELDS = ("image", "question", "answer")


class ManifestError(ValueError):
    """A manifest that cannot be used at all (its schema is wrong from the first line)."""


def read_manifest(path: str | Path, strict: bool = False) -> tuple[list[dict], Counter]:
    """Records of a JSONL manifest and the count of skipped lines per reason.

    A wrong schema on the first line raises at once; later malformed lines are skipped and counted
    (``strict=True`` raises on them, naming the file and line).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    records: list[dict] = []
    skipped: Counter = Counter()
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            problem = None
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                problem, reason = f"not valid JSON ({err.msg})", "malformed_line"
            else:
                missing = [
                    f for f in REQUIRED_FIELDS if not isinstance(record, dict) or not isinstance(record.get(f), str)
                ]
                if missing:
                    problem, reason = f"missing or non-string field(s) {missing}", "missing_field"
                elif not record["answer"].strip():
                    problem, reason = "empty answer", "empty_answer"
            if problem is None:
                records.append(record)
                continue
            message = f"{path}:{number}: {problem}"
            if strict or (number == 1 and reason != "empty_answer"):
                raise ManifestError(f"{message}; expected fields {list(REQUIRED_FIELDS)} (strings)")
            skipped[reason] += 1
            log.warning("skipping %s", message)
    return records, skipped


class ManifestDataset(Dataset):
    """Image + question + answer samples from a JSONL manifest.

    An image that cannot be read yields ``None`` (the collate function drops and counts it) unless
    ``strict`` is set, in which case the error names the file.
    """

    def __init__(
        self,
        manifest: str | Path,
        transform: Callable[[Image.Image], torch.Tensor],
        image_root: str | Path | None = None,
        strict: bool = False,
    ) -> None:
        self.manifest = Path(manifest)
        self.image_root = Path(image_root) if image_root else self.manifest.parent
        self.transform = transform
        self.strict = strict
        self.records, self.skipped_lines = read_manifest(self.manifest, strict=strict)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Sample | None:
        record = self.records[index]
        path = self.image_root / record["image"]
        try:
            with Image.open(path) as image:
                pixels = self.transform(image.convert("RGB"))
        except (OSError, ValueError) as err:
            if self.strict:
                raise OSError(f"{self.manifest}: cannot read image {path}: {err}") from err
            log.warning("skipping unreadable image %s: %s", path, err)
            return None
        return Sample(
            instruction=record["question"],
            answer=record["answer"],
            image=pixels,
            category=str(record.get("category") or ""),
            id=str(record.get("id", index)),
        )

    @property
    def categories(self) -> list[str]:
        return sorted({str(r.get("category") or "") for r in self.records})
