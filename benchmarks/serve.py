"""Serving throughput and latency: ``python -m lynx_zoo serve`` with dynamic batching vs the same server with
batching off (``--max-batch-size 1``: one request at a time), at 1, 8 and 32 concurrent clients.

Each client is a keep-alive HTTP connection in one asyncio loop of this process (a lean client: see
``Connection``), asking one question about one rendered shapes scene per request (a PNG data URL; the chat
page's example scenes) with the variant's own generation settings, and sending its next request when the
answer arrives. Per level: a warm-up, then
``--seconds`` of measurement; requests/s, p50 and p95 latency. The servers run as child processes, one after
the other, started with the command line a user types.

Targets (issue 17): at 32 clients, at least 3x the unbatched requests/s; at 8 clients, a p95 latency at most
2x the single-client latency (p50 at 1 client, same server).

    python benchmarks/serve.py                      # the demo variant, lynx-demo
    python benchmarks/serve.py --variant FOLDER     # any variant
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
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from scale_common import report

REPO = Path(__file__).resolve().parents[1]


class Server:
    """``python -m lynx_zoo serve`` in a child process on a free loopback port."""

    def __init__(self, args: list[str]) -> None:
        command = [sys.executable, "-m", "lynx_zoo", "serve", "--port", "0", *args]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        self.command = " ".join(["python", *command[1:]])
        self.process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.url, started, self.log = "", threading.Event(), []
        threading.Thread(target=self._read, args=(started,), daemon=True).start()
        if not started.wait(300):
            self.process.kill()
            raise RuntimeError("the server did not start:\n" + "".join(self.log[-30:]))

    def _read(self, started: threading.Event) -> None:
        for line in self.process.stdout:
            self.log.append(line)
            if line.startswith("serving ") and not started.is_set():
                self.url = line.split(" on ", 1)[1].split()[0]
                started.set()

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

    async def post(self, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
        head = f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
        self.writer.write(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
        await self.writer.drain()
        status = int((await self.reader.readline()).split()[1])
        length = 0
        while (line := await self.reader.readline()) != b"\r\n":
            name, _, value = line.decode().partition(":")
            if name.lower() == "content-length":
                length = int(value)
        return status, json.loads(await self.reader.readexactly(length))


async def load(url: str, model: str, clients: int, seconds: float, requests: list[tuple[str, str]]) -> list[float]:
    """Latencies (s) of the requests that ``clients`` closed-loop clients complete in ``seconds``."""
    deadline = time.perf_counter() + seconds
    latencies: list[float] = []
    bodies = [
        json.dumps(
            {
                "model": model,
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": q}],
                    }
                ],
            }
        ).encode()
        for image, q in requests
    ]

    async def client(index: int) -> None:
        turn = index
        async with Connection(url) as connection:
            while time.perf_counter() < deadline:
                start = time.perf_counter()
                status, reply = await connection.post("/v1/chat/completions", bodies[turn % len(bodies)])
                if time.perf_counter() <= deadline:
                    latencies.append(time.perf_counter() - start)
                if status != 200 or reply["choices"][0]["message"]["content"] is None:
                    raise RuntimeError(f"request failed: {status} {reply}")
                turn += clients

    await asyncio.gather(*(client(i) for i in range(clients)))
    return latencies


def measure(server: Server, mode: str, model: str, levels: list[int], args: argparse.Namespace) -> list[dict]:
    requests = server.examples()
    rows = []
    for clients in levels:
        asyncio.run(load(server.url, model, clients, args.warmup, requests))
        before = server.health()
        start = time.perf_counter()
        latencies = asyncio.run(load(server.url, model, clients, args.seconds, requests))
        elapsed = time.perf_counter() - start
        after = server.health()
        batches = after["batches"] - before["batches"]
        ms = sorted(1000 * t for t in latencies)
        rows.append(
            {
                "server": mode,
                "clients": clients,
                "requests": len(latencies),
                "requests_per_s": len(latencies) / args.seconds,
                "p50_ms": statistics.median(ms),
                "p95_ms": ms[min(len(ms) - 1, round(0.95 * (len(ms) - 1)))],
                "mean_batch": (after["requests"] - before["requests"]) / max(1, batches),
                "wall_s": elapsed,
            }
        )
        print(
            f"{mode:>10} {clients:>3} clients: {rows[-1]['requests_per_s']:.1f} req/s, p50 {rows[-1]['p50_ms']:.0f} ms"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="lynx-demo", help="a variant name, folder or checkpoint")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--seconds", type=float, default=15.0, help="measured time per level")
    parser.add_argument("--warmup", type=float, default=3.0, help="unmeasured time before each level")
    parser.add_argument("--max-batch-size", type=int, default=32, help="of the batched server")
    parser.add_argument("--max-wait-ms", type=float, default=10.0, help="of the batched server")
    args = parser.parse_args()

    common = ["--variant", args.variant, "--max-queue", str(4 * max(args.clients))]
    modes = {
        "batched": ["--max-batch-size", str(args.max_batch_size), "--max-wait-ms", str(args.max_wait_ms)],
        "unbatched": ["--max-batch-size", "1", "--max-wait-ms", "0"],
    }
    rows, commands = [], {}
    for mode, flags in modes.items():
        server = Server(common + flags)
        commands[mode] = server.command
        try:
            with urllib.request.urlopen(server.url + "/v1/models", timeout=10) as response:
                model = json.loads(response.read())["data"][0]["id"]
            rows += measure(server, mode, model, args.clients, args)
        finally:
            server.stop()

    by = {(r["server"], r["clients"]): r for r in rows}
    top, mid = max(args.clients), 8 if 8 in args.clients else sorted(args.clients)[len(args.clients) // 2]
    speedup = by[("batched", top)]["requests_per_s"] / by[("unbatched", top)]["requests_per_s"]
    single = by[("batched", min(args.clients))]["p50_ms"]
    latency_ratio = by[("batched", mid)]["p95_ms"] / single
    targets = {
        f"speedup_at_{top}_clients": round(speedup, 2),
        "speedup_target": 3.0,
        f"p95_at_{mid}_clients_over_single_client_p50": round(latency_ratio, 2),
        "latency_ratio_target": 2.0,
        "met": speedup >= 3.0 and latency_ratio <= 2.0,
    }
    print(json.dumps(targets, indent=2))
    columns = ["server", "clients", "requests", "requests_per_s", "p50_ms", "p95_ms", "mean_batch"]
    report("serve", rows, columns, variant=args.variant, servers=commands, settings=vars(args), targets=targets)


if __name__ == "__main__":
    main()
