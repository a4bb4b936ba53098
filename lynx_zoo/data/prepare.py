"""``python -m lynx_zoo data prepare``: any source the zoo reads, turned into a prepared (LitData) data set.

    python -m lynx_zoo data prepare image_text data/vqa/train.jsonl --output prepared/vqa
    python -m lynx_zoo data prepare shards 'cc3m/pairs-{000000..000331}.tar' --output prepared/cc3m --workers 16

Kinds: ``image_text``, ``video_qa``, ``text`` (JSONL manifests), ``conversation`` (LLaVA JSON or JSONL) and
``shards`` (WebDataset tars: paths, globs, brace ranges). The inputs are cut into work units (blocks of manifest
lines, one tar each) that LitData's ``optimize`` spreads over worker processes, with its progress bar. Each
sample is decoded and checked once (an image fully decoded, a video's frames sampled as for evaluation) and its
media bytes are stored as they were. A bad record is skipped and counted by reason in ``prepare_report.json``,
beside the chunks.

The data set is written to ``<output>.partial`` and renamed to ``<output>`` only when it is complete, so a
half-written one is never read as a whole one; a prepare that was interrupted starts again from scratch.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tarfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lynx_zoo.data.images import open_rgb
from lynx_zoo.data.manifest import ManifestError, parse_line
from lynx_zoo.data.sources import (
    IMAGE_EXTENSIONS,
    ConversationSource,
    ImageTextSource,
    TextSource,
    VideoQASource,
    conversation_pairs,
    expand_pattern,
    is_complete_sample,
    shard_member,
    shard_text,
)
from lynx_zoo.data.video import read_video_frames

log = logging.getLogger(__name__)

KINDS = ("image_text", "video_qa", "text", "conversation", "shards")
REQUIRED = {"image_text": ImageTextSource.required, "video_qa": VideoQASource.required, "text": TextSource.required}
MEDIA_FIELD = {"image_text": "image", "video_qa": "video"}
EXAMPLES_PER_REASON = 5

SkipLog = Callable[[str, str], None]  # (reason, detail) of a skipped record


@dataclass(frozen=True)
class LineBlock:
    """A work unit of a JSONL manifest: ``count`` lines from byte ``offset`` on, the first being line ``first_line``."""

    manifest: str
    offset: int
    first_line: int
    count: int


@dataclass(frozen=True)
class RecordBlock:
    """A work unit of conversations read in the main process: ``(record number, record)`` pairs."""

    manifest: str
    records: tuple[tuple[int, dict], ...]


class SampleWriter:
    """What each worker process runs on a work unit: yields the stored items, logs each skip to ``skips_dir``."""

    def __init__(self, kind: str, root: str | None, skips_dir: str, num_frames: int) -> None:
        self.kind, self.root, self.skips_dir, self.num_frames = kind, root, skips_dir, num_frames

    def _media_root(self, manifest: str) -> Path:
        """Media paths are relative to ``--root``, or else to their manifest's folder."""
        return Path(self.root) if self.root else Path(manifest).parent

    def __call__(self, unit: LineBlock | RecordBlock | str) -> Iterator[dict[str, Any]]:
        with open(os.path.join(self.skips_dir, f"{os.getpid()}.jsonl"), "a", encoding="utf-8") as skips:

            def skip(reason: str, detail: str) -> None:
                skips.write(json.dumps({"reason": reason, "detail": detail}) + "\n")
                skips.flush()

            if isinstance(unit, str):
                yield from self._shard(Path(unit), skip)
            elif isinstance(unit, RecordBlock):
                yield from self._conversations(unit, skip)
            else:
                yield from self._lines(unit, skip)

    # ------------------------------------------------------------------ kinds
    def _lines(self, block: LineBlock, skip: SkipLog) -> Iterator[dict[str, Any]]:
        name = Path(block.manifest).name
        with open(block.manifest, "rb") as manifest:
            manifest.seek(block.offset)
            for number in range(block.first_line, block.first_line + block.count):
                line = manifest.readline().decode("utf-8", "replace")
                if not line.strip():
                    continue
                record, reason, problem = parse_line(line, REQUIRED[self.kind])
                if record is None:
                    skip(reason, f"{block.manifest}:{number}: {problem}")
                    continue
                sample_id = str(record.get("id", f"{name}:{number}"))
                question = record["instruction"] if self.kind == "text" else str(record.get("question") or "")
                text = {"question": question, "answer": record["answer"], "category": record.get("category")}
                if self.kind == "text":
                    yield self._item(sample_id, b"", "", "", text)
                    continue
                field = MEDIA_FIELD[self.kind]
                path = self._media_root(block.manifest) / record[field]
                media = self._checked_media(field, path)
                if isinstance(media, str):
                    skip(f"unreadable_{field}", f"{block.manifest}:{number}: cannot read {path}: {media}")
                    continue
                yield self._item(sample_id, media, field, path.suffix.lstrip(".").lower(), text)

    def _conversations(self, block: RecordBlock, skip: SkipLog) -> Iterator[dict[str, Any]]:
        for number, record in block.records:
            path = self._media_root(block.manifest) / record["image"]
            media = self._checked_media("image", path)
            if isinstance(media, str):
                skip("unreadable_image", f"{block.manifest}: record {number}: cannot read image {path}: {media}")
                continue
            pairs = conversation_pairs(record["conversations"])
            text = {"question": pairs[-1][0], "answer": pairs[-1][1], "history": pairs[:-1], "template": False}
            sample_id = str(record.get("id", f"{Path(block.manifest).name}:{number}"))
            yield self._item(sample_id, media, "image", path.suffix.lstrip(".").lower(), text)

    def _shard(self, path: Path, skip: SkipLog) -> Iterator[dict[str, Any]]:
        key, members = None, {}
        try:
            with tarfile.open(path, mode="r|") as tar:  # streamed: members in the order they were written
                for member in tar:
                    if (found := shard_member(member)) is None:
                        continue
                    member_key, ext = found
                    if member_key != key:
                        yield from self._shard_sample(path, key, members, skip)
                        key, members = member_key, {}
                    members[ext] = tar.extractfile(member).read()
        except (OSError, tarfile.TarError, EOFError) as err:
            skip("unreadable_shard", f"{path}: {err} (the samples after {key!r} are lost)")
            return
        yield from self._shard_sample(path, key, members, skip)

    def _shard_sample(
        self, path: Path, key: str | None, members: dict[str, bytes], skip: SkipLog
    ) -> Iterator[dict[str, Any]]:
        if key is None:
            return
        where = f"{path}:{key}"
        if not is_complete_sample(members):
            skip("incomplete_sample", f"{where}: lacks an image or a json/txt member: {sorted(members)}")
            return
        image_ext = next(ext for ext in IMAGE_EXTENSIONS if ext in members)
        try:
            question, answer = shard_text(members)
        except ValueError as err:
            skip("malformed_line", f"{where}.json: {err}")
            return
        if not answer:
            skip("empty_answer", f"{where}: empty answer")
            return
        try:
            _check_image(members[image_ext])
        except (OSError, ValueError) as err:
            skip("unreadable_image", f"{where}.{image_ext}: {err}")
            return
        yield self._item(key, members[image_ext], "image", image_ext, {"question": question, "answer": answer})

    # ------------------------------------------------------------------ helpers
    def _checked_media(self, field: str, path: Path) -> bytes | str:
        """The file's bytes once decoded and checked, or what is wrong with it."""
        try:
            data = path.read_bytes()
            if field == "image":
                _check_image(data)
            else:
                read_video_frames(path, self.num_frames, training=False, data=data)
        except (OSError, ValueError) as err:  # a VideoError is an OSError
            return str(err)
        return data

    @staticmethod
    def _item(sample_id: str, media: bytes, media_kind: str, ext: str, text: dict[str, Any]) -> dict[str, Any]:
        record = {
            "media": media_kind,
            "ext": ext,
            "question": text["question"],
            "answer": text["answer"].strip(),
            "category": str(text.get("category") or ""),
            "history": text.get("history", []),
            "template": text.get("template", True),
        }
        return {"id": sample_id, "media": media, "record": json.dumps(record)}


def _check_image(data: bytes) -> None:
    open_rgb(data=data, where="image")  # decodes every pixel; a MediaError (an OSError) for any problem


# ---------------------------------------------------------------------- work units
def line_blocks(manifest: Path, lines_per_block: int) -> list[LineBlock]:
    """Blocks of ``lines_per_block`` lines of a JSONL manifest (found in one pass, no line parsed)."""
    blocks, start, first, count, position = [], 0, 1, 0, 0
    with manifest.open("rb") as lines:
        for number, line in enumerate(lines, start=1):
            if count == 0:
                start, first = position, number
            position += len(line)
            count += 1
            if count == lines_per_block:
                blocks.append(LineBlock(str(manifest), start, first, count))
                count = 0
    if count:
        blocks.append(LineBlock(str(manifest), start, first, count))
    return blocks


def work_units(kind: str, inputs: list[str], lines_per_block: int, skipped: Counter, examples: dict) -> list[Any]:
    """The work units of ``inputs`` (skips found while reading conversations are added to ``skipped``)."""
    if kind == "shards":
        paths = [str(p) for pattern in inputs for p in expand_pattern(pattern)]
        missing = [p for p in paths if not Path(p).is_file()]
        if not paths or missing:
            raise FileNotFoundError(f"no tar shard at {missing or inputs}")
        return paths
    units: list[Any] = []
    for manifest in map(Path, inputs):
        if not manifest.is_file():
            raise FileNotFoundError(f"{kind} manifest not found: {manifest}")
        if kind == "conversation":
            numbered, counts, messages = ConversationSource.read(manifest)
            skipped.update(counts)
            for reason, message in messages:
                shown = examples.setdefault(reason, [])
                if len(shown) < EXAMPLES_PER_REASON:
                    shown.append(message)
            units += [
                RecordBlock(str(manifest), tuple(numbered[i : i + lines_per_block]))
                for i in range(0, len(numbered), lines_per_block)
            ]
            continue
        _check_first_line(manifest, REQUIRED[kind])
        units += line_blocks(manifest, lines_per_block)
    return units


def _check_first_line(manifest: Path, required: tuple[str, ...]) -> None:
    """A manifest of another schema fails at once (as when it is read directly), naming the missing field."""
    with manifest.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if line.strip():
                record, reason, problem = parse_line(line, required)
                if record is None and reason != "empty_answer":
                    raise ManifestError(f"{manifest}:{number}: {problem}; expected fields {list(required)} (strings)")
                return


# ---------------------------------------------------------------------- the command
def prepare(
    kind: str,
    inputs: list[str],
    output: str,
    root: str | None = None,
    workers: int | None = None,
    chunk_bytes: str = "64MB",
    chunk_size: int | None = None,
    lines_per_block: int = 2000,
    num_frames: int = 5,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write the prepared data set of ``inputs`` (of ``kind``) to the folder ``output``; returns its report."""
    # LitData is imported here, not for --help (lynx_zoo.data.prepared turns LitData's PyPI check off first)
    from lynx_zoo.data.prepared import INDEX_NAME, REPORT_NAME, read_report  # isort: split
    from litdata import optimize

    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}: expected one of {', '.join(KINDS)}")
    target = Path(output)
    if target.exists():
        if not overwrite:
            read_report(target)  # a folder that is not a finished prepared data set is named as such
            raise FileExistsError(f"{target} already holds a prepared data set: pass --overwrite to replace it")
        shutil.rmtree(target)
    staging = target.with_name(target.name + ".partial")
    if staging.exists():
        log.warning("%s: an interrupted prepare left it; starting again", staging)
        shutil.rmtree(staging)
    data_dir, skips_dir = staging / "data", staging / "skips"
    skips_dir.mkdir(parents=True)
    started = time.time()
    skipped: Counter = Counter()
    examples: dict[str, list[str]] = {}
    units = work_units(kind, inputs, lines_per_block, skipped, examples)
    workers = max(1, min(workers or os.cpu_count() or 1, len(units)))
    optimize(
        fn=SampleWriter(kind, root, str(skips_dir), num_frames),
        inputs=units,
        output_dir=str(data_dir),
        num_workers=workers,
        chunk_bytes=None if chunk_size else chunk_bytes,
        chunk_size=chunk_size,
        reorder_files=False,
        keep_data_ordered=True,
        start_method="fork" if sys.platform == "linux" else None,
        mode="overwrite",
    )
    if not (data_dir / INDEX_NAME).is_file():  # every record was bad: LitData wrote nothing
        raise ValueError(f"{kind} {inputs}: no usable sample ({dict(_count_skips(skips_dir, skipped, examples))})")
    _count_skips(skips_dir, skipped, examples)
    chunks = json.loads((data_dir / INDEX_NAME).read_text())["chunks"]
    report = {
        "complete": True,
        "kind": kind,
        "inputs": inputs,
        "samples": sum(chunk["chunk_size"] for chunk in chunks),
        "chunks": len(chunks),
        "bytes": sum(chunk["chunk_bytes"] for chunk in chunks),
        "skipped": dict(sorted(skipped.items())),
        "skipped_examples": examples,
        "categories": _categories(kind, units),
        "seconds": round(time.time() - started, 1),
        "workers": workers,
    }
    (data_dir / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    os.replace(data_dir, target)  # the data set appears whole, or not at all
    shutil.rmtree(staging)
    return report


def _count_skips(skips_dir: Path, skipped: Counter, examples: dict[str, list[str]]) -> Counter:
    for log_file in sorted(skips_dir.glob("*.jsonl")):
        for line in log_file.read_text(encoding="utf-8").splitlines():
            entry = json.loads(line)
            skipped[entry["reason"]] += 1
            shown = examples.setdefault(entry["reason"], [])
            if len(shown) < EXAMPLES_PER_REASON:
                shown.append(entry["detail"])
    return skipped


def _categories(kind: str, units: list[Any]) -> list[str]:
    """The categories of a manifest's records (the held-out metrics are per category); ``[""]`` for none."""
    if kind not in REQUIRED:
        return [""]
    found = set()
    for block in units:
        with open(block.manifest, "rb") as manifest:
            manifest.seek(block.offset)
            for _ in range(block.count):
                record, _, _ = parse_line(manifest.readline().decode("utf-8", "replace"), REQUIRED[kind])
                if record is not None:
                    found.add(str(record.get("category") or ""))
    return sorted(found) or [""]


def main(argv: list[str]) -> int:
    """``python -m lynx_zoo data prepare KIND INPUT... --output DIR``; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m lynx_zoo data", description="Prepare data sets for training.")
    commands = parser.add_subparsers(dest="command", required=True)
    cmd = commands.add_parser("prepare", help=__doc__.splitlines()[0], description=__doc__.split("\n\n")[1])
    cmd.add_argument("kind", choices=KINDS, help="the kind of input (the source class that reads it)")
    cmd.add_argument("inputs", nargs="+", help="manifests, or tar shards (paths, globs, brace ranges)")
    cmd.add_argument("--output", required=True, help="the prepared folder to write")
    cmd.add_argument("--root", help="folder the manifest's media paths are relative to (default: its folder)")
    cmd.add_argument("--workers", type=int, help="worker processes (default: the CPU count)")
    cmd.add_argument("--chunk-bytes", default="64MB", help="bytes per chunk file (LitData's default)")
    cmd.add_argument("--chunk-size", type=int, help="samples per chunk file, instead of --chunk-bytes")
    cmd.add_argument("--lines-per-block", type=int, default=2000, help="manifest lines per work unit")
    cmd.add_argument("--num-frames", type=int, default=5, help="frames decoded to check each video")
    cmd.add_argument("--overwrite", action="store_true", help="replace a prepared data set already at --output")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        report = prepare(
            args.kind,
            args.inputs,
            args.output,
            root=args.root,
            workers=args.workers,
            chunk_bytes=args.chunk_bytes,
            chunk_size=args.chunk_size,
            lines_per_block=args.lines_per_block,
            num_frames=args.num_frames,
            overwrite=args.overwrite,
        )
    except (OSError, ValueError) as err:  # ManifestError and DataError included
        print(f"lynx_zoo data prepare: error: {err}", file=sys.stderr)
        return 1
    from lynx_zoo.data.prepared import REPORT_NAME

    skipped = ", ".join(f"{reason} {n}" for reason, n in report["skipped"].items()) or "none"
    print(
        f"{args.output}: {report['samples']} samples in {report['chunks']} chunks ({report['bytes'] / 1e6:.1f} MB), "
        f"{report['seconds']} s; skipped: {skipped} (see {Path(args.output) / REPORT_NAME})"
    )
    return 0
