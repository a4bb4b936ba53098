"""Dynamic batching: requests wait in a bounded queue, one thread runs the model on batches of them.

A batch holds requests of one kind (images, videos or text only) and one set of generation settings, since
``generate`` takes one media tensor and one configuration. With greedy or sampled decoding (one beam) the
requests of a batch may ask for different ``max_tokens``: each sequence stops at its own budget, and its answer
is delivered the moment it ends (streamed token by token when asked), not when the longest one ends.
A batch that fails is run again request by request, so only the request at fault gets the error.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from lynx_zoo.data.processor import Sample
from lynx_zoo.fusion.base import LynxModel
from lynx_zoo.serving.protocol import ChatRequest

log = logging.getLogger(__name__)


@dataclass
class Delta:
    """New text of choice ``index`` (streamed requests only)."""

    index: int
    text: str


@dataclass
class Finished:
    """Choice ``index`` is complete."""

    index: int
    text: str
    finish_reason: str
    completion_tokens: int


@dataclass
class Failed:
    """The request could not be answered."""

    message: str


Event = Delta | Finished | Failed


class Overloaded(Exception):
    """The queue is full (or the server is stopping): try again after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class ChoiceState:
    ids: list[int] = field(default_factory=list)
    sent: str = ""
    finished: bool = False


@dataclass(eq=False)
class Job:
    """One request in the engine: its inputs, its settings, and where its events go (an asyncio queue)."""

    request: ChatRequest
    media: torch.Tensor | None
    settings: dict[str, Any]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    enqueued: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    prompt_tokens: int = 0
    choices: list[ChoiceState] = field(default_factory=list)
    batch_key: tuple = field(init=False)  # requests with equal keys can share a batch

    def __post_init__(self) -> None:
        self.choices = [ChoiceState() for _ in range(self.request.n)]
        # once per request, not at every wake-up of the engine: its settings do not change
        settings = dict(self.settings)
        if int(settings.get("num_beams", 1)) == 1:
            settings.pop("max_new_tokens")  # each sequence keeps its own budget
        self.batch_key = self.request.kind, self.request.n, tuple(sorted((k, repr(v)) for k, v in settings.items()))

    @property
    def budget(self) -> int:
        return int(self.settings["max_new_tokens"])

    def emit(self, event: Event) -> None:
        """Hand an event to the request's handler (thread-safe)."""
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


@dataclass
class EngineStats:
    """What the engine has done (``GET /health``)."""

    requests: int = 0
    batches: int = 0
    failed_batches: int = 0
    dropped_sequences: int = 0  # stopped early because their client went away
    batch_sizes: Counter = field(default_factory=Counter)
    batch_seconds: float = 0.0  # moving average of one batch's wall time

    @property
    def largest_batch(self) -> int:
        return max(self.batch_sizes, default=0)

    def record(self, size: int, seconds: float) -> None:
        self.requests += size
        self.batches += 1
        self.batch_sizes[size] += 1
        self.batch_seconds = seconds if self.batches == 1 else 0.8 * self.batch_seconds + 0.2 * seconds


class Engine:
    """Runs a model on batches of queued requests in one background thread.

    Args:
        model: the model, in eval mode, on its device.
        max_batch_size: sequences generated together at most (a request asks for ``n``); 1 turns batching off.
        max_wait_s: how long a batch waits at most for requests to fill it, from its oldest request's arrival or
            from the end of the previous batch, whichever is later; it starts earlier when it holds as many
            sequences as the previous batch did.
        max_queue: requests waiting at most; :meth:`submit` raises :class:`Overloaded` beyond.
    """

    def __init__(self, model: LynxModel, max_batch_size: int, max_wait_s: float, max_queue: int) -> None:
        self.model = model
        self.max_batch_size, self.max_wait_s, self.max_queue = max_batch_size, max_wait_s, max_queue
        self.stats = EngineStats()
        # a batch starts as soon as it is as large as the previous one (as many as the clients keeping the server
        # busy, so a lone client does not wait), or when its oldest request has waited max_wait_s
        self._expected_rows = max_batch_size
        self._free_since = 0.0
        self._pending: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._closed = False
        self._thread = threading.Thread(target=self._run_forever, name="lynx-serve-engine", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop after the batch in progress; requests still queued get a :class:`Failed` event."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        with self._cond:
            while self._pending:
                self._pending.popleft().emit(Failed("the server is shutting down"))

    @property
    def queued(self) -> int:
        return len(self._pending)

    def retry_after(self) -> int:
        """Seconds until the queue has room, about: the batches ahead times a batch's time."""
        batches_ahead = len(self._pending) / self.max_batch_size + 1
        return max(1, math.ceil(batches_ahead * self.stats.batch_seconds))

    def check_capacity(self) -> None:
        """Raise :class:`Overloaded` if a request submitted now would be refused."""
        if self._closed:
            raise Overloaded("the server is shutting down", 5)
        if len(self._pending) >= self.max_queue:
            raise Overloaded(
                f"the server is busy: {len(self._pending)} requests are waiting (--max-queue {self.max_queue}); "
                "retry after the time in Retry-After",
                self.retry_after(),
            )

    def submit(self, job: Job) -> None:
        """Queue a request, or raise :class:`Overloaded` when the queue is full."""
        with self._cond:
            self.check_capacity()
            self._pending.append(job)
            self._cond.notify()

    # ------------------------------------------------------------------ the engine thread
    def _run_forever(self) -> None:
        while (batch := self._take_batch()) is not None:
            self._run_isolated(batch)
            self._free_since = time.monotonic()

    def _take_batch(self) -> list[Job] | None:
        with self._cond:
            while True:
                while self._pending and self._pending[0].cancelled:
                    self._pending.popleft()
                if self._closed:
                    return None
                if self._pending:
                    break
                self._cond.wait()
            head = self._pending[0]
            # waiting for the batch to fill starts when the request arrived or, if the engine was busy then, when
            # the engine became free: the clients of the batch that just ended are about to send their next requests
            deadline = max(head.enqueued, self._free_since) + self.max_wait_s
            while True:
                batch, rows = self._compatible_with(head)
                remaining = deadline - time.monotonic()
                if rows >= self._expected_rows or remaining <= 0 or self._closed:
                    break
                self._cond.wait(remaining)
            for job in batch:
                self._pending.remove(job)
            self._expected_rows = min(self.max_batch_size, rows)
            return batch

    def _compatible_with(self, head: Job) -> tuple[list[Job], int]:
        """``head`` and the queued requests that can join its batch, oldest first, and their sequences."""
        batch, rows = [head], head.request.n
        for job in list(self._pending)[1:]:
            if rows >= self.max_batch_size:
                break
            if not job.cancelled and rows + job.request.n <= self.max_batch_size and job.batch_key == head.batch_key:
                batch.append(job)
                rows += job.request.n
        return batch, rows

    def _run_isolated(self, jobs: list[Job]) -> None:
        """Run a batch; if it fails, run its requests one by one so that only the one at fault fails."""
        jobs = [j for j in jobs if not j.cancelled and not all(c.finished for c in j.choices)]
        if not jobs:
            return
        try:
            self._generate(jobs)
        except Exception as err:  # any failure of one request must not reach the others
            self.stats.failed_batches += 1
            if len(jobs) == 1:
                log.exception("generation failed for one request")
                jobs[0].emit(Failed(f"generation failed: {type(err).__name__}: {err}"))
                return
            log.warning("a batch of %d requests failed (%s); running them one by one", len(jobs), err)
            for job in jobs:
                for choice in job.choices:
                    choice.ids = []
                self._run_isolated([job])

    def _generate(self, jobs: list[Job]) -> None:
        model, started = self.model, time.perf_counter()
        prompts = model.processor.prompts([Sample(j.request.instruction, history=j.request.history) for j in jobs])
        for job, mask in zip(jobs, prompts["attention_mask"]):
            job.prompt_tokens = int(mask.sum())
        media = None if jobs[0].media is None else torch.stack([j.media for j in jobs]).to(model.device)
        settings = dict(jobs[0].settings)
        n = jobs[0].request.n
        if n > 1:
            settings["num_return_sequences"] = n
        rows = [(job, index) for job in jobs for index in range(n)]
        if int(settings.get("num_beams", 1)) == 1:
            settings["max_new_tokens"] = max(j.budget for j in jobs)
            settings["stopping_criteria"] = StoppingCriteriaList([BatchProgress(rows, self)])
        with torch.no_grad():
            ids = model.generate_ids(
                prompts["input_ids"].to(model.device), prompts["attention_mask"].to(model.device), media, **settings
            )
        for (job, index), row in zip(rows, ids.tolist()):
            if not job.choices[index].finished:  # beam search, or a stop that the tracker did not see
                job.choices[index].ids = row
                self.finish(job, index)
        self.stats.record(len(jobs), time.perf_counter() - started)

    # ------------------------------------------------------------------ per sequence
    def _text(self, ids: list[int]) -> str:
        return self.model.decode(torch.tensor([ids], dtype=torch.long))[0]

    def stream_delta(self, job: Job, index: int) -> None:
        """Send the new, stable part of a streamed answer (not trailing spaces or a half-decoded character)."""
        choice = job.choices[index]
        stable = self._text(choice.ids).rstrip()
        if stable.endswith("\ufffd") or not stable.startswith(choice.sent) or len(stable) == len(choice.sent):
            return
        job.emit(Delta(index, stable[len(choice.sent) :]))
        choice.sent = stable

    def finish(self, job: Job, index: int) -> None:
        """Deliver a complete answer: up to the first end-of-sequence token, which makes it ``stop``."""
        choice = job.choices[index]
        if choice.finished:  # delivered before a rerun of its batch
            return
        eos = self.model.tokenizer.eos_token_id
        ids = choice.ids
        reason = "length"
        if eos in ids:
            ids, reason = ids[: ids.index(eos) + 1], "stop"
        text = self._text(ids)
        if job.request.stream and text.startswith(choice.sent) and len(text) > len(choice.sent):
            job.emit(Delta(index, text[len(choice.sent) :]))
            choice.sent = text
        choice.finished = True
        job.emit(Finished(index, text, reason, len(ids)))


class BatchProgress(StoppingCriteria):
    """Follows every sequence of a batch step by step: streams its text, ends it at its own ``max_tokens`` or
    its end-of-sequence token (delivering it at once), and drops it when its client went away."""

    def __init__(self, rows: list[tuple[Job, int]], engine: Engine) -> None:
        self.rows, self.engine = rows, engine
        self.eos = engine.model.tokenizer.eos_token_id
        self.closed = [False] * len(rows)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        tokens = input_ids[:, -1].tolist()
        for r, (job, index) in enumerate(self.rows):
            if self.closed[r]:
                continue
            choice = job.choices[index]
            choice.ids.append(tokens[r])
            if job.cancelled or choice.finished:
                self.closed[r] = True
                self.engine.stats.dropped_sequences += job.cancelled
            elif tokens[r] == self.eos or len(choice.ids) >= job.budget:
                self.closed[r] = True
                self.engine.finish(job, index)
            elif job.request.stream:
                self.engine.stream_delta(job, index)
        return torch.tensor(self.closed, dtype=torch.bool, device=input_ids.device)
