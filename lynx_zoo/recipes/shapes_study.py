"""The rendered-shapes set of the frozen-LLM study (``docs/study/``): scenes with a small detail, questions in
several phrasings, and text-only data that teaches an LLM the language of the task.

Each 64 px scene holds 1-3 objects, each of its own shape, colour and quadrant, and each filled with a fine
**pattern** (``horizontal stripes``, ``vertical stripes`` or ``checks``) of 1-pixel lines: the three patterns cover
the same share of the object, so an image shrunk to 32 px averages them all to the same tint. The pattern is the
small detail that needs the higher resolution. Every scene gets one question of each category:

* ``colour``:   "what color is the circle?"                      -> red / green / blue / yellow / purple
* ``shape``:    "what shape is the red object?"                  -> circle / square / triangle
* ``counting``: "how many shapes are there?"                     -> one / two / three
* ``position``: "where is the red circle?"                       -> top left / top right / bottom left / bottom right
* ``pattern``:  "what pattern does the circle have?"             -> horizontal stripes / vertical stripes / checks

Every question comes in several **phrasings** (:data:`PHRASINGS`): the first :data:`TRAIN_PHRASINGS` of a category
are for training (the first alone is the "single prompt" set), the others are held out for evaluation.

A **caption** describes a scene in words ("a red circle with checks in the top left and ..."). The text-only data
of stage 0 puts the caption where the image will be and asks a question about it, in every phrasing: an LLM trained
on it knows the words, the questions and how to read a scene description before it ever sees an image.

:class:`ShapesStudyDataModule` renders the set once under ``root`` (JSONL manifests + PNG files, read through the
zoo's sources) and mixes image questions and text-only questions by ratio.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw
from transformers import PreTrainedTokenizerFast

from lynx_zoo.data.mixture import MixtureDataModule
from lynx_zoo.data.shapes import COLOURS, NUMBERS, QUADRANTS, SHAPES, word_level_tokenizer
from lynx_zoo.data.sources import ImageTextSource, Source, TextSource
from lynx_zoo.llm.causal_lm import register_tokenizer

PATTERNS = ("horizontal stripes", "vertical stripes", "checks")
CATEGORIES = ("colour", "shape", "counting", "position", "pattern")
# phrasings per category: the first TRAIN_PHRASINGS train (the first alone: "single prompt"), the rest are held out
PHRASINGS: dict[str, tuple[str, ...]] = {
    "colour": (
        "what color is the {shape}?",
        "which color does the {shape} have?",
        "tell me the color of the {shape}.",
        "what is the color of the {shape}?",
        "the {shape} has which color?",
    ),
    "shape": (
        "what shape is the {colour} object?",
        "which shape does the {colour} object have?",
        "tell me the shape of the {colour} object.",
        "what is the shape of the {colour} object?",
        "the {colour} object has which shape?",
    ),
    "counting": (
        "how many shapes are there?",
        "how many objects does the picture have?",
        "tell me the number of shapes.",
        "what is the number of objects?",
        "the picture has how many shapes?",
    ),
    "position": (
        "where is the {colour} {shape}?",
        "in which part of the picture is the {colour} {shape}?",
        "tell me where the {colour} {shape} is.",
        "where in the picture is the {colour} {shape}?",
        "the {colour} {shape} is in which part?",
    ),
    "pattern": (
        "what pattern does the {shape} have?",
        "which pattern is on the {shape}?",
        "tell me the pattern of the {shape}.",
        "what is the pattern of the {shape}?",
        "the {shape} has which pattern?",
    ),
}
TRAIN_PHRASINGS = 3
PhrasingSet = Literal["single", "diverse", "held_out"]

_CAPTION_WORDS = "a with in the and , .".split()
_PROMPT_WORDS = "user bot :".split()


def _words(text: str) -> list[str]:
    return text.replace("?", " ? ").replace(".", " . ").replace(",", " , ").replace("{", " ").replace("}", " ").split()


VOCABULARY = sorted(
    {w for options in PHRASINGS.values() for p in options for w in _words(p) if w not in ("shape", "colour")}
    | {"shape"}
    | set(_CAPTION_WORDS)
    | set(_PROMPT_WORDS)
    | set(COLOURS)
    | set(SHAPES)
    | set(NUMBERS)
    | {w for q in QUADRANTS for w in q.split()}
    | {w for p in PATTERNS for w in p.split()}
)


@register_tokenizer("lynx_zoo/shapes-study-words")
def shapes_study_tokenizer() -> PreTrainedTokenizerFast:
    """A lower-casing word-level tokenizer over the study's vocabulary (scenes, captions, every phrasing)."""
    return word_level_tokenizer(VOCABULARY)


# ----------------------------------------------------------------------------------------------- scenes
def draw_scene(rng: random.Random) -> list[dict]:
    """The objects of one scene: 1-3 of distinct shapes and colours, each in its own quadrant, each patterned."""
    count = rng.randint(1, 3)
    cells = rng.sample(range(4), count)
    shapes = rng.sample(SHAPES, count)
    colours = rng.sample(list(COLOURS), count)
    objects = []
    for cell, shape, colour in sorted(zip(cells, shapes, colours)):
        objects.append(
            {
                "shape": shape,
                "colour": colour,
                "quadrant": QUADRANTS[cell],
                "pattern": rng.choice(PATTERNS),
                "size": rng.uniform(0.30, 0.42),
                "offset": (rng.uniform(-0.1, 0.1), rng.uniform(-0.1, 0.1)),
            }
        )
    return objects


def pattern_mask(pattern: str, size: int) -> np.ndarray:
    """Where a pattern shows its colour on a ``size`` px canvas (1-pixel lines; the rest shows the background)."""
    rows, cols = np.indices((size, size))
    if pattern == "horizontal stripes":
        return rows % 2 == 0
    if pattern == "vertical stripes":
        return cols % 2 == 0
    return (rows + cols) % 2 == 0


def render(objects: list[dict], image_size: int, background: tuple[int, int, int]) -> Image.Image:
    """The scene as an image: each object's shape filled with its colour through its pattern."""
    canvas = np.empty((image_size, image_size, 3), dtype=np.uint8)
    canvas[:] = background
    half = image_size / 2
    for obj in objects:
        cell = QUADRANTS.index(obj["quadrant"])
        size = obj["size"] * image_size
        cx = (cell % 2) * half + half / 2 + obj["offset"][0] * half
        cy = (cell // 2) * half + half / 2 + obj["offset"][1] * half
        box = (cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2)
        shape = Image.new("L", (image_size, image_size), 0)
        draw = ImageDraw.Draw(shape)
        if obj["shape"] == "circle":
            draw.ellipse(box, fill=255)
        elif obj["shape"] == "square":
            draw.rectangle(box, fill=255)
        else:
            draw.polygon([(cx, box[1]), (box[2], box[3]), (box[0], box[3])], fill=255)
        inside = np.asarray(shape) > 127
        canvas[inside & pattern_mask(obj["pattern"], image_size)] = COLOURS[obj["colour"]]
    return Image.fromarray(canvas)


def caption(objects: list[dict]) -> str:
    """The scene in words: ``a red circle with checks in the top left and a blue square with ... .``"""
    parts = [f"a {o['colour']} {o['shape']} with {o['pattern']} in the {o['quadrant']}" for o in objects]
    return " and ".join(parts) + " ."


def questions(rng: random.Random, objects: list[dict]) -> list[dict]:
    """One question per category about a scene: its answer and the fields its phrasings fill in."""
    out = []
    for category in CATEGORIES:
        target = rng.choice(objects)
        answer = {
            "colour": target["colour"],
            "shape": target["shape"],
            "counting": NUMBERS[len(objects) - 1],
            "position": target["quadrant"],
            "pattern": target["pattern"],
        }[category]
        out.append(
            {"category": category, "answer": answer, "fields": {"shape": target["shape"], "colour": target["colour"]}}
        )
    return out


def phrase(category: str, fields: dict[str, str], phrasings: PhrasingSet, rng: random.Random) -> str:
    """A question in one phrasing of the set: ``single`` (the first), ``diverse`` (one of the training ones) or
    ``held_out`` (one of the others)."""
    options = PHRASINGS[category]
    if phrasings == "single":
        template = options[0]
    elif phrasings == "diverse":
        template = rng.choice(options[:TRAIN_PHRASINGS])
    else:
        template = rng.choice(options[TRAIN_PHRASINGS:])
    return template.format(**fields)


# ----------------------------------------------------------------------------------------------- the files
MANIFESTS = {
    "train_single": "train_single.jsonl",
    "train_diverse": "train_diverse.jsonl",
    "val": "val.jsonl",
    "val_held_out_phrasings": "val_held_out_phrasings.jsonl",
    "text_train": "text_train.jsonl",
    "text_val": "text_val.jsonl",
}


def write_shapes_study(
    root: str | Path, num_train: int, num_val: int, num_text: int, image_size: int = 64, seed: int = 0
) -> dict[str, Path]:
    """Render the study's set under ``root``; returns its manifests by name (:data:`MANIFESTS`).

    * ``train_single`` / ``train_diverse``: ``num_train`` images, five questions each, in the first phrasing / in
      one of the training phrasings (the same images, questions and answers);
    * ``val`` / ``val_held_out_phrasings``: ``num_val`` held-out images, in the first phrasing / in held-out ones;
    * ``text_train`` / ``text_val``: text only, ``num_text`` / ``num_val`` scenes of their own, each question after
      the scene's caption, in every phrasing (``{"instruction", "answer", "category"}``).
    """
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    lines: dict[str, list[str]] = {name: [] for name in MANIFESTS}
    for split, count, names in (
        ("train", num_train, ("train_single", "train_diverse")),
        ("val", num_val, ("val", "val_held_out_phrasings")),
    ):
        for index in range(count):
            objects = draw_scene(rng)
            background = tuple(rng.randint(200, 245) for _ in range(3))
            image = f"images/{split}_{index:06d}.png"
            render(objects, image_size, background).save(root / image)
            for q in questions(rng, objects):
                for name in names:
                    phrasings: PhrasingSet = {"train_single": "single", "val": "single"}.get(name, "diverse")
                    if name == "val_held_out_phrasings":
                        phrasings = "held_out"
                    record = {
                        "id": f"{split}_{index:06d}_{q['category']}",
                        "image": image,
                        "question": phrase(q["category"], q["fields"], phrasings, rng),
                        "answer": q["answer"],
                        "category": q["category"],
                    }
                    lines[name].append(json.dumps(record))
    for name, count in (("text_train", num_text), ("text_val", num_val)):
        for index in range(count):
            objects = draw_scene(rng)
            for q in questions(rng, objects):
                template = rng.choice(PHRASINGS[q["category"]])
                record = {
                    "id": f"{name}_{index:06d}_{q['category']}",
                    "instruction": f"{caption(objects)} {template.format(**q['fields'])}",
                    "answer": q["answer"],
                    "category": q["category"],
                }
                lines[name].append(json.dumps(record))
    paths = {}
    for name, file in MANIFESTS.items():
        tmp = root / f"{file}.tmp"
        tmp.write_text("\n".join(lines[name]) + "\n", encoding="utf-8")
        tmp.rename(root / file)
        paths[name] = root / file
    return paths


class ShapesStudyDataModule(MixtureDataModule):
    """The study's data (:func:`write_shapes_study`, rendered under ``root`` on first use), mixed by ratio: image
    questions in the chosen phrasings and text-only questions about captions.

    Args:
        root: folder of the rendered set (written if missing or made with other settings).
        num_train: training images (five questions each).
        num_val: held-out images (and held-out text scenes).
        num_text: text-only training scenes (five questions each).
        image_size: rendered image size in pixels (a model at a lower resolution shrinks them).
        render_seed: seed of the renderer.
        phrasings: ``diverse`` (three phrasings per question) or ``single`` (the first only).
        image_ratio: weight of the image questions in the mixture (0: text only, stage 0).
        text_ratio: weight of the text-only questions (0: images only).
        (the other arguments are those of :class:`~lynx_zoo.data.MixtureDataModule`)
    """

    def __init__(
        self,
        root: str = "data/shapes_study",
        num_train: int = 8000,
        num_val: int = 300,
        num_text: int = 8000,
        image_size: int = 64,
        render_seed: int = 0,
        phrasings: Literal["single", "diverse"] = "diverse",
        image_ratio: float = 1.0,
        text_ratio: float = 0.0,
        batch_size: int = 32,
        batches_per_epoch: int | None = None,
        num_workers: int = 1,
        seed: int = 0,
        strict: bool = False,
    ) -> None:
        if phrasings not in ("single", "diverse"):
            raise ValueError(f"phrasings: expected 'single' or 'diverse', got {phrasings!r}")
        if image_ratio <= 0 and text_ratio <= 0:
            raise ValueError("ShapesStudyDataModule: image_ratio and text_ratio are both 0: nothing to train on")
        self.root = Path(root)
        self.settings = dict(
            num_train=num_train, num_val=num_val, num_text=num_text, image_size=image_size, seed=render_seed
        )
        sources: list[Source] = []
        val_sources: list[Source] = []
        if image_ratio > 0:
            sources.append(
                ImageTextSource(str(self.root / MANIFESTS[f"train_{phrasings}"]), name="images", ratio=image_ratio)
            )
            val_sources.append(ImageTextSource(str(self.root / MANIFESTS["val"]), name="val"))
        if text_ratio > 0:
            sources.append(TextSource(str(self.root / MANIFESTS["text_train"]), name="text", ratio=text_ratio))
            if image_ratio <= 0:
                val_sources.append(TextSource(str(self.root / MANIFESTS["text_val"]), name="text_val"))
        super().__init__(
            sources,
            val_sources,
            batch_size=batch_size,
            batches_per_epoch=batches_per_epoch,
            num_workers=num_workers,
            seed=seed,
            strict=strict,
        )

    def prepare_data(self) -> None:
        stamp = self.root / "params.json"
        wanted = json.dumps(self.settings, sort_keys=True)
        if stamp.is_file() and stamp.read_text(encoding="utf-8") == wanted:
            return
        write_shapes_study(self.root, **self.settings)
        stamp.write_text(wanted, encoding="utf-8")
