"""The Lynx release's vision tower: a tiny EVA-01 built here in the raw EVA file layout and in a Lynx release
checkpoint's layout loads into lynx_zoo's tower, whose tokens match a direct computation of the release's EVA
(models/vits/eva_vit.py of bytedance/lynx-llm) at another resolution; the position embeddings are interpolated
as the release interpolates them, for loading and for ``init_from`` alike."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

from lynx_zoo.vision import VisionConfig, VisionEncoder, resample_vision_pos_embed
from lynx_zoo.vision.checkpoint import resample_pos_embed, set_tower_resolution

WIDTH, HEADS, PATCH, FILE_BLOCKS, KEPT_BLOCKS = 32, 2, 14, 4, 3
HIDDEN = int(WIDTH * 4.3637)  # EVA-01 g/14's mlp ratio: 6144 / 1408
EVA = dict(embed_dim=WIDTH, depth=FILE_BLOCKS, num_heads=HEADS, mlp_ratio=4.3637)


def raw_eva_file_state(grid: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    """A tiny EVA-01 state dict in the layout of ``EVA01_g_psz14.pt``: 224 px (16x16 + CLS positions), fused qkv
    with q_bias/v_bias, one block more than Lynx keeps, a final norm and the MIM head that Lynx does not use."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int, scale: float = 0.2) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    state = {
        "cls_token": randn(1, 1, WIDTH),
        "pos_embed": randn(1, grid * grid + 1, WIDTH),
        "patch_embed.proj.weight": randn(WIDTH, 3, PATCH, PATCH, scale=0.05),
        "patch_embed.proj.bias": randn(WIDTH),
        "norm.weight": 1 + randn(WIDTH),
        "norm.bias": randn(WIDTH),
        "mask_token": randn(1, 1, WIDTH),
        "lm_head.weight": randn(64, WIDTH),
        "lm_head.bias": randn(64),
    }
    for i in range(FILE_BLOCKS):
        b = f"blocks.{i}."
        state |= {
            b + "norm1.weight": 1 + randn(WIDTH),
            b + "norm1.bias": randn(WIDTH),
            b + "attn.qkv.weight": randn(3 * WIDTH, WIDTH),
            b + "attn.q_bias": randn(WIDTH),
            b + "attn.v_bias": randn(WIDTH),
            b + "attn.proj.weight": randn(WIDTH, WIDTH),
            b + "attn.proj.bias": randn(WIDTH),
            b + "norm2.weight": 1 + randn(WIDTH),
            b + "norm2.bias": randn(WIDTH),
            b + "mlp.fc1.weight": randn(HIDDEN, WIDTH),
            b + "mlp.fc1.bias": randn(HIDDEN),
            b + "mlp.fc2.weight": randn(WIDTH, HIDDEN),
            b + "mlp.fc2.bias": randn(WIDTH),
        }
    return state


def release_interpolation(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """eva_vit.py interpolate_pos_embed: CLS kept, the patch grid bicubic, align_corners=False, no antialias."""
    side = int((pos_embed.shape[1] - 1) ** 0.5)
    patches = pos_embed[:, 1:].float().reshape(1, side, side, -1).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([pos_embed[:, :1], patches.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)


def release_split_layout(state: dict[str, torch.Tensor], grid: int) -> dict[str, torch.Tensor]:
    """The tower as a Lynx release checkpoint holds it (models/lynx.py + eva_vit.py create_eva_vit_g): the blocks
    Lynx keeps, split q/k/v (k without a bias), no final norm, the position embedding interpolated to ``grid``,
    under ``vision_encoder.``, beside the other parts of the checkpoint."""
    tower = {"vision_encoder.pos_embed": release_interpolation(state["pos_embed"], grid)}
    for key in ("cls_token", "patch_embed.proj.weight", "patch_embed.proj.bias"):
        tower[f"vision_encoder.{key}"] = state[key]
    for i in range(KEPT_BLOCKS):
        b = f"blocks.{i}."
        q, k, v = state[b + "attn.qkv.weight"].chunk(3)
        tower |= {
            f"vision_encoder.{b}attn.q_proj.weight": q,
            f"vision_encoder.{b}attn.k_proj.weight": k,
            f"vision_encoder.{b}attn.v_proj.weight": v,
            f"vision_encoder.{b}attn.q_proj.bias": state[b + "attn.q_bias"],
            f"vision_encoder.{b}attn.v_proj.bias": state[b + "attn.v_bias"],
        }
        for name in ("norm1", "norm2", "attn.proj", "mlp.fc1", "mlp.fc2"):
            for kind in ("weight", "bias"):
                tower[f"vision_encoder.{b}{name}.{kind}"] = state[f"{b}{name}.{kind}"]
    return tower | {"bridge.latents": torch.zeros(4, 8), "LLM.model.norm.weight": torch.ones(8)}


def release_tokens(state: dict[str, torch.Tensor], images: torch.Tensor) -> torch.Tensor:
    """The release's EVA forward (VisionTransformer.forward_features with StableAttention blocks), computed
    directly from a raw-layout state dict: every token incl. CLS, the first KEPT_BLOCKS blocks, no final norm."""
    grid = images.shape[-1] // PATCH
    x = F.conv2d(images, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=PATCH)
    x = torch.cat([state["cls_token"].expand(len(images), -1, -1), x.flatten(2).transpose(1, 2)], dim=1)
    x = x + release_interpolation(state["pos_embed"], grid)
    b, n, _ = x.shape
    for i in range(KEPT_BLOCKS):
        p = f"blocks.{i}."
        h = F.layer_norm(x, (WIDTH,), state[p + "norm1.weight"], state[p + "norm1.bias"], eps=1e-6)
        wq, wk, wv = state[p + "attn.qkv.weight"].chunk(3)
        q = F.linear(h, wq, state[p + "attn.q_bias"]).view(b, n, HEADS, -1).transpose(1, 2)
        k = F.linear(h, wk).view(b, n, HEADS, -1).transpose(1, 2)
        v = F.linear(h, wv, state[p + "attn.v_bias"]).view(b, n, HEADS, -1).transpose(1, 2)
        attn = ((q * (WIDTH // HEADS) ** -0.5) @ k.transpose(-2, -1)).softmax(-1, dtype=torch.float32)
        out = (attn @ v).transpose(1, 2).reshape(b, n, WIDTH)
        x = x + F.linear(out, state[p + "attn.proj.weight"], state[p + "attn.proj.bias"])
        h = F.layer_norm(x, (WIDTH,), state[p + "norm2.weight"], state[p + "norm2.bias"], eps=1e-6)
        h = F.linear(F.gelu(F.linear(h, state[p + "mlp.fc1.weight"], state[p + "mlp.fc1.bias"])), *_fc2(state, p))
        x = x + h
    return x


def _fc2(state: dict[str, torch.Tensor], prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
    return state[prefix + "mlp.fc2.weight"], state[prefix + "mlp.fc2.bias"]


def lynx_tower(checkpoint_path: str | None, image_size: int) -> VisionEncoder:
    """lynx_zoo's tower as the real-Lynx configs build it (timm's EVA architecture, 39 of 40 blocks, no final
    norm, all tokens), at the tiny size."""
    config = VisionConfig(
        model_name="eva_giant_patch14_clip_224",
        checkpoint_path=checkpoint_path,
        image_size=image_size,
        num_blocks=KEPT_BLOCKS,
        final_norm=False,
        keep_cls_token=True,
        model_kwargs=EVA,
    )
    return VisionEncoder(config)


def images(size: int) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))


@pytest.mark.slow
def test_the_raw_eva_file_loads_at_420_and_matches_the_release(tmp_path, caplog):
    state = raw_eva_file_state()
    path = tmp_path / "eva_vit_g.pth"
    torch.save(state, path)
    with warnings.catch_warnings(), caplog.at_level(logging.INFO, logger="lynx_zoo.vision.checkpoint"):
        warnings.simplefilter("error")  # nothing unexpected in a raw EVA file
        tower = lynx_tower(str(path), 420)
    assert "left out blocks [3]" in caplog.text and "lm_head.weight" in caplog.text
    pixels = images(420)
    with torch.no_grad():
        tokens = tower(pixels)
    assert tokens.shape == (2, 30 * 30 + 1, WIDTH) == (2, tower.num_tokens, WIDTH)
    torch.testing.assert_close(tokens, release_tokens(state, pixels), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_a_lynx_checkpoint_tower_loads_at_its_420_and_at_a_second_resolution(tmp_path):
    raw = raw_eva_file_state(seed=1)
    path = tmp_path / "finetune_lynx.pt"
    torch.save({"model": release_split_layout(raw, grid=30)}, path)
    # at 420 px: its position embedding is used as it is
    pixels = images(420)
    with torch.no_grad():
        torch.testing.assert_close(
            lynx_tower(str(path), 420)(pixels), release_tokens(raw, pixels), rtol=1e-4, atol=1e-4
        )
    # at 224 px: interpolated again from its 30x30 grid, as the release interpolates
    expected_state = dict(raw, pos_embed=release_interpolation(raw["pos_embed"], 30))
    pixels = images(224)
    with torch.no_grad():
        tokens = lynx_tower(str(path), 224)(pixels)
    assert tokens.shape == (2, 16 * 16 + 1, WIDTH)
    torch.testing.assert_close(tokens, release_tokens(expected_state, pixels), rtol=1e-4, atol=1e-4)


def test_the_interpolation_is_the_releases_not_timms_antialiased_default():
    pos_embed = raw_eva_file_state()["pos_embed"]
    ours = resample_pos_embed(pos_embed, (30, 30), num_prefix_tokens=1)
    assert torch.equal(ours, release_interpolation(pos_embed, 30))
    antialiased = resample_abs_pos_embed(pos_embed, new_size=[30, 30], num_prefix_tokens=1)  # timm's default
    assert (antialiased - ours).abs().max() > 1e-3
    with pytest.raises(ValueError, match="not a square grid"):
        resample_pos_embed(pos_embed[:, :-3], (30, 30))


def test_init_from_and_timm_weights_resample_as_the_release(tmp_path):
    low = lynx_tower(None, 224)
    high = lynx_tower(None, 420)
    state = {f"vision.{k}": v for k, v in low.state_dict().items()}
    resample_vision_pos_embed(state, high, prefix="vision.")
    assert torch.equal(state["vision.model.pos_embed"], release_interpolation(low.model.pos_embed.detach(), 30))
    # a tower built at its weights' resolution and moved to 420 px (the path of timm's pretrained weights)
    moved = lynx_tower(None, 224)
    before = moved.model.pos_embed.detach().clone()
    set_tower_resolution(moved.model, 420)
    assert moved.model.patch_embed.grid_size == (30, 30)
    assert torch.equal(moved.model.pos_embed.detach(), release_interpolation(before, 30))


def test_a_file_missing_a_weight_is_an_error_and_an_unknown_key_a_warning(tmp_path):
    state = raw_eva_file_state()
    del state["blocks.1.attn.q_bias"]
    save_file(state, str(tmp_path / "short.safetensors"))
    with pytest.raises(ValueError, match=r"the file lacks \(1\): \['blocks.1.attn.q_bias'\]"):
        lynx_tower(str(tmp_path / "short.safetensors"), 224)
    state = raw_eva_file_state() | {"rel_pos_bias.relative_position_bias_table": torch.zeros(3, HEADS)}
    torch.save(state, tmp_path / "odd.pth")
    with pytest.warns(UserWarning, match=r"left out .*rel_pos_bias.relative_position_bias_table"):
        lynx_tower(str(tmp_path / "odd.pth"), 224)
