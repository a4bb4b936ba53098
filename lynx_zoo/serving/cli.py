"""``python -m lynx_zoo serve --variant NAME|FOLDER|CKPT [--host 127.0.0.1] [--port 8000] ...``"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from lynx_zoo.serving.settings import ServeSettings, is_loopback, parse_settings


def served_name_of(variant: str) -> str:
    """The model id a variant is served under: its registered name, the name a folder's config.json records, a
    checkpoint's file name, or the hub repository."""
    path = Path(variant).expanduser()
    if path.is_dir():
        config = path / "config.json"
        if config.is_file():
            return str(json.loads(config.read_text(encoding="utf-8")).get("name") or path.resolve().name)
        return path.resolve().name
    if path.is_file():
        return path.stem
    return variant.removeprefix("hf://")


def default_threads() -> int:
    """torch's intra-op threads when serving: the cores this process may use, less one for the HTTP loop and media
    decoding (on a busy machine a thread too many makes every step wait for the one that was descheduled)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores - 1)


def serve(settings: ServeSettings) -> None:
    """Load the model, then serve it until interrupted (Ctrl-C or SIGTERM)."""
    import torch  # here, not at the top: ``serve --help`` loads neither torch's kernels nor Lightning

    from lynx_zoo.hub import load_model
    from lynx_zoo.serving.app import create_app
    from lynx_zoo.serving.server import base_url, bind_socket, uvicorn_server

    if settings.insecure_no_auth and not settings.api_keys() and not is_loopback(settings.host):
        print(f"serve: warning: listening on {settings.host} without an API key (--insecure-no-auth)", file=sys.stderr)
    threads = settings.threads or default_threads()
    torch.set_num_threads(threads)
    sock = bind_socket(settings.host, settings.port)
    model = load_model(settings.variant, device=settings.device, dtype=settings.dtype)  # in eval mode
    name = settings.served_name or served_name_of(settings.variant)
    app = create_app(model, settings, name)
    batching = (
        f"continuous batching of up to {settings.max_batch_size} sequences"
        if settings.max_batch_size > 1
        else "batching off"
    )
    threading = f"{threads} torch thread" + ("s" if threads > 1 else "")
    auth = "API key required" if settings.api_keys() else "no API key"
    print(f"serving {name} on {base_url(sock)} ({batching}, {threading}, {auth}; chat page at /)", flush=True)
    uvicorn_server(app, access_log=settings.access_log).run(sockets=[sock])


def main(argv: list[str]) -> int:
    """Entry point of ``python -m lynx_zoo serve`` (``argv`` without ``serve``); returns the exit status."""
    settings = parse_settings(argv)
    try:
        serve(settings)
    except ModuleNotFoundError as err:
        print(f"lynx_zoo serve: error: {err}; install the server with: pip install 'lynx-zoo[serve]'", file=sys.stderr)
        return 1
    except (OSError, ValueError) as err:
        print(f"lynx_zoo serve: error: {err}", file=sys.stderr)
        return 1
    return 0
