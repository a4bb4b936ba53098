"""Does a training rank's memory grow with the data set? Resident memory and start-up of the data path, by size.

For each size N (default 10^5, 10^6, 10^7) the benchmark builds a synthetic data set of N tiny image-caption
pairs (an 8x8 PNG and a short caption; built once, kept under ``--root`` and rebuilt when missing), then starts a
fresh process that plays a training rank: ``MixtureDataModule`` over the one source, 2 dataloader workers,
batches of 8, the default epoch (N / 8 batches). It reports the time from ``setup`` to the first batch and, after
50 more batches, the resident memory of the rank and of each worker: RSS, and PSS (pages shared with other
processes split between them). Two readers are compared:

* ``prepared``: a prepared (LitData) data set read by ``PreparedSource`` (what ``data prepare`` writes);
* ``tar``: WebDataset tar shards read by ``ShardSource`` (the baseline: an index entry per sample), with its header
  index cached beside the shards (the steady state); only up to ``--tar-max`` samples (default 10^6), as 10^7 pairs
  make 20 GB of tar whose index would not fit this machine beside other jobs.

    python benchmarks/data_memory.py --sizes 100000 1000000 10000000 --root /tmp/lynx_memory

The data sets are big (about 0.3 GB prepared and 2 GB of tar per million samples): delete ``--root`` when done.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import torch
from PIL import Image
from record import finish_record, run_record

from lynx_zoo.data import LynxProcessor, MixtureDataModule, PromptConfig, ShardSource
from lynx_zoo.data.prepared import REPORT_NAME, PreparedSource
from lynx_zoo.data.shapes import shapes_tokenizer

BLOCK = 100_000  # samples per work unit of the synthetic build
TAR_SHARD = 10_000  # pairs per tar shard


def tiny_png() -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.arange(192, dtype=np.uint8).reshape(8, 8, 3)).save(out, format="PNG")
    return out.getvalue()


def synthetic_block(first: int) -> Iterator[dict]:
    """The stored items of samples ``first .. first + BLOCK - 1`` (the layout ``data prepare`` writes)."""
    png = tiny_png()
    for i in range(first, first + BLOCK):
        record = {"media": "image", "ext": "png", "question": "", "answer": f"pattern number {i}", "category": "",
                  "history": [], "template": True}  # fmt: skip
        yield {"id": f"s{i:09d}", "media": png, "record": json.dumps(record)}


def build_prepared(folder: Path, size: int) -> None:
    from litdata import optimize

    if (folder / REPORT_NAME).is_file():
        return
    optimize(fn=synthetic_block, inputs=list(range(0, size, BLOCK)), output_dir=str(folder), num_workers=2,
             chunk_bytes="64MB", reorder_files=False, keep_data_ordered=True, start_method="fork", mode="overwrite",
             verbose=False)  # fmt: skip
    report = {"complete": True, "kind": "synthetic", "samples": size, "skipped": {}, "categories": [""]}
    (folder / REPORT_NAME).write_text(json.dumps(report))


def build_tar(folder: Path, size: int) -> None:
    done = folder / "done"
    if done.is_file():
        return
    folder.mkdir(parents=True, exist_ok=True)
    png = tiny_png()
    for shard in range(0, size, TAR_SHARD):
        with tarfile.open(folder / f"pairs-{shard // TAR_SHARD:06d}.tar", "w") as tar:
            for i in range(shard, shard + TAR_SHARD):
                for ext, payload in (("png", png), ("txt", f"pattern number {i}".encode())):
                    info = tarfile.TarInfo(f"s{i:09d}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    done.write_text(str(size))


def measure(reader: str, path: str, batches: int) -> dict:
    """One training rank (this process) reading ``path``: start-up, then memory after ``batches`` batches."""

    def transform(image: Image.Image) -> torch.Tensor:
        return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)

    start = time.perf_counter()
    source = PreparedSource(path, name="pairs") if reader == "prepared" else ShardSource(f"{path}/*.tar", name="pairs")
    data = MixtureDataModule([source], batch_size=8, num_workers=2, seed=0)
    data.processor = LynxProcessor(shapes_tokenizer(), PromptConfig(), transform)
    data.setup("fit")
    batches_iter = iter(data.train_dataloader())
    next(batches_iter)
    startup = time.perf_counter() - start
    for _ in range(batches):
        next(batches_iter)
    rank = psutil.Process()
    workers = rank.children()

    def megabytes(process: psutil.Process) -> dict:
        info = process.memory_full_info()
        return {"rss_mb": round(info.rss / 2**20, 1), "pss_mb": round(info.pss / 2**20, 1)}

    return {"startup_s": round(startup, 2), "rank": megabytes(rank), "workers": [megabytes(w) for w in workers]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10**5, 10**6, 10**7])
    parser.add_argument("--readers", nargs="+", default=["prepared", "tar"], choices=["prepared", "tar"])
    parser.add_argument("--tar-max", type=int, default=10**6, help="largest data set the tar reader is run on")
    parser.add_argument("--root", default="/tmp/lynx_memory", help="where the synthetic data sets are kept")
    parser.add_argument("--batches", type=int, default=50)
    parser.add_argument("--out", default="benchmarks/results/data_memory.json")
    parser.add_argument("--measure", nargs=2, metavar=("READER", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:  # the child process: one rank
        print(json.dumps(measure(*args.measure, args.batches)))
        return

    machine = run_record()
    rows = []
    for size in args.sizes:
        for reader in args.readers:
            if reader == "tar" and size > args.tar_max:
                continue
            folder = Path(args.root) / f"{reader}-{size}"
            built = time.perf_counter()
            (build_prepared if reader == "prepared" else build_tar)(folder, size)
            build_s = time.perf_counter() - built
            command = [sys.executable, __file__, "--measure", reader, str(folder), "--batches", str(args.batches)]
            if reader == "tar":  # the header index, cached beside the shards, is built by a first run
                subprocess.run(command, check=True, capture_output=True, text=True)
            result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
            row = {"reader": reader, "samples": size, **result, "build_s": round(build_s, 1)}
            rows.append(row)
            worker_rss = max(w["rss_mb"] for w in row["workers"])
            worker_pss = max(w["pss_mb"] for w in row["workers"])
            print(f"{reader:8s} {size:>10d} samples: start-up {row['startup_s']:6.2f} s, rank RSS "
                  f"{row['rank']['rss_mb']:7.1f} MB (PSS {row['rank']['pss_mb']:7.1f}), worker RSS {worker_rss:7.1f} "
                  f"MB (PSS {worker_pss:7.1f})", flush=True)  # fmt: skip
    result = {
        "command": machine["command"],
        "machine": {**finish_record(machine), "memory_gib": round(psutil.virtual_memory().total / 2**30)},
        "batch_size": 8,
        "num_workers": 2,
        "batches_measured": args.batches,
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
