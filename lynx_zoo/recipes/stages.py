"""``python -m lynx_zoo stages``: a model config (a grid row) trained under the paper's protocol, in one command.

Every Lynx ablation row went through the same stages (arXiv 2307.02469, section 3): stage 1 (alignment on
image-text pairs) at 224 px, stage 1 continued at the row's resolution (420 px), then stage 2 (instruction
tuning). This command runs them in order, each a ``python -m lynx_zoo fit`` of::

    <the row's configs> + configs/stages/<stage>.yaml + configs/data/lynx_<stage1|stage2>.yaml
    + <OUT>/<stage>/stage.yaml (written here) + <extra LightningCLI arguments>

where the written overlay gives the stage its own folder (``<OUT>/<stage>``), its checkpoints
(``<OUT>/<stage>/checkpoints/last.ckpt``, kept by a ``ModelCheckpoint`` with ``save_last``), the previous
stage's ``last.ckpt`` as ``init_from`` (weights only: a fresh optimiser and schedule; the vision position
embeddings resampled as the release interpolates) and, after stage 1, the row's resolution. A row whose
resolution is stage 1's (the "w/o high resolution" row, 224 px) skips the continuation. A row that trains its
LLM through cross-attention (the paper's "CA, trainable LLM + text data") must have text-only data in its
stage-2 mixture. ``--dry-run`` prints the commands (the chain to run by hand) without running them; every
run writes ``<OUT>/stages.json`` (the stages, their commands and checkpoints).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lynx_zoo.resources import shipped

CHECKPOINT_CALLBACK = "lightning.pytorch.callbacks.ModelCheckpoint"


@dataclass(frozen=True)
class Stage:
    """One stage of the protocol: its overlay in the stages folder, and which data mixture it trains on."""

    name: str
    data: str  # "stage1" or "stage2"
    continuation: bool = False  # stage 1 continued at the row's resolution (skipped when that is stage 1's)


PROTOCOL = (
    Stage("stage1_224", "stage1"),
    Stage("stage1_420", "stage1", continuation=True),
    Stage("stage2", "stage2"),
)


@dataclass
class PlannedStage:
    """A stage as this command runs it: its ``fit`` arguments and where its weights end up."""

    stage: Stage
    args: list[str]
    overlay: dict[str, Any]
    folder: Path

    @property
    def checkpoint(self) -> Path:
        return self.folder / "checkpoints" / "last.ckpt"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "lynx_zoo", "fit", *self.args]


def resolve(args: list[str]) -> dict[str, Any]:
    """The config ``fit`` resolves from ``args`` (``--config`` files and options), nothing built."""
    from lynx_zoo.hub.config import parse_fit_args  # Lightning's parser: not needed for --help

    return parse_fit_args(args)


def _callbacks(trainer: dict[str, Any], folder: Path) -> list[dict[str, Any]]:
    """The stage's callbacks, its ``ModelCheckpoint``s writing into ``folder`` with ``save_last`` (one added if
    there is none)."""
    callbacks = [dict(c) for c in trainer.get("callbacks") or []]
    checkpoints = [c for c in callbacks if c.get("class_path") == CHECKPOINT_CALLBACK]
    if not checkpoints:
        checkpoints = [{"class_path": CHECKPOINT_CALLBACK, "init_args": {}}]
        callbacks.append(checkpoints[0])
    for callback in checkpoints:
        callback["init_args"] = {**(callback.get("init_args") or {}), "dirpath": str(folder), "save_last": True}
    return callbacks


def has_text_data(data: dict[str, Any]) -> bool:
    """Whether the resolved DataModule ``data`` mixes in a text-only source (:attr:`Source.text_only`)."""
    from lynx_zoo.data.sources import Source

    for source in (data.get("init_args") or {}).get("sources") or []:
        class_path = str(source.get("class_path", ""))
        module, _, name = class_path.rpartition(".")
        cls = getattr(sys.modules.get(module), name, None)  # the parse imported it: nothing is imported here
        if not (isinstance(cls, type) and issubclass(cls, Source)):
            raise ValueError(f"stages: data.init_args.sources: {class_path!r} is not a data source (Source)")
        if cls.text_only:
            return True
    return False


def plan(
    configs: list[Path],
    out: Path,
    stages_dir: Path,
    data: dict[str, Path | None],
    extra: list[str],
) -> list[PlannedStage]:
    """The stages to run for the row ``configs`` (see the module docstring), checked before any runs."""
    row_args = [a for c in configs for a in ("--config", str(c))]
    row_size = resolve(row_args + extra)["model"]["init_args"]["vision"]["image_size"]
    planned: list[PlannedStage] = []
    for stage in PROTOCOL:
        overlay_file = stages_dir / f"{stage.name}.yaml"
        if not overlay_file.is_file():
            raise FileNotFoundError(f"stages: no stage overlay {overlay_file} (--stages names the folder)")
        data_file = data[stage.data]
        if data_file is not None and not data_file.is_file():
            raise FileNotFoundError(f"stages: no {stage.data} data overlay {data_file}")
        stage_args = row_args + ["--config", str(overlay_file)] + (["--config", str(data_file)] if data_file else [])
        resolved = resolve(stage_args + extra)
        # stage 1 at its overlay's resolution; the continuation and stage 2 at the row's
        at_row_size = stage.continuation or stage.data == "stage2"
        size = row_size if at_row_size else resolved["model"]["init_args"]["vision"]["image_size"]
        if stage.continuation and planned and size == _image_size(planned[0]):
            continue  # the row trains at stage 1's resolution: no high-resolution continuation
        folder = out / stage.name
        overlay: dict[str, Any] = {
            "trainer": {
                "default_root_dir": str(folder),
                "callbacks": _callbacks(resolved["trainer"], folder / "checkpoints"),
            },
            "model": {
                "init_args": {
                    "init_from": str(planned[-1].checkpoint) if planned else None,
                    "vision": {"image_size": size},
                }
            },
        }
        if stage.data == "stage2" and _trains_llm_through_cross_attention(resolved["model"]):
            if not has_text_data(resolved["data"]):
                raise ValueError(
                    f"stages: {' + '.join(str(c) for c in configs)} trains its LLM through cross-attention (the "
                    "paper's 'CA, trainable LLM + text data' row), but its stage-2 data has no text-only source "
                    "(TextSource); add one to the stage-2 mixture (configs/data/lynx_stage2.yaml has FLAN and Baize)"
                )
        args = stage_args + ["--config", str(folder / "stage.yaml")] + extra
        planned.append(PlannedStage(stage, args, overlay, folder))
    return planned


def _image_size(stage: PlannedStage) -> int:
    return stage.overlay["model"]["init_args"]["vision"]["image_size"]


def _trains_llm_through_cross_attention(model: dict[str, Any]) -> bool:
    from lynx_zoo.fusion import CrossAttnLynx, model_class

    init_args = model.get("init_args") or {}
    cls = model_class(str(model.get("class_path", "")), where="stages: model.class_path")
    return issubclass(cls, CrossAttnLynx) and bool(init_args["llm"].get("trainable"))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lynx_zoo stages",
        description="Train a model config (a grid row) through the paper's stages: stage 1 at 224 px, stage 1 "
        "continued at the row's resolution, stage 2; each from the previous stage's weights.",
        epilog="Arguments after -- go to every stage's `fit` (e.g. --trainer.devices=8).",
    )
    p.add_argument("--config", type=Path, action="append", required=True, help="the row's configs, base first")
    p.add_argument("--out", type=Path, required=True, help="the run folder; each stage gets <OUT>/<stage>/")
    p.add_argument("--stages", type=Path, default=shipped("configs/stages"), help="the stage overlays")
    p.add_argument(
        "--stage1-data",
        default=str(shipped("configs/data/lynx_stage1.yaml")),
        help="the stage-1 data overlay ('none': the row's own data)",
    )
    p.add_argument(
        "--stage2-data",
        default=str(shipped("configs/data/lynx_stage2.yaml")),
        help="the stage-2 data overlay ('none': the row's own data)",
    )
    p.add_argument("--from", dest="start", choices=[s.name for s in PROTOCOL], help="start at this stage")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    return p


def main(argv: list[str]) -> int:
    """Run (or with ``--dry-run`` print) the stages; the exit status of the first stage that fails, else 0."""
    extra: list[str] = []
    if "--" in argv:
        argv, extra = argv[: argv.index("--")], argv[argv.index("--") + 1 :]
    args = parser().parse_args(argv)
    missing = [str(c) for c in args.config if not c.is_file()]
    if missing:
        sys.exit(f"lynx_zoo stages: error: no config {', '.join(missing)}")
    data = {
        name: None if value.lower() == "none" else Path(value)
        for name, value in (("stage1", args.stage1_data), ("stage2", args.stage2_data))
    }
    try:
        stages = plan(args.config, args.out, args.stages, data, extra)
    except (OSError, ValueError) as err:
        sys.exit(f"lynx_zoo stages: error: {err}")
    names = [s.stage.name for s in stages]
    if args.start is not None and args.start not in names:
        sys.exit(f"lynx_zoo stages: error: --from {args.start}: this row runs {names}")
    start = names.index(args.start) if args.start else 0
    if start and not stages[start - 1].checkpoint.is_file():
        sys.exit(f"lynx_zoo stages: error: --from {args.start} needs {stages[start - 1].checkpoint}")
    args.out.mkdir(parents=True, exist_ok=True)
    record = [
        {"stage": s.stage.name, "command": shlex.join(s.command()), "checkpoint": str(s.checkpoint)} for s in stages
    ]
    (args.out / "stages.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    for index, stage in enumerate(stages):
        stage.folder.mkdir(parents=True, exist_ok=True)
        (stage.folder / "stage.yaml").write_text(yaml.safe_dump(stage.overlay, sort_keys=False), encoding="utf-8")
        print(f"# {stage.stage.name}\n{shlex.join(stage.command())}", flush=True)
        if args.dry_run or index < start:
            continue
        code = subprocess.run(stage.command(), check=False).returncode
        if code != 0:
            print(f"lynx_zoo stages: {stage.stage.name} failed (exit status {code})", file=sys.stderr)
            return code
        if not stage.checkpoint.is_file():
            print(f"lynx_zoo stages: {stage.stage.name} left no {stage.checkpoint}", file=sys.stderr)
            return 1
    if not args.dry_run:
        print(f"the row's final weights: {stages[-1].checkpoint}")
    return 0
