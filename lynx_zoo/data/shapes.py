"""A built-in visual question answering set of rendered shapes, for the embedded CPU demo and tests.

Each image holds 1-3 shapes (circle, square, triangle) of distinct colours, each in its own quadrant.
Every image gets one question of each category:

* ``colour``:   "what color is the circle?"            -> red / green / blue / yellow / purple
* ``shape``:    "what shape is the red object?"        -> circle / square / triangle
* ``counting``: "how many shapes are there?"          -> one / two / three
* ``position``: "where is the red circle?"            -> top left / top right / bottom left / bottom right

The set is written to disk as PNG files plus JSONL manifests, the format real data sets use, so
the demo trains through the real loading path. The word-level tokenizer ``lynx_zoo/shapes-words``
covers its vocabulary.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tokenizers import Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from lynx_zoo.llm.causal_lm import PAD_TOKEN, register_tokenizer

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 30),
    "purple": (140, 50, 170),
}
SHAPES = ("circle", "square", "triangle")
NUMBERS = ("one", "two", "three")
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
CATEGORIES = ("colour", "shape", "counting", "position")

_PROMPT_WORDS = "user bot : ? what color is the in shape object how many shapes are there where".split()
VOCABULARY = sorted(
    set(_PROMPT_WORDS) | set(COLOURS) | set(SHAPES) | set(NUMBERS) | {w for q in QUADRANTS for w in q.split()}
)
SPECIAL_TOKENS = (PAD_TOKEN, "<s>", "</s>", "<unk>")


def word_level_tokenizer(vocabulary: list[str]) -> PreTrainedTokenizerFast:
    """A lower-casing word-level tokenizer: the special tokens, then ``vocabulary`` (ids are stable)."""
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *vocabulary])}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD_TOKEN, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


@register_tokenizer("lynx_zoo/shapes-words")
def shapes_tokenizer() -> PreTrainedTokenizerFast:
    """A lower-casing word-level tokenizer over the shapes vocabulary (ids are stable)."""
    return word_level_tokenizer(VOCABULARY)


def render_scene(rng: random.Random, image_size: int) -> tuple[Image.Image, list[dict]]:
    """One image and its objects (shape, colour, quadrant)."""
    background = tuple(rng.randint(200, 245) for _ in range(3))
    image = Image.new("RGB", (image_size, image_size), background)
    draw = ImageDraw.Draw(image)
    count = rng.randint(1, 3)
    cells = rng.sample(range(4), count)
    colours = rng.sample(list(COLOURS), count)
    objects = []
    half = image_size // 2
    for cell, colour in zip(cells, colours):
        shape = rng.choice(SHAPES)
        size = rng.uniform(0.28, 0.42) * image_size
        cx = (cell % 2) * half + half / 2 + rng.uniform(-0.1, 0.1) * half
        cy = (cell // 2) * half + half / 2 + rng.uniform(-0.1, 0.1) * half
        box = (cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2)
        fill = COLOURS[colour]
        if shape == "circle":
            draw.ellipse(box, fill=fill)
        elif shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(cx, box[1]), (box[2], box[3]), (box[0], box[3])], fill=fill)
        objects.append({"shape": shape, "colour": colour, "quadrant": QUADRANTS[cell]})
    return image, objects


def scene_questions(rng: random.Random, objects: list[dict]) -> list[tuple[str, str, str]]:
    """One (category, question, answer) per category for a scene."""
    target = rng.choice(objects)
    shape_counts = {s: sum(o["shape"] == s for o in objects) for s in SHAPES}
    unique_shape = [o for o in objects if shape_counts[o["shape"]] == 1]
    by_shape = rng.choice(unique_shape) if unique_shape else None
    questions = []
    if by_shape is not None:
        questions.append(("colour", f"what color is the {by_shape['shape']}?", by_shape["colour"]))
    else:  # every shape repeats: ask about the one that is unique by colour and shape together
        questions.append(
            ("colour", f"what color is the {target['shape']} in the {target['quadrant']}?", target["colour"])
        )
    questions.append(("shape", f"what shape is the {target['colour']} object?", target["shape"]))
    questions.append(("counting", "how many shapes are there?", NUMBERS[len(objects) - 1]))
    where = rng.choice(objects)
    questions.append(("position", f"where is the {where['colour']} {where['shape']}?", where["quadrant"]))
    return questions


def write_shapes_vqa(root: str | Path, num_train: int, num_val: int, image_size: int = 64, seed: int = 0) -> None:
    """Render the set under ``root``: ``images/``, ``train.jsonl`` and ``val.jsonl`` (held-out images)."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for split, count in (("train", num_train), ("val", num_val)):
        lines = []
        for index in range(count):
            image, objects = render_scene(rng, image_size)
            name = f"images/{split}_{index:06d}.png"
            image.save(root / name)
            for category, question, answer in scene_questions(rng, objects):
                record = {
                    "id": f"{split}_{index:06d}_{category}",
                    "image": name,
                    "question": question,
                    "answer": answer,
                    "category": category,
                }
                lines.append(json.dumps(record))
        tmp = root / f"{split}.jsonl.tmp"
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
        tmp.rename(root / f"{split}.jsonl")


# the share of its bounding box that each shape fills (a filled circle pi/4, a square 1, an isosceles triangle 1/2)
_FILL_SHARE = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}


def scene_from_pixels(image: Image.Image) -> list[dict]:
    """Read a rendered scene back from its pixels alone: each palette colour present is one object, its shape the
    one whose share of the bounding box it fills best, its quadrant where its centre lies. An oracle over the data:
    what the image decides, with no access to how it was drawn."""
    pixels = np.asarray(image.convert("RGB"))
    half_y, half_x = pixels.shape[0] / 2, pixels.shape[1] / 2
    objects = []
    for colour, rgb in COLOURS.items():
        ys, xs = np.nonzero((pixels == rgb).all(axis=-1))
        if len(ys) == 0:
            continue
        fill = len(ys) / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
        shape = min(_FILL_SHARE, key=lambda s: abs(_FILL_SHARE[s] - fill))
        quadrant = QUADRANTS[2 * int(ys.mean() >= half_y) + int(xs.mean() >= half_x)]
        objects.append({"shape": shape, "colour": colour, "quadrant": quadrant})
    return objects


def oracle_answer(objects: list[dict], question: str) -> str | None:
    """The answer that ``objects`` (e.g. :func:`scene_from_pixels`) give to one of :func:`scene_questions`'
    questions; None when they do not decide it (no object, or several, fits)."""
    if question == "how many shapes are there?":
        return NUMBERS[len(objects) - 1] if 1 <= len(objects) <= len(NUMBERS) else None
    # the words naming the object come after "what color is" / "what shape is" / "where is the"
    named = set(question.rstrip("?").split()[3:]) & {*SHAPES, *COLOURS}
    in_quadrant = " in the " in question
    fits = [
        o
        for o in objects
        if named <= {o["shape"], o["colour"]} and (not in_quadrant or question.rstrip("?").endswith(o["quadrant"]))
    ]
    if len(fits) != 1:
        return None
    (target,) = fits
    if question.startswith("what color"):
        return target["colour"]
    if question.startswith("what shape"):
        return target["shape"]
    return target["quadrant"]
