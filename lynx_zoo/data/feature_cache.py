"""A frozen vision tower's tokens, computed once and read back in training (stage 1 without the tower).

When the tower is frozen and its transform deterministic (the evaluation transform: resize + centre crop; video
frames at segment centres), its output for a sample never changes: ``python -m lynx_zoo cache-features``
(:mod:`lynx_zoo.training.cache_features`) computes it once and :class:`FeatureCacheSource` reads it back as the
samples' ``vision_tokens``. The model then runs the bridge and the LLM only.

A cache is a folder:

* ``features-00000.safetensors``, ...: each holds ``tokens``, the tower's output of its samples
  ``(n, N, width)`` (images) or ``(n, T, N, width)`` (videos) in the stored dtype, and in its metadata
  ``records``: a JSON list of each sample's ``id``, ``instruction`` (the question, before any template),
  ``answer``, ``category`` and ``history``;
* ``features.json``: the format, the media kind, the tower's config and the fingerprint of its weights, the dtype,
  the shards and their sizes, and the samples skipped (by reason).

It is written to ``<folder>.partial`` and renamed when complete. Reading is by sample, memory-mapped: a shard is a
block of the mixture's pass order (:meth:`~lynx_zoo.data.sources.Source.chunk_sizes`). Before training, the
mixture checks that the cache was made by the model's own tower (:meth:`FeatureCacheSource.check_tower`).

Disk: ``N x width x 2`` bytes per image in fp16: 901 x 1408 x 2 = 2.5 MB at 420 px for EVA ViT-g (Lynx), 0.7 MB at
224 px (257 tokens). That is for data sets seen many times (several epochs, many runs of an ablation grid), not
for a single pass over 120M pairs.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import json
import os
import shutil
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lynx_zoo.data.processor import Sample
from lynx_zoo.data.sources import DataError, LoadContext, Source
from lynx_zoo.data.templates import InstructionTemplates

if TYPE_CHECKING:
    from lynx_zoo.vision.encoder import VisionEncoder

FORMAT = "lynx_zoo-vision-features"
FORMAT_VERSION = 1
INDEX_NAME = "features.json"
# the fields of a VisionConfig that decide the tower's tokens of a sample (the weights are fingerprinted)
TOWER_FIELDS = ("model_name", "image_size", "num_blocks", "final_norm", "keep_cls_token", "num_frames", "model_kwargs")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def tower_fingerprint(tower: torch.nn.Module) -> str:
    """SHA-256 of a tower's weights (names, dtypes, shapes and bytes): two towers with the same fingerprint make the
    same tokens."""
    digest = hashlib.sha256()
    for name, tensor in sorted(tower.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def tower_description(tower: VisionEncoder) -> dict[str, Any]:
    """What a cache records of the tower that made it: the config fields that decide its tokens, their shape and the
    fingerprint of its weights."""
    config = dataclasses.asdict(tower.config)
    return {
        "config": {field: config[field] for field in TOWER_FIELDS},
        "tokens": tower.num_tokens,
        "width": tower.width,
        "fingerprint": tower_fingerprint(tower),
    }


def cache_context(tower: VisionEncoder) -> LoadContext:
    """How the cache reads its sources: the tower's evaluation transform (deterministic), video frames at segment
    centres, and no templates (questions are stored as they are; the reading source applies its task's)."""
    transform = tower.image_transform()
    return LoadContext(transform, InstructionTemplates({}), tower.config.num_frames, training=False, strict=False)


def write_feature_cache(
    sources: list[Source],
    tower: VisionEncoder,
    output: str | Path,
    batch_size: int = 16,
    shard_size: int = 1024,
    dtype: str = "float16",
    device: str | torch.device = "cpu",
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run ``tower`` over every sample of ``sources`` (prepared here with :func:`cache_context`) and write the cache
    folder ``output``; returns its index (``features.json``). Unreadable and text-only samples are skipped and
    counted. One cache holds one media kind (images, or videos)."""
    if tower.config.trainable:
        raise ValueError("cache-features: the vision tower is trainable (vision.trainable: true): its tokens change")
    if dtype not in DTYPES:
        raise ValueError(f"cache-features: dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    output = Path(output)
    if output.exists() and not overwrite:
        raise FileExistsError(f"cache-features: {output} exists (pass --overwrite to replace it)")
    partial = output.with_name(output.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    context = cache_context(tower)
    for source in sources:
        source.prepare(context)
    description = tower_description(tower)
    tower = tower.to(device).eval()
    skipped: Counter = Counter()
    shards: list[dict[str, Any]] = []
    media_kind: str | None = None
    tokens: list[torch.Tensor] = []
    records: list[dict[str, Any]] = []
    for batch in _batches(_media_samples(sources, skipped), batch_size):
        kinds = {"video" if sample.image.dim() == 4 else "image" for sample in batch}
        media_kind = media_kind or next(iter(kinds))
        if kinds != {media_kind}:
            raise ValueError(
                f"cache-features: the inputs hold images and videos (e.g. {batch[0].source}:{batch[0].id}); "
                "cache each media kind in its own folder"
            )
        pixels = torch.stack([sample.image for sample in batch]).to(device)
        with torch.no_grad():
            out = tower(pixels.flatten(0, 1) if media_kind == "video" else pixels)
        if media_kind == "video":
            out = out.unflatten(0, pixels.shape[:2])
        tokens += list(out.to("cpu", DTYPES[dtype]))
        records += [_record(sample) for sample in batch]
        while len(tokens) >= shard_size:
            shards.append(_write_shard(partial, len(shards), tokens[:shard_size], records[:shard_size]))
            tokens, records = tokens[shard_size:], records[shard_size:]
    if tokens:
        shards.append(_write_shard(partial, len(shards), tokens, records))
    if not shards:
        raise ValueError(f"cache-features: no sample with media to cache in {[s.name for s in sources]}")
    index = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "media": media_kind,
        "dtype": dtype,
        "tower": description,
        "task": sources[0].task,
        "sources": [source.name for source in sources],
        "samples": sum(shard["samples"] for shard in shards),
        "shards": shards,
        "skipped": dict(skipped),
    }
    (partial / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    if output.exists():
        shutil.rmtree(output)
    os.replace(partial, output)
    return index


def _media_samples(sources: list[Source], skipped: Counter) -> Iterator[Sample]:
    for source in sources:
        for index in range(len(source)):
            sample = source.load(index, str(index))
            if not isinstance(sample, Sample):
                skipped[f"{sample.source}/{sample.reason}"] += 1
            elif sample.image is None:
                skipped[f"{source.name}/text_only"] += 1
            else:
                yield sample


def _batches(samples: Iterable[Sample], size: int) -> Iterator[list[Sample]]:
    batch: list[Sample] = []
    for sample in samples:
        batch.append(sample)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _record(sample: Sample) -> dict[str, Any]:
    return {
        "id": sample.id,
        "instruction": sample.instruction,
        "answer": sample.answer,
        "category": sample.category,
        "history": [list(turn) for turn in sample.history],
    }


def _write_shard(folder: Path, number: int, tokens: list[torch.Tensor], records: list[dict]) -> dict[str, Any]:
    name = f"features-{number:05d}.safetensors"
    metadata = {"records": json.dumps(records)}
    save_file({"tokens": torch.stack(tokens).contiguous()}, str(folder / name), metadata=metadata)
    return {"file": name, "samples": len(tokens)}


class FeatureCacheSource(Source):
    """A feature cache (``python -m lynx_zoo cache-features``) read as a source: each sample comes with its
    ``vision_tokens`` instead of an image, and training never runs the tower.

    Args:
        path: the cache folder.
        task: the instruction-template task of its questions (default: the task of the source it was made from).
        (``name``, ``ratio`` as for every :class:`Source`.)
    """

    kind = "feature_cache"

    def __init__(self, path: str, name: str | None = None, ratio: float = 1.0, task: str | None = None) -> None:
        super().__init__(name or Path(path.rstrip("/")).name, ratio, task or "")
        self.path = Path(path)
        self.index: dict[str, Any] = {}
        self.starts: list[int] = []
        self.given_task = task
        self._open: dict[int, tuple[Any, list[dict[str, Any]]]] = {}  # shard -> (its file, its records)
        self._process = 0

    def prepare(self, context: LoadContext) -> None:
        super().prepare(context)
        self._read_index()

    def _read_index(self) -> None:
        if self.index:
            return
        self.index = read_index(self.path)
        if self.given_task is None:
            self.task = str(self.index.get("task") or "")
        sizes = self.chunk_sizes()
        self.starts = [sum(sizes[:i]) for i in range(len(sizes))]

    def __len__(self) -> int:
        return int(self.index.get("samples", 0))

    def chunk_sizes(self) -> list[int]:
        return [int(shard["samples"]) for shard in self.index.get("shards", [])]

    def check_tower(self, tower: VisionEncoder, description: dict[str, Any] | None = None) -> None:
        """Raise a :class:`DataError` unless ``tower`` is the frozen tower that made the cache, and trains on the
        transform the cache used (no random crop). ``description``: the tower's :func:`tower_description`, when the
        caller has it already (it hashes every weight)."""
        self._read_index()
        if tower.config.trainable:
            raise DataError(f"{self.path}: a feature cache needs a frozen tower, but vision.trainable is true")
        if tower.config.train_crop:
            raise DataError(
                f"{self.path}: the model trains on random crops (vision.train_crop: true) but the cache holds the "
                "tokens of centre crops; set vision.train_crop: false, or train on the images"
            )
        cached = self.index["tower"]
        now = description or tower_description(tower)
        for field in TOWER_FIELDS:
            if cached["config"].get(field) != now["config"][field]:
                raise DataError(
                    f"{self.path}: made by a tower with vision.{field}={cached['config'].get(field)!r}, the model's "
                    f"has {now['config'][field]!r}"
                )
        if cached["fingerprint"] != now["fingerprint"]:
            raise DataError(f"{self.path}: made by a tower with other weights than the model's (fingerprints differ)")

    def load(self, index: int, seed: str) -> Sample:
        shard = bisect.bisect_right(self.starts, index) - 1
        position = index - self.starts[shard]
        handle, records = self._open_shard(shard)
        record = records[position]
        tokens = handle.get_slice("tokens")[position : position + 1][0]
        return Sample(
            instruction=self.instruction(record["instruction"], seed),
            answer=record["answer"],
            category=str(record.get("category") or ""),
            id=str(record["id"]),
            history=[(str(q), str(a)) for q, a in record.get("history") or []],
            source=self.name,
            vision_tokens=tokens,
        )

    def _open_shard(self, shard: int) -> tuple[Any, list[dict[str, Any]]]:
        """The shard's open file and its records (the last two shards stay open: a pass reads shard by shard)."""
        if self._process != os.getpid():  # a dataloader worker opens its own files
            self._open, self._process = {}, os.getpid()
        if shard not in self._open:
            if len(self._open) >= 2:
                self._open.pop(next(iter(self._open)))
            handle = safe_open(str(self.path / self.index["shards"][shard]["file"]), framework="pt")
            self._open[shard] = handle, json.loads(handle.metadata()["records"])
        return self._open[shard]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(_open={}, _process=0)  # open files stay in the process that opened them
        return state


def read_index(folder: Path) -> dict[str, Any]:
    """The index of a finished feature cache, or a :class:`DataError` naming what is wrong."""
    path = folder / INDEX_NAME
    if not path.is_file():
        partial = folder.with_name(folder.name + ".partial")
        hint = f" (an interrupted cache-features left {partial}: run it again)" if partial.exists() else ""
        raise DataError(f"{folder} is not a feature cache: no {INDEX_NAME}{hint}; make one with cache-features")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise DataError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise DataError(f"{path}: not a lynx_zoo feature cache (format {index.get('format')!r}, expected {FORMAT!r})")
    if index.get("format_version", 0) > FORMAT_VERSION:
        raise DataError(f"{path}: format_version {index['format_version']} is newer than this lynx_zoo reads")
    return index
