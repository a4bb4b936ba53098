"""Reading the image or video of a request: data URLs, files under the media root, remote URLs when allowed.

Every refusal is a :class:`~lynx_zoo.serving.protocol.RequestError` naming the field: bad base64, a payload that
is no PNG/JPEG/WebP image (or no video), a file over the byte cap, an image over the pixel cap, a path outside
the root, a remote URL while remote fetching is off.
"""

from __future__ import annotations

import base64
import binascii
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from lynx_zoo.data.images import pil_limit_at_least
from lynx_zoo.data.video import VideoError, read_video_frames
from lynx_zoo.serving.protocol import MediaRef, RequestError
from lynx_zoo.serving.settings import ServeSettings

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
IMAGE_MIME_TYPES = {"image/png", "image/jpeg", "image/jpg", "image/webp"}

Transform = Callable[[Image.Image], torch.Tensor]
# a data-URL image up to this long decodes in well under a millisecond: cheaper on the event loop than a hop
# to a worker thread (larger ones, files, remote URLs and videos are read in worker threads)
INLINE_DATA_URL_CHARS = 64 * 1024


def reads_quickly(ref: MediaRef) -> bool:
    """Whether :func:`load_media` of ``ref`` is quick enough to run on the event loop."""
    return ref.kind == "image" and ref.url.startswith("data:") and len(ref.url) <= INLINE_DATA_URL_CHARS


@dataclass
class MediaPolicy:
    """What a request may point to, and how large it may be."""

    root: Path | None
    allow_remote: bool
    remote_timeout_s: float
    max_image_bytes: int
    max_image_pixels: int
    max_video_bytes: int
    num_frames: int

    @classmethod
    def from_settings(cls, settings: ServeSettings, num_frames: int) -> MediaPolicy:
        return cls(
            settings.media_root,
            settings.allow_remote_media,
            settings.remote_timeout_s,
            settings.max_image_bytes,
            settings.max_image_pixels,
            settings.max_video_bytes,
            num_frames,
        )

    def byte_cap(self, ref: MediaRef) -> tuple[int, str]:
        if ref.kind == "image":
            return self.max_image_bytes, "--max-image-bytes"
        return self.max_video_bytes, "--max-video-bytes"


@dataclass
class Payload:
    """The bytes of a medium, or the file that holds them; the medium's name in messages to the client (never the
    server's own paths)."""

    name: str
    data: bytes | None = None
    path: Path | None = None


def _over_cap(ref: MediaRef, size: int, policy: MediaPolicy) -> RequestError:
    cap, flag = policy.byte_cap(ref)
    return RequestError(ref.param, f"the {ref.kind} is {size} bytes, over the cap of {cap} bytes ({flag})")


def _data_url(ref: MediaRef, policy: MediaPolicy) -> Payload:
    header, comma, encoded = ref.url.partition(",")
    if not comma:
        raise RequestError(ref.param, "a data URL needs a comma between its header and its data")
    mime, *params = header[len("data:") :].split(";")
    mime = mime.strip().lower()
    if "base64" not in params:
        raise RequestError(ref.param, "only base64 data URLs are accepted (data:<type>;base64,<data>)")
    if ref.kind == "image" and mime not in IMAGE_MIME_TYPES:
        raise RequestError(ref.param, f"unsupported image type {mime or 'none'!r}; send PNG, JPEG or WebP")
    if ref.kind == "video" and not mime.startswith("video/"):
        raise RequestError(ref.param, f"unsupported video type {mime or 'none'!r}; send a video/* data URL")
    encoded = "".join(encoded.split())
    cap, _ = policy.byte_cap(ref)
    if len(encoded) * 3 // 4 > cap + 2:
        raise _over_cap(ref, len(encoded) * 3 // 4, policy)
    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as err:
        raise RequestError(ref.param, f"invalid base64 in the data URL ({err})") from err
    if len(data) > cap:
        raise _over_cap(ref, len(data), policy)
    return Payload(f"the uploaded {ref.kind}", data=data)


def _local_file(ref: MediaRef, location: str, policy: MediaPolicy) -> Payload:
    if policy.root is None:
        raise RequestError(
            ref.param, "local paths are off: start the server with --media-root DIR to allow files there"
        )
    path = Path(location)
    resolved = (path if path.is_absolute() else policy.root / path).resolve()
    if not resolved.is_relative_to(policy.root):
        raise RequestError(ref.param, f"{location} is outside the media root")
    if not resolved.is_file():
        raise RequestError(ref.param, f"no such file under the media root: {location}")
    size = resolved.stat().st_size
    if size > policy.byte_cap(ref)[0]:
        raise _over_cap(ref, size, policy)
    return Payload(location, path=resolved)


def _remote(ref: MediaRef, policy: MediaPolicy) -> Payload:
    if not policy.allow_remote:
        raise RequestError(
            ref.param, "remote URLs are off: send a data URL, or start the server with --allow-remote-media"
        )
    cap, _ = policy.byte_cap(ref)
    request = urllib.request.Request(ref.url, headers={"User-Agent": "lynx_zoo-serve"})
    try:
        with urllib.request.urlopen(request, timeout=policy.remote_timeout_s) as response:
            data = response.read(cap + 1)
    except (urllib.error.URLError, OSError, ValueError) as err:
        raise RequestError(ref.param, f"cannot fetch {ref.url}: {err}") from err
    if len(data) > cap:
        raise _over_cap(ref, len(data), policy)
    return Payload(ref.url, data=data)


def fetch_payload(ref: MediaRef, policy: MediaPolicy) -> Payload:
    """The bytes (or file) a media reference names, within the policy."""
    url = ref.url.strip()
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme == "data":
        return _data_url(MediaRef(ref.kind, url, ref.param), policy)
    if scheme in ("http", "https"):
        return _remote(MediaRef(ref.kind, url, ref.param), policy)
    if scheme == "file":
        return _local_file(ref, urllib.parse.unquote(urllib.parse.urlsplit(url).path), policy)
    if scheme and len(scheme) > 1:  # a one-letter scheme is a Windows drive
        raise RequestError(ref.param, f"unsupported URL scheme {scheme!r}; use data:, file: (under the media root)")
    return _local_file(ref, url, policy)


def decode_image(data: bytes, param: str, max_pixels: int) -> Image.Image:
    """An RGB image from PNG/JPEG/WebP bytes, its size checked before its pixels are decoded."""
    try:
        with warnings.catch_warnings(), pil_limit_at_least(max_pixels):
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the cap below decides
            image = Image.open(BytesIO(data))
    except Image.DecompressionBombError as err:  # over twice PIL's limit, which is at least the cap
        raise RequestError(
            param, f"the image is over the pixel cap of {max_pixels} (--max-image-pixels): {err}"
        ) from err
    except (UnidentifiedImageError, OSError) as err:
        raise RequestError(param, "not an image: the data is no PNG, JPEG or WebP file") from err
    if image.format not in IMAGE_FORMATS:
        raise RequestError(param, f"{image.format} images are not accepted; send PNG, JPEG or WebP")
    width, height = image.size
    if width * height > max_pixels:
        raise RequestError(
            param,
            f"the image is {width}x{height} = {width * height} pixels, over the cap of {max_pixels} "
            "(--max-image-pixels)",
        )
    try:
        return image.convert("RGB")
    except (OSError, ValueError) as err:
        raise RequestError(param, f"the {image.format} image cannot be decoded (truncated or corrupt): {err}") from err


def _video_frames(payload: Payload, ref: MediaRef, num_frames: int) -> list[Image.Image]:
    if num_frames < 1:
        raise RequestError(ref.param, "this model takes no videos (its vision.num_frames is 0)")
    # bytes are decoded in memory, named in errors by the payload's name (a Path of it would fold a URL's "//")
    source = payload.path if payload.path is not None else Path(payload.name)
    try:
        return read_video_frames(source, num_frames, data=payload.data)
    except VideoError as err:
        raise RequestError(ref.param, str(err).replace(str(source), payload.name)) from err


def load_media(ref: MediaRef, policy: MediaPolicy, transform: Transform) -> torch.Tensor:
    """The transformed tensor of a medium: ``(3, H, W)`` for an image, ``(T, 3, H, W)`` for a video's
    ``vision.num_frames`` frames, sampled at segment centres as in evaluation."""
    payload = fetch_payload(ref, policy)
    if ref.kind == "image":
        data = payload.data if payload.data is not None else payload.path.read_bytes()  # type: ignore[union-attr]
        return transform(decode_image(data, ref.param, policy.max_image_pixels))
    return torch.stack([transform(frame) for frame in _video_frames(payload, ref, policy.num_frames)])
