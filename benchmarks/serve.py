"""Serving throughput and latency: ``python -m lynx_zoo serve`` with continuous batching vs the same server with
batching off (``--max-batch-size 1``: one request at a time), at 1, 8 and 32 concurrent clients.

The model is a PT variant over the 135M-parameter SmolLM2-Instruct (``configs/pt_smollm2.yaml``, untrained: a
random bridge; the cost per token is the trained model's), so that the model's compute, not HTTP, dominates.
Each client is a keep-alive HTTP connection in one asyncio loop of this process (a lean client: see
``Connection``) sending streamed requests: a question about one of the chat page's example scenes (a PNG data
URL), with or without a longer context before it, and ``max_tokens`` of 8, 16, 24 or 32 in turn; it sends its next
request when the answer has arrived. Per level: a warm-up, then ``--seconds`` of measurement; requests/s, p50 and
p95 latency, p50 and p95 time to first token, mean sequences per decode step. Both servers run as child processes
started with the command line a user types, and the levels alternate between them, ``--repetitions`` times.

Targets (issue 26): at 32 clients, at least 4x the unbatched requests/s; at 8 clients, a p95 latency at most 2x the
single-client p50 (same server); time-to-first-token p95 reported. The table in docs/serving.md is rendered from
the results (``render_docs``; ``--render-docs`` redoes it from benchmarks/results/serve.json).

    python benchmarks/serve.py                        # PT over SmolLM2-135M, untrained bridge
    python benchmarks/serve.py --variant FOLDER       # any variant
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from scale_common import RESULTS, report

REPO = Path(__file__).resolve().parents[1]


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

    async def stream(self, path: str, body: bytes) -> tuple[int, float | None, str]:
        """POST a streamed request: its status, the time its first content delta arrived, and its text."""
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
            return status, None, (await self.reader.readexactly(length)).decode()
        first, text, buffer = None, "", b""
        while size := int((await self.reader.readline()).strip(), 16):
            buffer += await self.reader.readexactly(size)
            await self.reader.readexactly(2)
            while b"\n\n" in buffer:
                event, buffer = buffer.split(b"\n\n", 1)
                data = event.decode().removeprefix("data: ")
                if data == "[DONE]":
                    continue
                for choice in json.loads(data).get("choices", []):
                    if choice["delta"].get("content"):
                        first = first or time.perf_counter()
                        text += choice["delta"]["content"]
        await self.reader.readexactly(2)
        return status, first, text


#: the requests' mix: short and long prompts (a question, or a question after a longer context) and budgets
CONTEXTS = ("", "Look carefully at every shape in the scene, its colour, its size and where it lies. ")
MAX_TOKENS = (8, 16, 24, 32)


async def load(
    url: str, model: str, clients: int, seconds: float, requests: list[tuple[str, str]]
) -> tuple[list[float], list[float]]:
    """Latencies and times to first token (s) of the requests that ``clients`` closed-loop clients complete in
    ``seconds`` (streamed, so that the first token's arrival is seen)."""
    deadline = time.perf_counter() + seconds
    latencies: list[float] = []
    first_tokens: list[float] = []
    bodies = [
        json.dumps(
            {
                "model": model,
                "stream": True,
                "max_tokens": MAX_TOKENS[k % len(MAX_TOKENS)],
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": image}},
                            {"type": "text", "text": CONTEXTS[k % len(CONTEXTS)] + q},
                        ],
                    }
                ],
            }
        ).encode()
        for k, (image, q) in enumerate(requests)
    ]

    async def client(index: int) -> None:
        turn = index
        async with Connection(url) as connection:
            while time.perf_counter() < deadline:
                start = time.perf_counter()
                try:
                    status, first, text = await asyncio.wait_for(
                        connection.stream("/v1/chat/completions", bodies[turn % len(bodies)]), deadline - start
                    )
                except TimeoutError:  # abandoned at the deadline: closing the connection cancels it in the server
                    return
                if status != 200:
                    raise RuntimeError(f"request failed: {status} {text}")
                latencies.append(time.perf_counter() - start)
                first_tokens.append((first or time.perf_counter()) - start)
                turn += clients

    await asyncio.gather(*(client(i) for i in range(clients)))
    return latencies, first_tokens


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def measure(server: Server, mode: str, clients: int, repetition: int, args: argparse.Namespace) -> dict[str, Any]:
    """One level: warm-up, then ``args.seconds`` of ``clients`` closed-loop clients."""
    requests = server.examples()
    asyncio.run(load(server.url, server.model, clients, args.warmup, requests))
    before = server.health()
    latencies, first_tokens = asyncio.run(load(server.url, server.model, clients, args.seconds, requests))
    after = server.health()
    ms, ttft = [1000 * t for t in latencies], [1000 * t for t in first_tokens]
    steps = after["steps"] - before["steps"]
    rows_decoded = sum(after["step_rows"].get(k, 0) * int(k) for k in after["step_rows"]) - sum(
        before["step_rows"].get(k, 0) * int(k) for k in before["step_rows"]
    )
    row = {
        "server": mode,
        "clients": clients,
        "repetition": repetition,
        "requests": len(latencies),
        "requests_per_s": len(latencies) / args.seconds,
        "p50_ms": statistics.median(ms),
        "p95_ms": percentile(ms, 0.95),
        "ttft_p50_ms": statistics.median(ttft),
        "ttft_p95_ms": percentile(ttft, 0.95),
        "mean_step_rows": rows_decoded / max(1, steps),
    }
    print(
        f"{mode:>10} {clients:>3} clients #{repetition}: {row['requests_per_s']:.2f} req/s, p50 {row['p50_ms']:.0f} ms"
    )
    return row


def untrained_variant(config: str, out: Path) -> Path:
    """The model of a training config with its initial weights (seeded by the config, untrained), exported as a
    variant: the same architecture and cost per token as the trained variant, with no training run needed."""
    from lynx_zoo.hub import export_variant
    from lynx_zoo.training.lightning_cli import LynxCLI

    cli = LynxCLI(args=["--config", config, "--trainer.logger=false"], run=False)
    return export_variant(cli.model, out / "variant", name=f"{Path(config).stem}-untrained")


def summarize(rows: list[dict[str, Any]], clients: list[int]) -> dict[str, Any]:
    """The targets' figures per repetition (batched and unbatched levels of one repetition ran back to back), and
    their median, min and max over the repetitions."""
    by = {(r["server"], r["clients"], r["repetition"]): r for r in rows}
    top, mid, low = max(clients), 8 if 8 in clients else sorted(clients)[len(clients) // 2], min(clients)
    reps = sorted({r["repetition"] for r in rows})
    speedups = [by["batched", top, k]["requests_per_s"] / by["unbatched", top, k]["requests_per_s"] for k in reps]
    ratios = [by["batched", mid, k]["p95_ms"] / by["batched", low, k]["p50_ms"] for k in reps]
    ttft = [by["batched", mid, k]["ttft_p95_ms"] for k in reps]

    def spread(values: list[float]) -> dict[str, float]:
        return {
            "median": round(statistics.median(values), 2),
            "min": round(min(values), 2),
            "max": round(max(values), 2),
        }

    return {
        f"speedup_at_{top}_clients": spread(speedups),
        "speedup_target": 4.0,
        "speedup_met": min(speedups) >= 4.0,
        f"p95_at_{mid}_clients_over_single_client_p50": spread(ratios),
        "latency_ratio_target": 2.0,
        "latency_met": max(ratios) <= 2.0,
        f"ttft_p95_ms_at_{mid}_clients": spread(ttft),
    }


def render_table(record: dict[str, Any]) -> str:
    """The docs' table of a results record (docs/serving.md, between ``<!-- results:serve -->`` markers): per server
    and clients, the median over the repetitions and the range."""
    rows = record["rows"]
    keys = sorted({(r["clients"], r["server"]) for r in rows})
    lines = [
        "| server | clients | requests/s | p50 ms | p95 ms | TTFT p95 ms | sequences per step |",
        "|---|---|---|---|---|---|---|",
    ]
    for clients, server in keys:
        group = [r for r in rows if r["clients"] == clients and r["server"] == server]

        def cell(name: str, digits: int = 0, group: list[dict[str, Any]] = group) -> str:
            values = [r[name] for r in group]
            med = statistics.median(values)
            return f"{med:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"

        lines.append(
            f"| {server} | {clients} | {cell('requests_per_s', 2)} | {cell('p50_ms')} | {cell('p95_ms')} "
            f"| {cell('ttft_p95_ms')} | {cell('mean_step_rows', 1)} |"
        )
    return "\n".join(lines)


DOCS = REPO / "docs" / "serving.md"
MARKERS = ("<!-- results:serve -->", "<!-- /results:serve -->")


def render_docs(record: dict[str, Any], docs: Path = DOCS) -> str:
    """``docs`` with the table between its markers rendered from ``record``."""
    text = docs.read_text(encoding="utf-8")
    head, found, rest = text.partition(MARKERS[0])
    _, closed, tail = rest.partition(MARKERS[1])
    if not found or not closed:
        raise ValueError(f"{docs}: no {MARKERS[0]} ... {MARKERS[1]} block for the serving results")
    return f"{head}{MARKERS[0]}\n{render_table(record)}\n{MARKERS[1]}{tail}"


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
    parser.add_argument("--seconds", type=float, default=15.0, help="measured time per level")
    parser.add_argument("--warmup", type=float, default=3.0, help="unmeasured time before each level")
    parser.add_argument("--max-batch-size", type=int, default=32, help="of the batched server")
    parser.add_argument("--render-docs", action="store_true", help="only render docs/serving.md from the results")
    args = parser.parse_args()
    if args.render_docs:
        DOCS.write_text(render_docs(json.loads((RESULTS / "serve.json").read_text())), encoding="utf-8")
        return

    import torch

    scratch = tempfile.TemporaryDirectory()
    variant = args.variant or str(untrained_variant(args.untrained_config, Path(scratch.name)))
    common = ["--variant", variant, "--max-queue", str(4 * max(args.clients))]
    modes = {"batched": ["--max-batch-size", str(args.max_batch_size)], "unbatched": ["--max-batch-size", "1"]}
    # both servers run throughout (the idle one costs memory only) and the levels alternate between them, so that
    # the machine's other load weighs on both alike
    servers: dict[str, Server] = {}
    try:
        for mode, flags in modes.items():
            servers[mode] = Server(common + flags, Path(scratch.name) / f"{mode}.log")
        rows = [
            measure(servers[mode], mode, clients, k, args)
            for k in range(args.repetitions)
            for clients in args.clients
            for mode in modes
        ]
    finally:
        for server in servers.values():
            server.stop()
    targets = summarize(rows, args.clients)
    print(json.dumps(targets, indent=2))
    columns = ["server", "clients", "repetition", "requests_per_s", "p50_ms", "p95_ms", "ttft_p95_ms", "mean_step_rows"]
    served = args.variant or f"{args.untrained_config} (untrained)"
    path = report(
        "serve",
        rows,
        columns,
        variant=served,
        servers={mode: server.command for mode, server in servers.items()},
        settings=vars(args),
        cpu_capability=torch.backends.cpu.get_cpu_capability(),
        load_average_at_end=os.getloadavg(),
        targets=targets,
    )
    DOCS.write_text(render_docs(json.loads(path.read_text())), encoding="utf-8")
    scratch.cleanup()


if __name__ == "__main__":
    main()
