"""A regular (non-editable) wheel works away from the checkout: it carries its configs, model cards and recorded
results, and the commands that read them run from an unrelated folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hub_fixtures import to_original_layout

from lynx_zoo.hub.config import model_config_from_files
from lynx_zoo.hub.weights import base_prefixes, variant_keys
from lynx_zoo.resources import config_path

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """The project built as a wheel and installed into a folder of its own; a working folder elsewhere."""
    root = tmp_path_factory.mktemp("wheel")
    # built from a copy of the working tree: setuptools leaves a build/ folder behind in what it builds
    source = root / "source"
    outputs = {".git", "build", "runs", "data", ".pytest_cache"}

    def skip(folder: str, names: list[str]) -> set[str]:
        top = Path(folder) == REPO
        return {
            n
            for n in names
            if n == "__pycache__" or n.endswith(".egg-info") or top and (n in outputs or n.startswith(".venv"))
        }

    shutil.copytree(REPO, source, symlinks=True, ignore=skip)
    pip = [sys.executable, "-m", "pip", "-q"]
    build = [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(root), str(source)]
    subprocess.run(build, check=True, timeout=600)
    (wheel,) = root.glob("lynx_zoo-*.whl")
    site = root / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True, timeout=600)
    work = root / "work"
    work.mkdir()
    # `python -S`: no .pth files, so the checkout's editable install cannot stand in for a missing file of the wheel
    dependencies = next(p for p in sys.path if p.endswith("site-packages"))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(site), dependencies]),
        "LYNX_ZOO_VARIANTS": str(root / "variants"),
    }
    return dict(site=site, work=work, env=env)


def run(installed: dict, *args: str) -> subprocess.CompletedProcess:
    cwd, env = installed["work"], installed["env"]
    result = subprocess.run(
        [sys.executable, "-S", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_the_installed_package_is_the_wheel_and_lists_every_variant(installed):
    code = (
        "import lynx_zoo; print(lynx_zoo.__file__); rows = lynx_zoo.list_variants(); "
        "print(len(rows)); print(all(r.info.card.is_file() for r in rows if r.info))"
    )
    location, count, cards = run(installed, "-c", code).stdout.split()
    assert Path(location).is_relative_to(installed["site"])  # not the checkout
    assert int(count) >= 17 and cards == "True"


def test_model_cards_check_from_the_wheel(installed):
    run(installed, "-m", "lynx_zoo", "cards", "--check")


def test_fit_on_a_shipped_config_from_the_wheel(installed):
    run(installed, "-m", "lynx_zoo", "fit", "--config", "zoo:tiny.yaml", "--trainer.max_steps=2")
    assert list((installed["work"] / "runs" / "tiny").rglob("*.ckpt"))


def test_convert_lynx_with_its_default_config_from_the_wheel(installed):
    """The released Lynx layout at full size (zeros: only the keys and shapes matter) converts with the default
    config, which the wheel must carry."""
    config, _ = model_config_from_files([config_path("zoo:pt_vicuna_420.yaml")])
    model = config.build_on_meta()
    state = model.state_dict()
    wanted = variant_keys(model, bases=base_prefixes(config.vision, config.llm))
    zeros = {k: torch.zeros(state[k].shape, dtype=torch.bfloat16) for k in wanted}
    checkpoint = installed["work"] / "finetune_lynx.pt"
    torch.save({"model": to_original_layout(zeros)}, checkpoint)
    out = installed["work"] / "lynx-converted"
    run(installed, "-m", "lynx_zoo", "convert-lynx", "--ckpt", str(checkpoint), "--out", str(out))
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()


def test_stages_and_study_from_the_wheel(installed):
    """``stages`` finds its default stage and data overlays in the package (a wheel has no repository ``configs/``),
    and ``study`` answers ``--help``."""
    out = installed["work"] / "stages-run"
    rows = ["--config", "zoo:pt_vicuna_420.yaml", "--config", "zoo:grid/ca_vicuna_420_trainable_llm.yaml"]
    planned = run(installed, "-m", "lynx_zoo", "stages", *rows, "--out", str(out), "--dry-run").stdout
    assert planned.count("-m lynx_zoo fit") == 3
    assert str(installed["site"] / "lynx_zoo" / "configs" / "stages" / "stage1_224.yaml") in planned
    assert "--report-only" in run(installed, "-m", "lynx_zoo", "study", "--help").stdout
