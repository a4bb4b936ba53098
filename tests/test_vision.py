import pytest
import torch
from safetensors.torch import save_file

from lynx_zoo.vision import VisionConfig, VisionEncoder, resample_vision_pos_embed

TINY = dict(patch_size=8, embed_dim=32, depth=3, num_heads=2)


def tiny(**kwargs) -> VisionEncoder:
    return VisionEncoder(VisionConfig(model_name="vit_tiny_patch16_224", model_kwargs=TINY, **kwargs))


@pytest.mark.parametrize("size", [32, 56])
def test_tokens_per_resolution(size):
    encoder = tiny(image_size=size)
    tokens = encoder(torch.randn(2, 3, size, size))
    grid = size // 8
    assert tokens.shape == (2, grid * grid + 1, 32)
    assert encoder.num_tokens == grid * grid + 1


def test_cls_less_tokens_and_truncated_blocks():
    encoder = tiny(image_size=32, keep_cls_token=False, num_blocks=2, final_norm=False)
    assert len(encoder.model.blocks) == 2
    assert isinstance(encoder.model.norm, torch.nn.Identity)
    assert encoder(torch.randn(1, 3, 32, 32)).shape == (1, 16, 32)


def test_frozen_tower_has_no_trainable_parameters_and_stays_in_eval():
    encoder = tiny(image_size=32)
    encoder.train()
    assert not any(p.requires_grad for p in encoder.parameters())
    assert not encoder.model.training
    assert all(p.requires_grad for p in tiny(image_size=32, trainable=True).parameters())


def test_checkpoint_at_224_loads_at_420_with_resampled_pos_embed(tmp_path):
    source = VisionEncoder(
        VisionConfig(
            model_name="vit_tiny_patch16_224",
            image_size=224,
            model_kwargs=dict(patch_size=14, embed_dim=32, depth=2, num_heads=2),
        )
    )
    path = tmp_path / "vit224.safetensors"
    save_file({k: v.contiguous() for k, v in source.model.state_dict().items()}, path)
    target = VisionEncoder(
        VisionConfig(
            model_name="vit_tiny_patch16_224",
            image_size=420,
            checkpoint_path=str(path),
            model_kwargs=dict(patch_size=14, embed_dim=32, depth=2, num_heads=2),
        )
    )
    # timm loads strictly: every key present, pos_embed resampled from 16x16+1 to 30x30+1
    assert target.model.pos_embed.shape == (1, 30 * 30 + 1, 32)
    torch.testing.assert_close(target.model.blocks[0].attn.qkv.weight, source.model.blocks[0].attn.qkv.weight)
    torch.testing.assert_close(target.model.pos_embed[:, :1], source.model.pos_embed[:, :1])
    tokens = target(torch.randn(1, 3, 420, 420))
    assert tokens.shape == (1, 901, 32) and torch.isfinite(tokens).all()


def test_resample_state_dict_helper_matches_target_grid():
    small, big = tiny(image_size=32), tiny(image_size=64)
    state = {f"vision.{k}": v for k, v in small.state_dict().items()}
    resample_vision_pos_embed(state, big, prefix="vision.")
    missing, unexpected = big.load_state_dict({k.removeprefix("vision."): v for k, v in state.items()})
    assert not missing and not unexpected


def test_missing_checkpoint_and_unknown_model_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="vision.checkpoint_path"):
        tiny(checkpoint_path=str(tmp_path / "nope.pth"))
    with pytest.raises(ValueError, match="no architecture 'vit_nope'"):
        VisionEncoder(VisionConfig(model_name="vit_nope"))


def test_lynx_eva_tower_is_expressible_on_meta():
    config = VisionConfig(model_name="eva_giant_patch14_clip_224", image_size=420, num_blocks=39, final_norm=False)
    with torch.device("meta"):
        encoder = VisionEncoder(config)
    assert encoder.width == 1408 and len(encoder.model.blocks) == 39
    assert encoder.num_tokens == 30 * 30 + 1
    params = sum(p.numel() for p in encoder.parameters())
    assert 0.95e9 < params < 1.05e9, params
