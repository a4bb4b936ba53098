"""Is data loading the bottleneck? Samples/s of the image and video pipelines vs the model's training rate.

The pipelines are the real training path (a source in ``MixtureDataModule``: decoding, the model's
transform, collation, dataloader workers) on files written here: scikit-image photographs saved as
640x480 JPEGs, and 320x240 mp4 clips of 8 s decoded by PyAV (``num_frames`` frames by segment). Each is read
three ways: from its JSONL manifest (one file per sample), from WebDataset tar shards (images only, the
``ShardSource`` reader), and prepared by ``python -m lynx_zoo data prepare`` (``PreparedSource``, LitData
chunks). The baseline is the model's own consumption: training steps per second (forward, backward, AdamW) on
batches from the image pipeline, for the model of ``--config``.

    python benchmarks/data_throughput.py --config configs/demo.yaml
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image
from record import finish_record, run_record
from skimage import data as skdata

from lynx_zoo.data import ImageTextSource, MixtureDataModule, ShardSource, VideoQASource
from lynx_zoo.data.prepare import prepare
from lynx_zoo.data.prepared import PreparedSource
from lynx_zoo.fusion import LynxModel
from lynx_zoo.training.lightning_cli import LynxCLI

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "cat")


def write_images(folder: Path, count: int) -> Path:
    """``count`` 640x480 JPEG photographs and their manifest."""
    records = []
    for i in range(count):
        pixels = getattr(skdata, PHOTOS[i % len(PHOTOS)])()
        Image.fromarray(pixels).convert("RGB").resize((640, 480)).save(folder / f"{i}.jpg", quality=90)
        records.append({"image": f"{i}.jpg", "question": "what is in the picture?", "answer": "a photograph"})
    manifest = folder / "images.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in records))
    return manifest


def write_videos(folder: Path, count: int, seconds: int = 8, fps: int = 25) -> Path:
    """``count`` 320x240 H.264 mp4 clips of a panning photograph and their manifest."""
    base = np.asarray(Image.fromarray(skdata.astronaut()).resize((480, 240)))
    records = []
    for i in range(count):
        with av.open(str(folder / f"{i}.mp4"), "w") as container:
            stream = container.add_stream("libx264", rate=fps)
            stream.width, stream.height, stream.pix_fmt = 320, 240, "yuv420p"
            for t in range(seconds * fps):
                shift = (t * 2 + i * 7) % 160
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(base[:, shift : shift + 320]), format="rgb24")
                for packet in stream.encode(frame):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        records.append({"video": f"{i}.mp4", "question": "what happens?", "answer": "the camera pans"})
    manifest = folder / "videos.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in records))
    return manifest


def write_tar(folder: Path, manifest: Path) -> str:
    """The manifest's images and answers as one WebDataset tar shard; returns its path."""
    shard = folder / "images.tar"
    with tarfile.open(shard, "w") as tar:
        for line in manifest.read_text().splitlines():
            record = json.loads(line)
            key = Path(record["image"]).stem
            tar.add(folder / record["image"], arcname=f"{key}.jpg")
            info = tarfile.TarInfo(f"{key}.json")
            payload = json.dumps({"question": record["question"], "answer": record["answer"]}).encode()
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return str(shard)


def pipeline_rate(model: LynxModel, source, batch_size: int, workers: int, batches: int) -> float:
    """Samples/s of one source through MixtureDataModule's training loader (after one warm-up batch)."""
    data = MixtureDataModule([source], batch_size=batch_size, batches_per_epoch=batches + 1, num_workers=workers)
    data.processor, data.num_frames = model.processor, model.vision_config.num_frames
    data.setup("fit")
    iterator = iter(data.train_dataloader())
    next(iterator)  # worker start-up and the first batch are not throughput
    start = time.perf_counter()
    count = sum(len(batch["ids"]) for batch in iterator)
    return count / (time.perf_counter() - start)


def model_rate(model: LynxModel, batch: dict, steps: int) -> float:
    """Samples/s the model trains at (forward, backward, optimizer step) on ``batch``."""
    model.train()
    optimizer = torch.optim.AdamW([p for _, p in model.trainable_parameters()], lr=1e-5)
    inputs = (batch["input_ids"], batch["attention_mask"], batch["images"], batch["labels"])
    times = []
    for step in range(steps + 1):
        start = time.perf_counter()
        model(*inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step:  # the first step warms up
            times.append(time.perf_counter() - start)
    return len(batch["ids"]) / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml", help="the model config (its data part is ignored)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batches", type=int, default=12, help="timed batches per pipeline measurement")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--repeats", type=int, default=3, help="measurements of each pipeline (the median is kept)")
    parser.add_argument("--out", default="benchmarks/results/data_throughput.json")
    args = parser.parse_args()
    machine = run_record()

    torch.manual_seed(0)
    cli = LynxCLI(args=["--config", args.config, "--trainer.logger=false"], run=False)
    model: LynxModel = cli.model
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        images = write_images(folder, 48)
        videos = write_videos(folder, 8)
        shard = write_tar(folder, images)
        prepared = {
            kind: prepare(kind, [str(manifest)], str(folder / f"prepared-{kind}"), workers=2)
            for kind, manifest in (("image_text", images), ("video_qa", videos))
        }
        print(f"prepared: { ({kind: report['samples'] for kind, report in prepared.items()}) } samples", flush=True)
        readers = {
            ("image", "manifest"): lambda: ImageTextSource(str(images), name="image"),
            ("image", "tar"): lambda: ShardSource(shard, name="image", task=""),
            ("image", "prepared"): lambda: PreparedSource(str(folder / "prepared-image_text"), name="image"),
            ("video", "manifest"): lambda: VideoQASource(str(videos), name="video"),
            ("video", "prepared"): lambda: PreparedSource(str(folder / "prepared-video_qa"), name="video"),
        }
        rates: dict[tuple[str, str, int], list[float]] = {}
        for repeat in range(args.repeats):  # interleaved, so that a busy spell of the machine hits every pipeline
            for workers in args.workers:
                for (kind, storage), make_source in readers.items():
                    rate = pipeline_rate(model, make_source(), args.batch_size, workers, args.batches)
                    rates.setdefault((kind, storage, workers), []).append(rate)
                    print(f"[{repeat}] {kind:5s} {storage:8s}, {workers} workers: {rate:8.1f} samples/s", flush=True)
        for (kind, storage, workers), measured in rates.items():
            median = round(statistics.median(measured), 1)
            rows.append({"pipeline": kind, "storage": storage, "workers": workers, "samples_per_s": median,
                         "runs": [round(r, 1) for r in measured]})  # fmt: skip
        data = MixtureDataModule([ImageTextSource(str(images))], batch_size=args.batch_size, num_workers=0)
        data.processor, data.num_frames = model.processor, model.vision_config.num_frames
        data.setup("fit")
        first = next(iter(data.train_dataloader()))
        consumption = model_rate(model, first, steps=10)
    print(f"model ({args.config}) trains at {consumption:.1f} samples/s (batch {args.batch_size})")
    print()
    print(f"| pipeline | storage | workers | samples/s (median of {args.repeats}) | x the model's {consumption:.1f} |")
    print("|---|---|---|---|---|")
    for row in sorted(rows, key=lambda r: (r["pipeline"], r["storage"], r["workers"])):
        ratio = row["samples_per_s"] / consumption
        row["ratio_to_model"] = round(ratio, 2)
        print(f"| {row['pipeline']} | {row['storage']} | {row['workers']} | {row['samples_per_s']} | {ratio:.2f} |")
    result = {
        "command": machine["command"],
        "machine": finish_record(machine),
        "model_config": args.config,
        "batch_size": args.batch_size,
        "image_size": model.vision_config.image_size,
        "num_frames": model.vision_config.num_frames,
        "model_samples_per_s": round(consumption, 1),
        "repeats": args.repeats,
        "pipelines": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
