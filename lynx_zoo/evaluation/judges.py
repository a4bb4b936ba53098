"""Open-VQA-style judging: does a free-form answer imply the ground truth? (the Lynx protocol)

A :class:`Judge` gets ``(question, prediction, ground truth)`` and returns a :class:`Judgement`:
``yes``, ``no`` or ``failed``. A reply that is not a clear yes or no (empty, bad JSON, anything
else) is a failure, never a yes. Judges:

* :class:`OpenAIChatJudge`: any OpenAI-compatible ``POST {base_url}/chat/completions`` endpoint,
  with timeouts, retries with exponential backoff (429, 5xx, timeouts, dropped connections) and a
  requests-per-second limit; the API key is read from an environment variable and never written out;
* :class:`TransformersJudge`: a local transformers causal LM (any HF model, or a lynx_zoo
  :class:`~lynx_zoo.llm.LLMConfig` such as the offline SmolLM2 GGUF);
* :class:`ExactMatchJudge`: exact or normalised match, the free baseline.

:class:`JudgementCache` (sqlite) keeps every reply, keyed by a hash of (judge id, question,
prediction, ground truth): :func:`judge_all` never asks a judge twice for the same triple. A :class:`JudgeBudget`
ends a run whose judge keeps failing (consecutive failures, total time) rather than reporting 0 % after hours of
retries.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import json
import logging
import os
import re
import sqlite3
import time
import urllib.error
import urllib.request
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lynx_zoo.data.answers import normalize_answer
from lynx_zoo.llm import LLMConfig, build_llm, load_tokenizer

log = logging.getLogger(__name__)

JUDGE_PROMPT = (
    'Given the question "{question}", does the answer "{prediction}" imply the answer "{answer}"? '
    "Answer with Yes or No."
)

Verdict = Literal["yes", "no", "failed"]
_YES_NO = re.compile(r"^[\W_]*(yes|no)\b", re.IGNORECASE)


def judge_prompt(question: str, prediction: str, answer: str) -> str:
    """The paper's judge prompt for one triple."""
    return JUDGE_PROMPT.format(question=question, prediction=prediction, answer=answer)


def parse_judge_reply(reply: str) -> Verdict:
    """``yes`` / ``no`` when the reply starts with that word (after quotes, markup, punctuation), else ``failed``."""
    match = _YES_NO.match(reply.strip())
    return "failed" if match is None else match.group(1).lower()  # type: ignore[return-value]


@dataclass(frozen=True)
class Judgement:
    """A verdict with the judge's raw reply; ``error`` says why a failure failed.

    ``replied`` is false when no reply came at all (the endpoint stayed unreachable after all
    retries): such a judgement is not cached, so the next run asks again.
    """

    verdict: Verdict
    raw: str
    error: str = ""
    replied: bool = True


class JudgeError(RuntimeError):
    """A judge that cannot work at all (a rejected key, an unknown model, a wrong URL)."""


class JudgeBudgetExceeded(JudgeError):
    """A judge that failed more than its :class:`JudgeBudget` allows; ``judgements`` are those made before."""

    def __init__(self, message: str, judgements: list[Judgement]) -> None:
        super().__init__(message)
        self.judgements = judgements


@dataclass
class JudgeBudget:
    """When a failing judge ends the run: after ``max_consecutive_failures`` failed judgements in a row (no reply
    after every retry, or a reply that is neither yes nor no), or once judging has taken ``max_seconds`` in all
    (over every :func:`judge_all` call given this budget). ``None``: no such limit."""

    max_consecutive_failures: int | None = 5
    max_seconds: float | None = None
    consecutive_failures: int = dataclasses.field(default=0, init=False)
    seconds: float = dataclasses.field(default=0.0, init=False)

    def __post_init__(self) -> None:
        if self.max_consecutive_failures is not None and self.max_consecutive_failures < 1:
            raise ValueError(
                f"judge budget: max_consecutive_failures must be >= 1 or None, got {self.max_consecutive_failures}"
            )
        if self.max_seconds is not None and self.max_seconds <= 0:
            raise ValueError(f"judge budget: max_seconds must be positive or None, got {self.max_seconds}")

    def charge(self, judge: Judge, judgement: Judgement, seconds: float, done: int, total: int) -> str | None:
        """Count one judgement that took ``seconds``; what was exceeded, if anything (``done`` of ``total`` judged)."""
        self.seconds += seconds
        self.consecutive_failures = self.consecutive_failures + 1 if judgement.verdict == "failed" else 0
        where = f"judge {judge.judge_id}: stopped after {done} of {total} judgements"
        last = f"last failure: {judgement.error or judgement.raw or 'no reason given'}"
        if self.max_consecutive_failures is not None and self.consecutive_failures >= self.max_consecutive_failures:
            return f"{where}: {self.consecutive_failures} failures in a row ({last})"
        if self.max_seconds is not None and self.seconds > self.max_seconds:
            failing = f" ({last})" if judgement.verdict == "failed" else ""
            return f"{where}: judging took {self.seconds:.0f} s, over the limit of {self.max_seconds:g} s{failing}"
        return None


class Judge(ABC):
    """Decides whether a prediction implies the ground truth. ``judge_id`` names it in the cache."""

    judge_id: str
    cacheable: bool = True

    @abstractmethod
    def judge(self, question: str, prediction: str, answer: str) -> Judgement:
        """The verdict on one (question, prediction, ground truth) triple."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """The judge's settings for the results file (never a secret)."""


class ExactMatchJudge(Judge):
    """Yes when the prediction equals the ground truth, after :func:`normalize_answer` by default."""

    cacheable = False

    def __init__(self, normalize: bool = True) -> None:
        self.normalize = normalize
        self.judge_id = "normalized-match" if normalize else "exact-match"

    def judge(self, question: str, prediction: str, answer: str) -> Judgement:
        same = (
            normalize_answer(prediction) == normalize_answer(answer)
            if self.normalize
            else prediction.strip() == answer.strip()
        )
        return Judgement("yes" if same else "no", raw="")

    def describe(self) -> dict[str, Any]:
        return {"kind": "exact", "normalize": self.normalize}


class _RateLimiter:
    """Spaces request starts at least ``1 / per_second`` seconds apart."""

    def __init__(self, per_second: float | None) -> None:
        if per_second is not None and per_second <= 0:
            raise ValueError(f"requests_per_second must be positive, got {per_second}")
        self.interval = 1.0 / per_second if per_second else 0.0
        self.next_start = 0.0

    def wait(self) -> None:
        now = time.monotonic()
        if now < self.next_start:
            time.sleep(self.next_start - now)
        self.next_start = max(now, self.next_start) + self.interval


class OpenAIChatJudge(Judge):
    """A judge behind an OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, llama.cpp, ...).

    Args:
        base_url: the API root, e.g. ``https://api.openai.com/v1`` or ``http://127.0.0.1:8000/v1``.
        model: the model name sent with each request.
        api_key_env: the NAME of the environment variable holding the API key (``None``: send no
            key, for local servers). The key is sent as a bearer token and nowhere else.
        timeout: seconds to wait on the connection and on each read of a reply.
        max_retries: retries after a 408, 429 or 5xx status, a timeout or a dropped connection.
        backoff: the first retry waits this many seconds, doubling up to ``max_backoff`` (a
            ``Retry-After`` header is honoured within that cap).
        requests_per_second: the most requests started per second (``None``: no limit).
        max_tokens: the reply length limit sent with each request.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str | None = "OPENAI_API_KEY",
        timeout: float = 30.0,
        max_retries: int = 4,
        backoff: float = 1.0,
        max_backoff: float = 30.0,
        requests_per_second: float | None = None,
        max_tokens: int = 8,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"judge base_url must start with http:// or https://, got {base_url!r}")
        self._api_key: str | None = None
        if api_key_env is not None:
            self._api_key = os.environ.get(api_key_env)
            if not self._api_key:
                raise JudgeError(f"judge: the environment variable {api_key_env} (the API key) is not set or empty")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.api_key_env = api_key_env
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.max_tokens = max_tokens
        self.rate = _RateLimiter(requests_per_second)
        self.judge_id = f"openai:{model}@{base_url.rstrip('/')}"

    def __repr__(self) -> str:
        return f"OpenAIChatJudge(url={self.url!r}, model={self.model!r}, api_key_env={self.api_key_env!r})"

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "openai",
            "url": self.url,
            "model": self.model,
            "api_key_env": self.api_key_env,
            "timeout": self.timeout,
            "max_retries": self.max_retries,
            "backoff": self.backoff,
            "requests_per_second": 1.0 / self.rate.interval if self.rate.interval else None,
            "max_tokens": self.max_tokens,
        }

    def _request(self, prompt: str) -> urllib.request.Request:
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": 0,
            "max_tokens": self.max_tokens,
        }
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        return urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers, method="POST")

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        delay = self.backoff * 2**attempt
        if retry_after is not None:
            try:
                delay = max(delay, float(retry_after))
            except ValueError:
                pass  # an HTTP-date Retry-After: keep the exponential delay
        return min(delay, self.max_backoff)

    def judge(self, question: str, prediction: str, answer: str) -> Judgement:
        judgement = self._ask(judge_prompt(question, prediction, answer))
        return dataclasses.replace(judgement, raw=self._scrub(judgement.raw), error=self._scrub(judgement.error))

    def _scrub(self, text: str) -> str:
        """``text`` with the API key masked, should a server ever echo it."""
        return text.replace(self._api_key, "***") if self._api_key else text

    def _ask(self, prompt: str) -> Judgement:
        request = self._request(prompt)
        problem = ""
        for attempt in range(self.max_retries + 1):
            retry_after = None
            self.rate.wait()
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return _chat_judgement(response.read().decode("utf-8", errors="replace"))
            except urllib.error.HTTPError as err:
                body = err.read().decode("utf-8", errors="replace")[:300]
                if err.code not in (408, 429) and err.code < 500:
                    raise JudgeError(self._scrub(f"judge {self.url}: HTTP {err.code} {err.reason}: {body}")) from None
                problem, retry_after = f"HTTP {err.code}", err.headers.get("Retry-After")
            except (OSError, http.client.HTTPException) as err:  # timeouts, refused or dropped connections
                problem = f"{type(err).__name__}: {getattr(err, 'reason', err)}"
            if attempt < self.max_retries:
                delay = self._delay(attempt, retry_after)
                log.warning(
                    "judge %s: %s; retry %d/%d in %.2f s", self.url, problem, attempt + 1, self.max_retries, delay
                )
                time.sleep(delay)
        return Judgement(
            "failed", raw="", error=f"no reply after {self.max_retries + 1} attempts ({problem})", replied=False
        )


def _chat_judgement(body: str) -> Judgement:
    """The verdict in a chat-completions reply body; anything unreadable is a failure."""
    try:
        content = json.loads(body)["choices"][0]["message"]["content"]
    except (json.JSONDecodeError, KeyError, IndexError, TypeError) as err:
        return Judgement("failed", raw=body[:2000], error=f"not a chat-completions reply ({type(err).__name__}: {err})")
    if not isinstance(content, str):
        return Judgement("failed", raw=body[:2000], error="message content is not a string")
    verdict = parse_judge_reply(content)
    return Judgement(verdict, raw=content, error="" if verdict != "failed" else "reply is neither yes nor no")


class TransformersJudge(Judge):
    """A local transformers causal LM as the judge (greedy; the chat template when it has one)."""

    def __init__(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, name: str, max_new_tokens: int = 8
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.max_new_tokens = max_new_tokens
        self.judge_id = f"hf:{name}"

    @classmethod
    def from_config(cls, config: LLMConfig, device: str = "cpu", max_new_tokens: int = 8) -> TransformersJudge:
        """Build the judge from an :class:`LLMConfig` (hub id, local folder or GGUF file; pretrained weights)."""
        if not config.pretrained or config.model is None:
            raise ValueError("judge: a transformers judge needs a pretrained LLM (llm.model, and pretrained: true)")
        tokenizer = load_tokenizer(config)
        model = build_llm(config, tokenizer).to(device)
        name = ":".join(part for part in (config.model, config.gguf_file, config.revision) if part)
        return cls(model, tokenizer, name, max_new_tokens)

    def describe(self) -> dict[str, Any]:
        return {"kind": "hf", "model": self.name, "max_new_tokens": self.max_new_tokens}

    @torch.no_grad()
    def judge(self, question: str, prediction: str, answer: str) -> Judgement:
        prompt = judge_prompt(question, prediction, answer)
        if self.tokenizer.chat_template:
            inputs = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
            )
        else:
            inputs = self.tokenizer(prompt, return_tensors="pt")
        inputs = {k: v.to(self.model.device) for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
        out = self.model.generate(
            **inputs, max_new_tokens=self.max_new_tokens, do_sample=False, pad_token_id=self.tokenizer.pad_token_id
        )
        reply = self.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
        verdict = parse_judge_reply(reply)
        return Judgement(verdict, raw=reply, error="" if verdict != "failed" else "reply is neither yes nor no")


class JudgementCache:
    """Judge replies on disk (sqlite), keyed by a hash of (judge id, question, prediction, ground truth)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path)
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS judgements (key TEXT PRIMARY KEY, judge_id TEXT, question TEXT, "
            "prediction TEXT, answer TEXT, verdict TEXT, raw TEXT, error TEXT)"
        )
        self._db.commit()

    @staticmethod
    def key(judge_id: str, question: str, prediction: str, answer: str) -> str:
        """The cache key of a triple for a judge (a SHA-256 hex digest)."""
        return hashlib.sha256(json.dumps([judge_id, question, prediction, answer]).encode()).hexdigest()

    def get(self, judge_id: str, question: str, prediction: str, answer: str) -> Judgement | None:
        """The stored judgement of a triple, or ``None``."""
        row = self._db.execute(
            "SELECT verdict, raw, error FROM judgements WHERE key = ?",
            (self.key(judge_id, question, prediction, answer),),
        ).fetchone()
        return None if row is None else Judgement(row[0], raw=row[1], error=row[2])

    def put(self, judge_id: str, question: str, prediction: str, answer: str, judgement: Judgement) -> None:
        """Store (or replace) the judgement of a triple; committed at once, so an interrupted run keeps it."""
        self._db.execute(
            "INSERT OR REPLACE INTO judgements VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                self.key(judge_id, question, prediction, answer),
                judge_id,
                question,
                prediction,
                answer,
                judgement.verdict,
                judgement.raw,
                judgement.error,
            ),
        )
        self._db.commit()

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM judgements").fetchone()[0]

    def close(self) -> None:
        """Close the database."""
        self._db.close()


def judge_all(
    judge: Judge,
    triples: Sequence[tuple[str, str, str]],
    cache: JudgementCache | None = None,
    budget: JudgeBudget | None = None,
) -> list[Judgement]:
    """Judge ``(question, prediction, ground truth)`` triples, reading and filling ``cache``.

    With a cache, a triple that ever got a reply from this judge is never sent again; one that got
    no reply at all (the endpoint unreachable after all retries) is asked again on the next run.
    With a ``budget``, a judge failing past it raises :class:`JudgeBudgetExceeded` (cached judgements do not count).
    """
    store = cache if judge.cacheable else None
    judgements: list[Judgement] = []
    for question, prediction, answer in triples:
        judgement = store.get(judge.judge_id, question, prediction, answer) if store is not None else None
        if judgement is None:
            started = time.monotonic()
            judgement = judge.judge(question, prediction, answer)
            if store is not None and judgement.replied:
                store.put(judge.judge_id, question, prediction, answer, judgement)
            judgements.append(judgement)
            exceeded = budget and budget.charge(
                judge, judgement, time.monotonic() - started, len(judgements), len(triples)
            )
            if exceeded:
                raise JudgeBudgetExceeded(exceeded, judgements)
        else:
            judgements.append(judgement)
    return judgements
