"""Image decoding that fails one way: every problem of one file is a :class:`~lynx_zoo.errors.MediaError` naming it.

PIL raises many kinds for a bad file (``UnidentifiedImageError``, ``OSError``, ``SyntaxError``, ``struct.error``,
``EOFError``, ``ValueError``, ``DecompressionBombError``...); :func:`open_rgb` turns each of them into a
:class:`MediaError`, refuses images over a pixel cap before decoding them, and refuses degenerate (0-pixel) ones.
A programming error (a wrong argument type, a missing attribute) still surfaces as itself.
"""

from __future__ import annotations

import io
import re
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from PIL import Image

from lynx_zoo.errors import MediaError, OversizedMediaError, is_programming_error

# the default pixel cap: PIL's own decompression-bomb threshold (about 89.5 million pixels, e.g. 9459 x 9459)
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485
_PIL_LIMIT_LOCK = threading.Lock()
# how PIL names bytes in memory in its messages ("cannot identify image file <_io.BytesIO object at 0x...>")
_IN_MEMORY_FILE = re.compile(r" <_io\.BytesIO object at 0x[0-9a-f]+>")


@contextmanager
def pil_limit_at_least(max_pixels: int | None) -> Iterator[None]:
    """PIL refuses images over twice ``Image.MAX_IMAGE_PIXELS`` by itself; a larger cap lifts that (process-wide,
    under a lock, for this decode only)."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit is None or (max_pixels is not None and max_pixels <= 2 * limit):
        yield
        return
    with _PIL_LIMIT_LOCK:
        Image.MAX_IMAGE_PIXELS = None if max_pixels is None else max_pixels
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = limit


def check_image_size(width: int, height: int, where: str, max_pixels: int | None) -> None:
    """A :class:`MediaError` naming ``where`` for a degenerate image or one over ``max_pixels``."""
    if width < 1 or height < 1:
        raise MediaError(f"{where}: a degenerate image of {width}x{height} pixels")
    if max_pixels is not None and width * height > max_pixels:
        raise OversizedMediaError(
            f"{where}: {width}x{height} = {width * height:,} pixels, over the cap max_image_pixels={max_pixels:,} "
            "(a decompression bomb, or raise the cap)"
        )


def open_rgb(
    path: str | Path | None = None,
    data: bytes | None = None,
    where: str | None = None,
    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
) -> Image.Image:
    """The RGB image in file ``path`` (or in ``data``, named ``where`` in errors), decoded in full.

    Raises :class:`MediaError` naming the file for anything wrong with it: missing, unreadable, not an image,
    truncated, degenerate, or over ``max_pixels`` (``None``: no cap), checked from the header before decoding.
    """
    if path is None and data is None:
        raise TypeError("open_rgb: give a path or data")
    where = where or str(path)
    try:
        with warnings.catch_warnings(), pil_limit_at_least(max_pixels):
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the cap below decides
            with Image.open(io.BytesIO(data) if data is not None else path) as image:
                check_image_size(image.width, image.height, where, max_pixels)
                return image.convert("RGB")
    except MediaError:
        raise
    except FileNotFoundError:
        raise MediaError(f"{where}: no such image file") from None
    except Image.DecompressionBombError as err:
        raise OversizedMediaError(f"{where}: {err} (max_image_pixels={max_pixels})") from err
    except Exception as err:
        if is_programming_error(err):
            raise
        reason = _IN_MEMORY_FILE.sub("", str(err).replace(f" '{where}'", ""))  # PIL repeats the path (or the buffer)
        raise MediaError(f"{where}: not a readable image ({type(err).__name__}: {reason})") from err
