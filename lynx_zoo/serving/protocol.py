"""The OpenAI chat-completions protocol: requests checked field by field, responses and stream chunks built.

A request becomes a :class:`ChatRequest`: the conversation as the Lynx prompt needs it (earlier turns, the last
user instruction, at most one image or video) and the generation fields. Anything that does not fit is a
:class:`RequestError` naming the field (``messages[1].content[0].image_url.url``), answered with a 400.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from lynx_zoo.serving.settings import ServeSettings

MediaKind = Literal["image", "video"]
ROLES = ("system", "developer", "user", "assistant")
CONTENT_TYPES = {"text": None, "image_url": "image", "video_url": "video"}
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "typical_p")
# fields of the OpenAI request this server honours
SUPPORTED_FIELDS = {
    "model",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "n",
    "stream",
    "stream_options",
    "user",
    "metadata",
    "store",
}


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error object: ``kind`` is its ``type`` (``invalid_request_error``, ``server_error``, ...)."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class RequestError(Exception):
    """A request the server refuses: ``status`` (400 unless said), the field at fault and what is wrong."""

    def __init__(self, param: str, message: str, status: int = 400, code: str | None = None) -> None:
        self.param, self.status, self.code = param, status, code
        self.message = f"{param}: {message}"
        super().__init__(self.message)

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return error_body(self.message, kind, self.param, self.code)


@dataclass
class MediaRef:
    """An image or video a message points to (a data URL, a local path or a remote URL), not yet read."""

    kind: MediaKind
    url: str
    param: str


@dataclass
class ChatRequest:
    """One chat-completions request, checked: the Lynx conversation and the generation fields."""

    instruction: str
    history: list[tuple[str, str]] = field(default_factory=list)
    media: MediaRef | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stream: bool = False
    include_usage: bool = False

    @property
    def kind(self) -> str:
        """What the batch it joins holds: ``image``, ``video`` or ``text``."""
        return self.media.kind if self.media else "text"


def _number(body: dict[str, Any], name: str, low: float, high: float, integer: bool = False) -> Any:
    value = body.get(name)
    if value is None:
        return None
    wanted = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, wanted):
        raise RequestError(name, f"expected {'an integer' if integer else 'a number'}, got {value!r}")
    if not low <= value <= high:
        raise RequestError(name, f"must be between {low} and {high}, got {value}")
    return value


def _asks_nothing(value: Any) -> bool:
    """Whether an unsupported field's value leaves the request unchanged (``presence_penalty: 0``, ``tools: []``)."""
    if value is None or value is False or value in ("", "none", "auto", [], {}, {"type": "text"}):
        return True
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0


def _media_url(part: dict[str, Any], key: str, where: str) -> tuple[str, str]:
    """The URL of an ``image_url``/``video_url`` part (``{"url": ...}`` as OpenAI, or the plain string) and
    the name of its field."""
    value = part.get(key)
    if isinstance(value, dict):
        value, where = value.get("url"), f"{where}.{key}.url"
    else:
        where = f"{where}.{key}"
    if not isinstance(value, str) or not value.strip():
        raise RequestError(where, f'expected a URL string ({{"{key}": {{"url": "data:..."}}}}), got {value!r}')
    return value, where


def _message_parts(message: dict[str, Any], where: str, role: str) -> tuple[str, list[MediaRef]]:
    """The text of a message (its text parts joined by new lines) and the media it points to."""
    content = message.get("content")
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise RequestError(f"{where}.content", f"expected a string or a list of content parts, got {content!r}")
    texts: list[str] = []
    media: list[MediaRef] = []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        if not isinstance(part, dict):
            raise RequestError(at, f"expected a content part object with a `type`, got {part!r}")
        kind = part.get("type")
        if kind not in CONTENT_TYPES:
            raise RequestError(
                f"{at}.type", f"unsupported content type {kind!r}; supported: {', '.join(CONTENT_TYPES)}"
            )
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise RequestError(f"{at}.text", f"expected a string, got {part.get('text')!r}")
            texts.append(part["text"])
            continue
        if role != "user":
            raise RequestError(f"{at}.type", f"{kind} parts belong in user messages, not in {role} messages")
        url, param = _media_url(part, kind, at)
        media.append(MediaRef(CONTENT_TYPES[kind], url, param))  # type: ignore[arg-type]
    return "\n".join(t for t in texts if t), media


def _conversation(messages: Any) -> tuple[str, list[tuple[str, str]], list[MediaRef]]:
    """The last user instruction, the earlier (user, assistant) turns and all media of ``messages``.

    System (and developer) text goes before the first user turn: the Lynx prompt has no system slot.
    Consecutive messages of one role are joined.
    """
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages", f"expected a non-empty list of messages, got {messages!r}")
    system: list[str] = []
    turns: list[list[Any]] = []  # [role, text]
    media: list[MediaRef] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise RequestError(where, f"expected an object with `role` and `content`, got {message!r}")
        role = message.get("role")
        if role not in ROLES:
            hint = " (this server has no tools)" if role in ("tool", "function") else ""
            raise RequestError(f"{where}.role", f"unknown role {role!r}{hint}; expected one of {', '.join(ROLES)}")
        text, found = _message_parts(message, where, role)
        media.extend(found)
        if role in ("system", "developer"):
            system.append(text)
        elif turns and turns[-1][0] == role:
            turns[-1][1] = "\n".join(t for t in (turns[-1][1], text) if t)
        elif not turns and role == "assistant":
            raise RequestError(f"{where}.role", "the conversation must start with a user message, not an assistant one")
        else:
            turns.append([role, text])
    if not turns or turns[-1][0] != "user":
        raise RequestError("messages", "the last message must be a user message (the one to answer)")
    if system:
        turns[0][1] = "\n".join(t for t in [*system, turns[0][1]] if t)
    history = [(turns[k][1], turns[k + 1][1]) for k in range(0, len(turns) - 1, 2)]
    instruction = turns[-1][1]
    if not instruction.strip() and not media:
        raise RequestError(f"messages[{len(messages) - 1}].content", "the user message is empty")
    return instruction, history, media


def parse_chat_request(body: Any, served_name: str, settings: ServeSettings) -> ChatRequest:
    """Check a decoded request body; every problem is a :class:`RequestError` naming its field."""
    if not isinstance(body, dict):
        raise RequestError("body", f"expected a JSON object, got {type(body).__name__}")
    model = body.get("model")
    if model not in (None, "", served_name):
        raise RequestError(
            "model", f"model {model!r} is not served here; this server serves {served_name!r}", 404, "model_not_found"
        )
    for name, value in body.items():
        if name not in SUPPORTED_FIELDS and not _asks_nothing(value):
            raise RequestError(name, f"not supported by this server (supported: {', '.join(sorted(SUPPORTED_FIELDS))})")
    instruction, history, media = _conversation(body.get("messages"))
    if len(media) > 1:
        places = ", ".join(m.param for m in media)
        raise RequestError(
            "messages",
            f"too many images/videos: {len(media)} ({places}); the model reads one image or video per conversation",
        )
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError("stream", f"expected true or false, got {stream!r}")
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or not stream):
        raise RequestError("stream_options", "expected an object, and only with stream: true")
    max_tokens = _number(body, "max_completion_tokens", 1, settings.max_tokens_limit, integer=True)
    if max_tokens is None:
        max_tokens = _number(body, "max_tokens", 1, settings.max_tokens_limit, integer=True)
    return ChatRequest(
        instruction=instruction,
        history=history,
        media=media[0] if media else None,
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 0.0, 2.0),
        top_p=_number(body, "top_p", 0.0, 1.0),
        n=_number(body, "n", 1, settings.max_n, integer=True) or 1,
        stream=stream,
        include_usage=bool((options or {}).get("include_usage", False)),
    )


def generation_for(request: ChatRequest, defaults: dict[str, Any]) -> dict[str, Any]:
    """The transformers ``generate`` settings of a request: the variant's defaults, then its fields.

    ``max_tokens`` is ``max_new_tokens``; ``temperature: 0`` is greedy, a positive one samples at it; ``top_p``
    samples from the nucleus; ``n`` is ``num_return_sequences`` (the top ``n`` beams under beam search; with one
    beam it needs sampling).
    """
    settings = dict(defaults)
    if request.max_tokens is not None:
        settings["max_new_tokens"] = request.max_tokens
    if request.temperature is not None:
        if request.temperature == 0:
            settings["do_sample"] = False
        else:
            settings.update(do_sample=True, temperature=float(request.temperature))
    if request.top_p is not None and request.temperature != 0:
        if request.top_p == 0:
            raise RequestError("top_p", "must be above 0 (use temperature: 0 for greedy answers)")
        settings.update(do_sample=True, top_p=float(request.top_p))
    if not settings.get("do_sample"):
        for key in SAMPLING_KEYS:
            settings.pop(key, None)
    beams = int(settings.get("num_beams", 1))
    if beams > 1 and request.n > beams:
        raise RequestError("n", f"n={request.n} is more than the {beams} beams of these settings (the top n beams)")
    if beams == 1 and request.n > 1 and not settings.get("do_sample"):
        raise RequestError(
            "n", f"n={request.n} different answers need sampling (a temperature above 0); these settings are greedy"
        )
    return settings


def completion_id() -> str:
    return f"chatcmpl-{secrets.token_hex(12)}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_body(
    request_id: str, model: str, choices: list[tuple[str, str]], prompt_tokens: int, completion_tokens: int
) -> dict[str, Any]:
    """A ``chat.completion`` object; ``choices`` are (text, finish reason) in index order."""
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": reason, "logprobs": None}
            for i, (text, reason) in enumerate(choices)
        ],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chunk_body(
    request_id: str,
    model: str,
    index: int | None,
    delta: dict[str, str] | None = None,
    finish_reason: str | None = None,
    usage_info: dict[str, int] | None = None,
) -> dict[str, Any]:
    """A ``chat.completion.chunk`` for one choice, or (``index`` None) the closing usage chunk."""
    choices = (
        []
        if index is None
        else [{"index": index, "delta": delta or {}, "finish_reason": finish_reason, "logprobs": None}]
    )
    return {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage_info,
    }
