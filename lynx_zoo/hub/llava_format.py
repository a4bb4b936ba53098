"""Export a PT model to transformers' own LLaVA layout (``LlavaForConditionalGeneration`` + ``LlavaProcessor``), the
folder vLLM, SGLang, TGI and lmms-eval's ``llava_hf`` read, and refuse every model that layout would compute
differently.

What maps exactly: :class:`~lynx_zoo.fusion.prefix.PrefixLynx` with the ``mlp`` projector (Linear, GELU, Linear is
``LlavaMultiModalProjector``), an LLM trained in full or with LoRA merged into it, and a plain timm ViT tower (class
token, absolute position embeddings, no pre-norm, no layer scale) as transformers' ``ViTModel``. LLaVA reads a hidden
state of the tower's blocks, never its final norm: a tower with ``vision.final_norm: true`` is refused.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lynx_zoo.adapters.lora import lora_layers, merged_llm
from lynx_zoo.bridge.bridges import MLPProjector
from lynx_zoo.fusion.base import LynxModel
from lynx_zoo.hub.export import _written_in_place_of

FORMAT_NAME = "transformers-llava"
IMAGE_TOKEN = "<image>"


class NotExportableError(ValueError):
    """The model computes something transformers' LLaVA layout cannot: the message names what."""


def export_refusal(model: LynxModel) -> str | None:
    """Why ``model`` cannot be written in the LLaVA layout without computing something else, or ``None``."""
    from lynx_zoo.fusion.prefix import PrefixLynx

    if not isinstance(model, PrefixLynx):
        return f"{type(model).__name__} ({model.label} fusion): LLaVA places visual tokens in the sequence (PT) only"
    if model.adapter_config.kind != "lora" and model.adapter_blocks:
        return (
            f"bottleneck adapters in LLM layers {model.adapter_layers}: transformers' LLM classes have no such "
            "blocks (train with adapters: none or LoRA, which merges)"
        )
    if not isinstance(model.bridge, MLPProjector):
        return (
            f"bridge.kind {model.bridge_config.kind!r}: LLaVA's projector is Linear-GELU-Linear (bridge.kind: mlp); "
            "a resampler or a single linear layer has no transformers equivalent"
        )
    tower = model.vision.model
    if type(tower).__name__ != "VisionTransformer":
        return f"vision tower {type(tower).__name__}: only timm's plain VisionTransformer maps to transformers' ViT"
    checks = {
        "a class token and no register tokens": tower.num_prefix_tokens == 1
        and getattr(tower, "cls_token", None) is not None,
        "no pre-norm": isinstance(tower.norm_pre, nn.Identity),
        "no layer scale": all(isinstance(b.ls1, nn.Identity) and isinstance(b.ls2, nn.Identity) for b in tower.blocks),
        "qkv bias, no q/k norm": all(
            b.attn.qkv.bias is not None and isinstance(b.attn.q_norm, nn.Identity) for b in tower.blocks
        ),
        "a GELU MLP": all(isinstance(b.mlp.act, nn.GELU) and b.mlp.act.approximate == "none" for b in tower.blocks),
        "embeddings added to the class token too": not getattr(tower, "no_embed_class", False),
    }
    missing = [name for name, ok in checks.items() if not ok]
    if missing:
        return f"vision tower {model.vision_config.model_name}: transformers' ViT needs {', '.join(missing)}"
    if not isinstance(tower.norm, nn.Identity):
        return (
            "vision.final_norm: true: LLaVA feeds the projector a hidden state of the tower's blocks, never the "
            "final norm (set vision.final_norm: false, as LLaVA-1.5 reads its tower)"
        )
    return None


def _vit_state(tower: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """transformers ``ViTConfig`` fields and ``ViTModel`` weights of a timm VisionTransformer."""
    blocks = list(tower.blocks)
    width = tower.embed_dim
    config = {
        "model_type": "vit",
        "hidden_size": width,
        "num_hidden_layers": len(blocks),
        "num_attention_heads": blocks[0].attn.num_heads,
        "intermediate_size": blocks[0].mlp.fc1.out_features,
        "hidden_act": "gelu",
        "layer_norm_eps": blocks[0].norm1.eps,
        "image_size": tower.patch_embed.img_size[0],
        "patch_size": tower.patch_embed.patch_size[0],
        "num_channels": tower.patch_embed.proj.in_channels,
        "qkv_bias": True,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
    }
    state = {
        "embeddings.cls_token": tower.cls_token,
        "embeddings.position_embeddings": tower.pos_embed,
        "embeddings.patch_embeddings.projection.weight": tower.patch_embed.proj.weight,
        "embeddings.patch_embeddings.projection.bias": tower.patch_embed.proj.bias,
        # unused by LLaVA (it reads a block's hidden state): the identity, so the folder holds every weight
        "layernorm.weight": torch.ones(width),
        "layernorm.bias": torch.zeros(width),
        "pooler.dense.weight": torch.zeros(width, width),
        "pooler.dense.bias": torch.zeros(width),
    }
    for i, block in enumerate(blocks):
        layer = f"layers.{i}"
        q, k, v = block.attn.qkv.weight.chunk(3)
        qb, kb, vb = block.attn.qkv.bias.chunk(3)
        state |= {
            f"{layer}.layernorm_before.weight": block.norm1.weight,
            f"{layer}.layernorm_before.bias": block.norm1.bias,
            f"{layer}.attention.q_proj.weight": q,
            f"{layer}.attention.q_proj.bias": qb,
            f"{layer}.attention.k_proj.weight": k,
            f"{layer}.attention.k_proj.bias": kb,
            f"{layer}.attention.v_proj.weight": v,
            f"{layer}.attention.v_proj.bias": vb,
            f"{layer}.attention.o_proj.weight": block.attn.proj.weight,
            f"{layer}.attention.o_proj.bias": block.attn.proj.bias,
            f"{layer}.layernorm_after.weight": block.norm2.weight,
            f"{layer}.layernorm_after.bias": block.norm2.bias,
            f"{layer}.mlp.fc1.weight": block.mlp.fc1.weight,
            f"{layer}.mlp.fc1.bias": block.mlp.fc1.bias,
            f"{layer}.mlp.fc2.weight": block.mlp.fc2.weight,
            f"{layer}.mlp.fc2.bias": block.mlp.fc2.bias,
        }
    return config, {k: v.detach().float().clone() for k, v in state.items()}


def chat_template(model: LynxModel) -> str:
    """A Jinja chat template rendering lynx_zoo's prompt: ``<image>`` first (the visual prefix), then ``<s>``, each
    user turn through the prompt template, each answer as `` answer</s>``."""
    prompt = model.processor.prompt
    before, sep, after = prompt.template.partition("{instruction}")
    if not sep:
        raise NotExportableError(f"prompt.template {prompt.template!r} has no {{instruction}}")
    content = "(message['content'] if message['content'] is string else message['content'] | selectattr('type', 'eq', 'text') | map(attribute='text') | join(' '))"  # noqa: E501
    instruction = f"({content} | lower)" if prompt.lower_case else content
    turn = f"({json.dumps(before)} + {instruction} + {json.dumps(after)})"
    if prompt.lower_text:
        turn = f"({turn} | lower)"
    has_image = (
        "message['content'] is not string and message['content'] | selectattr('type', 'eq', 'image') | list | length"
    )
    return (
        "{% set ns = namespace(image=false) %}{% for message in messages %}{% if " + has_image + " %}"
        "{% set ns.image = true %}{% endif %}{% endfor %}"
        "{% if ns.image %}" + IMAGE_TOKEN + "{% endif %}{{ bos_token }}"
        "{% for message in messages %}{% if message['role'] == 'user' %}{{ " + turn + " }}"
        "{% elif message['role'] == 'assistant' %}{{ ' ' + " + content + " + eos_token }}{% endif %}{% endfor %}"
    )


def export_llava(model: LynxModel, out: str | Path, source: str | None = None) -> Path:
    """Write ``model`` at ``out`` as a transformers LLaVA folder (config.json, model.safetensors, tokenizer with
    ``<image>``, processor with the chat template and the tower's image transform, a model card naming the format;
    ``source``: where the weights came from); a model that would compute something else there raises
    :class:`NotExportableError` naming why."""
    from transformers import CLIPImageProcessorPil, LlavaConfig, LlavaForConditionalGeneration
    from transformers.image_utils import PILImageResampling

    refusal = export_refusal(model)
    if refusal is not None:
        raise NotExportableError(f"export --format {FORMAT_NAME}: {refusal}")
    if model.vision_config.num_frames:
        warnings.warn(
            f"export --format {FORMAT_NAME}: the model's video frame embeddings (vision.num_frames="
            f"{model.vision_config.num_frames}) have no place in LLaVA: the export answers about images only",
            stacklevel=2,
        )
    vision_config, vision_state = _vit_state(model.vision.model)
    llm = merged_llm(model.llm) if any(lora_layers(model.llm)) else model.llm
    tokenizer = copy.deepcopy(model.tokenizer)
    tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    text_config = llm.config.to_dict()
    vocab = llm.get_input_embeddings().weight.shape[0]
    if image_token_id != vocab:
        raise NotExportableError(
            f"export --format {FORMAT_NAME}: the tokenizer has {len(tokenizer) - 1} tokens but the LLM {vocab} "
            "embeddings; the image token would not get its own row"
        )
    keep_cls = model.vision_config.keep_cls_token
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=image_token_id,
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full" if keep_cls else "default",
        image_seq_length=model.vision.num_tokens,
        tie_word_embeddings=bool(getattr(llm.config, "tie_word_embeddings", False)),
    )
    llava = LlavaForConditionalGeneration(config).eval()
    llava.model.vision_tower.load_state_dict(vision_state, strict=True)
    llava.model.multi_modal_projector.load_state_dict(
        {
            "linear_1.weight": model.bridge[0].weight,
            "linear_1.bias": model.bridge[0].bias,
            "linear_2.weight": model.bridge[2].weight,
            "linear_2.bias": model.bridge[2].bias,
        }
    )
    llava.resize_token_embeddings(vocab + 1, mean_resizing=False)
    decoder = llm.get_decoder()
    decoder_state = {k: v for k, v in decoder.state_dict().items() if not k.startswith("embed_tokens.")}
    missing, unexpected = llava.model.language_model.load_state_dict(decoder_state, strict=False)
    if unexpected or set(missing) != {"embed_tokens.weight"}:
        raise NotExportableError(
            f"export --format {FORMAT_NAME}: the LLM's weights do not fit transformers' {type(decoder).__name__}: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    with torch.no_grad():
        embed = llm.get_input_embeddings().weight
        llava.get_input_embeddings().weight.copy_(torch.cat([embed, embed.mean(0, keepdim=True)]))
        head = llm.get_output_embeddings().weight
        llava.lm_head.weight.copy_(torch.cat([head, head.mean(0, keepdim=True)]))
    llava.generation_config.pad_token_id = tokenizer.pad_token_id
    llava.generation_config.bos_token_id = tokenizer.bos_token_id
    llava.generation_config.eos_token_id = tokenizer.eos_token_id
    llava.generation_config.suppress_tokens = [image_token_id]  # the placeholder is never an answer
    for key, value in model.eval_generation.items():
        setattr(llava.generation_config, key, value)
    size = model.vision_config.image_size
    mean, std = _mean_std(model)
    # the PIL backend resizes as torchvision does on PIL images (the torchvision one differs by a grey level)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        resample=PILImageResampling.BICUBIC,
        do_center_crop=True,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=mean,
        image_std=std,
        do_convert_rgb=True,
    )
    # the files LlavaProcessor.save_pretrained writes, written without building one (its check of the tokenizer's
    # class imports every tokenizer backend transformers knows, which fails where one is installed incompletely)
    processor_config = {
        "processor_class": "LlavaProcessor",
        "image_token": IMAGE_TOKEN,
        "patch_size": vision_config["patch_size"],
        "vision_feature_select_strategy": config.vision_feature_select_strategy,
        "num_additional_image_tokens": 1,
    }
    out = Path(out)
    with _written_in_place_of(out) as tmp:
        llava.save_pretrained(tmp, safe_serialization=True)
        image_processor.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        # left padding, as lynx_zoo pads prompts (and generation needs): kept only where the config says so
        tokenizer_config = json.loads((tmp / "tokenizer_config.json").read_text(encoding="utf-8"))
        tokenizer_config["padding_side"] = "left"
        (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n", encoding="utf-8")
        (tmp / "processor_config.json").write_text(json.dumps(processor_config, indent=2) + "\n", encoding="utf-8")
        (tmp / "chat_template.jinja").write_text(chat_template(model), encoding="utf-8")
        (tmp / "README.md").write_text(llava_card(model, config, source), encoding="utf-8")
    return out


def _mean_std(model: LynxModel) -> tuple[list[float], list[float]]:
    from torchvision import transforms

    normalize = next(t for t in model.vision.image_transform().transforms if isinstance(t, transforms.Normalize))
    return [float(x) for x in normalize.mean], [float(x) for x in normalize.std]


def llava_card(model: LynxModel, config: Any, source: str | None) -> str:
    """The ``README.md`` of an exported folder: its format, what it holds, how to load it."""
    vision = model.vision_config
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: image-text-to-text",
        "tags: [llava, lynx_zoo, multimodal]",
        "---",
        f"# A lynx_zoo PT model in transformers' LLaVA layout (format: `{FORMAT_NAME}`)",
        "",
        f"Exported by `python -m lynx_zoo export --format {FORMAT_NAME}` from {source or 'a lynx_zoo model'}. It loads "
        "with `transformers.LlavaForConditionalGeneration.from_pretrained` and `AutoProcessor.from_pretrained`, "
        "without lynx_zoo, and computes what the lynx_zoo model computes for images:",
        "",
        f"- vision tower: transformers ViT ({config.vision_config.num_hidden_layers} blocks, width "
        f"{config.vision_config.hidden_size}, {vision.image_size} px, patch {config.vision_config.patch_size}), "
        f"the last block's hidden state, {'class token kept' if vision.keep_cls_token else 'class token dropped'} "
        f"(`vision_feature_select_strategy: {config.vision_feature_select_strategy}`): "
        f"{model.vision.num_tokens} `<image>` tokens per image",
        "- projector: Linear-GELU-Linear (lynx_zoo's `mlp` bridge)",
        f"- language model: {config.text_config.model_type}"
        + (", LoRA updates merged" if model.adapter_config.kind == "lora" and model.adapter_blocks else ""),
        f"- prompt (the chat template): the image first, then `<s>` and `{model.processor.prompt.template}`; "
        "answers follow after a space, then `</s>`",
        "- images: resized (shortest side, bicubic), centre-cropped, normalised as the lynx_zoo tower's transform; "
        'equal to it with `AutoProcessor.from_pretrained(DIR, backend="pil")` (the default torchvision backend '
        "can round a resized pixel to the next grey level)",
        "",
        "Videos are not part of this format: the lynx_zoo model's frame embeddings are not exported.",
        "",
    ]
    return "\n".join(lines)
