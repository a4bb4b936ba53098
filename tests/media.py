"""Real media for data tests: scikit-image's bundled photographs, clips encoded with PyAV, tar shards, and broken
files of every kind (a decompression bomb, truncated, empty, text, missing)."""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image
from skimage import data as skdata

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera")
CODECS = {"mp4": "libx264", "webm": "libvpx", "mkv": "mpeg4", "mpg": "mpeg2video", "ts": "libx264", "avi": "mpeg4"}


def to_tensor(image: Image.Image, size: int = 16) -> torch.Tensor:
    """A plain stand-in for a model's transform: resize, to a float ``(3, size, size)`` tensor."""
    return torch.from_numpy(np.asarray(image.convert("RGB").resize((size, size)), dtype=np.float32)).permute(2, 0, 1)


def write_jsonl(path: Path, records: list) -> Path:
    """A manifest: one JSON record a line (strings are written as they are: malformed lines for tests)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def photo(name: str, size: int = 48) -> Image.Image:
    """A real photograph from scikit-image, RGB, resized to ``size`` x ``size``."""
    pixels = getattr(skdata, name)()
    image = Image.fromarray(pixels).convert("RGB")
    return image.resize((size, size))


def save_photos(folder: Path, size: int = 48) -> list[str]:
    """The photographs as JPEG/PNG files in ``folder``; returns their file names."""
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i, name in enumerate(PHOTOS):
        file = f"{name}.{'jpg' if i % 2 else 'png'}"
        photo(name, size).save(folder / file)
        names.append(file)
    return names


def frame_value(index: int) -> int:
    """The grey level of frame ``index`` of :func:`write_clip` clips (frames are told apart by it)."""
    return (index * 12) % 240


def write_clip(path: Path, num_frames: int = 20, size: int = 32, fps: int = 10) -> Path:
    """A clip of a photograph whose top half is a flat grey of level :func:`frame_value` (``i``) in frame ``i``."""
    base = np.asarray(photo("astronaut", size)).copy()
    with av.open(str(path), "w") as container:
        stream = container.add_stream(CODECS[path.suffix[1:]], rate=fps)
        stream.width, stream.height, stream.pix_fmt = size, size, "yuv420p"
        for i in range(num_frames):
            frame = base.copy()
            frame[: size // 2] = frame_value(i)  # the top half is a flat grey that encodes the index
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def decoded_index(frame: Image.Image) -> int:
    """Which frame of a :func:`write_clip` clip ``frame`` is (from the grey level of its top half)."""
    grey = float(np.asarray(frame)[2 : frame.height // 2 - 2].mean())
    return int(round(grey / 12))


def write_shards(folder: Path, num_shards: int, per_shard: int, size: int = 32) -> list[str]:
    """Tar shards ``pairs-000000.tar`` ... of ``<key>.jpg`` + ``<key>.json`` (or ``.txt``) pairs; returns the keys."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = []
    for s in range(num_shards):
        with tarfile.open(folder / f"pairs-{s:06d}.tar", "w") as tar:
            for j in range(per_shard):
                key = f"s{s:02d}-{j:03d}"
                image = io.BytesIO()
                photo(PHOTOS[(s + j) % len(PHOTOS)], size).save(image, format="JPEG")
                members = {"jpg": image.getvalue()}
                if j % 2:
                    members["txt"] = f"a photo number {j}".encode()
                else:
                    members["json"] = json.dumps({"caption": f"a photo number {j}"}).encode()
                for ext, payload in members.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
                keys.append(key)
    return keys


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(side: int = 20000) -> bytes:
    """A valid 1-bit greyscale PNG of ``side`` x ``side`` pixels (400 million at 20000) in about 60 KB of zeros: a
    decompression bomb (decoded as RGB it would take 1.2 GB)."""
    row = bytes(1 + (side + 7) // 8)  # filter byte 0, then the bits of the row
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def write_broken_images(folder: Path) -> dict[str, str]:
    """Broken image files in ``folder``, by fault: a 20000 x 20000 PNG bomb, a truncated PNG, a zero-byte file, text
    saved as ``.png``, and a missing file's name. Returns ``fault -> file name``."""
    folder.mkdir(parents=True, exist_ok=True)
    whole = io.BytesIO()
    photo("coffee", 48).save(whole, format="PNG")
    files = {
        "bomb": ("bomb.png", png_bomb()),
        "truncated": ("truncated.png", whole.getvalue()[: len(whole.getvalue()) // 2]),
        "empty": ("empty.png", b""),
        "text": ("text.png", b"this is not an image\n"),
    }
    for name, data in files.values():
        (folder / name).write_bytes(data)
    return {fault: name for fault, (name, _) in files.items()} | {"missing": "missing.png"}
