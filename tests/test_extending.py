"""The fusion example of docs/extending.md, defined outside the package: it trains through the CLI and reloads
through the one loader; under FSDP2 on two processes its blocks are FSDP units of their own; its FLOPs are counted."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import tiny_configs
from torch.utils.flop_counter import FlopCounterMode

import lynx_zoo
from lynx_zoo.data import Sample
from lynx_zoo.training.throughput import lynx_step_flops

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def plugin(tmp_path_factory) -> Path:
    """The page's ``my_fusion.py``, written to a folder outside the package."""
    doc = (REPO / "docs" / "extending.md").read_text()
    folder = tmp_path_factory.mktemp("plugins")
    (folder / "my_fusion.py").write_text(re.search(r"```python\n# my_fusion.py\n(.*?)```", doc, re.S).group(1))
    return folder


@pytest.fixture
def my_fusion(plugin, monkeypatch):
    monkeypatch.syspath_prepend(str(plugin))
    import my_fusion

    return my_fusion


def env_with(plugin: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin), str(REPO), os.environ.get("PYTHONPATH", "")])}


@pytest.mark.slow
def test_outside_fusion_trains_with_the_cli_and_reloads(plugin, my_fusion, tmp_path):
    args = ["fit", "--config", "configs/tiny.yaml", "--model=my_fusion.VisualBiasLynx", "--model.init_args.every=1"]
    args += [f"--trainer.default_root_dir={tmp_path / 'run'}", f"--data.init_args.root={tmp_path / 'shapes'}"]
    result = subprocess.run(
        [sys.executable, "-m", "lynx_zoo", *args], cwd=REPO, env=env_with(plugin), capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (checkpoint,) = (tmp_path / "run").rglob("*.ckpt")
    model = lynx_zoo.load_model(checkpoint)  # registered by importing my_fusion
    assert isinstance(model, my_fusion.VisualBiasLynx) and sorted(model.fusion_blocks()) == [0, 1, 2, 3]
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    gates = [block.gate for block in model.fusion_blocks().values()]
    assert any(g.item() != 0 for g in gates)  # the gates opened in training
    torch.testing.assert_close(gates[0], state["llm.model.layers.0.visual_bias.gate"])
    batch = model.processor.prompts([Sample("how many shapes are there?")])
    out = model(batch["input_ids"], batch["attention_mask"], torch.randn(1, 3, 32, 32))
    assert out.logits.shape[1] == batch["input_ids"].shape[1]  # the visual tokens stay out of the sequence
    assert len(model.generate(torch.randn(1, 3, 32, 32), ["how many shapes are there?"], max_new_tokens=2)) == 1


@pytest.mark.slow
def test_closed_gates_equal_the_llm_and_its_flops_are_counted(my_fusion):
    torch.manual_seed(0)
    wider = dict(model_type="llama", hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=4, max_position_embeddings=256)  # fmt: skip
    model = my_fusion.VisualBiasLynx(**tiny_configs(llm=dict(config=wider)), every=2)
    ids = torch.randint(4, 30, (2, 64))
    batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), images=torch.randn(2, 3, 32, 32), labels=ids)
    with torch.no_grad():
        torch.testing.assert_close(
            model(**batch, return_logits=True).logits, model.llm(input_ids=ids).logits, rtol=0, atol=0
        )
    with FlopCounterMode(display=False) as step:
        model(**batch).loss.backward()
    # the blocks are declared: the formula counts them (their own forward_flops)
    assert lynx_step_flops(model, 2, 64) == pytest.approx(step.get_total_flops(), rel=0.06)


WORKER = """
import atexit, json, os, sys
from pathlib import Path
import lightning as L
import torch

# registered first, so it runs last at exit: by then the zoo has destroyed the gloo group (else gloo can abort)
atexit.register(lambda: Path({out!r}).with_name(f"exit-rank{{os.environ.get('LOCAL_RANK', '0')}}.json").write_text(
    json.dumps(torch.distributed.is_initialized())
))
from torch.distributed.fsdp import FSDPModule
sys.path.insert(0, {tests!r})
from conftest import tiny_configs
from fsdp_worker import FixedLengthData, FixedLengthSet
import my_fusion
from lynx_zoo.fusion.scale_out import sharding_units
from lynx_zoo.training.distributed import LynxFSDP2Strategy
from lynx_zoo.training.throughput import lynx_step_flops

L.seed_everything(0, verbose=False)
model = my_fusion.VisualBiasLynx(**tiny_configs(), every=2)
trainer = L.Trainer(
    accelerator="cpu", devices=2, strategy=LynxFSDP2Strategy(param_dtype=None), max_steps=2, logger=False,
    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    limit_val_batches=0, use_distributed_sampler=False,
)
trainer.fit(model, FixedLengthData(FixedLengthSet(len(model.tokenizer), 32)))
blocks = list(model.fusion_blocks().values())
units = sharding_units(model)
if trainer.global_rank == 0:
    Path({out!r}).write_text(json.dumps(dict(
        steps=trainer.global_step,
        blocks_sharded=[isinstance(b, FSDPModule) for b in blocks],
        blocks_are_units=[any(b is u for u in units) for b in blocks],
        flops=lynx_step_flops(model, 4, 12),
    )))
"""


@pytest.mark.slow
def test_outside_fusion_under_fsdp2_on_two_processes_shards_its_blocks(plugin, tmp_path):
    script, out = tmp_path / "worker.py", tmp_path / "result.json"
    script.write_text(textwrap.dedent(WORKER.format(tests=str(REPO / "tests"), out=str(out))))
    result = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env_with(plugin), capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    facts = json.loads(out.read_text())
    assert facts["steps"] == 2
    assert facts["blocks_sharded"] == [True, True] and facts["blocks_are_units"] == [True, True]
    assert facts["flops"] > 0
    # each process destroyed its process group before the interpreter's finalisation
    assert [json.loads((tmp_path / f"exit-rank{r}.json").read_text()) for r in (0, 1)] == [False, False]
