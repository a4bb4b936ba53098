"""Export to transformers' LLaVA layout: the folder loads and answers in a process without lynx_zoo exactly as the
lynx_zoo model does; what would compute something else is refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import REPO, tiny_configs
from PIL import Image

from lynx_zoo import AdapterConfig, BridgeConfig, LLMConfig, PrefixLynx, PromptConfig, VisionConfig
from lynx_zoo.cli import main
from lynx_zoo.data.processor import Sample
from lynx_zoo.fusion.llava_import import llava_model_configs
from lynx_zoo.hub.llava_format import IMAGE_TOKEN, NotExportableError, export_llava
from lynx_zoo.llm import load_tokenizer

WORKER = Path(__file__).with_name("llava_worker.py")
QUESTIONS = ["what color is the circle?", "how many shapes are there in this picture of shapes?"]


def _images(root: Path) -> list[Path]:
    """Two images of different sizes and aspect ratios (resized and centre-cropped by both sides)."""
    rng = np.random.RandomState(3)
    paths = []
    for i, (h, w) in enumerate([(40, 56), (90, 64)]):
        path = root / f"image{i}.png"
        Image.fromarray(rng.randint(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def _transformers_alone(folder: Path, images: list[Path], questions: list[str], tmp: Path, new_tokens: int) -> dict:
    requests = tmp / "requests.json"
    requests.write_text(
        json.dumps({"images": [str(p) for p in images], "questions": questions, "max_new_tokens": new_tokens})
    )
    out = tmp / "outputs.pt"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # -I: no PYTHONPATH, no user site, not the script's folder; lynx_zoo's editable install (a path or an import
    # hook) is dropped: the worker checks that `import lynx_zoo` fails
    code = (
        "import sys; sys.path = [p for p in sys.path if 'lynx' not in p]; "
        "sys.meta_path = [f for f in sys.meta_path if '__editable__' not in getattr(f, '__module__', '')]; "
        f"sys.argv = {[str(WORKER), str(folder), str(requests), str(out)]!r}; "
        f"exec(compile(open({str(WORKER)!r}).read(), {str(WORKER)!r}, 'exec'))"
    )
    subprocess.run([sys.executable, "-I", "-c", code], check=True, cwd=tmp, env=env, timeout=300)
    return torch.load(out, weights_only=True)


def _lynx_side(model: PrefixLynx, images: list[Path], questions: list[str], new_tokens: int) -> tuple:
    transform = model.processor.image_transform
    pixels = torch.stack([transform(Image.open(p).convert("RGB")) for p in images])
    batch = model.processor.prompts([Sample(q) for q in questions])
    with torch.no_grad():
        logits = model(batch["input_ids"], batch["attention_mask"], images=pixels).logits
    mask = torch.cat([torch.ones(len(images), model.vision.num_tokens, dtype=torch.long), batch["attention_mask"]], 1)
    answers = model.generate(images=images, prompts=questions, max_new_tokens=new_tokens, num_beams=1, do_sample=False)
    return pixels, logits, mask, answers


def _check_round_trip(model: PrefixLynx, tmp_path: Path, new_tokens: int = 4) -> list[str]:
    folder = export_llava(model.eval(), tmp_path / "llava")
    images = _images(tmp_path)
    theirs = _transformers_alone(folder, images, QUESTIONS, tmp_path, new_tokens)
    pixels, logits, mask, answers = _lynx_side(model, images, QUESTIONS, new_tokens)
    torch.testing.assert_close(theirs["pixel_values"], pixels, atol=1e-6, rtol=0)
    # the default (torchvision) backend: at most one grey level apart on resized images (std 0.5: 2/255)
    torch.testing.assert_close(theirs["default_pixel_values"], pixels, atol=2 / 255 + 1e-6, rtol=0)
    vocab = logits.shape[-1]
    # the same tokens in the same order (LLaVA pads before the image, lynx_zoo between image and text)
    torch.testing.assert_close(
        theirs["logits"][theirs["mask"].bool()][:, :vocab], logits[mask.bool()], atol=1e-5, rtol=0
    )
    assert theirs["answers"] == answers
    return answers


@pytest.mark.slow
def test_pt_mlp_export_answers_in_transformers_alone(tmp_path):
    torch.manual_seed(0)
    model = PrefixLynx(
        **tiny_configs(bridge={"kind": "mlp"}, adapters=AdapterConfig(every=None), vision={"final_norm": False})
    )
    _check_round_trip(model, tmp_path)


@pytest.mark.slow
def test_demo_without_adapters_exports_and_answers_alike(tmp_path):
    """The demo's architecture (configs/demo.yaml) with adapters none and the tower read before its final norm,
    random weights: the export answers the README's questions as lynx_zoo does."""
    args = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())["model"]["init_args"]
    torch.manual_seed(0)
    model = PrefixLynx(
        vision=VisionConfig(**{**args["vision"], "final_norm": False}),
        bridge=BridgeConfig(**args["bridge"]),
        llm=LLMConfig(**args["llm"]),
        adapters=AdapterConfig(every=None),
        prompt=PromptConfig(**args["prompt"]),
        eval_generation=args["eval_generation"],
    )
    _check_round_trip(model, tmp_path, new_tokens=args["eval_generation"]["max_new_tokens"])


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        (dict(bridge={"kind": "mlp"}), "bottleneck adapters in LLM layers"),
        (dict(adapters=AdapterConfig(every=None)), "bridge.kind 'resampler'"),
        (dict(bridge={"kind": "linear"}, adapters=AdapterConfig(every=None)), "bridge.kind 'linear'"),
        (dict(bridge={"kind": "mlp"}, adapters=AdapterConfig(every=None)), "vision.final_norm: true"),
    ],
)
def test_what_does_not_map_is_refused_in_one_line(make_tiny, tmp_path, overrides, reason):
    model = make_tiny(**overrides)
    with pytest.raises(NotExportableError, match=reason) as refused:
        export_llava(model, tmp_path / "llava")
    assert "\n" not in str(refused.value)
    assert not (tmp_path / "llava").exists()


@pytest.mark.parametrize(("feature_layer", "strategy"), [(-1, "full"), (-2, "default")])
def test_a_transformers_llava_starts_a_pt_model_with_its_logits(tmp_path, feature_layer, strategy):
    """A tiny LLaVA built by transformers (ViT tower, LLaMA), saved; ``init_from`` it: lynx_zoo's logits are its."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    tokenizer = load_tokenizer(LLMConfig(tokenizer="lynx_zoo/shapes-words"))
    tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=128,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    vision = dict(hidden_size=32, intermediate_size=96, num_hidden_layers=3, num_attention_heads=2, image_size=32,
                  patch_size=8, layer_norm_eps=1e-6, qkv_bias=True)  # fmt: skip
    config = LlavaConfig(
        vision_config={"model_type": "vit", **vision},
        text_config={"model_type": "llama", **text},
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=feature_layer,
        vision_feature_select_strategy=strategy,
    )
    torch.manual_seed(0)
    llava = LlavaForConditionalGeneration(config).eval()
    llava.save_pretrained(tmp_path / "llava")
    tokenizer.save_pretrained(tmp_path / "llava")

    configs = llava_model_configs(tmp_path / "llava")
    model = PrefixLynx(
        vision=VisionConfig(**configs["vision"]),
        bridge=BridgeConfig(**configs["bridge"]),
        llm=LLMConfig(**configs["llm"]),
        adapters=AdapterConfig(**configs["adapters"]),
        init_from=str(tmp_path / "llava"),
    ).eval()
    model.load_weights(str(tmp_path / "llava"))
    grid = 16
    tokens = grid + 1 if strategy == "full" else grid
    assert model.vision.num_tokens == tokens
    pixels = torch.randn(2, 3, 32, 32)
    batch = model.processor.prompts([Sample(q) for q in QUESTIONS])
    with torch.no_grad():
        ours = model(batch["input_ids"], batch["attention_mask"], images=pixels).logits
        image = torch.full((2, tokens), config.image_token_id)
        ids = torch.cat([image, batch["input_ids"]], 1)
        mask = torch.cat([torch.ones_like(image), batch["attention_mask"]], 1)
        theirs = llava(
            input_ids=ids, attention_mask=mask, pixel_values=pixels, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)
        ).logits
    torch.testing.assert_close(ours[mask.bool()], theirs[mask.bool()], atol=1e-5, rtol=0)


def test_a_llava_folder_with_a_clip_tower_is_refused_naming_it(tmp_path):
    from transformers import LlavaConfig

    LlavaConfig(vision_config={"model_type": "clip_vision_model"}).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="vision tower 'clip_vision_model'"):
        llava_model_configs(tmp_path)


def _checkpoint(model: PrefixLynx, path: Path) -> Path:
    torch.save(
        {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams) | {"_class_path": "PrefixLynx"}},
        path,
    )
    return path


def test_export_command_writes_the_llava_folder_or_refuses_in_one_line(make_tiny, tmp_path):
    exportable = make_tiny(bridge={"kind": "mlp"}, adapters=AdapterConfig(every=None), vision={"final_norm": False})
    folder = main(["export", "--ckpt", str(_checkpoint(exportable, tmp_path / "a.ckpt")), "--format",
                   "transformers-llava", "--out", str(tmp_path / "llava")])  # fmt: skip
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llava" and config["vision_config"]["model_type"] == "vit"
    assert (folder / "chat_template.jinja").is_file() and (folder / "preprocessor_config.json").is_file()
    card = (folder / "README.md").read_text()
    assert "format: `transformers-llava`" in card and "a.ckpt" in card

    refused = make_tiny(bridge={"kind": "mlp"})
    with pytest.raises(SystemExit) as exited:
        main(["export", "--ckpt", str(_checkpoint(refused, tmp_path / "b.ckpt")), "--format", "transformers-llava",
              "--out", str(tmp_path / "refused")])  # fmt: skip
    message = str(exited.value)
    assert "bottleneck adapters in LLM layers [0, 2]" in message and "\n" not in message
    assert not (tmp_path / "refused").exists()


def test_lora_is_merged_into_the_exported_llm(make_tiny, tmp_path):
    from transformers import LlavaForConditionalGeneration

    model = make_tiny(
        bridge={"kind": "mlp"}, vision={"final_norm": False}, adapters=AdapterConfig(kind="lora", every=1, rank=4)
    ).eval()
    pixels = torch.randn(2, 3, 32, 32)
    batch = model.processor.prompts([Sample(q) for q in QUESTIONS])
    with torch.no_grad():
        base = model(batch["input_ids"], batch["attention_mask"], images=pixels).logits
    with torch.no_grad():  # a trained update: lora_B starts at zero
        for name, param in model.llm.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    llava = LlavaForConditionalGeneration.from_pretrained(export_llava(model, tmp_path / "llava")).eval()
    with torch.no_grad():
        ours = model(batch["input_ids"], batch["attention_mask"], images=pixels).logits
        image = torch.full((2, model.vision.num_tokens), llava.config.image_token_id)
        ids = torch.cat([image, batch["input_ids"]], 1)
        mask = torch.cat([torch.ones_like(image), batch["attention_mask"]], 1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        theirs = llava(input_ids=ids, attention_mask=mask, pixel_values=pixels, position_ids=positions).logits
    torch.testing.assert_close(theirs[..., : ours.shape[-1]][mask.bool()], ours[mask.bool()], atol=1e-5, rtol=0)
    assert not torch.allclose(base, ours, atol=1e-3)  # the update changed the answers: merging it mattered
