"""What :meth:`LynxModel.generate` takes: images and videos in any common form, and generation presets."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Union

import torch
from PIL import Image

from lynx_zoo.data.images import DEFAULT_MAX_IMAGE_PIXELS, open_rgb

# ``generate(..., preset=NAME)``: transformers generation settings (explicit keyword arguments win), plus ``seed``.
GENERATION_PRESETS: dict[str, dict[str, Any]] = {
    # the released Lynx evaluation (configs/LYNX.yaml and generate.sh of bytedance/lynx-llm): beam sampling
    # (use_nucleus_sampling: True) over 5 beams with top-p 0.9 and top-k 3, length penalty -2, no repeated bigram,
    # at least 2 and at most 64 new tokens (its min_length counts new tokens only, the prompt being embeddings),
    # seeded with its default seed 42 at each call so that a run repeats
    "lynx": dict(
        num_beams=5,
        do_sample=True,
        top_p=0.9,
        top_k=3,
        length_penalty=-2.0,
        no_repeat_ngram_size=2,
        min_new_tokens=2,
        max_new_tokens=64,
        seed=42,
    ),
    # the same beam search without sampling: deterministic without a seed
    "lynx-beam": dict(
        num_beams=5, do_sample=False, length_penalty=-2.0, no_repeat_ngram_size=2, min_new_tokens=2, max_new_tokens=64
    ),
    "greedy": dict(num_beams=1, do_sample=False),
}


def generation_settings(preset: str | None, defaults: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``defaults`` (the model's ``eval_generation``), then the preset's settings, then ``overrides``."""
    if preset is not None and preset not in GENERATION_PRESETS:
        raise ValueError(f"generate: unknown preset {preset!r}; choose one of {sorted(GENERATION_PRESETS)}")
    return {**defaults, **(GENERATION_PRESETS[preset] if preset else {}), **overrides}


@contextmanager
def seeded(seed: int | None, device: torch.device | str) -> Iterator[None]:
    """Run the block with torch's generators (CPU, and ``device``'s if it is an accelerator) seeded with ``seed``,
    then give them back their state: sampling inside repeats from run to run, and nothing outside is disturbed.
    ``None`` changes nothing."""
    if seed is None:
        yield
        return
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


ImageLike = Union[Image.Image, str, Path, torch.Tensor]
VideoLike = Union[str, Path, Sequence[ImageLike], torch.Tensor]
Transform = Callable[[Image.Image], torch.Tensor]


def open_image(path: str | Path, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """An RGB image from a file; a :class:`~lynx_zoo.errors.MediaError` (an ``OSError``) naming it when it cannot be
    used: unreadable, not an image, degenerate, or over ``max_pixels`` (a decompression bomb)."""
    return open_rgb(path, max_pixels=max_pixels)


def _image_tensor(item: ImageLike, transform: Transform, where: str) -> torch.Tensor:
    if isinstance(item, torch.Tensor):
        if item.dim() != 3 or 0 in item.shape:
            raise ValueError(f"generate: {where}: a tensor must be (3, H, W) and transformed, got {tuple(item.shape)}")
        return item
    if isinstance(item, (str, Path)):
        return transform(open_image(item))
    if isinstance(item, Image.Image):
        if item.width < 1 or item.height < 1:
            raise ValueError(f"generate: {where}: a degenerate PIL image of {item.width}x{item.height} pixels")
        return transform(item.convert("RGB"))
    raise TypeError(
        f"generate: {where}: must be a PIL image, a file path or a (3, H, W) tensor, got {type(item).__name__}"
    )


def image_batch(images: Sequence[ImageLike] | torch.Tensor, transform: Transform) -> torch.Tensor:
    """``(B, 3, H, W)`` from PIL images, file paths, transformed ``(3, H, W)`` tensors, or a batch tensor."""
    if isinstance(images, torch.Tensor):
        if images.dim() not in (4, 5) or 0 in images.shape[1:]:
            raise ValueError(
                f"generate: images must be (B, 3, H, W) (or videos (B, T, 3, H, W)), got {tuple(images.shape)}"
            )
        return images
    if isinstance(images, (str, Path, Image.Image)):
        raise TypeError("generate: `images` is a batch: pass a list, e.g. images=[image]")
    return torch.stack([_image_tensor(item, transform, f"image {i}") for i, item in enumerate(images)])


def video_batch(videos: Sequence[VideoLike] | torch.Tensor, transform: Transform, num_frames: int) -> torch.Tensor:
    """``(B, T, 3, H, W)`` from video files (``T = num_frames`` sampled at segment centres), frame lists
    (PIL images, paths or tensors), transformed ``(T, 3, H, W)`` tensors, or a batch tensor."""
    if num_frames < 1:
        raise ValueError("generate: this model takes no videos (vision.num_frames is 0)")
    if isinstance(videos, torch.Tensor):
        if videos.dim() != 5:
            raise ValueError(f"generate: videos must be (B, T, 3, H, W), got {tuple(videos.shape)}")
        return videos
    if isinstance(videos, (str, Path)):
        raise TypeError("generate: `videos` is a batch: pass a list, e.g. videos=['clip.mp4']")
    clips = []
    for video in videos:
        if isinstance(video, (str, Path)):
            from lynx_zoo.data.video import read_video_frames

            frames: Sequence[ImageLike] | torch.Tensor = read_video_frames(video, num_frames)
        else:
            frames = video
        if isinstance(frames, torch.Tensor):
            clip = frames
        else:
            clip = torch.stack([_image_tensor(frame, transform, f"frame {k}") for k, frame in enumerate(frames)])
        if clip.dim() != 4 or clip.shape[0] != num_frames:
            raise ValueError(
                f"generate: a video must have {num_frames} frames (vision.num_frames), got shape {tuple(clip.shape)}"
            )
        clips.append(clip)
    return torch.stack(clips)
