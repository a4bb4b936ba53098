"""Shared fixtures: tiny models built from configs (random weights) and a small rendered data set."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import lightning
import pytest
import torch

from lynx_zoo import (
    AdapterConfig,
    BridgeConfig,
    CrossAttnConfig,
    LLMConfig,
    OptimizerConfig,
    PrefixLynx,
    PromptConfig,
    VisionConfig,
)
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


# cross-attention blocks for the tiny LLM (width 32): every 2nd layer from layer 1
TINY_CROSS_ATTN = CrossAttnConfig(every=2, start=1, num_heads=2, head_dim=8, ff_mult=2)


def open_gates(model, attn: float, ff: float | None = None) -> None:
    """Open a CA model's gates (closed at initialisation), so that the media change its outputs."""
    for block in model.fusion_blocks().values():
        block.attn_gate.data.fill_(attn)
        if ff is not None:
            block.ff_gate.data.fill_(ff)


def loss_and_grads(model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One training forward and backward of a collated batch: the loss and every gradient, by parameter name."""
    from lynx_zoo.fusion.base import model_inputs

    model.zero_grad()
    loss = model(**model_inputs(batch)).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def tiny_checkpoint(path: Path, seed: int, class_path: str | None) -> Path:
    """A tiny random PT model saved as Lightning does (``class_path``: what LightningCLI records)."""
    torch.manual_seed(seed)
    model = PrefixLynx(**tiny_configs(eval_generation={"max_new_tokens": 3}))
    with torch.no_grad():  # special tokens never win: the random model always answers with words
        model.llm.get_output_embeddings().weight[model.tokenizer.all_special_ids] = 0
    hparams = dict(model.hparams) | ({"_class_path": class_path} if class_path else {})
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint = {"state_dict": model.state_dict(), "hyper_parameters": hparams}
    torch.save({**checkpoint, "pytorch-lightning_version": lightning.__version__}, path)
    return path


@pytest.fixture
def make_tiny():
    """``make_tiny(cls=PrefixLynx, **overrides)`` -> a tiny model with fixed random weights."""

    def make(cls=PrefixLynx, seed: int = 0, **overrides):
        torch.manual_seed(seed)
        return cls(**tiny_configs(**overrides))

    return make


@pytest.fixture(autouse=True)
def restored_environment():
    """Every test ends with the environment it started with. Lightning writes the variables of a distributed run
    into ``os.environ`` (``MASTER_PORT``: the first free port it found; ``LOCAL_RANK``, ``NODE_RANK``, ...): left
    there, a later multi-process run would bind a port another process may have taken since, or take itself for
    an already launched rank and wait forever for the others."""
    before = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(before)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread (and do not fight other jobs for a small machine's cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory) -> Path:
    """A small rendered shapes VQA set on disk (32 px, 64 training and 16 held-out images)."""
    root = tmp_path_factory.mktemp("shapes")
    write_shapes_vqa(root, num_train=64, num_val=16, image_size=32, seed=1)
    return root


@pytest.fixture(scope="session")
def llama_tokenizer_dir(tmp_path_factory) -> str:
    """A folder with the LLaMA-layout SentencePiece tokenizer (32,000 pieces) shipped in the mistral-common wheel."""
    spec = importlib.util.find_spec("mistral_common")
    source = Path(spec.origin).parent / "data" / "tokenizer.model.v1"
    target = tmp_path_factory.mktemp("llama_tok")
    shutil.copy(source, target / "tokenizer.model")
    return str(target)


# ------------------------------------------------------------------------------------------- the shipped configs
CONFIG_ROOT = REPO / "configs"
# every config, with the base it overlays: grid/ overlays the real Lynx, demo_grid/ the demo, study/ the frozen-LLM
# study's reference row (stage 0 stands alone), and the two training stages of Lynx each with its data mixture
CONFIGS = (
    [[p] for p in sorted(CONFIG_ROOT.glob("*.yaml"))]
    + [[CONFIG_ROOT / "pt_vicuna_420.yaml", p] for p in sorted((CONFIG_ROOT / "grid").glob("*.yaml"))]
    + [[CONFIG_ROOT / "demo.yaml", p] for p in sorted((CONFIG_ROOT / "demo_grid").glob("*.yaml"))]
    + [[CONFIG_ROOT / "study" / "stage0.yaml"], [CONFIG_ROOT / "study" / "pt.yaml"]]
    + [
        [CONFIG_ROOT / "study" / "pt.yaml", p]
        for p in sorted((CONFIG_ROOT / "study").glob("*.yaml"))
        if p.stem not in ("pt", "stage0")
    ]
    + [
        [
            CONFIG_ROOT / "pt_vicuna_420.yaml",
            CONFIG_ROOT / "stages" / f"{stage}.yaml",
            CONFIG_ROOT / "data" / f"lynx_{d}.yaml",
        ]
        for stage, d in (("stage1_224", "stage1"), ("stage1_420", "stage1"), ("stage2", "stage2"))
    ]
)


def config_args(paths: list[Path]) -> list[str]:
    """``--config`` arguments of ``fit`` for a base config and its overlays."""
    return [arg for path in paths for arg in ("--config", str(path))]


# reference sizes of the real Lynx (independent of the code that builds it)
ADAPTER = 2 * 4096 * 2048 + 2048 + 4096 + 2 * 4096 + 1  # down + up, their biases, the LayerNorm, the scale
LLAMA_7B = 6_738_415_616 + 2 * 4096  # LLaMA-7B plus the added [PAD] rows of the input and output embeddings
FRAME_POSITION = 5 * 1408  # (1, 5 frames, 1, EVA width)
# a gated block: LayerNorm, q + k + v + out (8 x 64 heads in width 4096), two gates, LN + 4x feed-forward
XATTN_BLOCK = 2 * 4096 + 4 * 4096 * 512 + 2 + 2 * 4096 + 2 * 4096 * 16384
# the grid rows: overlay -> (fusion, image size, LLM id, adapter layers, cross-attention layers, LLM trainable)
GRID = {
    "pt_llama_420": ("PrefixLynx", 420, "huggyllama/llama-7b", list(range(0, 32, 2)), [], False),
    "pt_vicuna_224": ("PrefixLynx", 224, "lmsys/vicuna-7b-v1.1", list(range(0, 32, 2)), [], False),
    "ca_vicuna_420": ("CrossAttnLynx", 420, "lmsys/vicuna-7b-v1.1", [], [3, 7, 11, 15, 19, 23, 27, 31], False),
    "ca_vicuna_420_trainable_llm": (
        "CrossAttnLynx",
        420,
        "lmsys/vicuna-7b-v1.1",
        [],
        [3, 7, 11, 15, 19, 23, 27, 31],
        True,
    ),
    "adapters_every_layer": ("PrefixLynx", 420, "lmsys/vicuna-7b-v1.1", list(range(32)), [], False),
    "adapters_every_2nd": ("PrefixLynx", 420, "lmsys/vicuna-7b-v1.1", list(range(0, 32, 2)), [], False),
    "adapters_none": ("PrefixLynx", 420, "lmsys/vicuna-7b-v1.1", [], [], False),
}


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
