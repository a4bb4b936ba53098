"""Serving throughput and latency: ``python -m lynx_zoo serve`` with continuous batching vs the same server with
batching off (``--max-batch-size 1``: one request at a time), at 1, 8 and 32 concurrent clients.

The model is a PT variant over the 135M-parameter SmolLM2-Instruct (``configs/pt_smollm2.yaml``, untrained: a
random bridge; the cost per token is the trained model's), so that the model's compute, not HTTP, dominates.
Each client is a keep-alive HTTP connection in one asyncio loop of this process (a lean client: see
``Connection``) sending streamed requests: a question about one of the chat page's example scenes (a PNG data
URL), with or without a longer context before it, and ``max_tokens`` of 8, 16, 24 or 32 in turn; it sends its next
request when the answer has arrived. A level (a server and a number of clients) runs a fixed number of requests:
``--requests-per-client`` each, more where that makes fewer than ``--min-requests`` in all, and ends when all have
been answered, so that it cannot end empty (a request that fails, or takes over ``--request-timeout`` seconds, is
an error naming the level). Per level: requests/s and generated tokens/s over the level's wall time, p50 and p95
latency, p50 and p95 time to first token, mean sequences per decode step and requests per prefill. Both servers run
as child processes started with the command line a user types, each warmed up once, and the levels alternate
between them (which one goes first alternates too), ``--repetitions`` times.

Targets (issue 26): at 32 clients, at least 4x the unbatched requests/s; at 8 clients, a p95 latency at most 2x the
single-client p50 (same server); time-to-first-token p95 reported. Writes benchmarks/results/serve.json;
``python benchmarks/render_docs.py`` renders docs/serving.md's block from it.

    python benchmarks/serve.py                        # PT over SmolLM2-135M, untrained bridge
    python benchmarks/serve.py --variant FOLDER       # any variant
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from record import finish_record, run_record

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


class Server:
    """``python -m lynx_zoo serve`` in a child process on a free loopback port; its log goes to a file (a pipe
    would need a reader thread in this process, which would compete with the clients)."""

    def __init__(self, args: list[str], log: Path) -> None:
        command = [sys.executable, "-m", "lynx_zoo", "serve", "--port", "0", *args]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        self.command = " ".join(["python", *command[1:]])
        self.log = log
        with log.open("w") as output:
            self.process = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 300
        while not (started := [line for line in log.read_text().splitlines() if line.startswith("serving ")]):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.process.kill()
                raise RuntimeError("the server did not start:\n" + log.read_text()[-3000:])
            time.sleep(0.1)
        self.started = started[0]  # "serving NAME on URL (batching, torch threads, key; ...)"
        self.url = started[0].split(" on ", 1)[1].split()[0]

    @property
    def model(self) -> str:
        with urllib.request.urlopen(self.url + "/v1/models", timeout=10) as response:
            return json.loads(response.read())["data"][0]["id"]

    def health(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.url + "/health", timeout=10) as response:
            return json.loads(response.read())

    def examples(self) -> list[tuple[str, str]]:
        """(PNG data URL, question) pairs of the server's example scenes."""
        with urllib.request.urlopen(self.url + "/info", timeout=10) as response:
            info = json.loads(response.read())
        pairs = []
        for example in info["examples"]:
            with urllib.request.urlopen(self.url + example["url"], timeout=10) as response:
                url = "data:image/png;base64," + base64.b64encode(response.read()).decode()
            pairs.extend((url, question) for question in example["questions"])
        return pairs

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(60)


class Connection:
    """A keep-alive HTTP/1.1 connection on asyncio streams that POSTs JSON: the load generator shares the 2 cores
    with the server, and this costs ~0.3 ms of CPU a request where the ``openai`` client costs ~5.6 ms (measured
    here), which would make the benchmark measure the client."""

    def __init__(self, url: str) -> None:
        host, _, port = url.removeprefix("http://").partition(":")
        self.host, self.port = host, int(port)

    async def __aenter__(self) -> Connection:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.writer.close()
        await self.writer.wait_closed()

    async def stream(self, path: str, body: bytes) -> tuple[int, float | None, int, str]:
        """POST a streamed request: its status, the time its first content delta arrived, the tokens generated (its
        usage chunk) and its text (the error body if it failed)."""
        head = f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
        self.writer.write(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
        await self.writer.drain()
        status = int((await self.reader.readline()).split()[1])
        length, chunked = 0, False
        while (line := await self.reader.readline()) != b"\r\n":
            name, _, value = line.decode().partition(":")
            chunked |= name.lower() == "transfer-encoding" and "chunked" in value
            length = int(value) if name.lower() == "content-length" else length
        if not chunked:
            return status, None, 0, (await self.reader.readexactly(length)).decode()
        first, tokens, text, buffer = None, 0, "", b""
        while size := int((await self.reader.readline()).strip(), 16):
            buffer += await self.reader.readexactly(size)
            await self.reader.readexactly(2)
            while b"\n\n" in buffer:
                event, buffer = buffer.split(b"\n\n", 1)
                data = event.decode().removeprefix("data: ")
                if data == "[DONE]":
                    continue
                chunk = json.loads(data)
                if "error" in chunk:
                    return 500, first, tokens, json.dumps(chunk["error"])
                tokens = (chunk.get("usage") or {}).get("completion_tokens", tokens)
                for choice in chunk.get("choices", []):
                    if choice["delta"].get("content"):
                        first = first or time.perf_counter()
                        text += choice["delta"]["content"]
        await self.reader.readexactly(2)
        return status, first, tokens, text


#: the requests' mix: short and long prompts (a question, or a question after a longer context) and budgets
CONTEXTS = ("", "Look carefully at every shape in the scene, its colour, its size and where it lies. ")
MAX_TOKENS = (8, 16, 24, 32)


def request_bodies(model: str, examples: list[tuple[str, str]]) -> list[bytes]:
    """The streamed chat requests the clients send in turn: every example question, with each context and budget
    (``max_tokens`` cycles faster than the context, so that every pairing occurs)."""
    bodies = []
    for k, (image, question) in enumerate(examples * len(CONTEXTS)):
        content = [
            {"type": "image_url", "image_url": {"url": image}},
            {"type": "text", "text": CONTEXTS[(k // len(examples)) % len(CONTEXTS)] + question},
        ]
        body = {
            "model": model,
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": MAX_TOKENS[k % len(MAX_TOKENS)],
            "messages": [{"role": "user", "content": content}],
        }
        bodies.append(json.dumps(body).encode())
    return bodies


@dataclass
class Level:
    """What one level measured: per request its latency, its time to first token (s) and its generated tokens;
    and the level's wall time."""

    name: str
    latencies: list[float] = field(default_factory=list)
    first_tokens: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    seconds: float = 0.0


async def load(url: str, bodies: list[bytes], clients: int, per_client: int, timeout: float, name: str) -> Level:
    """``clients`` closed-loop clients send ``per_client`` requests each (client ``i`` starts at body ``i``) and the
    level ends when every one has been answered. A failed or timed-out request is an error naming the level."""
    level = Level(name)

    async def client(index: int) -> None:
        async with Connection(url) as connection:
            for turn in range(index, index + per_client * clients, clients):
                start = time.perf_counter()
                try:
                    status, first, tokens, text = await asyncio.wait_for(
                        connection.stream("/v1/chat/completions", bodies[turn % len(bodies)]), timeout
                    )
                except TimeoutError:
                    raise RuntimeError(f"{name}: a request took over {timeout:.0f} s (--request-timeout)") from None
                if status != 200:
                    raise RuntimeError(f"{name}: a request failed: {status} {text[:500]}")
                level.latencies.append(time.perf_counter() - start)
                level.first_tokens.append((first or time.perf_counter()) - start)
                level.tokens.append(tokens)

    started = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    level.seconds = time.perf_counter() - started
    return level


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile of ``values`` (the nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def counted(health: dict[str, Any], key: str) -> tuple[int, int]:
    """(events, sum of their sizes) of one of ``/health``'s size histograms (``step_rows``, ``prefill_sizes``)."""
    sizes = health.get(key, {})
    return sum(sizes.values()), sum(int(k) * v for k, v in sizes.items())


def mean_size(before: dict[str, Any], after: dict[str, Any], key: str) -> float:
    (events_before, total_before), (events_after, total_after) = counted(before, key), counted(after, key)
    return round((total_after - total_before) / max(1, events_after - events_before), 2)


def measure(
    server: Server, bodies: list[bytes], mode: str, clients: int, repetition: int, args: argparse.Namespace
) -> dict[str, Any]:
    """One level: ``clients`` closed-loop clients, a fixed number of requests (see the module)."""
    name = f"level {mode} server, {clients} clients, repetition {repetition}"
    per_client = max(args.requests_per_client, math.ceil(args.min_requests / clients))
    before = server.health()
    level = asyncio.run(load(server.url, bodies, clients, per_client, args.request_timeout, name))
    after = server.health()
    if not level.latencies:
        raise RuntimeError(f"{name}: no request was answered")
    ms, ttft = [1000 * t for t in level.latencies], [1000 * t for t in level.first_tokens]
    row = {
        "server": mode,
        "clients": clients,
        "repetition": repetition,
        "requests": len(ms),
        "seconds": round(level.seconds, 2),
        "requests_per_s": round(len(ms) / level.seconds, 3),
        "tokens_per_s": round(sum(level.tokens) / level.seconds, 2),
        "mean_tokens": round(statistics.mean(level.tokens), 2),
        "p50_ms": round(statistics.median(ms), 1),
        "p95_ms": round(percentile(ms, 0.95), 1),
        "ttft_p50_ms": round(statistics.median(ttft), 1),
        "ttft_p95_ms": round(percentile(ttft, 0.95), 1),
        "mean_step_rows": mean_size(before, after, "step_rows"),
        "mean_prefill_size": mean_size(before, after, "prefill_sizes"),
    }
    print(
        f"{mode:>10} {clients:>3} clients #{repetition}: {row['requests']} requests in {row['seconds']:.1f} s, "
        f"{row['requests_per_s']:.2f} req/s, p50 {row['p50_ms']:.0f} ms, p95 {row['p95_ms']:.0f} ms, "
        f"TTFT p95 {row['ttft_p95_ms']:.0f} ms, {row['mean_step_rows']} sequences per step",
        flush=True,
    )
    return row


def untrained_variant(config: str, out: Path) -> Path:
    """The model of a training config with its initial weights (seeded by the config, untrained), exported as a
    variant: the same architecture and cost per token as the trained variant, with no training run needed."""
    from lynx_zoo.hub import export_variant
    from lynx_zoo.training.lightning_cli import LynxCLI

    cli = LynxCLI(args=["--config", config, "--trainer.logger=false"], run=False)
    return export_variant(cli.model, out / "variant", name=f"{Path(config).stem}-untrained")


def spread(values: list[float]) -> dict[str, float]:
    """The median, min and max of ``values``."""
    return {"median": round(statistics.median(values), 2), "min": round(min(values), 2), "max": round(max(values), 2)}


def summarize(rows: list[dict[str, Any]], clients: list[int]) -> dict[str, Any]:
    """The targets' figures per repetition (the levels of one repetition ran back to back), their median, min and
    max over the repetitions, and whether every repetition met each target."""
    by = {(r["server"], r["clients"], r["repetition"]): r for r in rows}
    top, low = max(clients), min(clients)
    mid = 8 if 8 in clients else sorted(clients)[len(clients) // 2]
    reps = sorted({r["repetition"] for r in rows})
    speedups = [by["batched", top, k]["requests_per_s"] / by["unbatched", top, k]["requests_per_s"] for k in reps]
    ratios = [by["batched", mid, k]["p95_ms"] / by["batched", low, k]["p50_ms"] for k in reps]
    return {
        "speedup": {"clients": top, "target": 4.0, **spread(speedups), "met": min(speedups) >= 4.0},
        "latency_ratio": {
            "clients": mid,
            "baseline_clients": low,
            "target": 2.0,
            **spread(ratios),
            "met": max(ratios) <= 2.0,
        },  # fmt: skip
        "ttft_p95_ms": {"clients": mid, **spread([by["batched", mid, k]["ttft_p95_ms"] for k in reps])},
    }


def warm_up(server: Server, bodies: list[bytes], args: argparse.Namespace) -> None:
    """A few requests alone and eight at once, unmeasured: the first calls' costs (allocations, lazy imports)."""
    for clients in (1, 8):
        asyncio.run(load(server.url, bodies, clients, 1, args.request_timeout, f"warm-up, {clients} clients"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--variant", default=None, help="a variant name, folder or checkpoint")
    source.add_argument(
        "--untrained-config",
        default="configs/pt_smollm2.yaml",
        help="serve the model of this training config, untrained (default: PT over SmolLM2-135M)",
    )
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--requests-per-client", type=int, default=2, help="requests each client sends per level")
    parser.add_argument("--min-requests", type=int, default=20, help="requests per level at least (all clients)")
    parser.add_argument("--request-timeout", type=float, default=600.0, help="seconds a request may take at most")
    parser.add_argument("--max-batch-size", type=int, default=32, help="of the batched server")
    parser.add_argument("--out", type=Path, default=RESULTS / "serve.json")
    args = parser.parse_args()
    if args.repetitions < 1 or args.requests_per_client < 1 or min(args.clients) < 1:
        parser.error("--repetitions, --requests-per-client and --clients must be at least 1")
    machine = run_record()

    scratch = tempfile.TemporaryDirectory()
    variant = args.variant or str(untrained_variant(args.untrained_config, Path(scratch.name)))
    common = ["--variant", variant, "--max-queue", str(4 * max(args.clients))]
    modes = {"batched": ["--max-batch-size", str(args.max_batch_size)], "unbatched": ["--max-batch-size", "1"]}
    # both servers run throughout (the idle one costs memory only) and the levels alternate between them, so that
    # the machine's other load weighs on both alike
    servers: dict[str, Server] = {}
    rows = []
    try:
        for mode, flags in modes.items():
            servers[mode] = Server(common + flags, Path(scratch.name) / f"{mode}.log")
            print(servers[mode].started, flush=True)
        bodies = request_bodies(servers["batched"].model, servers["batched"].examples())  # one variant: same ids
        for server in servers.values():
            warm_up(server, bodies, args)
        for k in range(args.repetitions):
            for clients in args.clients:
                order = list(modes) if k % 2 == 0 else list(modes)[::-1]
                rows.extend(measure(servers[mode], bodies, mode, clients, k, args) for mode in order)
    finally:
        for server in servers.values():
            server.stop()
    targets = summarize(rows, args.clients)
    print(json.dumps(targets, indent=2))
    result = {
        "command": machine["command"],
        "machine": finish_record(machine),
        "variant": args.variant or f"{args.untrained_config} (untrained)",
        "servers": {mode: {"command": s.command, "started": s.started} for mode, s in servers.items()},
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "rows": rows,
        "targets": targets,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}; render the docs with: python benchmarks/render_docs.py")
    scratch.cleanup()


if __name__ == "__main__":
    main()
