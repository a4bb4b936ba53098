"""Prepared data sets: samples stored in LitData's optimised format, streamed from a folder or an object store.

``python -m lynx_zoo data prepare`` (:mod:`lynx_zoo.data.prepare`) writes them: chunk files of samples plus
LitData's ``index.json``, and the zoo's ``prepare_report.json`` beside them. Every sample is one record:

* ``id``: the sample's id (the manifest's ``id``, ``<manifest>:<line>``, or the tar key);
* ``media``: the image or video file's bytes as they were (empty for text-only samples);
* ``record``: JSON text ``{"media": "image"|"video"|"", "ext", "question", "answer", "category", "history",
  "template"}``; ``template`` says whether ``question`` goes through the task's instruction templates
  (conversations keep their own instructions).

:class:`PreparedSource` reads them in a :class:`~lynx_zoo.data.mixture.MixtureDataModule` like any other
source. Memory does not grow with the number of samples: LitData keeps one entry per chunk, and a mixture's
pass order is built chunk by chunk.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

# LitData asks PyPI for a newer release whenever a data set is opened; a training job must not depend on that
os.environ.setdefault("LITDATA_DISABLE_VERSION_CHECK", "1")

import torch  # noqa: E402

try:
    from litdata import StreamingDataset

    # LitData takes serializers by name (``StreamingDataset(serializers=...)``, public) but lists its own built-in
    # names only in the private ``_SERIALIZERS`` (see Lightning-AI/litData#125, which made passed serializers win
    # over the built-in ones); each built-in name lynx_zoo does not store is replaced by one that refuses
    from litdata.streaming.serializers import _SERIALIZERS, Serializer
except ImportError as err:  # an optional dependency: say which
    raise ImportError(f"prepared data sets need LitData: pip install 'lynx-zoo[stream]' ({err})") from err

from lynx_zoo.data.processor import Sample, Skipped  # noqa: E402
from lynx_zoo.data.sources import DataError, LoadContext, Source, media_reason  # noqa: E402
from lynx_zoo.data.video import read_video_frames  # noqa: E402
from lynx_zoo.errors import ConfigError  # noqa: E402

REPORT_NAME = "prepare_report.json"
INDEX_NAME = "index.json"
# what prepare writes, in LitData's words
STORED_TYPES = {"id": "str", "media": "bytes", "record": "str"}
STORED_FORMATS = tuple(STORED_TYPES.values())
REMOTE_SCHEMES = ("s3://", "gs://", "r2://", "azure://", "hf://", "local:")


class _Refused(Serializer):
    """Stands in for every LitData serializer the zoo does not write (``pickle`` would run what a file says)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def serialize(self, item: Any) -> tuple[bytes, str | None]:
        raise DataError(f"lynx_zoo does not write {self.name!r} items")

    def deserialize(self, data: bytes) -> Any:
        raise DataError(f"a prepared data set holds {self.name!r} items; lynx_zoo reads only {set(STORED_FORMATS)}")

    def can_serialize(self, item: Any) -> bool:
        return False


SAFE_SERIALIZERS: dict[str, Serializer] = {name: _Refused(name) for name in _SERIALIZERS if name not in STORED_FORMATS}


def is_remote(path: str) -> bool:
    """Whether ``path`` is a URI LitData streams from (``s3://``, ``gs://``, ..., ``local:`` for tests)."""
    return path.startswith(REMOTE_SCHEMES)


def read_report(folder: Path) -> dict[str, Any]:
    """The prepare report of a local prepared folder; ``DataError`` when the folder is not a finished one."""
    report_path = folder / REPORT_NAME
    if not (folder / INDEX_NAME).is_file() or not report_path.is_file():
        partial = folder.with_name(folder.name + ".partial")
        hint = f" (an interrupted prepare left {partial}: run it again)" if partial.exists() else ""
        raise DataError(
            f"{folder} is not a finished prepared data set: it needs {INDEX_NAME} and {REPORT_NAME}{hint}; "
            "make one with `python -m lynx_zoo data prepare`"
        )
    try:
        report = json.loads(report_path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise DataError(f"{report_path}: not valid JSON ({err})") from err
    if not isinstance(report, dict) or report.get("complete") is not True:
        raise DataError(f"{report_path}: the prepare did not finish (no 'complete': true)")
    return report


def open_prepared(path: str, cache_dir: str | None = None, max_cache_size: str | None = "50GB") -> StreamingDataset:
    """A LitData dataset over a prepared folder or URI, checked to hold only what prepare writes.

    ``cache_dir`` and ``max_cache_size`` bound the local copy of chunks streamed from a URI (ignored for a
    local folder, which is read in place).
    """
    local = not is_remote(path)
    if local:
        read_report(Path(path))
    dataset = StreamingDataset(
        path,
        cache_dir=None if local else cache_dir,
        max_cache_size=None if local else max_cache_size,
        serializers=SAFE_SERIALIZERS,
    )
    index = Path(dataset.input_dir.path) / INDEX_NAME
    config = json.loads(index.read_text(encoding="utf-8")).get("config", {})
    if tuple(config.get("data_format", ())) != STORED_FORMATS or config.get("types") != STORED_TYPES:
        raise DataError(
            f"{path}: not a lynx_zoo prepared data set: items of {config.get('types')} stored as "
            f"{config.get('data_format')} (expected {STORED_TYPES}); make one with `python -m lynx_zoo data prepare`"
        )
    return dataset


class PreparedSource(Source):
    """A data set made by ``python -m lynx_zoo data prepare``: any kind of sample (image, video, conversation,
    text), read from a local folder in place or streamed from an object store through a bounded local cache.

    Args:
        path: the prepared folder, or its URI (``s3://bucket/stage1/coyo``, ``gs://...``).
        cache_dir: where chunks streamed from a URI are kept (default: LitData's, ``~/.lightning/chunks``).
        max_cache_size: the most disk the cache of this source may use (``"50GB"``); chunks already read are
            deleted to stay under it.
        (``name``, ``ratio``, ``task`` as for every :class:`Source`.)

    A pass reads the data set chunk by chunk (shuffled chunk order, shuffled within each chunk), so each
    reader of a mixture downloads only its own chunks.
    """

    kind = "prepared"

    def __init__(
        self,
        path: str,
        name: str | None = None,
        ratio: float = 1.0,
        task: str = "",
        cache_dir: str | None = None,
        max_cache_size: str = "50GB",
    ) -> None:
        super().__init__(name or Path(path.rstrip("/")).name, ratio, task)
        self.path = path
        self.cache_dir = cache_dir
        self.max_cache_size = max_cache_size
        self.dataset: StreamingDataset | None = None
        self.sizes: list[int] = []
        self._categories = [""]
        self._chunk_reads = False
        self._process = 0  # the process the dataset was opened in (a dataloader worker opens its own)

    def prepare(self, context: LoadContext) -> None:
        super().prepare(context)
        if self.dataset is not None:
            return
        self._open()
        self.sizes = [end - start for start, end in self.dataset.region_of_interest]
        if not is_remote(self.path):
            report = read_report(Path(self.path))
            self._categories = report.get("categories") or [""]
            if report.get("kind") == "video_qa":
                self._check_frames()

    def _check_frames(self) -> None:
        if self.ctx.num_frames < 1:
            raise ConfigError(
                f"source {self.name} ({self.path}): video data needs vision.num_frames >= 1 frames per clip, got "
                f"{self.ctx.num_frames} (0 is an image-only model)"
            )

    def where(self, index: int) -> str:
        return f"{self.path}[{index}]"

    def __len__(self) -> int:
        return sum(self.sizes)

    def chunk_sizes(self) -> list[int]:
        return self.sizes

    @property
    def categories(self) -> list[str]:
        return self._categories

    def _open(self) -> None:
        self.dataset = open_prepared(self.path, self.cache_dir, self.max_cache_size)
        self._process, self._chunk_reads = os.getpid(), False

    def _read(self, index: int) -> dict[str, Any]:
        assert self.dataset is not None, "call prepare(context) first"
        if self._process != os.getpid():  # its reader threads and cache state stay in the process that made them
            self._open()
        item = self.dataset[index]
        if not self._chunk_reads and self.dataset.cache is not None:
            # from a URI, fetch whole chunks into the bounded cache (the pass reads chunk by chunk) rather than
            # one request per sample
            self.dataset.on_demand_bytes = False
            self._chunk_reads = True
        return item

    def load(self, index: int, seed: str) -> Sample | Skipped:
        where = f"{self.path}[{index}]"
        try:
            item = self._read(index)
        except DataError:  # a data set the zoo does not read: not one bad sample
            raise
        except (OSError, ValueError, RuntimeError, KeyError) as err:
            return self.skip("unreadable_chunk", f"{where}: {err}")
        try:
            record = json.loads(item["record"])
            question, answer, media_kind = str(record["question"]), str(record["answer"]), record["media"]
        except (ValueError, KeyError, TypeError) as err:
            return self.skip("malformed_line", f"{where}: record {err}")
        where = f"{self.path}:{item['id']}"
        media: torch.Tensor | None = None
        data = bytes(item["media"])
        try:
            if media_kind == "image":
                media = self.read_image(where, seed, data)
            elif media_kind == "video":
                self._check_frames()
                draws = random.Random(f"{seed}/frames")
                frames = read_video_frames(where, self.ctx.num_frames, self.ctx.training, draws, data=data)
                transform = self.ctx.frame_transform or self.ctx.transform
                media = torch.stack([transform(frame) for frame in frames])
        except ConfigError:
            raise
        except (OSError, ValueError) as err:  # a MediaError (VideoError) is an OSError
            return self.skip(media_reason(err, media_kind), f"{where}.{record.get('ext', '')}: {err}")
        instruction = self.instruction(question, seed) if record.get("template", True) else question
        return Sample(
            instruction=instruction,
            answer=answer,
            image=media,
            category=str(record.get("category") or ""),
            id=str(item["id"]),
            history=[(str(q), str(a)) for q, a in record.get("history") or []],
            source=self.name,
        )
