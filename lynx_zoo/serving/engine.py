"""The engine: requests wait in a bounded queue; one thread schedules the model a decode step at a time.

Requests with one beam and the settings a decode step honours (greedy or sampled, any ``max_tokens``: most requests)
are batched at the token level (continuous batching): at every step the engine admits queued requests while the
batch has room, prefills them together (their images or videos through the tower once, then their prompts' input
embeddings, left-padded, through the LLM in one forward per kind of media) and splices them into the running batch
(:class:`~lynx_zoo.serving.decoding.DecodeBatch`); one LLM forward then decodes one token of every running sequence.
A sequence that ends (its end-of-sequence token or its ``max_tokens``) is delivered and leaves the batch at that
step; a request that arrives meanwhile joins at the next one. Greedy answers equal ``generate``'s, token for token.

Other requests (beam search, repetition penalties, cross-attention models with media) are answered by ``generate``
as a whole, in batches of one kind and one set of settings, when no sequence is running. A batch that fails is
run again request by request, so only the request at fault gets the error.
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
from transformers import DynamicCache, StoppingCriteria, StoppingCriteriaList

from lynx_zoo.data.processor import Sample
from lynx_zoo.fusion.base import LynxModel
from lynx_zoo.serving.decoding import DecodeBatch, Sampler, decodes_per_step
from lynx_zoo.serving.metrics import ServeMetrics
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
    first_token_at: float | None = None
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
    steps: int = 0  # decode steps of the token-level batch
    prefill_sizes: Counter = field(default_factory=Counter)  # requests per prefill forward
    batches: int = 0  # whole-request batches (beam search and the like)
    failed_batches: int = 0
    dropped_sequences: int = 0  # stopped early because their client went away
    step_rows: Counter = field(default_factory=Counter)  # sequences per decode step
    batch_sizes: Counter = field(default_factory=Counter)  # requests per whole-request batch
    batch_seconds: float = 0.0  # moving average of one whole-request batch's wall time
    step_seconds: float = 0.0  # moving average of one decode step's wall time

    @property
    def largest_batch(self) -> int:
        return max([*self.batch_sizes, *self.step_rows], default=0)

    @property
    def mean_step_rows(self) -> float:
        return sum(k * v for k, v in self.step_rows.items()) / max(1, self.steps)

    def record_batch(self, size: int, seconds: float) -> None:
        self.requests += size
        self.batches += 1
        self.batch_sizes[size] += 1
        self.batch_seconds = seconds if self.batches == 1 else 0.8 * self.batch_seconds + 0.2 * seconds

    def record_prefill(self, size: int) -> None:
        self.prefill_sizes[size] += 1

    def record_step(self, rows: int, seconds: float) -> None:
        self.steps += 1
        self.step_rows[rows] += 1
        self.step_seconds = seconds if self.steps == 1 else 0.95 * self.step_seconds + 0.05 * seconds


@dataclass(eq=False)
class Running:
    """One sequence in the decode batch: choice ``index`` of ``job``, and how it picks its tokens."""

    job: Job
    index: int
    sampler: Sampler


class Engine:
    """Runs a model on the queued requests in one background thread (continuous batching, see the module).

    Args:
        model: the model, in eval mode, on its device.
        max_batch_size: sequences decoded together at most (a request asks for ``n``); 1 turns batching off.
        max_wait_s: for whole-request batches only: how long a batch waits at most for requests to fill it, from
            its oldest request's arrival or from the end of the previous batch, whichever is later; it starts
            earlier when it holds as many sequences as the previous batch did.
        max_queue: requests waiting at most; :meth:`submit` raises :class:`Overloaded` beyond.
        metrics: the Prometheus metrics to keep up to date (none: not kept).
    """

    def __init__(
        self,
        model: LynxModel,
        max_batch_size: int,
        max_wait_s: float,
        max_queue: int,
        metrics: ServeMetrics | None = None,
    ) -> None:
        self.model = model
        self.max_batch_size, self.max_wait_s, self.max_queue = max_batch_size, max_wait_s, max_queue
        self.metrics = metrics
        self.stats = EngineStats()
        self._expected_rows = max_batch_size
        self._free_since = 0.0
        self._pending: deque[Job] = deque()
        self._batch = DecodeBatch(model.llm)
        self._running: list[Running] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._closed = False
        self._thread = threading.Thread(target=self._run_forever, name="lynx-serve-engine", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop after the step in progress; requests still queued or running get a :class:`Failed` event."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        with self._cond:
            while self._pending:
                self._pending.popleft().emit(Failed("the server is shutting down"))
        for job in {r.job for r in self._running}:
            job.emit(Failed("the server is shutting down"))
        self._running = []
        self._batch.clear()

    @property
    def queued(self) -> int:
        return len(self._pending)

    @property
    def running(self) -> int:
        """Sequences in the decode batch now."""
        return len(self._running)

    def retry_after(self) -> int:
        """Seconds until the queue has room, about: the requests ahead times a request's share of the engine."""
        if self.stats.steps:
            tokens = sum(j.budget * j.request.n for j in self._pending)
            return max(1, math.ceil(tokens / self.max_batch_size * self.stats.step_seconds))
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

    def per_step(self, job: Job) -> bool:
        """Whether ``job`` is decoded in the token-level batch (else by ``generate`` as a whole)."""
        return decodes_per_step(job.settings) and (job.media is None or self.model.media_in_sequence)

    # ------------------------------------------------------------------ the engine thread
    def _run_forever(self) -> None:
        while True:
            with self._cond:
                while True:
                    while self._pending and self._pending[0].cancelled:
                        self._pending.popleft()
                    if self._closed:
                        return
                    if self._pending or self._running:
                        break
                    self._cond.wait()
                admitted = self._admissions()
                whole = self._take_batch() if not admitted and not self._running else None
            if admitted:
                self._admit(admitted)
            if whole:
                self._run_isolated(whole)
                self._free_since = time.monotonic()
            if self._running:
                self._step()

    def _admissions(self) -> list[Job]:
        """The queued requests that join the decode batch now, oldest first, while it has room: up to the first
        whole-request one (which runs once the batch is empty, so that it is not overtaken forever)."""
        admitted, rows = [], len(self._running)
        while self._pending:
            job = self._pending[0]
            if job.cancelled:
                self._pending.popleft()
                continue
            if not self.per_step(job) or rows + job.request.n > self.max_batch_size:
                break
            admitted.append(self._pending.popleft())
            rows += job.request.n
        return admitted

    def _admit(self, jobs: list[Job]) -> None:
        """Prefill the admitted requests and put their choices into the decode batch: those with the same kind of
        media (none, images, videos of one frame count) together, in one LLM forward over their left-padded
        prompts. If a group's prefill fails, its requests are prefilled one by one, so that only the one at fault
        fails."""
        groups: dict[tuple[int, ...] | None, list[Job]] = {}
        for job in jobs:
            groups.setdefault(None if job.media is None else tuple(job.media.shape), []).append(job)
        for group in groups.values():
            try:
                prefilled = self._prefill(group)
            except Exception as err:  # one request's failure must not reach the others
                if len(group) > 1:
                    log.warning("a prefill of %d requests failed (%s); prefilling them one by one", len(group), err)
                    for job in group:
                        self._admit([job])
                    continue
                self.stats.failed_batches += 1
                log.exception("prefill failed for one request")
                group[0].emit(Failed(f"generation failed: {type(err).__name__}: {err}"))
                continue
            try:
                self._start(group, *prefilled)
            except Exception as err:  # choosing a first token failed: these requests fail, the batch goes on
                self.stats.failed_batches += 1
                log.exception("the first tokens of %d requests failed", len(group))
                for job in group:
                    job.emit(Failed(f"generation failed: {type(err).__name__}: {err}"))

    def _prefill(self, jobs: list[Job]) -> tuple[DynamicCache, torch.Tensor, torch.Tensor]:
        """One LLM forward over the prompts of ``jobs`` (their media through the tower, once): the cache, the mask
        over it and the logits of each prompt's last position."""
        model = self.model
        prompt = model.processor.prompts([Sample(j.request.instruction, history=j.request.history) for j in jobs])
        ids, mask = prompt["input_ids"].to(model.device), prompt["attention_mask"].to(model.device)
        media = None if jobs[0].media is None else torch.stack([j.media for j in jobs]).to(model.device)
        with torch.no_grad(), model.fused(ids, mask, media) as inputs:
            cache, logits = self._batch.prefill(inputs)
        for job, row in zip(jobs, mask.sum(-1).tolist()):
            job.prompt_tokens = int(row)
        self.stats.record_prefill(len(jobs))
        return cache, inputs.attention_mask, logits

    def _start(self, jobs: list[Job], cache: DynamicCache, mask: torch.Tensor, logits: torch.Tensor) -> None:
        """Pick the first token of every choice of the prefilled ``jobs`` and splice the ones that go on into the
        decode batch; a choice that ends at its first token is delivered at once."""
        now = time.monotonic()
        rows, prompts, tokens = [], [], []
        for p, job in enumerate(jobs):
            job.first_token_at = now
            self.stats.requests += 1
            if self.metrics is not None:
                self.metrics.prompt_tokens.inc(job.prompt_tokens)
                self.metrics.time_to_first_token.observe(now - job.enqueued)
            for index in range(job.request.n):
                sampler = Sampler(job.settings, self.model.llm.generation_config, index)
                token = sampler(torch.zeros(1, 0, dtype=torch.long), logits[p : p + 1])
                running = Running(job, index, sampler)
                if self._advance(running, token):
                    rows.append(running)
                    prompts.append(p)
                    tokens.append(token)
        if rows:
            self._batch.add(cache, mask, prompts, tokens)
            self._running.extend(rows)

    def _advance(self, running: Running, token: int) -> bool:
        """Record a sequence's new token; deliver it when it ends (or drop it when its client went away).
        Returns whether it goes on."""
        job, index = running.job, running.index
        choice = job.choices[index]
        choice.ids.append(token)
        if job.cancelled:
            self.stats.dropped_sequences += 1
            return False
        if token == self.model.tokenizer.eos_token_id or len(choice.ids) >= job.budget:
            self.finish(job, index)
            return False
        if job.request.stream:
            self.stream_delta(job, index)
        return True

    def _step(self) -> None:
        """One decode step of every running sequence; the ones that end leave the batch."""
        started = time.perf_counter()
        rows = len(self._running)
        try:
            with torch.no_grad():
                logits = self._batch.step()
                greedy = logits.argmax(-1).tolist()
                tokens = []
                for r, running in enumerate(self._running):
                    if running.sampler.sample:
                        ids = torch.tensor([running.job.choices[running.index].ids], dtype=torch.long)
                        tokens.append(running.sampler(ids, logits[r : r + 1]))
                    else:
                        tokens.append(greedy[r])
        except Exception as err:  # the step failed: every running sequence fails, the engine goes on
            self.stats.failed_batches += 1
            log.exception("a decode step of %d sequences failed", rows)
            for job in {r.job: None for r in self._running}:
                job.emit(Failed(f"generation failed: {type(err).__name__}: {err}"))
            self._running = []
            self._batch.clear()
            return
        keep = [r for r, running in enumerate(self._running) if self._advance(running, tokens[r])]
        if len(keep) < rows:
            self._batch.keep(keep)
            self._running = [self._running[r] for r in keep]
        self._batch.tokens = torch.tensor([tokens[r] for r in keep], dtype=torch.long, device=self._batch.mask.device)
        seconds = time.perf_counter() - started
        self.stats.record_step(rows, seconds)
        if self.metrics is not None:
            self.metrics.batch_occupancy.observe(rows)
            self.metrics.step_seconds.observe(seconds)

    # ------------------------------------------------------------------ whole requests (beam search, ...)
    def _take_batch(self) -> list[Job] | None:
        """A whole-request batch headed by the oldest queued request (called with the lock held, when no sequence
        is running and the head cannot be decoded per step)."""
        if not self._pending:
            return None
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
        self.stats.record_batch(len(jobs), time.perf_counter() - started)

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
        if self.metrics is not None:
            self.metrics.completion_tokens.inc(len(ids))
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
