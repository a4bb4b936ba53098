"""``generate``: images in every form, video files, batches of mixed prompt lengths, presets."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from lynx_zoo import CrossAttnLynx
from lynx_zoo.data.video import read_video_frames
from lynx_zoo.generation import GENERATION_PRESETS

PROMPTS = ["how many shapes are there?", "what color is the big circle in the top left of the picture?"]


def write_clip(path: Path, num_frames: int = 12, size: int = 32) -> Path:
    """A short MPEG-4 clip of a square moving across the frame."""
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(num_frames):
            pixels = np.full((size, size, 3), 220, dtype=np.uint8)
            x = i * (size - 8) // num_frames
            pixels[8:16, x : x + 8] = (200, 30, 30)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def scene(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))


@pytest.fixture
def model(make_tiny):
    # min_new_tokens: a random tiny model would often end at once; the answers must have words to compare
    return make_tiny(eval_generation={"max_new_tokens": 4, "min_new_tokens": 4}).eval()


@pytest.mark.slow
def test_images_as_pil_paths_and_tensors_give_the_same_answers(model, tmp_path):
    images = [scene(1), scene(2)]
    paths = []
    for i, image in enumerate(images):
        paths.append(tmp_path / f"{i}.png")
        image.save(paths[-1])
    tensors = [model.processor.image_transform(image) for image in images]
    expected = model.generate(images=images, prompts=PROMPTS)
    assert len(expected) == 2 and all(a.strip() for a in expected)
    assert model.generate(images=paths, prompts=PROMPTS) == expected
    assert model.generate(images=[str(p) for p in paths], prompts=PROMPTS) == expected
    assert model.generate(images=tensors, prompts=PROMPTS) == expected
    assert model.generate(images=torch.stack(tensors), prompts=PROMPTS) == expected
    assert model.generate(images, PROMPTS) == expected  # the positional form of earlier callers


@pytest.mark.slow
def test_a_batch_of_mixed_prompt_lengths_answers_as_one_by_one(model):
    images = [scene(3), scene(4)]
    batched = model.generate(images=images, prompts=PROMPTS, preset="greedy", max_new_tokens=6, min_new_tokens=6)
    single = [
        model.generate(images=[i], prompts=p, preset="greedy", max_new_tokens=6, min_new_tokens=6)[0]
        for i, p in zip(images, PROMPTS)
    ]
    assert batched == single and all(a.strip() for a in batched)


@pytest.mark.slow
def test_greedy_equals_one_beam_and_presets_apply(model, make_tiny):
    images = [scene(5), scene(6)]
    greedy = model.generate(images=images, prompts=PROMPTS, preset="greedy", max_new_tokens=5, min_new_tokens=5)
    assert all(a.strip() for a in greedy)
    one_beam = model.generate(images=images, prompts=PROMPTS, num_beams=1, do_sample=False, max_new_tokens=5)
    assert one_beam == greedy
    # the Lynx preset: 5 beams (an explicit argument still wins over the preset)
    assert GENERATION_PRESETS["lynx"]["num_beams"] == 5 and GENERATION_PRESETS["lynx"]["length_penalty"] == -2.0
    lynx = model.generate(images=images, prompts=PROMPTS, preset="lynx", max_new_tokens=5)
    assert len(lynx) == 2 and all(isinstance(a, str) for a in lynx)
    assert model.generate(images=images, prompts=PROMPTS, preset="lynx", num_beams=1, max_new_tokens=5) == (
        model.generate(
            images=images,
            prompts=PROMPTS,
            max_new_tokens=5,
            **{k: v for k, v in GENERATION_PRESETS["lynx"].items() if k not in ("num_beams", "max_new_tokens")},
            num_beams=1,
        )
    )
    with pytest.raises(ValueError, match="unknown preset 'beam'"):
        model.generate(images=images, prompts=PROMPTS, preset="beam")


@pytest.mark.slow
def test_a_video_file_is_sampled_and_answered(model, make_tiny, tmp_path):
    clip = write_clip(tmp_path / "clip.mp4")
    frames = read_video_frames(clip, model.vision_config.num_frames)
    answers = model.generate(videos=[clip, clip], prompts=PROMPTS)
    assert len(answers) == 2 and all(a.strip() for a in answers)
    assert model.generate(videos=[frames, frames], prompts=PROMPTS) == answers
    tensor = torch.stack([model.processor.image_transform(f) for f in frames])
    assert model.generate(videos=torch.stack([tensor, tensor]), prompts=PROMPTS) == answers
    # the frames count: a different video gives a different visual prefix
    assert not torch.equal(
        model.encode_images(torch.stack([tensor])), model.encode_images(torch.stack([tensor.flip(0)]))
    )
    ca = make_tiny(CrossAttnLynx, eval_generation={"max_new_tokens": 3}).eval()
    assert len(ca.generate(videos=[str(clip)], prompts=PROMPTS[:1])) == 1


def test_wrong_inputs_are_named(model, tmp_path):
    with pytest.raises(ValueError, match="images or videos, not both"):
        model.generate(images=[scene(1)], videos=[tmp_path / "a.mp4"], prompts=PROMPTS[:1])
    with pytest.raises(ValueError, match="1 images for 2 prompts"):
        model.generate(images=[scene(1)], prompts=PROMPTS)
    with pytest.raises(OSError, match="video not found: .*missing.mp4"):
        model.generate(videos=[tmp_path / "missing.mp4"], prompts=PROMPTS[:1])
    with pytest.raises(OSError, match="nothing.png: no such image file"):
        model.generate(images=[tmp_path / "nothing.png"], prompts=PROMPTS[:1])
    with pytest.raises(ValueError, match="must have 5 frames"):
        model.generate(videos=[[scene(1)] * 3], prompts=PROMPTS[:1])
