"""The rendered shapes set is unambiguous: every question is decided by the image's pixels alone."""

import json
import random

import pytest
from PIL import Image

from lynx_zoo.data.shapes import oracle_answer, render_scene, scene_from_pixels, scene_questions, write_shapes_vqa


@pytest.mark.parametrize("image_size", [32, 64])
def test_a_pixel_oracle_answers_every_question(tmp_path, image_size):
    write_shapes_vqa(tmp_path, num_train=150, num_val=0, image_size=image_size, seed=3)
    records = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    scenes = {}
    for record in records:
        if record["image"] not in scenes:
            scenes[record["image"]] = scene_from_pixels(Image.open(tmp_path / record["image"]))
        assert oracle_answer(scenes[record["image"]], record["question"]) == record["answer"], record
    assert {r["category"] for r in records} == {"colour", "shape", "counting", "position"}


def test_the_oracle_reads_back_what_was_drawn():
    rng = random.Random(0)
    for _ in range(50):
        image, objects = render_scene(rng, 64)
        assert sorted(scene_from_pixels(image), key=str) == sorted(objects, key=str)


def test_the_oracle_says_when_the_objects_do_not_decide():
    objects = [
        {"shape": "circle", "colour": "red", "quadrant": "top left"},
        {"shape": "circle", "colour": "blue", "quadrant": "top right"},
    ]
    assert oracle_answer(objects, "what color is the circle?") is None
    assert oracle_answer(objects, "what color is the circle in the top right?") == "blue"
    assert {q for _, q, _ in scene_questions(random.Random(0), objects)} >= {"how many shapes are there?"}
