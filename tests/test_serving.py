"""``python -m lynx_zoo serve``: the real server on loopback, called with the ``openai`` client and raw HTTP.

Every answer is compared with ``generate`` of the same variant, loaded in the test process, on the same inputs
with the same settings.
"""

from __future__ import annotations

import base64
import http.client
import http.server
import io
import json
import socket
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest
import torch
from PIL import Image, PngImagePlugin

import lynx_zoo
from lynx_zoo.data.processor import Sample

QUESTIONS = ("what color is the circle?", "how many shapes are there?", "where is the red square?")
MIME = {".png": "image/png", ".jpg": "image/jpeg", ".webp": "image/webp", ".mp4": "video/mp4"}


def data_url(path: Path) -> str:
    return f"data:{MIME[path.suffix]};base64,{base64.b64encode(path.read_bytes()).decode()}"


def image_bytes_url(image: Image.Image, fmt: str = "PNG", **save: Any) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buffer.getvalue()).decode()}"


def ask(question: str, media: dict | None = None) -> list[dict]:
    """One user message: a question, with an ``image_url``/``video_url`` part."""
    if media is None:
        return [{"role": "user", "content": question}]
    return [{"role": "user", "content": [media, {"type": "text", "text": question}]}]


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def post(
    url: str, body: bytes | dict, path: str = "/v1/chat/completions", headers: dict[str, str] | None = None
) -> tuple[int, dict, dict]:
    """A raw POST (so that malformed bodies can be sent): status, headers, decoded JSON body."""
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    payload = body if isinstance(body, bytes) else json.dumps(body).encode()
    connection.request("POST", path, payload, {"Content-Type": "application/json", **(headers or {})})
    response = connection.getresponse()
    status, headers, data = response.status, dict(response.getheaders()), response.read()
    connection.close()
    return status, headers, json.loads(data)


def get(url: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict, bytes]:
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    connection.request("GET", path, headers=headers or {})
    response = connection.getresponse()
    result = response.status, dict(response.getheaders()), response.read()
    connection.close()
    return result


def assert_still_answering(server, model) -> None:
    """The server still serves a request after a bad one (and answers it right)."""
    reply = client(server).chat.completions.create(model="", messages=ask(QUESTIONS[1]), max_tokens=3)
    assert reply.choices[0].message.content == model.generate(prompts=[QUESTIONS[1]], max_new_tokens=3)[0]


# ---------------------------------------------------------------------------------------------- answers
def test_lists_the_served_model(tiny_server):
    models = client(tiny_server).models.list()
    assert [m.id for m in models.data] == ["lynx-serve-tiny"]
    assert client(tiny_server).models.retrieve("lynx-serve-tiny").owned_by == "lynx_zoo"


@pytest.mark.parametrize("name", ["scene0.png", "astronaut.jpg", "coffee.webp"])
def test_answer_equals_generate(tiny_server, served_model, media_root, name):
    path = media_root / name
    reply = client(tiny_server).chat.completions.create(
        model="lynx-serve-tiny", messages=ask(QUESTIONS[0], image_part(data_url(path)))
    )
    expected = served_model.generate(images=[path], prompts=[QUESTIONS[0]])[0]
    choice = reply.choices[0]
    assert choice.message.content == expected and choice.message.role == "assistant"
    # finish_reason and usage follow the generated tokens: "stop" at the end token, "length" at max_new_tokens
    words = len(expected.split())
    budget = served_model.eval_generation["max_new_tokens"]
    assert choice.finish_reason == ("stop" if reply.usage.completion_tokens == words + 1 else "length")
    assert reply.usage.completion_tokens <= budget
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_text_only_answer_equals_generate(tiny_server, served_model):
    reply = client(tiny_server).chat.completions.create(model="lynx-serve-tiny", messages=ask(QUESTIONS[2]))
    assert reply.choices[0].message.content == served_model.generate(prompts=[QUESTIONS[2]])[0]


def test_streamed_answer_equals_generate(tiny_server, served_model, media_root):
    path = media_root / "scene1.png"
    stream = client(tiny_server).chat.completions.create(
        model="lynx-serve-tiny",
        messages=ask(QUESTIONS[0], image_part(data_url(path))),
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    expected = served_model.generate(images=[path], prompts=[QUESTIONS[0]])[0]
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(deltas) == expected
    assert len(deltas) > 1, "the answer should arrive in pieces, as it is generated"
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes in (["stop"], ["length"])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= len(expected.split())


def media_part(path: Path) -> dict:
    if path.suffix == ".mp4":
        return {"type": "video_url", "video_url": {"url": data_url(path)}}
    return image_part(data_url(path))


def reference(model, question: str, path: Path | None, **settings: Any) -> str:
    """``generate`` on one question about an image, a video or nothing."""
    if path is not None and path.suffix == ".mp4":
        return model.generate(videos=[path], prompts=[question], **settings)[0]
    return model.generate(images=None if path is None else [path], prompts=[question], **settings)[0]


def test_mixed_concurrent_traffic_is_batched_per_step_and_each_equals_generate(tiny_server, served_model, media_root):
    """Fourteen clients at once, with different prompt lengths and ``max_tokens``: images (PNG, JPEG, WebP), videos,
    text only, streamed or not. Each answer equals ``generate``'s on that request alone, token for token, whatever
    else was prefilled and decoded beside it; the server prefilled several requests in one forward and decoded
    several sequences per step."""
    before = json.loads(get(tiny_server.url, "/health")[2])
    names = ["scene0.png", "scene2.png", "astronaut.jpg", None, "coffee.webp", "clip.mp4", "scene3.png"]
    questions = [*QUESTIONS, "is there a shape in the top left corner of this scene, and if so which colour is it?"]
    cases = [
        (questions[i % 4], None if names[i % 7] is None else media_root / names[i % 7], i % 2 == 0, 1 + (5 * i) % 12)
        for i in range(14)
    ]

    def run(case) -> tuple[str, int]:
        question, path, stream, max_tokens = case
        messages = ask(question, None if path is None else media_part(path))
        api = client(tiny_server)
        if stream:
            chunks = api.chat.completions.create(
                model="lynx-serve-tiny", messages=messages, stream=True, max_tokens=max_tokens
            )
            return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), -1
        reply = api.chat.completions.create(model="lynx-serve-tiny", messages=messages, max_tokens=max_tokens)
        return reply.choices[0].message.content, reply.usage.completion_tokens

    with ThreadPoolExecutor(len(cases)) as pool:
        answers = list(pool.map(run, cases))
    for (question, path, _, max_tokens), (answer, tokens) in zip(cases, answers):
        assert answer == reference(served_model, question, path, max_new_tokens=max_tokens), (question, path)
        assert tokens <= max_tokens
    assert len({a for a, _ in answers}) > 3
    after = json.loads(get(tiny_server.url, "/health")[2])
    assert after["requests"] - before["requests"] == len(cases)
    assert after["steps"] > before["steps"] and after["largest_batch"] > 1, "concurrent requests were not batched"
    assert max(map(int, after["prefill_sizes"])) > 1, "no requests were prefilled together"
    assert after["batches"] == before["batches"]  # no request needed generate as a whole


def test_generation_fields_map_onto_generate(tiny_server, served_model, media_root):
    api = client(tiny_server)
    path = media_root / "scene0.png"
    messages = ask(QUESTIONS[0], image_part(data_url(path)))
    # max_tokens is max_new_tokens; a cut answer ends with "length"
    short = api.chat.completions.create(model="lynx-serve-tiny", messages=messages, max_tokens=2)
    assert (
        short.choices[0].message.content
        == served_model.generate(images=[path], prompts=[QUESTIONS[0]], max_new_tokens=2)[0]
    )
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 2
    # temperature 0 is greedy, as the variant's default
    greedy = api.chat.completions.create(model="lynx-serve-tiny", messages=messages, temperature=0)
    assert greedy.choices[0].message.content == served_model.generate(images=[path], prompts=[QUESTIONS[0]])[0]
    # n samples at the temperature (num_return_sequences); top_p samples too
    sampled = api.chat.completions.create(model="lynx-serve-tiny", messages=messages, n=6, temperature=2.0)
    assert [c.index for c in sampled.choices] == list(range(6))
    assert len({c.message.content for c in sampled.choices}) > 1, "six samples at temperature 2 were all equal"
    nucleus = api.chat.completions.create(model="lynx-serve-tiny", messages=messages, top_p=0.9, n=2, max_tokens=4)
    assert len(nucleus.choices) == 2 and nucleus.usage.completion_tokens <= 8


def test_n_choices_stream_with_their_index(tiny_server):
    chunks = list(
        client(tiny_server).chat.completions.create(
            model="lynx-serve-tiny", messages=ask(QUESTIONS[1]), n=3, temperature=1.0, stream=True, max_tokens=4
        )
    )
    finished = sorted(c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason)
    assert finished == [0, 1, 2]


def test_video_parts_equal_generate(tiny_server, served_model, media_root):
    """A video as a data URL and as a path under the media root: ``vision.num_frames`` frames at segment centres,
    as ``generate(videos=...)`` samples them."""
    clip = media_root / "clip.mp4"
    expected = served_model.generate(videos=[clip], prompts=[QUESTIONS[1]])[0]
    api = client(tiny_server)
    for url in (data_url(clip), "clip.mp4", clip.as_uri()):
        part = {"type": "video_url", "video_url": {"url": url}}
        reply = api.chat.completions.create(model="lynx-serve-tiny", messages=ask(QUESTIONS[1], part))
        assert reply.choices[0].message.content == expected, url[:40]


def test_image_paths_under_the_root(tiny_server, served_model, media_root):
    path = media_root / "scene3.png"
    expected = served_model.generate(images=[path], prompts=[QUESTIONS[2]])[0]
    for url in ("scene3.png", path.as_uri(), str(path)):
        reply = client(tiny_server).chat.completions.create(
            model="lynx-serve-tiny", messages=ask(QUESTIONS[2], image_part(url))
        )
        assert reply.choices[0].message.content == expected, url


def test_conversation_history_and_system_message(tiny_server, served_model, media_root):
    """Earlier turns become the Lynx conversation (``<s> User: q1\\nBot: a1 </s> User: q2\\nBot:``), the image
    comes from the first turn, a system message goes before the first question."""
    path = media_root / "scene2.png"
    messages = [
        {"role": "system", "content": "what"},
        {"role": "user", "content": [image_part(data_url(path)), {"type": "text", "text": QUESTIONS[0]}]},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": QUESTIONS[1]},
    ]
    reply = client(tiny_server).chat.completions.create(model="lynx-serve-tiny", messages=messages)
    model = served_model
    prompts = model.processor.prompts([Sample(QUESTIONS[1], history=[(f"what\n{QUESTIONS[0]}", "red")])])
    image = model.processor.image_transform(Image.open(path).convert("RGB"))[None]
    ids = model.generate_ids(prompts["input_ids"], prompts["attention_mask"], image, **model.eval_generation)
    assert reply.choices[0].message.content == model.decode(ids)[0]
    assert reply.usage.prompt_tokens == int(prompts["attention_mask"].sum())


# ---------------------------------------------------------------------------------------------- bad requests
def _big_png() -> str:
    """A 90 x 90 PNG (under the pixel cap) of about 40 kB: a text chunk over the byte cap."""
    info = PngImagePlugin.PngInfo()
    info.add_text("padding", "x" * 40_000)
    return image_bytes_url(Image.new("RGB", (90, 90), "white"), pnginfo=info)


def _gif() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buffer, format="GIF")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _bad_requests(media_root: Path) -> list[tuple[str, bytes | dict, int, str, str | None]]:
    """(case, body, status, a phrase of the message, the field named)."""
    scene = data_url(media_root / "scene0.png")
    outside = media_root.parent / "outside.png"
    Image.new("RGB", (8, 8)).save(outside)
    (media_root / "escape.png").unlink(missing_ok=True)
    (media_root / "escape.png").symlink_to(outside)
    text_as_png = "data:image/png;base64," + base64.b64encode(b"just some text, not pixels").decode()
    return [
        ("malformed JSON", b'{"messages": [', 400, "malformed JSON", "body"),
        ("not an object", b"[1, 2]", 400, "expected a JSON object, got list", "body"),
        ("no messages", {"model": "lynx-serve-tiny"}, 400, "non-empty list of messages", "messages"),
        ("unknown role", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "unknown role 'wizard'",
         "messages[0].role"),
        ("tool role", {"messages": [{"role": "tool", "content": "hi"}]}, 400, "no tools", "messages[0].role"),
        ("last message not from the user", {"messages": [*ask("hi"), {"role": "assistant", "content": "yo"}]}, 400,
         "last message must be a user message", "messages"),
        ("bad base64", {"messages": ask("hi", image_part("data:image/png;base64,iVBOR%%%"))}, 400, "invalid base64",
         "messages[0].content[0].image_url.url"),
        ("non-image payload", {"messages": ask("hi", image_part(text_as_png))}, 400, "not an image",
         "messages[0].content[0].image_url.url"),
        ("GIF image", {"messages": ask("hi", image_part(_gif()))}, 400, "GIF images are not accepted",
         "messages[0].content[0].image_url.url"),
        ("image type not accepted", {"messages": ask("hi", image_part("data:image/tiff;base64,AAAA"))}, 400,
         "unsupported image type 'image/tiff'", "messages[0].content[0].image_url.url"),
        ("over the pixel cap", {"messages": ask("hi", image_part(image_bytes_url(Image.new("RGB", (200, 100)))))},
         400, "200x100 = 20000 pixels, over the cap of 10000", "messages[0].content[0].image_url.url"),
        ("over the byte cap", {"messages": ask("hi", image_part(_big_png()))}, 400, "over the cap of 20000 bytes",
         "messages[0].content[0].image_url.url"),
        ("too many images", {"messages": [*ask("a", image_part(scene)), {"role": "assistant", "content": "b"},
                                          *ask("c", image_part(scene))]}, 400, "too many images/videos: 2",
         "messages"),
        ("image and video", {"messages": ask("a", image_part(scene)) + ask(
            "c", {"type": "video_url", "video_url": {"url": "clip.mp4"}})}, 400, "too many images/videos: 2",
         "messages"),
        ("absolute path outside the root", {"messages": ask("hi", image_part(str(outside)))}, 400,
         "outside the media root", "messages[0].content[0].image_url.url"),
        ("relative path escaping the root", {"messages": ask("hi", image_part("../outside.png"))}, 400,
         "outside the media root", "messages[0].content[0].image_url.url"),
        ("symlink escaping the root", {"messages": ask("hi", image_part("escape.png"))}, 400,
         "outside the media root", "messages[0].content[0].image_url.url"),
        ("missing file", {"messages": ask("hi", image_part("nope.png"))}, 400, "no such file",
         "messages[0].content[0].image_url.url"),
        ("remote URL while off", {"messages": ask("hi", image_part("http://127.0.0.1:9/cat.png"))}, 400,
         "remote URLs are off", "messages[0].content[0].image_url.url"),
        ("unsupported URL scheme", {"messages": ask("hi", image_part("ftp://example.org/cat.png"))}, 400,
         "unsupported URL scheme 'ftp'", "messages[0].content[0].image_url.url"),
        ("unsupported content type", {"messages": [{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]}]}, 400,
         "unsupported content type 'input_audio'", "messages[0].content[0].type"),
        ("image in an assistant message", {"messages": [*ask("a"), {"role": "assistant", "content": [
            image_part(scene)]}, *ask("b")]}, 400, "belong in user messages", "messages[1].content[0].type"),
        ("corrupt video", {"messages": ask("hi", {"type": "video_url", "video_url": {"url": "broken.mp4"}})}, 400,
         "broken.mp4: cannot decode video", "messages[0].content[0].video_url.url"),
        ("not a video", {"messages": ask("hi", {"type": "video_url", "video_url": {
            "url": "data:video/mp4;base64," + base64.b64encode(b"not a video at all").decode()}})}, 400,
         "the uploaded video: cannot decode video", "messages[0].content[0].video_url.url"),
        ("max_tokens not an integer", {"messages": ask("hi"), "max_tokens": "many"}, 400, "expected an integer",
         "max_tokens"),
        ("max_tokens over the limit", {"messages": ask("hi"), "max_tokens": 100_000}, 400, "between 1 and 512",
         "max_tokens"),
        ("temperature out of range", {"messages": ask("hi"), "temperature": 3.5}, 400, "between 0.0 and 2.0",
         "temperature"),
        ("n on greedy settings", {"messages": ask("hi"), "n": 2}, 400, "need sampling (a temperature above 0)", "n"),
        ("unsupported field", {"messages": ask("hi"), "tools": [{"type": "function"}]}, 400,
         "not supported by this server", "tools"),
        ("stream not a boolean", {"messages": ask("hi"), "stream": "yes"}, 400, "expected true or false", "stream"),
        ("unknown model", {"model": "gpt-4o", "messages": ask("hi")}, 404, "is not served here", "model"),
    ]  # fmt: skip


def test_bad_requests_get_a_clear_error_and_the_server_keeps_answering(tiny_server, served_model, media_root):
    for case, body, status, phrase, param in _bad_requests(media_root):
        got, _, reply = post(tiny_server.url, body)
        assert got == status, (case, reply)
        error = reply["error"]
        assert phrase in error["message"], (case, error)
        assert str(media_root) not in error["message"], "an error shows the server's media root"
        assert error["param"] == param and error["message"].startswith(param + ": "), (case, error)
        assert error["type"] == "invalid_request_error"
        assert_still_answering(tiny_server, served_model)


def test_neutral_unsupported_fields_are_accepted(tiny_server, served_model):
    body = {"messages": ask(QUESTIONS[1]), "presence_penalty": 0, "frequency_penalty": 0.0, "tools": [], "stop": None}
    status, _, reply = post(tiny_server.url, body)
    assert status == 200
    assert reply["choices"][0]["message"]["content"] == served_model.generate(prompts=[QUESTIONS[1]])[0]


def test_the_openai_client_raises_on_a_bad_request(tiny_server):
    with pytest.raises(openai.BadRequestError, match="unknown role 'robot'"):
        client(tiny_server).chat.completions.create(model="", messages=[{"role": "robot", "content": "hi"}])


def test_image_pixel_cap_above_pils_own_limit():
    """The cap alone decides: PIL warns above its own limit (about 89.5 million pixels), a larger cap still lets
    an image under it through; over twice that limit PIL refuses by itself, reported as over the cap."""
    from lynx_zoo.serving.media import decode_image
    from lynx_zoo.serving.protocol import RequestError

    def png(width: int, height: int) -> bytes:
        out = io.BytesIO()
        Image.new("1", (width, height)).save(out, format="PNG")  # 1 bit a pixel: cheap to build and to send
        return out.getvalue()

    data = png(10000, 9000)
    image = decode_image(data, "image", max_pixels=100_000_000)
    assert image.mode == "RGB" and image.size == (10000, 9000)
    del image
    with pytest.raises(RequestError, match="10000x9000 = 90000000 pixels, over the cap of 89000000"):
        decode_image(data, "image", max_pixels=89_000_000)
    with pytest.raises(RequestError, match="over the pixel cap of 100000000"):
        decode_image(png(15000, 12000), "image", max_pixels=100_000_000)


# ---------------------------------------------------------------------------------------------- the page
def test_chat_page_and_its_assets(tiny_server):
    status, headers, page = get(tiny_server.url, "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert b"/static/chat.js" in page and b'id="file-input"' in page
    assert get(tiny_server.url, "/static/chat.js")[0] == 200
    info = json.loads(get(tiny_server.url, "/info")[2])
    assert info["model"] == "lynx-serve-tiny" and info["video"] is True and len(info["examples"]) == 6
    status, headers, png = get(tiny_server.url, info["examples"][0]["url"])
    assert status == 200 and Image.open(io.BytesIO(png)).size == (32, 32)
    assert get(tiny_server.url, "/examples/nope.png")[0] == 404


# ---------------------------------------------------------------------------------------------- in-process servers
@pytest.fixture
def in_process(served_model):
    """``serve(settings)`` -> the base URL of the served variant with these settings (a real uvicorn server on a
    free loopback port, in a thread of this process)."""
    from contextlib import ExitStack

    from lynx_zoo.serving.app import create_app
    from lynx_zoo.serving.server import background_server
    from lynx_zoo.serving.settings import ServeSettings

    with ExitStack() as stack:

        def serve(model=served_model, **settings: Any) -> str:
            app = create_app(model, ServeSettings(variant="tiny", **settings), "lynx-serve-tiny")
            return stack.enter_context(background_server(app))

        yield serve


def test_a_whole_request_batch_starts_once_it_is_as_large_as_the_last_one(in_process):
    """For the requests answered by ``generate`` as a whole, ``--max-wait-ms`` bounds the wait for a batch to fill;
    a batch as large as the previous one starts at once, so a lone client waits only once (the first request, when
    there is no previous batch)."""
    wait = 4.0  # long against a tiny model's answer, so a loaded machine cannot blur the two cases
    # beam search: answered by generate as a whole, in batches (greedy and sampled requests join at the next step)
    url = in_process(max_batch_size=8, max_wait_ms=wait * 1000, preset="lynx-beam")
    body = {"messages": ask(QUESTIONS[1]), "max_tokens": 2}
    durations = []
    for _ in range(3):
        start = time.perf_counter()
        assert post(url, body)[0] == 200
        durations.append(time.perf_counter() - start)
    assert durations[0] >= wait and max(durations[1:]) < wait / 2, durations
    start = time.perf_counter()
    with ThreadPoolExecutor(4) as pool:  # a burst after batches of one: none of it waits for a batch to fill
        assert [r[0] for r in pool.map(lambda _: post(url, body), range(4))] == [200] * 4
    assert time.perf_counter() - start < wait / 2
    assert json.loads(get(url, "/health")[2])["requests"] == 7


def test_cross_attention_variant_batches_and_streams(in_process, make_tiny, media_root):
    """CA fusion (visual tokens through gated cross-attention, the prompt as input_ids) is served the same way."""
    from lynx_zoo import CrossAttnLynx
    from lynx_zoo.fusion.cross_attn import CrossAttnConfig

    model = make_tiny(CrossAttnLynx, seed=1, cross_attn=CrossAttnConfig(every=2, num_heads=2, head_dim=8))
    for block in model.fusion_blocks().values():  # open the attention gates (0 at init), so that the images matter
        block.attn_gate.data.fill_(1.0)
    model.eval()
    url = in_process(model=model, max_wait_ms=300)
    api = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    paths = [media_root / name for name in ("scene0.png", "scene1.png", "astronaut.jpg", "coffee.webp")]

    def run(index: int) -> str:
        messages = ask(QUESTIONS[index % 3], image_part(data_url(paths[index])))
        if index % 2:
            chunks = api.chat.completions.create(model="", messages=messages, stream=True)
            return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        return api.chat.completions.create(model="", messages=messages).choices[0].message.content

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(run, range(4)))
    expected = [model.generate(images=[p], prompts=[QUESTIONS[i % 3]])[0] for i, p in enumerate(paths)]
    assert answers == expected and len(set(expected)) > 1
    assert json.loads(get(url, "/health")[2])["largest_batch"] > 1


def test_beam_search_preset_top_n_beams_and_whole_answer_streams(in_process, served_model, media_root):
    """``--preset lynx`` (5 beams): ``n`` is the top-n beams, and a streamed answer arrives whole (transformers
    cannot stream beam search)."""
    url = in_process(preset="lynx")
    api = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    path = media_root / "scene2.png"
    messages = ask(QUESTIONS[0], image_part(data_url(path)))
    reply = api.chat.completions.create(model="", messages=messages, n=2)
    expected = served_model.generate(images=[path], prompts=[QUESTIONS[0]], preset="lynx", num_return_sequences=2)
    assert [c.message.content for c in reply.choices] == expected
    chunks = list(api.chat.completions.create(model="", messages=messages, stream=True))
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert deltas == [served_model.generate(images=[path], prompts=[QUESTIONS[0]], preset="lynx")[0]]
    with pytest.raises(openai.BadRequestError, match="n=6 is more than the 5 beams"):
        api.chat.completions.create(model="", messages=messages, n=6)


def test_full_queue_answers_503_with_retry_after(in_process, served_model):
    url = in_process(max_batch_size=1, max_queue=2, max_wait_ms=0)
    body = {"messages": ask(QUESTIONS[1]), "max_tokens": 16}
    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(lambda _: post(url, body), range(16)))
    refused = [(headers, reply) for status, headers, reply in replies if status == 503]
    served = [reply for status, _, reply in replies if status == 200]
    assert refused and served and len(refused) + len(served) == 16
    for headers, reply in refused:
        assert int(headers["retry-after"]) >= 1
        assert "--max-queue 2" in reply["error"]["message"]
    expected = served_model.generate(prompts=[QUESTIONS[1]], max_new_tokens=16)[0]
    assert all(reply["choices"][0]["message"]["content"] == expected for reply in served)
    assert post(url, body)[0] == 200


def test_a_failure_inside_one_request_spares_the_rest_of_its_batch(in_process, served_model):
    """A request that makes generation fail (here: a prompt with an out-of-vocabulary word, on a model that
    refuses those) fails alone; the requests decoded with it are answered."""
    unknown = served_model.tokenizer.unk_token_id
    fused = served_model.fused

    def refusing_unknown_words(input_ids, *args, **kwargs):
        if (input_ids == unknown).any():
            raise RuntimeError("this model refuses unknown words")
        return fused(input_ids, *args, **kwargs)

    served_model.fused = refusing_unknown_words
    try:
        url = in_process(max_batch_size=8, max_wait_ms=500)
        questions = [QUESTIONS[0], "what is a zebra?", QUESTIONS[1], QUESTIONS[2]]
        with ThreadPoolExecutor(4) as pool:
            replies = list(pool.map(lambda q: post(url, {"messages": ask(q)}), questions))
        health = json.loads(get(url, "/health")[2])
    finally:
        del served_model.fused
    for question, (status, _, reply) in zip(questions, replies):
        if question == "what is a zebra?":
            assert status == 500 and "this model refuses unknown words" in reply["error"]["message"]
        else:
            assert status == 200
            assert reply["choices"][0]["message"]["content"] == served_model.generate(prompts=[question])[0]
    assert health["failed_batches"] == 1  # its prefill, at admission


def test_a_stream_whose_client_goes_away_stops_generating(in_process, media_root):
    url = in_process(max_batch_size=8, max_wait_ms=0)
    # 300 tokens without an end token (seconds of generating): the client goes away long before they are done
    body = {"messages": ask(QUESTIONS[0], image_part(data_url(media_root / "scene0.png"))), "max_tokens": 300}
    body["stream"] = True
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200 and response.readline().startswith(b"data: ")
    connection.sock.shutdown(socket.SHUT_RDWR)  # the client goes away after the first chunk
    connection.close()
    deadline = time.monotonic() + 30
    while json.loads(get(url, "/health")[2])["dropped_sequences"] == 0:
        assert time.monotonic() < deadline, "the sequence of a client that went away was not stopped"
        time.sleep(0.05)
    assert json.loads(get(url, "/health")[2])["requests"] == 1


class _ImageHandler(http.server.BaseHTTPRequestHandler):
    root: Path

    def do_GET(self) -> None:  # noqa: N802 (the http.server API)
        data = (self.root / self.path.lstrip("/")).read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


def test_remote_images_when_enabled(in_process, served_model, media_root):
    handler = type("Handler", (_ImageHandler,), {"root": media_root})
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as files:
        threading.Thread(target=files.serve_forever, daemon=True).start()
        remote = f"http://127.0.0.1:{files.server_address[1]}/scene1.png"
        try:
            refused = post(in_process(), {"messages": ask(QUESTIONS[0], image_part(remote))})
            url = in_process(allow_remote_media=True)
            status, _, reply = post(url, {"messages": ask(QUESTIONS[0], image_part(remote))})
            missing = post(url, {"messages": ask(QUESTIONS[0], image_part(remote.replace("scene1", "nope")))})
        finally:
            files.shutdown()
    assert refused[0] == 400 and "remote URLs are off" in refused[2]["error"]["message"]
    assert status == 200
    expected = served_model.generate(images=[media_root / "scene1.png"], prompts=[QUESTIONS[0]])[0]
    assert reply["choices"][0]["message"]["content"] == expected
    assert missing[0] == 400 and "cannot fetch" in missing[2]["error"]["message"]


def test_request_body_over_the_limit_is_refused(in_process):
    url = in_process(max_image_bytes=1000, max_video_bytes=1000)
    status, _, reply = post(url, {"messages": ask("x" * 2_000_000)})
    assert status == 413 and "over the limit" in reply["error"]["message"]


def test_listening_socket_is_tcp_so_responses_are_not_delayed():
    """asyncio turns Nagle's algorithm off (TCP_NODELAY) only on sockets created as IPPROTO_TCP; without it every
    response waits out the client's delayed ACK (40 ms on Linux)."""
    from lynx_zoo.serving.server import bind_socket

    with bind_socket("127.0.0.1", 0) as sock:
        assert sock.proto == socket.IPPROTO_TCP


def test_a_checkpoint_is_served_too(in_process, make_tiny, tmp_path):
    """``--variant RUN.ckpt``: a Lightning checkpoint as the CLI writes it (its class recorded as ``_class_path``)."""
    import lightning as L

    from lynx_zoo.serving.cli import served_name_of

    trained = make_tiny(seed=1)  # weights whose answer is not empty
    trained.hparams["_class_path"] = "lynx_zoo.PrefixLynx"
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_model_summary=False)
    trainer.strategy.connect(trained)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    model = lynx_zoo.load_model(str(tmp_path / "last.ckpt"))
    assert served_name_of(str(tmp_path / "last.ckpt")) == "last"
    status, _, reply = post(in_process(model=model), {"messages": ask(QUESTIONS[1])})
    assert status == 200
    assert reply["choices"][0]["message"]["content"] == trained.eval().generate(prompts=[QUESTIONS[1]])[0]
    assert lynx_zoo.load_model(str(tmp_path / "last.ckpt"), dtype="bfloat16").llm.dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------- command line
def test_serve_command_line_errors(served_variant, capsys):
    from lynx_zoo.serving import main

    assert main(["--variant", "/no/such/variant", "--port", "0"]) == 1
    assert "no/such/variant" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["--variant", str(served_variant), "--max-batch-size", "0"])
    assert exit_info.value.code == 2 and "--max-batch-size must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--variant", str(served_variant), "--preset", "fast"])
    assert "unknown --preset 'fast'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--port", "0"])
    assert "--variant" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- keys and metrics
def test_api_key_is_required_everywhere_but_health(in_process, served_model, tmp_path, monkeypatch):
    """With keys set (a flag, the environment variable, a file of keys), a request without a key or with a wrong
    one is a 401 in OpenAI's error format; with any of the keys, a 200; ``/health`` needs none."""
    keys = tmp_path / "keys.txt"
    keys.write_text("# one a line\nfile-key-1\n\nfile-key-2\n")
    monkeypatch.setenv("LYNX_ZOO_API_KEY", "env-key")
    url = in_process(api_key_file=keys)
    body = {"messages": ask(QUESTIONS[1]), "max_tokens": 3}
    expected = served_model.generate(prompts=[QUESTIONS[1]], max_new_tokens=3)[0]
    status, headers, reply = post(url, body)
    assert status == 401 and headers["www-authenticate"] == "Bearer"
    assert reply["error"]["type"] == "invalid_request_error" and "API key" in reply["error"]["message"]
    status, _, reply = post(url, body, headers={"Authorization": "Bearer not-a-key"})
    assert status == 401 and reply["error"]["message"] == "Incorrect API key provided."
    for key in ("env-key", "file-key-1", "file-key-2"):
        status, _, reply = post(url, body, headers={"Authorization": f"Bearer {key}"})
        assert status == 200 and reply["choices"][0]["message"]["content"] == expected
    for path in ("/v1/models", "/info", "/metrics", "/examples/scene0.png"):
        assert get(url, path)[0] == 401, path
        assert get(url, path, {"Authorization": "Bearer env-key"})[0] in (200, 404), path
    assert get(url, "/health")[0] == 200
    assert get(url, "/")[0] == 200  # the chat page, which asks for the key
    with pytest.raises(openai.AuthenticationError, match="Incorrect API key"):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    api = openai.OpenAI(base_url=url + "/v1", api_key="file-key-2", max_retries=0)
    assert api.chat.completions.create(model="", **body).choices[0].message.content == expected


def test_a_non_loopback_host_without_a_key_is_refused(served_variant, capsys, monkeypatch):
    from lynx_zoo.serving import ServeSettings, main

    monkeypatch.delenv("LYNX_ZOO_API_KEY", raising=False)
    for host in ("0.0.0.0", "::", "192.168.1.7", "example.org"):
        with pytest.raises(SystemExit) as exit_info:
            main(["--variant", str(served_variant), "--host", host, "--port", "0"])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and f"refusing to listen on {host} (not loopback) without an API key" in err
    for host in ("127.0.0.1", "::1", "localhost"):
        assert ServeSettings(variant="x", host=host).api_keys() == frozenset()
    assert ServeSettings(variant="x", host="0.0.0.0", api_key="k").api_keys() == {"k"}
    assert ServeSettings(variant="x", host="0.0.0.0", insecure_no_auth=True).insecure_no_auth
    monkeypatch.setenv("LYNX_ZOO_API_KEY", "from-env")
    assert ServeSettings(variant="x", host="0.0.0.0").api_keys() == {"from-env"}


def test_metrics_count_requests_tokens_and_batches(in_process, served_model):
    """``/metrics`` in Prometheus' text format: requests by status, tokens, queue length, running sequences, and the
    latency, time-to-first-token and batch-occupancy histograms, matching what was served."""
    from prometheus_client.parser import text_string_to_metric_families

    url = in_process(max_batch_size=8)
    bodies = [{"messages": ask(QUESTIONS[i % 3]), "max_tokens": 2 + i} for i in range(6)]
    with ThreadPoolExecutor(6) as pool:
        replies = list(pool.map(lambda b: post(url, b), bodies))
    assert post(url, {"messages": []})[0] == 400
    status, headers, text = get(url, "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text.decode())
        for s in family.samples
    }
    assert samples[("lynx_requests_total", (("status", "200"),))] == 6
    assert samples[("lynx_requests_total", (("status", "400"),))] == 1
    completion = sum(r["usage"]["completion_tokens"] for _, _, r in replies)
    assert samples[("lynx_completion_tokens_total", ())] == completion
    assert samples[("lynx_prompt_tokens_total", ())] == sum(r["usage"]["prompt_tokens"] for _, _, r in replies)
    assert samples[("lynx_queue_length", ())] == 0 and samples[("lynx_running_sequences", ())] == 0
    assert samples[("lynx_request_latency_seconds_count", ())] == 6
    assert samples[("lynx_time_to_first_token_seconds_count", ())] == 6
    steps = samples[("lynx_batch_occupancy_count", ())]
    assert steps > 0 and samples[("lynx_batch_occupancy_sum", ())] == completion - 6  # the first tokens: prefill
    assert samples[("lynx_decode_step_seconds_count", ())] == steps
