"""``python -m lynx_zoo study``: the frozen-LLM study on a CPU (``docs/study/``), in one resumable command.

The Lynx paper's adapter questions are about a **frozen** LLM. This command asks them of the demo's small LLaMA:

1. **Stage 0** (``configs/study/stage0.yaml``): the LLM learns the language of the task from text only, captions of
   rendered scenes followed by questions about them (:mod:`lynx_zoo.data.shapes_study`). Its weights are saved as a
   transformers folder, ``<OUT>/stage0/llm``: the pretrained base every row loads, frozen.
2. **The rows** (:data:`ROWS`), each over ``--seeds``: one ``python -m lynx_zoo fit`` of ``configs/study/pt.yaml``
   and the row's overlay, in a process of its own on one CPU thread (``<OUT>/<row>/seed<N>/``).
3. **Evaluation** of each run's last checkpoint on the held-out scenes, asked in the training phrasing
   (``shapes_study``) and in held-out phrasings (``shapes_study_held_out``): ``<OUT>/results/<row>-s<N>__*.json``,
   each naming its row, seed, the paper's row it stands for and its training wall time.
4. **The report** (``python -m lynx_zoo report``): mean ± std over seeds, chance, and the paper's findings beside the
   study's, written to ``--report``.

Every finished run is kept: run the command again and it goes on where it stopped (a run stopped midway starts
again from its last checkpoint). A line per run shows the progress.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lynx_zoo.evaluation.judges import ExactMatchJudge
from lynx_zoo.evaluation.report import StudyRun, write_report
from lynx_zoo.evaluation.runner import Benchmark, Evaluator, Variant
from lynx_zoo.resources import shipped

PROG = "python -m lynx_zoo study"


@dataclass(frozen=True)
class StudyRow:
    """A row of the study: its overlay on ``configs/study/pt.yaml`` (none: the reference row itself), what it
    changes, and the row of the paper's ablation table it stands for (``None``: the paper gives no figure)."""

    name: str
    overlay: str | None
    description: str
    paper_row: str | None = None

    def configs(self) -> list[Path]:
        base = [shipped("configs/study/pt.yaml")]
        return base + ([shipped(f"configs/study/{self.overlay}.yaml")] if self.overlay else [])


ROWS: tuple[StudyRow, ...] = (
    StudyRow("pt_adapters_every_2nd", None, "PT, frozen LLM, bottleneck adapters every 2nd layer, 64 px", "lynx"),
    StudyRow("pt_adapters_every_layer", "pt_adapters_every_layer", "adapters on every layer"),
    StudyRow("pt_adapters_none", "pt_adapters_none", "no adapters"),
    StudyRow("pt_lora", "pt_lora", "LoRA (peft) on every layer instead of adapters"),
    StudyRow("ca_frozen", "ca_frozen", "CA, frozen LLM", "cross_attn"),
    StudyRow("ca_trainable_llm", "ca_trainable_llm", "CA, trainable LLM + text data", "cross_attn_trainable_llm"),
    StudyRow("pt_low_res", "pt_low_res", "32 px instead of 64 px", "low_resolution"),
    StudyRow("pt_single_prompt", "pt_single_prompt", "one phrasing per question in training", "single_prompt"),
)
ROW_NAMES = [row.name for row in ROWS]
# (benchmark name, manifest of the study's data folder)
BENCHMARKS = (("shapes_study", "val.jsonl"), ("shapes_study_held_out", "val_held_out_phrasings.jsonl"))


def machine() -> str:
    """One line on the machine: CPU model, cores, torch threads of a run."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores; each run on 1 thread; {platform.system()}, torch {torch.__version__}"


@dataclass
class Study:
    """The study's settings (see :func:`parser`)."""

    out: Path
    report: Path | None
    rows: list[StudyRow]
    seeds: list[int]
    steps: int | None
    stage0_steps: int | None
    data_root: Path
    extra: list[str]

    # ------------------------------------------------------------------ the steps
    def run(self) -> None:
        started = time.time()
        self.log(f"{PROG}: {len(self.rows)} rows x {len(self.seeds)} seeds into {self.out} ({machine()})")
        llm = self.stage0()
        runs = [(row, seed) for row in self.rows for seed in self.seeds]
        for number, (row, seed) in enumerate(runs, start=1):
            self.run_row(row, seed, llm, f"[{number}/{len(runs)}]")
        if self.report is not None:
            report = write_report([self.results_dir], self.report)
            self.log(f"report: {report}")
        self.log(f"done in {time.time() - started:.0f} s")

    def stage0(self) -> Path:
        """The stage-0 LLM's folder, trained and saved first if it is not there yet."""
        from lynx_zoo.hub.export import save_llm
        from lynx_zoo.hub.loading import load_checkpoint

        folder = self.out / "stage0"
        llm = folder / "llm"
        if (llm / "config.json").is_file():
            self.log(f"stage 0: {llm} (done)")
            return llm
        args = ["--config", str(shipped("configs/study/stage0.yaml")), *self.common_args(folder)]
        if self.stage0_steps is not None:
            args += [f"--trainer.max_steps={self.stage0_steps}"]
        seconds = self.fit("stage 0", args, folder)
        model = load_checkpoint(folder / "checkpoints" / "last.ckpt")
        accuracy = text_accuracy(model, self.data_root / "text_val.jsonl")
        save_llm(model, llm)
        record = {"train_seconds": seconds, "text_accuracy": accuracy, "machine": machine(), "args": args}
        (folder / "stage0.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        self.log(f"stage 0: text-only accuracy {json.dumps(accuracy)} -> {llm}")
        return llm

    def run_row(self, row: StudyRow, seed: int, llm: Path, counter: str) -> None:
        name = f"{row.name}-s{seed}"
        results = [self.results_dir / f"{name}__{bench}.json" for bench, _ in BENCHMARKS]
        if all(p.is_file() for p in results):
            self.log(f"{counter} {row.name} seed {seed}: done")
            return
        folder = self.out / row.name / f"seed{seed}"
        facts = folder / "train.json"
        if not facts.is_file():
            args = [a for c in row.configs() for a in ("--config", str(c))]
            args += [
                f"--seed_everything={seed}",
                f"--data.init_args.seed={seed}",
                f"--model.init_args.llm.model={llm}",
                *self.common_args(folder),
            ]
            if self.steps is not None:
                args.append(f"--trainer.max_steps={self.steps}")
            seconds = self.fit(f"{counter} {row.name} seed {seed}", args, folder)
            record = {"train_seconds": seconds, "steps": trained_steps(folder), "args": args}
            facts.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        trained = json.loads(facts.read_text(encoding="utf-8"))
        study = StudyRun(row.name, seed, row.paper_row, trained["train_seconds"], machine(), trained["steps"])
        self.log(f"{counter} {row.name} seed {seed}: evaluating")
        evaluator = Evaluator(self.results_dir, ExactMatchJudge(), batch_size=64, device="cpu")
        variant = Variant(name, str(folder / "checkpoints" / "last.ckpt"), study=study)
        benchmarks = [Benchmark("vqa", bench, self.data_root / file) for bench, file in BENCHMARKS]
        written = evaluator.run([variant], benchmarks)
        scores = ", ".join(
            f"{p.stem.split('__')[1]} {json.loads(p.read_text())['summary']['overall']:.3f}" for p in written
        )
        self.log(f"{counter} {row.name} seed {seed}: {scores} ({trained['train_seconds']:.0f} s training)")

    # ------------------------------------------------------------------ helpers
    @property
    def results_dir(self) -> Path:
        return self.out / "results"

    def common_args(self, folder: Path) -> list[str]:
        return [
            f"--trainer.default_root_dir={folder}",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            f"--data.init_args.root={self.data_root}",
            "--data.init_args.num_workers=0",
            *self.extra,
        ]

    def fit(self, label: str, args: list[str], folder: Path) -> float:
        """One ``fit`` in its own process on one CPU thread (resumed from its last checkpoint if it stopped
        midway); its output goes to ``<folder>/fit.log``. Returns its wall time in seconds (all attempts)."""
        folder.mkdir(parents=True, exist_ok=True)
        last = folder / "checkpoints" / "last.ckpt"
        spent_file = folder / "seconds_spent"
        spent = float(spent_file.read_text()) if spent_file.is_file() else 0.0
        command = [
            sys.executable,
            "-m",
            "lynx_zoo",
            "fit",
            *args,
            *(["--ckpt_path", str(last)] if last.is_file() else []),
        ]
        self.log(f"{label}: training{' (resumed)' if last.is_file() else ''}: {shlex.join(command[1:])}")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        started = time.time()
        with (folder / "fit.log").open("a", encoding="utf-8") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
            try:
                code = process.wait()
            finally:
                if process.poll() is None:
                    process.terminate()
                spent += time.time() - started
                spent_file.write_text(f"{spent:.1f}")
        if code != 0 or not last.is_file():
            raise RuntimeError(f"{label}: fit failed (exit {code}); see {folder / 'fit.log'}")
        return spent

    @staticmethod
    def log(message: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)


def trained_steps(folder: Path) -> int:
    """The optimizer steps of a run's last checkpoint."""
    checkpoint = torch.load(folder / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True, mmap=True)
    return int(checkpoint["global_step"])


def text_accuracy(model: Any, manifest: Path) -> dict[str, float]:
    """Exact-match accuracy per category of a text-only model on text questions (``instruction``/``answer``)."""
    from lynx_zoo.data.answers import normalize_answer
    from lynx_zoo.data.manifest import read_manifest

    records, _ = read_manifest(manifest, required=("instruction", "answer"))
    correct: dict[str, list[bool]] = {}
    for start in range(0, len(records), 64):
        chunk = records[start : start + 64]
        answers = model.generate(prompts=[r["instruction"] for r in chunk])
        for record, answer in zip(chunk, answers):
            correct.setdefault(record["category"], []).append(
                normalize_answer(answer) == normalize_answer(record["answer"])
            )
    return {category: sum(v) / len(v) for category, v in sorted(correct.items())}


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/study"), help="runs, results (default: runs/study)")
    parser.add_argument("--report", type=Path, help="write the report here when every run is done (e.g. docs/study)")
    parser.add_argument("--rows", nargs="+", choices=ROW_NAMES, default=ROW_NAMES, help="rows to run (default: all)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds of every row (default: 0 1 2)")
    parser.add_argument("--steps", type=int, help="training steps of every row (default: the configs')")
    parser.add_argument("--stage0-steps", type=int, help="training steps of stage 0 (default: its config's)")
    parser.add_argument("--data", type=Path, default=Path("data/shapes_study"), help="the study's data folder")
    parser.add_argument("extra", nargs="*", help="after --: more fit arguments for every run")
    return parser


def main(argv: list[str]) -> None:
    args = parser().parse_args(argv)
    rows = [row for row in ROWS if row.name in args.rows]
    Study(args.out, args.report, rows, args.seeds, args.steps, args.stage0_steps, args.data, args.extra).run()
