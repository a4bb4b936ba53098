"""Shared fixtures: tiny models built from configs (random weights) and a small rendered data set."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from lynx_zoo import AdapterConfig, BridgeConfig, LLMConfig, OptimizerConfig, PrefixLynx, PromptConfig, VisionConfig
from lynx_zoo.data.shapes import write_shapes_vqa

REPO = Path(__file__).resolve().parents[1]


def tiny_configs(**overrides) -> dict:
    """Configs of a tiny PT model: a 2-block ViT, a 1-layer resampler, a 4-layer width-32 LLaMA."""
    configs = dict(
        vision=VisionConfig(
            model_name="vit_tiny_patch16_224",
            image_size=32,
            model_kwargs=dict(patch_size=8, embed_dim=32, depth=2, num_heads=2),
        ),
        bridge=BridgeConfig(kind="resampler", num_queries=4, depth=1, num_heads=2, head_dim=8, ff_mult=2),
        llm=LLMConfig(
            pretrained=False,
            tokenizer="lynx_zoo/shapes-words",
            config=dict(
                model_type="llama",
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=4,
                num_attention_heads=2,
                num_key_value_heads=2,
                max_position_embeddings=128,
            ),
        ),
        adapters=AdapterConfig(every=2),
        optimizer=OptimizerConfig(lr=3e-3, min_lr=3e-4),
        prompt=PromptConfig(max_length=32),
    )
    for key, value in overrides.items():
        if isinstance(value, dict) and dataclasses.is_dataclass(configs.get(key)):
            value = dataclasses.replace(configs[key], **value)
        configs[key] = value
    return configs


@pytest.fixture
def make_tiny():
    """``make_tiny(cls=PrefixLynx, **overrides)`` -> a tiny model with fixed random weights."""

    def make(cls=PrefixLynx, seed: int = 0, **overrides):
        torch.manual_seed(seed)
        return cls(**tiny_configs(**overrides))

    return make


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory) -> Path:
    """A small rendered shapes VQA set on disk (32 px, 64 training and 16 held-out images)."""
    root = tmp_path_factory.mktemp("shapes")
    write_shapes_vqa(root, num_train=64, num_val=16, image_size=32, seed=1)
    return root


# ----------------------------------------------------------------------------------------- serving
SERVE_SEED = 1  # random weights whose answers vary with the input and often end before max_new_tokens


@pytest.fixture(scope="session")
def served_variant(tmp_path_factory) -> Path:
    """A tiny variant folder (random weights) for the serving tests."""
    from lynx_zoo.hub import export_variant

    torch.manual_seed(SERVE_SEED)
    return export_variant(PrefixLynx(**tiny_configs()), tmp_path_factory.mktemp("served") / "lynx-serve-tiny")


@pytest.fixture(scope="session")
def media_root(tmp_path_factory) -> Path:
    """The serving tests' media root: rendered scenes, photographs (PNG/JPEG/WebP), an mp4 clip, a corrupt clip."""
    import random

    from media import photo, write_clip

    from lynx_zoo.data.shapes import render_scene

    root = tmp_path_factory.mktemp("media")
    for index in range(4):
        render_scene(random.Random(index), 32)[0].save(root / f"scene{index}.png")
    photo("astronaut", 40).save(root / "astronaut.jpg")
    photo("coffee", 40).save(root / "coffee.webp")
    write_clip(root / "clip.mp4")
    (root / "broken.mp4").write_bytes((root / "clip.mp4").read_bytes()[:300])
    return root


class ServerProcess:
    """``python -m lynx_zoo serve`` in a child process; ``url`` is where it listens."""

    def __init__(self, args: list[str]) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        command = [sys.executable, "-m", "lynx_zoo", "serve", "--port", "0", *args]
        self.process = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.lines: list[str] = []
        started = threading.Event()
        threading.Thread(target=self._read_output, args=(started,), daemon=True).start()
        if not started.wait(180):
            self.process.kill()
            raise RuntimeError("the server did not start:\n" + "".join(self.lines))

    def _read_output(self, started: threading.Event) -> None:
        """Keep the child's output (the pipe must be drained, or its logging blocks)."""
        for line in self.process.stdout:
            self.lines.append(line)
            if line.startswith("serving ") and not started.is_set():
                self.url = line.split(" on ", 1)[1].split()[0]
                started.set()

    def stop(self) -> bool:
        """SIGTERM, as a service manager stops it; whether it shut down cleanly (uvicorn finishes the requests
        in flight and the application's shutdown, then ends by the signal it caught)."""
        self.process.terminate()
        status = self.process.wait(60)
        return status in (0, -signal.SIGTERM) and any("Application shutdown complete" in line for line in self.lines)


@pytest.fixture(scope="session")
def start_server():
    """``start_server(*args)`` -> ``python -m lynx_zoo serve ARGS`` running on a free loopback port; every server
    started is stopped with SIGTERM at the end of the session, and must shut down cleanly."""
    started: list[ServerProcess] = []

    def start(*args: str) -> ServerProcess:
        started.append(ServerProcess(list(args)))
        return started[-1]

    yield start
    for server in started:
        assert server.stop(), "the server did not shut down cleanly on SIGTERM:\n" + "".join(server.lines[-20:])


@pytest.fixture(scope="session")
def tiny_server(start_server, served_variant, media_root) -> ServerProcess:
    """The tiny variant served by the real command line (batches of up to 8, 200 ms of waiting for a batch to
    fill; small image caps, so that tests can exceed them)."""
    return start_server(
        "--variant", str(served_variant), "--media-root", str(media_root), "--max-batch-size", "8",
        "--max-wait-ms", "200", "--max-image-pixels", "10000", "--max-image-bytes", "20000",
    )  # fmt: skip


@pytest.fixture(scope="session")
def served_model(served_variant):
    """The served variant, loaded in the test process: the reference answers come from its ``generate``."""
    from lynx_zoo import load_pretrained

    return load_pretrained(served_variant)
