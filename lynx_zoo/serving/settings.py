"""The settings of ``python -m lynx_zoo serve``: one dataclass, from which the command line is built."""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lynx_zoo.generation import GENERATION_PRESETS

MiB = 1024 * 1024
API_KEY_ENV = "LYNX_ZOO_API_KEY"


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (``127.0.0.1``, ``::1``, ``localhost``): reachable from here only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


@dataclass
class ServeSettings:
    """How the server loads, listens, batches and guards its inputs (every field is a ``--flag``)."""

    variant: str = field(
        default="", metadata={"help": "what to serve: a registered variant name, a variant folder, or a .ckpt file"}
    )
    host: str = field(default="127.0.0.1", metadata={"help": "the address to listen on"})
    port: int = field(default=8000, metadata={"help": "the port (0: any free port; the chosen one is printed)"})
    api_key: str | None = field(
        default=None,
        metadata={
            "help": f"the key clients must send as `Authorization: Bearer KEY` (default: ${API_KEY_ENV}; none: no key "
            "is checked, allowed on loopback only)"
        },
    )
    api_key_file: Path | None = field(
        default=None, metadata={"help": "a file of accepted keys, one a line (blank lines and # comments ignored)"}
    )
    insecure_no_auth: bool = field(
        default=False,
        metadata={"help": "listen on a non-loopback host without an API key (anyone reaching it uses it)"},
    )
    device: str = field(default="cpu", metadata={"help": "where the model runs (cpu, cuda, cuda:1, ...)"})
    dtype: str | None = field(
        default=None, metadata={"help": "the LLM's weight dtype (e.g. bfloat16); default: as saved"}
    )
    threads: int | None = field(
        default=None,
        metadata={
            "help": "torch's intra-op threads (default: the cores less one, which is left to the HTTP loop and media "
            "decoding)"
        },
    )
    served_name: str | None = field(
        default=None, metadata={"help": "the model id clients send and /v1/models lists (default: the variant's name)"}
    )
    preset: str | None = field(
        default=None,
        metadata={"help": "default generation preset (lynx, lynx-sampled, greedy); default: the variant's own"},
    )
    access_log: bool = field(
        default=False, metadata={"help": "log a line per request (off: at hundreds of requests a second it is noise)"}
    )
    max_batch_size: int = field(
        default=8, metadata={"help": "most sequences generated together (1: batching off, one request at a time)"}
    )
    max_wait_ms: float = field(
        default=10.0,
        metadata={"help": "the longest a batch waits to fill (it starts sooner once as large as the previous one)"},
    )
    max_queue: int = field(
        default=64, metadata={"help": "requests waiting for the model at most; more are answered 503 + Retry-After"}
    )
    max_tokens_limit: int = field(default=512, metadata={"help": "the largest max_tokens a request may ask for"})
    max_n: int = field(default=8, metadata={"help": "the largest n (choices per request)"})
    media_root: Path | None = field(
        default=None, metadata={"help": "local media paths are read only under this folder (default: no paths)"}
    )
    allow_remote_media: bool = field(
        default=False, metadata={"help": "fetch http(s) image and video URLs (off: they are refused)"}
    )
    remote_timeout_s: float = field(default=10.0, metadata={"help": "timeout of one remote media fetch"})
    max_image_bytes: int = field(default=10 * MiB, metadata={"help": "the largest image file, in bytes"})
    max_image_pixels: int = field(
        default=4096 * 4096, metadata={"help": "the largest image, in pixels (width x height)"}
    )
    max_video_bytes: int = field(default=50 * MiB, metadata={"help": "the largest video file, in bytes"})

    def __post_init__(self) -> None:
        if self.api_key is None:
            self.api_key = os.environ.get(API_KEY_ENV) or None
        if self.api_key_file is not None:
            self.api_key_file = Path(self.api_key_file).expanduser()
            if not self.api_key_file.is_file():
                raise ValueError(f"serve: --api-key-file {self.api_key_file} is not a file")
            if not self._file_keys():
                raise ValueError(f"serve: --api-key-file {self.api_key_file} holds no key (one a line)")
        if not is_loopback(self.host) and not self.api_keys() and not self.insecure_no_auth:
            raise ValueError(
                f"serve: refusing to listen on {self.host} (not loopback) without an API key: anyone reaching the port "
                f"would use the model. Give --api-key KEY (or ${API_KEY_ENV}, or --api-key-file), or --insecure-no-auth"
            )
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"serve: --threads must be at least 1, got {self.threads}")
        for name in ("max_batch_size", "max_queue", "max_tokens_limit", "max_n", "max_image_bytes", "max_image_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"serve: --{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.preset is not None and self.preset not in GENERATION_PRESETS:
            raise ValueError(f"serve: unknown --preset {self.preset!r}; choose one of {sorted(GENERATION_PRESETS)}")
        if self.max_wait_ms < 0:
            raise ValueError(f"serve: --max-wait-ms must be >= 0, got {self.max_wait_ms}")
        if self.media_root is not None:
            self.media_root = Path(self.media_root).expanduser().resolve()
            if not self.media_root.is_dir():
                raise ValueError(f"serve: --media-root {self.media_root} is not a folder")

    def _file_keys(self) -> list[str]:
        if self.api_key_file is None:
            return []
        lines = self.api_key_file.read_text(encoding="utf-8").splitlines()
        return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]

    def api_keys(self) -> frozenset[str]:
        """The keys a client may send (empty: none is checked)."""
        return frozenset(([self.api_key] if self.api_key else []) + self._file_keys())

    @property
    def max_request_bytes(self) -> int:
        """The largest request body: the largest medium as base64, plus room for the text."""
        return math.ceil(max(self.max_image_bytes, self.max_video_bytes) * 4 / 3) + MiB


def _flag_type(annotation: Any) -> type:
    """The parser type of a field annotation (``X`` of ``X | None``)."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return next(a for a in typing.get_args(annotation) if a is not type(None))
    return annotation


def settings_parser(prog: str = "python -m lynx_zoo serve") -> argparse.ArgumentParser:
    """The ``serve`` command line, built from :class:`ServeSettings` (its types, defaults and help)."""
    parser = argparse.ArgumentParser(prog=prog, description="An OpenAI-compatible server of one lynx_zoo model.")
    hints = typing.get_type_hints(ServeSettings)
    for spec in dataclasses.fields(ServeSettings):
        flag = "--" + spec.name.replace("_", "-")
        hint = _flag_type(hints[spec.name])
        if hint is bool:
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=spec.default, help=spec.metadata["help"]
            )
            continue
        parser.add_argument(
            flag,
            type=hint,
            default=spec.default,
            required=spec.name == "variant",
            help=spec.metadata["help"] + ("" if spec.default in (None, "") else f" (default: {spec.default})"),
        )
    return parser


def parse_settings(argv: list[str]) -> ServeSettings:
    """:class:`ServeSettings` from command-line arguments; a bad value exits with the parser's message."""
    parser = settings_parser()
    args = parser.parse_args(argv)
    try:
        return ServeSettings(**vars(args))
    except ValueError as err:
        parser.error(str(err))
