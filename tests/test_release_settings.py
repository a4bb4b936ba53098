"""The settings the original code fixes (bytedance/lynx-llm): the generation presets and their seeding, fp32
inference, the resampler's latent init, and the training-image augmentation with its switch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from media import save_photos, write_clip, write_jsonl
from PIL import Image
from torchvision import transforms

from lynx_zoo import VisionConfig
from lynx_zoo.bridge.bridges import PerceiverResampler
from lynx_zoo.data import ImageTextSource, LoadContext, MixtureDataModule, VideoQASource
from lynx_zoo.generation import GENERATION_PRESETS
from lynx_zoo.hub import load_pretrained
from lynx_zoo.hub.export import export_variant
from lynx_zoo.vision import VisionEncoder

REPO = Path(__file__).resolve().parents[1]
RELEASE = dict(  # configs/LYNX.yaml (infer params) and generate.sh (--seed 42)
    num_beams=5, do_sample=True, top_p=0.9, top_k=3, length_penalty=-2.0, no_repeat_ngram_size=2
) | dict(min_new_tokens=2, max_new_tokens=64, seed=42)


def real_lynx_init_args() -> dict:
    return yaml.safe_load((REPO / "configs" / "pt_vicuna_420.yaml").read_text())["model"]["init_args"]


def test_the_lynx_preset_is_the_releases_and_lynx_beam_its_deterministic_search():
    assert GENERATION_PRESETS["lynx"] == RELEASE
    assert GENERATION_PRESETS["lynx-beam"] == {
        k: v for k, v in RELEASE.items() if k not in ("top_p", "top_k", "seed")
    } | {"do_sample": False}
    # the real-Lynx config validates with the same settings
    assert real_lynx_init_args()["eval_generation"] == RELEASE


@pytest.mark.slow
def test_a_seeded_preset_repeats_and_leaves_the_global_generator_alone(make_tiny):
    model = make_tiny().eval()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    prompts = ["what color is the circle?", "how many shapes are there?"]
    settings = dict(preset="lynx", max_new_tokens=6)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = model.generate(images, prompts, **settings)
    assert torch.equal(torch.get_rng_state(), state)  # sampling drew from its own seeded stream
    torch.manual_seed(7)  # another global state: the seeded answers do not move
    assert model.generate(images, prompts, **settings) == first
    sampled = {tuple(model.generate(images, prompts, **settings, seed=s)) for s in range(6)}
    assert len(sampled) > 1  # the seed is what fixes them: other seeds sample other answers
    beam = model.generate(images, prompts, preset="lynx-beam", max_new_tokens=6)
    torch.manual_seed(99)
    assert model.generate(images, prompts, preset="lynx-beam", max_new_tokens=6) == beam


def test_a_bf16_variant_runs_in_fp32_when_loaded_so(make_tiny, tmp_path):
    model = make_tiny(llm={"dtype": "bfloat16"}).eval()
    assert model.llm.dtype == torch.bfloat16
    folder = export_variant(model, tmp_path / "bf16")
    loaded = load_pretrained(folder, dtype="float32")
    assert loaded.llm.dtype == torch.float32 and loaded.llm_config.dtype == "float32"
    images = torch.randn(1, 3, 32, 32)
    assert loaded.encode_images(images).dtype == torch.float32  # visual tokens enter an fp32 LLM in fp32
    weight = "llm.model.layers.0.mlp.down_proj.weight"
    torch.testing.assert_close(loaded.state_dict()[weight], model.state_dict()[weight].float(), rtol=0, atol=0)
    assert len(loaded.generate(images, ["how many shapes are there?"], preset="greedy", max_new_tokens=2)) == 1


def test_resampler_latents_start_from_a_standard_normal():
    torch.manual_seed(0)
    latents = PerceiverResampler(vision_width=64, llm_width=512, num_queries=32).latents.detach()
    assert latents.shape == (32, 512)
    assert abs(latents.std().item() - 1.0) < 0.03 and abs(latents.mean().item()) < 0.03


def tower(**kwargs) -> VisionEncoder:
    tiny = dict(patch_size=8, embed_dim=32, depth=1, num_heads=2)
    return VisionEncoder(VisionConfig(model_name="vit_tiny_patch16_224", image_size=32, model_kwargs=tiny, **kwargs))


def test_the_training_crop_is_the_releases_and_switchable():
    crop = tower(train_crop=True).train_image_transform().transforms[0]
    assert isinstance(crop, transforms.RandomResizedCrop)
    assert crop.size == (32, 32) and crop.scale == (0.9, 1.0) and crop.ratio == (0.75, 1.3333)
    assert crop.interpolation == transforms.InterpolationMode.BICUBIC
    plain = tower().train_image_transform().transforms  # the default: the evaluation transform
    assert [type(t) for t in plain[:2]] == [transforms.Resize, transforms.CenterCrop]
    custom = tower(train_crop=True, train_crop_scale=(0.5, 1.0)).train_image_transform().transforms[0]
    assert custom.scale == (0.5, 1.0)
    # the real-Lynx config crops as the release; the tiny and demo configs keep training on the eval transform
    assert real_lynx_init_args()["vision"]["train_crop"] is True
    for name in ("tiny", "demo"):
        config = yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text())
        assert not config["model"]["init_args"]["vision"].get("train_crop", False)


def test_training_images_are_cropped_per_sample_reproducibly_and_video_frames_never(tmp_path):
    encoder = tower(train_crop=True)
    files = save_photos(tmp_path)
    manifest = write_jsonl(tmp_path / "vqa.jsonl", [{"image": f, "question": "what?", "answer": "a"} for f in files])
    train = LoadContext(encoder.train_image_transform(), training=True, frame_transform=encoder.image_transform())
    source = ImageTextSource(str(manifest))
    source.prepare(train)
    first, again, other = source.load(0, "0/0").image, source.load(0, "0/0").image, source.load(0, "1/0").image
    assert torch.equal(first, again)  # the crop is drawn from the sample's own seeded stream
    assert not torch.equal(first, other)  # another pass crops differently
    evaluation = ImageTextSource(str(manifest))
    evaluation.prepare(LoadContext(encoder.image_transform(), training=False))
    with Image.open(tmp_path / files[0]) as image:
        expected = encoder.image_transform()(image.convert("RGB"))
    assert torch.equal(evaluation.load(0, "0/0").image, expected)
    # videos: the release never crops frames at random (get_video_transform: the eval transform for both)
    write_clip(tmp_path / "clip.mp4")
    clips = VideoQASource(str(write_jsonl(tmp_path / "clips.jsonl", [{"video": "clip.mp4", "answer": "a"}])))
    clips.prepare(train)
    frames = clips.load(0, "0/0").image
    assert frames.shape == (5, 3, 32, 32)
    assert torch.equal(clips.load(0, "0/0").image, frames)


def test_the_datamodules_hand_the_training_transform_to_training_sources_only(make_tiny, tmp_path):
    model = make_tiny(vision={"train_crop": True})
    files = save_photos(tmp_path)
    manifest = str(write_jsonl(tmp_path / "vqa.jsonl", [{"image": f, "answer": "a"} for f in files]))
    data = MixtureDataModule(
        [ImageTextSource(manifest, name="train")], val_sources=[ImageTextSource(manifest, name="val")], num_workers=0
    )
    data.processor = model.processor
    data.setup("fit")
    assert data.sources[0].ctx.transform is model.processor.train_image_transform
    assert data.sources[0].ctx.frame_transform is model.processor.image_transform
    assert data.val_sources[0].ctx.transform is model.processor.image_transform


@pytest.fixture(autouse=True)
def _variants_home(tmp_path, monkeypatch):
    monkeypatch.setenv("LYNX_ZOO_VARIANTS", str(tmp_path / "variants"))


def test_the_real_lynx_evaluation_transform_is_the_releases():
    vision = real_lynx_init_args()["vision"]
    config = VisionConfig(**{**vision, "checkpoint_path": None})
    with torch.device("meta"):
        encoder = VisionEncoder(config)
    resize, crop, _, normalize = encoder.image_transform().transforms
    assert (
        resize.size == 420 and resize.interpolation == transforms.InterpolationMode.BICUBIC and crop.size == (420, 420)
    )
    # dataset/__init__.py: image_mean / image_std of configs/LYNX.yaml (CLIP's)
    assert normalize.mean == (0.48145466, 0.4578275, 0.40821073)
    assert normalize.std == (0.26862954, 0.26130258, 0.27577711)
