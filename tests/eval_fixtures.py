"""Helpers of the evaluation tests: a real OpenAI-compatible judge server on loopback, an MME folder, and a model's
log-probability of an answer."""

from __future__ import annotations

import json
import re
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch
from PIL import Image

from lynx_zoo.data import IGNORE_INDEX, Sample

SECRET = "sk-test-7f3a9c-never-written-anywhere"
PROMPT = re.compile(
    r'^Given the question "(.*)", does the answer "(.*)" imply the answer "(.*)"\? Answer with Yes or No\.$', re.S
)


class ChatServer:
    """An OpenAI-compatible chat-completions endpoint on a free loopback port.

    It answers by rule ("Yes" when the prediction contains the ground truth, else "No"); ``script``
    queues actions for the next requests instead: ``("status", 429)``, ``("sleep", 0.5)`` (reply
    late), ``("body", "not json")`` or ``("content", "Maybe")``. ``requests`` records each request.
    """

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.script: deque[tuple[str, object]] = deque()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # keep the test output quiet
                pass

            def _send(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                    pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                owner.requests.append(
                    {
                        "time": time.monotonic(),
                        "path": self.path,
                        "auth": self.headers.get("Authorization"),
                        "body": body,
                    }
                )
                action, value = owner.script.popleft() if owner.script else ("rule", None)
                if action == "status":
                    return self._send(int(value), json.dumps({"error": {"message": "busy"}}).encode())
                if action == "body":
                    return self._send(200, str(value).encode())
                if action == "sleep":
                    time.sleep(float(value))
                content = value if action == "content" else owner.rule(body["messages"][0]["content"])
                reply = {
                    "id": "x",
                    "object": "chat.completion",
                    "model": body["model"],
                    "choices": [
                        {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
                    ],
                }
                self._send(200, json.dumps(reply).encode())

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @staticmethod
    def rule(prompt: str) -> str:
        match = PROMPT.match(prompt)
        if match is None:
            return "I did not get the question."
        _, prediction, answer = match.groups()
        return "Yes" if answer.lower() in prediction.lower() else "No"

    def __enter__(self) -> ChatServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def log_prob(model, question: str, image: Image.Image, continuation: str) -> float:
    """log p(continuation | question, image), from the model's own loss over exactly the continuation's tokens (its
    mean loss over them times their number; independent of the lmms-eval adapter)."""
    prompt = model.processor.encode(Sample(question), with_answer=False)[0]
    answer = model.tokenizer(continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt + answer])
    labels = torch.tensor([[IGNORE_INDEX] * len(prompt) + answer])
    pixels = model.processor.image_transform(image.convert("RGB"))[None]
    with torch.no_grad():
        loss = model(ids, torch.ones_like(ids), pixels, labels).loss
    return -loss.item() * len(answer)


def write_image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (120, 30, 200)).save(path)


def write_mme_fixture(root: Path) -> dict[tuple[str, str, str], str]:
    """Four subtasks in both layouts; returns the answer the "model" gives to each (subtask, image, question)."""
    # existence, count: the ground-truth table layout (<subtask>/<subtask>.txt, images in the folder)
    tables = {
        "existence": [
            ("a.png", "Is there a dog?", "Yes", "Yes, there is a dog."),
            ("a.png", "Is there a cat?", "No", "no."),
            ("b.png", "Is there a car?", "Yes", "The answer is yes"),
            ("b.png", "Is there a bus?", "No", "No"),
            ("c.png", "Is there a tree?", "No", "yes"),
            ("c.png", "Is there a sky?", "Yes", "  YES  "),
        ],
        "count": [
            ("d.png", "Are there two dogs?", "Yes", "Not sure"),
            ("d.png", "Are there three dogs?", "No", "no"),
            ("e.png", "Is there one apple?", "No", "nope"),
            ("e.png", "Are there two apples?", "Yes", "yes."),
        ],
    }
    answers = {}
    for subtask, rows in tables.items():
        lines = []
        for image, question, truth, answer in rows:
            write_image(root / subtask / image)
            lines.append(f"{image}\t{question}\t{truth}")
            answers[(subtask, image, question)] = answer
        (root / subtask / f"{subtask}.txt").write_text("\n".join(lines) + "\n")
    # artwork: the release layout with images/ and questions_answers_YN/
    write_image(root / "artwork" / "images" / "g.jpg")
    (root / "artwork" / "questions_answers_YN").mkdir(parents=True)
    (root / "artwork" / "questions_answers_YN" / "g.txt").write_text("Is this by Monet?\tYes\nIs this by Dali?\tNo\n")
    answers[("artwork", "g.jpg", "Is this by Monet?")] = "yes"
    answers[("artwork", "g.jpg", "Is this by Dali?")] = "Yes"
    # code_reasoning: the release layout with the image and its txt side by side
    write_image(root / "code_reasoning" / "f.png")
    (root / "code_reasoning" / "f.txt").write_text("Does it print 3?\tYes\nDoes it print 4?\tNo\n")
    answers[("code_reasoning", "f.png", "Does it print 3?")] = "Yes"
    answers[("code_reasoning", "f.png", "Does it print 4?")] = "No"
    return answers
