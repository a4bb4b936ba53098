"""Data sources: one small class per kind of data, all yielding :class:`~lynx_zoo.data.processor.Sample`.

* :class:`ImageTextSource`: captioning and visual QA from a JSONL manifest with local image paths;
* :class:`ConversationSource`: multi-turn instruction conversations about an image (LLaVA-style JSON);
* :class:`VideoQASource`: questions about video files (PyAV, frames sampled by segment);
* :class:`TextSource`: text-only instruction data;
* :class:`ShardSource`: WebDataset-style tar shards (``key.jpg`` + ``key.json``/``key.txt``), read by
  byte offset from an index of the tar headers, for alignment data that no single manifest holds.

A source is indexable (``len``, ``load(index, seed)``) and says how its samples are stored
(:meth:`Source.chunk_sizes`: one block for a manifest, one per tar shard or per chunk of a prepared data set),
so that a mixture reads a pass block by block (see :mod:`lynx_zoo.data.mixture`). A sample that
cannot be read comes back as :class:`~lynx_zoo.data.processor.Skipped` (source and reason), which the
collate function drops and counts, unless the source is strict: then the error names the file. Readers call
:meth:`Source.read_sample`, which also skips (and counts) any other exception a source raises for one record;
a programming error (:data:`~lynx_zoo.errors.PROGRAMMING_ERRORS`) and a setting that cannot work
(:class:`~lynx_zoo.errors.ConfigError`) still surface.
"""

from __future__ import annotations

import bisect
import glob
import io
import json
import logging
import os
import random
import re
import tarfile
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image
from torch.utils.data import Dataset

from lynx_zoo.data.images import DEFAULT_MAX_IMAGE_PIXELS, open_rgb
from lynx_zoo.data.manifest import ManifestError, read_manifest
from lynx_zoo.data.processor import Sample, Skipped
from lynx_zoo.data.templates import InstructionTemplates
from lynx_zoo.data.video import read_video_frames
from lynx_zoo.errors import ConfigError, DataError, MediaError, ReportedError, is_programming_error

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")

__all__ = ["DataError"]  # (re-exported: it lives in lynx_zoo.errors)


@dataclass
class LoadContext:
    """What a source needs from the model and the DataModule to turn records into samples.

    ``transform`` turns images into tensors (for training, the model's training transform: with
    ``vision.train_crop``, a random crop seeded by the sample); ``frame_transform`` turns video frames (default:
    ``transform``; the release never crops frames at random). An image of more than ``max_image_pixels`` pixels is
    skipped before it is decoded (a decompression bomb; ``None``: no cap)."""

    transform: Callable[[Image.Image], torch.Tensor]
    templates: InstructionTemplates = field(default_factory=lambda: InstructionTemplates({}))
    num_frames: int = 5
    training: bool = True
    strict: bool = False
    frame_transform: Callable[[Image.Image], torch.Tensor] | None = None
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS

    def __post_init__(self) -> None:
        if self.max_image_pixels is not None and self.max_image_pixels < 1:
            raise ConfigError(f"max_image_pixels: expected a positive number or null, got {self.max_image_pixels}")


class Source(Dataset):
    """Base of the data sources.

    Args:
        name: the source's name in mixtures, metrics and skip counts (default: the class's kind).
        ratio: its sampling weight in a mixture (normalised over the mixture's sources).
        task: the instruction-template task of its samples (see :mod:`lynx_zoo.data.templates`).
    """

    kind: ClassVar[str] = "source"
    text_only: ClassVar[bool] = False  # its samples carry no image or video (Lynx's NLP data)

    def __init__(self, name: str | None = None, ratio: float = 1.0, task: str = "") -> None:
        if ratio < 0:
            raise ValueError(f"source {name or self.kind}: ratio must be >= 0, got {ratio}")
        self.name = name or self.kind
        self.ratio = ratio
        self.task = task
        self.context: LoadContext | None = None
        self.skipped_lines: Counter = Counter()

    def prepare(self, context: LoadContext) -> None:
        """Read the source's index (manifest, tar headers) and keep the context for loading."""
        self.context = context

    def __len__(self) -> int:
        raise NotImplementedError

    def load(self, index: int, seed: str) -> Sample | Skipped:
        """Sample ``index``; ``seed`` seeds its random draws (template, training video frames), each
        from its own stream so that switching one (diverse prompts) leaves the others as they were."""
        raise NotImplementedError

    def __getitem__(self, index: int) -> Sample | Skipped:
        return self.read_sample(index, str(index))

    def read_sample(self, index: int, seed: str) -> Sample | Skipped:
        """:meth:`load`, with any exception it raises for this one record skipped and counted (in strict mode, a
        :class:`DataError` naming the record). Programming errors and errors that stop a run
        (:class:`~lynx_zoo.errors.ReportedError`: a strict-mode error, a setting that cannot work) go through."""
        try:
            return self.load(index, seed)
        except ReportedError:
            raise
        except Exception as err:
            if is_programming_error(err):
                raise
            detail = f"{self.where(index)}: {type(err).__name__}: {err}"
            if self.ctx.strict:
                raise DataError(f"source {self.name}: {detail}") from err
            return self.skip("load_error", detail)

    def where(self, index: int) -> str:
        """Where sample ``index`` is stored, for messages (its file, line, member...)."""
        return f"source {self.name} sample {index}"

    def chunk_sizes(self) -> list[int]:
        """Sizes of the blocks the samples are stored in, in index order (a pass reads block by block, each
        shuffled; one block, a plain permutation, for sources held in memory)."""
        return [len(self)]

    @property
    def categories(self) -> list[str]:
        """The categories of the source's samples (one, ``""``, for sources that have none)."""
        return [""]

    # ------------------------------------------------------------------ helpers for subclasses
    @property
    def ctx(self) -> LoadContext:
        if self.context is None:
            raise RuntimeError(f"source {self.name}: call prepare(context) before loading samples")
        return self.context

    def skip(self, reason: str, detail: str) -> Skipped:
        """Skip (and count) a sample; in strict mode raise instead, naming the file."""
        if self.ctx.strict:
            raise DataError(f"source {self.name}: {detail}")
        log.warning("source %s: skipping %s", self.name, detail)
        return Skipped(self.name, reason, detail)

    def instruction(self, question: str, seed: str) -> str:
        rng = random.Random(f"{seed}/template") if self.ctx.training else None
        return self.ctx.templates.render(self.task, question, rng)

    def read_image(self, path: Path | str, seed: str, data: bytes | None = None) -> torch.Tensor:
        """The transformed image at ``path`` (or in ``data``, named ``path`` in errors); a
        :class:`~lynx_zoo.errors.MediaError` (an ``OSError``) naming it when it cannot be used (see
        :func:`~lynx_zoo.data.images.open_rgb`: any decoding error, degenerate, over ``max_image_pixels``).

        A random training transform draws from torch's generator seeded by ``seed`` (its own stream), so that a
        sample is cropped alike in every run, worker layout and resume."""
        if data is not None:
            rgb = open_rgb(data=data, where=str(path), max_pixels=self.ctx.max_image_pixels)
        else:
            rgb = open_rgb(path, max_pixels=self.ctx.max_image_pixels)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(random.Random(f"{seed}/crop").getrandbits(63))
            return self.ctx.transform(rgb)


class ManifestSource(Source):
    """A source read from a JSONL manifest (one record per line, see :mod:`lynx_zoo.data.manifest`)."""

    required: ClassVar[tuple[str, ...]] = ("answer",)

    def __init__(
        self, manifest: str, root: str | None = None, name: str | None = None, ratio: float = 1.0, task: str = ""
    ) -> None:
        super().__init__(name, ratio, task)
        self.manifest = Path(manifest)
        self.root = Path(root) if root else self.manifest.parent
        self.records: list[dict] = []

    def prepare(self, context: LoadContext) -> None:
        super().prepare(context)
        if not self.records:
            self.records, self.skipped_lines = read_manifest(self.manifest, context.strict, self.required)

    def __len__(self) -> int:
        return len(self.records)

    def where(self, index: int) -> str:
        record = self.records[index]
        return f"{self.manifest}: sample {index}" + (f" (id {record['id']})" if "id" in record else "")

    def sample(self, index: int, record: dict, instruction: str, media: torch.Tensor | None) -> Sample:
        return Sample(
            instruction=instruction,
            answer=record["answer"],
            image=media,
            category=str(record.get("category") or ""),
            id=str(record.get("id", index)),
            source=self.name,
        )

    @property
    def categories(self) -> list[str]:
        return sorted({str(r.get("category") or "") for r in self.records})


class MediaSource(ManifestSource):
    """A manifest source whose records name a media file (``media_field``) read by :meth:`read_media`."""

    media_field: ClassVar[str] = "image"

    def read_media(self, path: Path, seed: str) -> torch.Tensor:
        raise NotImplementedError

    def where(self, index: int) -> str:
        return f"{super().where(index)} ({self.root / self.records[index][self.media_field]})"

    def load(self, index: int, seed: str) -> Sample | Skipped:
        record = self.records[index]
        path = self.root / record[self.media_field]
        try:
            media = self.read_media(path, seed)
        except (OSError, ValueError) as err:  # a MediaError (VideoError) is an OSError
            return self.skip(media_reason(err, self.media_field), f"{self.manifest}: {unreadable(path, err)}")
        return self.sample(index, record, self.instruction(str(record.get("question") or ""), seed), media)


class ImageTextSource(MediaSource):
    """Captioning or visual QA: ``{"image": "a.jpg", "question": "...", "answer": "...", "category": ...}``.

    ``question`` is optional (captioning manifests have none: the task's template is the instruction);
    ``image`` is relative to ``root`` (default: the manifest's folder).
    """

    kind = "image_text"
    required = ("image", "answer")

    def read_media(self, path: Path, seed: str) -> torch.Tensor:
        return self.read_image(path, seed)


class VideoQASource(MediaSource):
    """Questions about videos: ``{"video": "clip.mp4", "question": "...", "answer": "..."}`` (any container
    PyAV reads; ``num_frames`` frames by segment: random within segments for training, centres for evaluation)."""

    kind = "video_qa"
    required = ("video", "answer")
    media_field = "video"

    def prepare(self, context: LoadContext) -> None:
        if context.num_frames < 1:
            raise ConfigError(
                f"source {self.name}: video data needs vision.num_frames >= 1 frames per clip, got "
                f"{context.num_frames} (0 is an image-only model)"
            )
        super().prepare(context)

    def read_media(self, path: Path, seed: str) -> torch.Tensor:
        frames = read_video_frames(path, self.ctx.num_frames, self.ctx.training, random.Random(f"{seed}/frames"))
        transform = self.ctx.frame_transform or self.ctx.transform
        return torch.stack([transform(frame) for frame in frames])


class TextSource(ManifestSource):
    """Text-only instruction data: ``{"instruction": "...", "answer": "..."}`` (Lynx mixes NLP data in)."""

    kind = "text"
    required = ("instruction", "answer")
    text_only = True

    def load(self, index: int, seed: str) -> Sample:
        record = self.records[index]
        return self.sample(index, record, self.instruction(record["instruction"], seed), None)


class ConversationSource(ManifestSource):
    """Multi-turn conversations about an image, LLaVA-style: a JSON list (or JSONL) of
    ``{"id": ..., "image": "a.jpg", "conversations": [{"from": "human", "value": "<image>\\n..."},
    {"from": "gpt", "value": "..."}, ...]}``. Every answer is trained on; the ``<image>`` marker is
    dropped (each fusion module places the visual tokens itself)."""

    kind = "conversation"

    def prepare(self, context: LoadContext) -> None:
        Source.prepare(self, context)  # not a JSONL manifest of flat records: read here
        if not self.records:
            numbered, self.skipped_lines, _ = self.read(self.manifest, context.strict)
            self.records = [record for _, record in numbered]

    @classmethod
    def read(
        cls, manifest: Path, strict: bool = False
    ) -> tuple[list[tuple[int, dict]], Counter, list[tuple[str, str]]]:
        """The numbered valid records of a conversations file, the skipped ones counted by reason, and
        ``(reason, message)`` naming each skipped record (a wrong schema in record 1, or any problem when
        ``strict``, raises)."""
        if not manifest.is_file():
            raise FileNotFoundError(f"conversations not found: {manifest}")
        text = manifest.read_text(encoding="utf-8-sig")
        try:
            loaded = json.loads(text) if text.lstrip().startswith("[") else None
        except json.JSONDecodeError as err:
            raise ManifestError(f"{manifest}: not valid JSON ({err.msg}, line {err.lineno})") from err
        entries = list(enumerate(loaded, 1)) if loaded is not None else cls._json_lines(text)
        numbered, skipped, messages = [], Counter(), []
        for number, record in entries:
            problem = cls._problem(record)
            if problem is None:
                numbered.append((number, record))
                continue
            reason, detail = problem
            message = f"{manifest}: record {number}: {detail}"
            if strict or (number == 1 and reason != "empty_answer"):
                raise ManifestError(
                    f"{message}; expected {{'image': str, 'conversations': [{{'from': 'human'|'gpt', 'value': str}}]}}"
                )
            skipped[reason] += 1
            messages.append((reason, message))
            log.warning("skipping %s", message)
        return numbered, skipped, messages

    @staticmethod
    def _json_lines(text: str) -> list[tuple[int, Any]]:
        entries: list[tuple[int, Any]] = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    entries.append((number, json.loads(line)))
                except json.JSONDecodeError:
                    entries.append((number, None))
        return entries

    @staticmethod
    def _problem(record: Any) -> tuple[str, str] | None:
        if not isinstance(record, dict):
            return "malformed_line", "not a JSON object"
        turns = record.get("conversations")
        if not isinstance(record.get("image"), str) or not isinstance(turns, list) or not turns:
            return "missing_field", "missing 'image' or 'conversations'"
        roles = [t.get("from") if isinstance(t, dict) else None for t in turns]
        if len(turns) % 2 or roles != ["human", "gpt"] * (len(turns) // 2):
            return "malformed_line", f"turns must alternate human/gpt, got {roles}"
        if any(not isinstance(t.get("value"), str) for t in turns):
            return "malformed_line", "a turn's 'value' is not a string"
        if any(not t["value"].strip() for t in turns[1::2]):
            return "empty_answer", "an empty answer"
        return None

    def where(self, index: int) -> str:
        return f"{super().where(index)} ({self.root / self.records[index]['image']})"

    def load(self, index: int, seed: str) -> Sample | Skipped:
        record = self.records[index]
        path = self.root / record["image"]
        try:
            pixels = self.read_image(path, seed)
        except (OSError, ValueError) as err:
            return self.skip(media_reason(err, "image"), f"{self.manifest}: {unreadable(path, err)}")
        pairs = conversation_pairs(record["conversations"])
        return Sample(
            instruction=pairs[-1][0],
            answer=pairs[-1][1],
            image=pixels,
            id=str(record.get("id", index)),
            history=pairs[:-1],
            source=self.name,
        )


@dataclass
class _Shard:
    path: Path
    keys: list[str]
    members: list[dict[str, tuple[int, int]]]  # per sample: extension -> (offset, size)


class ShardSource(Source):
    """WebDataset-style tar shards of image-text pairs: members ``<key>.<jpg|png|...>`` with ``<key>.json``
    (``{"answer": ..., "question": ...}``, or ``"caption"``) or ``<key>.txt`` (the caption).

    Args:
        shards: tar files: paths, globs or a brace range (``pairs-{000000..000099}.tar``).
        (``name``, ``ratio``, ``task`` as for every :class:`Source`; the default task is captioning.)

    Samples are read by byte offset from an index of the tar headers (built at ``prepare``), so a
    mixture can address any sample. Each shard is one block of :meth:`chunk_sizes`: a pass goes shard
    by shard in a shuffled order. The index holds every key in memory, in every process: for more than
    about a million samples, prepare the shards (``python -m lynx_zoo data prepare``) and read them with
    :class:`~lynx_zoo.data.prepared.PreparedSource`.
    """

    kind = "shards"

    def __init__(self, shards: list[str] | str, name: str | None = None, ratio: float = 1.0, task: str = "caption"):
        super().__init__(name, ratio, task)
        self.patterns = [shards] if isinstance(shards, str) else list(shards)
        self.shards: list[_Shard] = []
        self.offsets: list[int] = []  # first global index of each shard

    def prepare(self, context: LoadContext) -> None:
        super().prepare(context)
        if self.shards:
            return
        paths = [p for pattern in self.patterns for p in expand_pattern(pattern)]
        if not paths:
            raise FileNotFoundError(f"source {self.name}: no tar shards match {self.patterns}")
        total = 0
        for path in paths:
            shard = _index_shard(path, self.skipped_lines, context.strict)
            self.shards.append(shard)
            self.offsets.append(total)
            total += len(shard.keys)
        self.size = total

    def __len__(self) -> int:
        return self.size if self.shards else 0

    def chunk_sizes(self) -> list[int]:
        return [len(shard.keys) for shard in self.shards]

    def where(self, index: int) -> str:
        shard, position = self.locate(index)
        return f"{shard.path}:{shard.keys[position]}"

    def locate(self, index: int) -> tuple[_Shard, int]:
        """The shard holding global sample ``index`` and the sample's position in it."""
        s = bisect.bisect_right(self.offsets, index) - 1
        return self.shards[s], index - self.offsets[s]

    def load(self, index: int, seed: str) -> Sample | Skipped:
        shard, position = self.locate(index)
        key, members = shard.keys[position], shard.members[position]
        where = f"{shard.path}:{key}"
        try:
            with shard.path.open("rb") as tar:
                blobs = {ext: _read_at(tar, *members[ext]) for ext in members}
        except OSError as err:
            return self.skip("unreadable_shard", f"{where}: {err}")
        image_ext = next(ext for ext in IMAGE_EXTENSIONS if ext in blobs)
        try:
            pixels = self.read_image(where, seed, blobs[image_ext])
        except (OSError, ValueError) as err:
            return self.skip(media_reason(err, "image"), f"{where}.{image_ext}: {err}")
        try:
            question, answer = shard_text(blobs)
        except ValueError as err:
            return self.skip("malformed_line", f"{where}.json: {err}")
        if not answer:
            return self.skip("empty_answer", f"{where}: empty answer")
        return Sample(self.instruction(question, seed), answer, pixels, id=key, source=self.name)


def unreadable(path: Path, error: Exception) -> str:
    """``cannot read <path>: <what is wrong>``, the path named once."""
    return f"cannot read {path}: {str(error).removeprefix(f'{path}: ')}"


def media_reason(error: Exception, kind: str) -> str:
    """The skip reason of an unusable image or video: ``unreadable_image``, ``oversized_image``, ..."""
    return f"{error.reason if isinstance(error, MediaError) else 'unreadable'}_{kind}"


def conversation_pairs(turns: list[dict]) -> list[tuple[str, str]]:
    """(instruction, answer) pairs of validated LLaVA turns, ``<image>`` markers dropped."""
    return [(q["value"].replace("<image>", "").strip(), a["value"]) for q, a in zip(turns[::2], turns[1::2])]


def shard_text(blobs: dict[str, bytes]) -> tuple[str, str]:
    """``(question, answer)`` of a tar-shard sample from its ``json`` (``answer`` or ``caption``, ``question``?) or
    ``txt`` member, the answer stripped (empty when there is none); ``ValueError`` for a malformed ``json``."""
    if "json" not in blobs:
        return "", blobs["txt"].decode("utf-8", "replace").strip()
    try:
        meta = json.loads(blobs["json"])
        return str(meta.get("question") or ""), str(meta.get("answer") or meta.get("caption") or "").strip()
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
        raise ValueError(str(err)) from err


def expand_pattern(pattern: str) -> list[Path]:
    """Paths of a glob or a ``{000..009}`` brace range (zero padding kept)."""
    brace = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if brace:
        first, last = brace.groups()
        names = [
            pattern[: brace.start()] + str(i).zfill(len(first)) + pattern[brace.end() :]
            for i in range(int(first), int(last) + 1)
        ]
        return [p for name in names for p in expand_pattern(name)]
    if glob.has_magic(pattern):
        return [Path(p) for p in sorted(glob.glob(pattern))]
    return [Path(pattern)]


def shard_member(member: tarfile.TarInfo) -> tuple[str, str] | None:
    """A tar shard member's WebDataset sample key and extension (the key is all before the name's first dot, the
    folder included; the extension lower-cased), or ``None`` for a member that is no sample file."""
    folder, _, name = member.name.removeprefix("./").rpartition("/")
    if not member.isfile() or "." not in name:
        return None
    stem, _, ext = name.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def is_complete_sample(extensions: Collection[str]) -> bool:
    """Whether a shard sample's members (by extension) hold an image and its text (``json`` or ``txt``)."""
    return any(e in extensions for e in IMAGE_EXTENSIONS) and ("json" in extensions or "txt" in extensions)


def _index_shard(path: Path, skipped: Counter, strict: bool) -> _Shard:
    """Keys and member byte ranges of a tar shard, from its headers (the data is not read).

    The index is cached beside the shard (``<shard>.index.json``, tied to its size and mtime) when that
    folder is writable, so later runs and other ranks do not walk the headers again.
    """
    cache = path.with_name(path.name + ".index.json")
    grouped = _cached_index(path, cache)
    if grouped is None:
        grouped = {}
        try:
            with tarfile.open(path, mode="r:") as tar:
                for member in tar:
                    if (found := shard_member(member)) is not None:
                        key, ext = found
                        grouped.setdefault(key, {})[ext] = (member.offset_data, member.size)
        except (OSError, tarfile.TarError) as err:
            if strict:
                raise DataError(f"{path}: unreadable tar shard: {err}") from err
            log.warning("shard %s: unreadable (%s); skipping the samples it did not index", path, err)
            skipped["unreadable_shard"] += 1
        else:
            _write_index(path, cache, grouped)
    keys, members = [], []
    for key, exts in grouped.items():
        if is_complete_sample(exts):
            keys.append(key)
            members.append(exts)
        else:
            if strict:
                raise DataError(f"{path}: sample {key!r} lacks an image or a json/txt member: {sorted(exts)}")
            skipped["incomplete_sample"] += 1
    return _Shard(path, keys, members)


def _shard_stamp(path: Path) -> list[int]:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


def _cached_index(path: Path, cache: Path) -> dict[str, dict[str, tuple[int, int]]] | None:
    """The cached index of ``path`` if it was written for this very file (same size and mtime)."""
    try:
        saved = json.loads(cache.read_text(encoding="utf-8"))
        if saved.get("stamp") == _shard_stamp(path):
            return {key: {ext: tuple(at) for ext, at in exts.items()} for key, exts in saved["members"].items()}
    except (OSError, ValueError, KeyError, AttributeError):
        pass  # no cache, an unreadable one, or one for another file: index the shard again
    return None


def _write_index(path: Path, cache: Path, grouped: dict[str, dict[str, tuple[int, int]]]) -> None:
    temporary = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text(json.dumps({"stamp": _shard_stamp(path), "members": grouped}), encoding="utf-8")
        os.replace(temporary, cache)
    except OSError as err:  # a read-only data folder: index again next time
        log.debug("shard %s: no index cache written: %s", path, err)
        temporary.unlink(missing_ok=True)


def _read_at(file: io.BufferedReader, offset: int, size: int) -> bytes:
    file.seek(offset)
    data = file.read(size)
    if len(data) != size:
        raise OSError(f"member at byte {offset} is cut short ({len(data)} of {size} bytes)")
    return data
