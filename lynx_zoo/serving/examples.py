"""Example scenes of the chat page: rendered shapes scenes (the demo's data), with questions about each."""

from __future__ import annotations

import io
import random
from dataclasses import dataclass

from lynx_zoo.data.shapes import render_scene, scene_questions

NUM_EXAMPLES = 6


@dataclass(frozen=True)
class ExampleScene:
    """One scene: its PNG file and the questions the shapes set asks about it (one per category)."""

    name: str
    png: bytes
    questions: tuple[str, ...]


def example_scenes(image_size: int, count: int = NUM_EXAMPLES) -> list[ExampleScene]:
    """``count`` scenes rendered at ``image_size`` pixels (the model's input size), the same on every start."""
    scenes = []
    for index in range(count):
        rng = random.Random(1000 + index)
        image, objects = render_scene(rng, image_size)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        questions = tuple(question for _, question, _ in scene_questions(rng, objects))
        scenes.append(ExampleScene(f"scene-{index}", buffer.getvalue(), questions))
    return scenes
