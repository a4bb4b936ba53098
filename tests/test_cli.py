import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lynx_zoo import CrossAttnLynx, PrefixLynx

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "lynx_zoo", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
def test_cli_fits_the_tiny_config_and_the_checkpoint_reloads(tmp_path):
    result = run_cli(
        "fit",
        "--config",
        str(REPO / "configs/tiny.yaml"),
        f"--trainer.default_root_dir={tmp_path}",
        f"--data.init_args.root={tmp_path / 'shapes'}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoints = list(tmp_path.rglob("*.ckpt"))
    assert len(checkpoints) == 1 and "step=4" in checkpoints[0].name
    model = PrefixLynx.load_from_checkpoint(checkpoints[0])
    state = torch.load(checkpoints[0], weights_only=True)["state_dict"]
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, state[name], rtol=0, atol=0)
    assert model.adapter_layers == [0, 2]


@pytest.mark.slow
def test_switching_pt_to_ca_with_every_other_key_unchanged_trains(tmp_path):
    result = run_cli(
        "fit",
        "--config",
        "configs/tiny.yaml",
        "--model=CrossAttnLynx",
        f"--trainer.default_root_dir={tmp_path}",
        f"--data.init_args.root={tmp_path / 'shapes'}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (checkpoint,) = tmp_path.rglob("*.ckpt")
    model = CrossAttnLynx.load_from_checkpoint(checkpoint)
    assert list(model.fusion_blocks()) == [3] and model.adapter_layers == [0, 2]  # the tiny config's adapters stay
    assert model.bridge_config.num_queries == 4  # every other key as in configs/tiny.yaml
    # the gates were trained away from zero
    assert list(model.fusion_blocks().values())[0].attn_gate.abs().item() > 0


@pytest.mark.slow
def test_print_config_shows_the_resolved_model():
    result = run_cli("fit", "--config", "configs/tiny.yaml", "--print_config")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "class_path: lynx_zoo.PrefixLynx" in result.stdout
    assert "num_queries: 4" in result.stdout


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--model.init_args.bridge.knd=mlp"], "unknown option 'knd' for BridgeConfig: did you mean 'kind'?"),
        (
            ["--model=PrefixLinx"],
            "unknown model class 'PrefixLinx': did you mean 'PrefixLynx'? valid choices: CrossAttnLynx, PrefixLynx",
        ),
        (
            ["--data.init_args.num_trian=3"],
            "unknown option 'num_trian' for ShapesVQADataModule: did you mean 'num_train'?",
        ),
        (["--trainer.max_stepz=3"], "unknown trainer option 'max_stepz': did you mean 'max_steps'?"),
    ],
)
@pytest.mark.slow
def test_misspelt_keys_and_classes_are_named_with_choices(args, expected):
    result = run_cli("fit", "--config", "configs/tiny.yaml", *args)
    assert result.returncode != 0
    assert expected in result.stderr
    assert "usage:" not in result.stderr
