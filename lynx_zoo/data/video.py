"""Video decoding with PyAV: any container FFmpeg reads (mp4, webm, mkv, mpg, ...), frames sampled by segment.

Lynx samples a fixed number of frames per clip (5): the clip is cut into equal segments and one
frame is taken from each, a random one for training and the segment's centre for evaluation (so
evaluation is deterministic). Frame positions come from the packets' timestamps (no decoding), then
only the chosen frames are decoded, seeking forward over long gaps; where a container seeks
imprecisely (a seek lands after its target), the stream is decoded from its start instead.
"""

from __future__ import annotations

import io
import math
import random
from pathlib import Path

import av
from PIL import Image

from lynx_zoo.errors import ConfigError, MediaError, is_programming_error

# seek instead of decoding through gaps longer than this many seconds
SEEK_GAP_SECONDS = 2.0
# a file whose packets cover less than this share of its declared duration was cut short
MIN_COVERED_SHARE = 0.8


class VideoError(MediaError):
    """A video that cannot be used: missing, not a video, truncated or undecodable (names the file)."""


def segment_indices(num_available: int, num_frames: int, training: bool, rng: random.Random | None = None) -> list[int]:
    """Indices of ``num_frames`` frames out of ``num_available``, one per equal segment, in order.

    Training: a random frame within each segment; evaluation: each segment's centre. Only a clip with
    fewer frames than ``num_frames`` repeats frames (the order is kept).
    """
    if num_available < 1 or num_frames < 1:
        raise ValueError(f"segment_indices: need frames to sample from, got {num_available} for {num_frames}")
    rng = rng or random.Random()
    # segment boundaries in whole frames: disjoint segments whenever there are enough frames
    edges = [round(num_available * k / num_frames) for k in range(num_frames + 1)]
    indices = []
    for segment in range(num_frames):
        if training:
            first = min(edges[segment], num_available - 1)
            index = rng.randint(first, max(first, edges[segment + 1] - 1))
        else:
            index = int(num_available * (segment + 0.5) / num_frames)
        indices.append(min(index, num_available - 1))
    return indices


def read_video_frames(
    path: str | Path,
    num_frames: int,
    training: bool = False,
    rng: random.Random | None = None,
    data: bytes | None = None,
) -> list[Image.Image]:
    """``num_frames`` RGB frames of the video at ``path`` (or in ``data``, the file's bytes, with ``path`` naming
    it in errors), sampled by segment (see :func:`segment_indices`).

    Raises :class:`VideoError` naming the file when it cannot be opened, has no video stream, fewer frames decode
    than its packets promise (a truncated or corrupt file), or anything else goes wrong decoding it.
    """
    path = Path(path)
    if num_frames < 1:
        raise ConfigError(f"vision.num_frames: a video needs at least 1 frame per clip, got {num_frames} ({path})")
    if data is None and not path.is_file():
        raise VideoError(f"video not found: {path}")

    def open_video() -> av.container.InputContainer:
        return av.open(io.BytesIO(data) if data is not None else str(path))

    try:
        with open_video() as container:
            if not container.streams.video:
                raise VideoError(f"{path}: no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            timestamps = sorted({p.pts for p in container.demux(stream) if p.pts is not None and p.size > 0})
            if not timestamps:
                raise VideoError(f"{path}: no video frames")
            _check_not_truncated(path, container, stream, timestamps)
            wanted = [timestamps[i] for i in segment_indices(len(timestamps), num_frames, training, rng)]
            gap = SEEK_GAP_SECONDS / float(stream.time_base) if stream.time_base else math.inf
            frames = _decode_at(container, stream, wanted, gap)
        if frames is None:
            with open_video() as container:
                frames = _decode_in_order(container, wanted)
    except VideoError:
        raise
    except Exception as err:  # FFmpeg's errors, and whatever else a broken file makes PyAV or PIL raise
        if is_programming_error(err):
            raise
        raise VideoError(f"{path}: cannot decode video: {type(err).__name__}: {err}") from err
    if len(frames) < num_frames:
        raise VideoError(f"{path}: decoded {len(frames)} of {num_frames} sampled frames (truncated or corrupt video)")
    return frames


def _check_not_truncated(
    path: Path, container: av.container.InputContainer, stream: av.VideoStream, timestamps: list[int]
) -> None:
    """Containers that declare a duration (mkv, webm, mp4) and lost their end still demux their head."""
    if stream.duration and stream.time_base:
        declared = float(stream.duration * stream.time_base)
    elif container.duration and not container.streams.audio:  # (with audio it may outlast the video)
        declared = container.duration / av.time_base
    else:
        return
    frame_time = 1 / float(stream.average_rate) if stream.average_rate else 0.0
    start = stream.start_time if stream.start_time is not None else timestamps[0]
    covered = float((timestamps[-1] - start) * stream.time_base) + frame_time
    if covered < MIN_COVERED_SHARE * declared:
        raise VideoError(f"{path}: truncated: its frames cover {covered:.2f} s of the declared {declared:.2f} s")


def _decode_at(
    container: av.container.InputContainer, stream: av.VideoStream, wanted: list[int], gap: float
) -> list[Image.Image] | None:
    """Decode the frames at (or first after) each timestamp of ascending ``wanted``, seeking between them.

    ``None`` when a seek cannot be trusted: it landed after its target (containers such as MPEG-TS, or
    streams with B-frames, seek imprecisely) or nothing decoded after it.
    """
    frames: list[Image.Image] = []
    while len(frames) < len(wanted):
        before_seek = len(frames)
        container.seek(wanted[before_seek], stream=stream, backward=True, any_frame=False)
        landed = None
        for frame in container.decode(stream):
            if frame.pts is None:
                continue
            if landed is None:
                landed = frame.pts
                if landed > wanted[before_seek]:
                    return None
            while len(frames) < len(wanted) and frame.pts >= wanted[len(frames)]:
                frames.append(frame.to_image())
            if len(frames) == len(wanted):
                break
            # once this seek has paid off, seek again rather than decode through a long gap
            if len(frames) > before_seek and wanted[len(frames)] - frame.pts > gap:
                break
        else:
            if landed is None:
                return None
            break  # the stream ended before every wanted frame was seen
    return frames


def _decode_in_order(container: av.container.InputContainer, wanted: list[int]) -> list[Image.Image]:
    """The same frames as :func:`_decode_at`, by decoding the whole stream from its start (no seeking)."""
    frames: list[Image.Image] = []
    for frame in container.decode(container.streams.video[0]):
        while frame.pts is not None and len(frames) < len(wanted) and frame.pts >= wanted[len(frames)]:
            frames.append(frame.to_image())
        if len(frames) == len(wanted):
            break
    return frames
