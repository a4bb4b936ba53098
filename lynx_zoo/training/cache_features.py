"""``python -m lynx_zoo cache-features``: a frozen vision tower's tokens of a data set, computed once for training.

    python -m lynx_zoo cache-features image_text data/cc3m/train.jsonl --config configs/pt_vicuna_420.yaml \\
        --config configs/stages/stage1_224.yaml --output cache/cc3m_224

The tower is the one the model configs (``--config``, as ``fit`` reads them) describe, with its weights; the
inputs are read as the zoo's sources read them (``image_text``, ``video_qa``, ``conversation`` manifests, ``shards``,
``prepared`` data sets) through the tower's evaluation transform. Train on the cache with
:class:`~lynx_zoo.data.feature_cache.FeatureCacheSource` in a mixture; see :mod:`lynx_zoo.data.feature_cache`.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch

from lynx_zoo.data.feature_cache import DTYPES, INDEX_NAME, write_feature_cache
from lynx_zoo.data.sources import ConversationSource, ImageTextSource, ShardSource, Source, VideoQASource

KINDS = ("image_text", "video_qa", "conversation", "shards", "prepared")


def sources_of(kind: str, inputs: list[str], root: str | None, task: str | None) -> list[Source]:
    """The zoo's sources that read ``inputs`` of ``kind``."""
    if kind == "shards":
        return [ShardSource(inputs, name=Path(inputs[0]).parent.name or "shards", task=task or "caption")]
    if kind == "prepared":
        from lynx_zoo.data.prepared import PreparedSource  # LitData, an optional dependency

        return [PreparedSource(path, task=task or "") for path in inputs]
    classes = {"image_text": ImageTextSource, "video_qa": VideoQASource, "conversation": ConversationSource}
    return [classes[kind](path, root=root, name=Path(path).stem, task=task or "") for path in inputs]


def main(argv: list[str]) -> int:
    """Parse the arguments, build the tower, write the cache; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m lynx_zoo cache-features", description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=KINDS, help="the kind of input (the source class that reads it)")
    parser.add_argument("inputs", nargs="+", help="manifests, tar shards (paths, globs, brace ranges) or prepared sets")
    parser.add_argument("--config", "-c", action="append", required=True, help="model config file(s), as for fit")
    parser.add_argument("--output", required=True, help="the cache folder to write")
    parser.add_argument("--root", help="folder the manifests' media paths are relative to (default: their folder)")
    parser.add_argument("--task", help="the template task of the questions (default: the source kind's)")
    parser.add_argument("--dtype", default="float16", choices=sorted(DTYPES), help="dtype of the stored tokens")
    parser.add_argument("--batch-size", type=int, default=16, help="images per tower forward")
    parser.add_argument("--shard-size", type=int, default=1024, help="samples per shard file")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--overwrite", action="store_true", help="replace a cache already at --output")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from lynx_zoo.hub.config import model_config_from_files  # the model configs, resolved as fit resolves them
    from lynx_zoo.vision.encoder import VisionEncoder  # timm: imported after --help

    vision = model_config_from_files(args.config)[0].vision
    start = time.perf_counter()
    index = write_feature_cache(
        sources_of(args.kind, args.inputs, args.root, args.task),
        VisionEncoder(vision),
        args.output,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        dtype=args.dtype,
        device=args.device,
        overwrite=args.overwrite,
    )
    skipped = ", ".join(f"{reason} {n}" for reason, n in index["skipped"].items()) or "none"
    print(
        f"{args.output}: {index['samples']} {index['media']} samples' tokens ({index['tower']['tokens']} x "
        f"{index['tower']['width']}, {args.dtype}) in {len(index['shards'])} shards, "
        f"{time.perf_counter() - start:.1f} s; skipped: {skipped} (see {Path(args.output) / INDEX_NAME})"
    )
    return 0
