"""Rerun the README's demo (``python -m lynx_zoo fit --config configs/demo.yaml``) over seeds and CPU kernels.

    python benchmarks/demo_reproduce.py                       # seeds 0 1 2 x native, avx2; seed 0 on default
    python benchmarks/demo_reproduce.py --seeds 0 --kernels native --workdir /tmp/demo

Each run is a fresh process in its own run folder, with ``ATEN_CPU_CAPABILITY`` set to the kernel setting
(``native``: unset, the CPU's best; ``avx2``; ``default``, torch's non-vectorised kernels), on a data set rendered
once beforehand and shared, with variants registered in a private folder (the runs do not overwrite your
``lynx-demo``). The result JSON (``benchmarks/results/demo_reproduce.json``) holds every run's held-out accuracy per
category, its training wall time and the kernels torch reported; per category, the range over all runs, chance and
a pixel oracle's accuracy (what the images decide: :func:`lynx_zoo.data.shapes.scene_from_pixels`); whether the
demo's targets hold (every category >= 0.90 in every run, a spread of at most 0.03, at most 8 minutes a run); and
the run record. README.md's table is rendered from it (``python benchmarks/render_docs.py``).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml
from PIL import Image
from record import REPO, finish_record, load_average, run_record

from lynx_zoo.data.answers import majority_rates
from lynx_zoo.data.datamodule import ShapesVQADataModule
from lynx_zoo.data.shapes import oracle_answer, scene_from_pixels

TARGETS = {"min_accuracy": 0.90, "max_spread": 0.03, "max_wall_s": 480.0}


def held_out_accuracy(run: Path) -> dict[str, float]:
    """The last logged ``val/acc/<category>`` of a run (Lightning's CSV logger)."""
    (metrics,) = run.rglob("metrics.csv")
    last: dict[str, float] = {}
    with metrics.open() as lines:
        for row in csv.DictReader(lines):
            for key, value in row.items():
                if key.startswith("val/acc/") and value:
                    last[key.removeprefix("val/acc/")] = float(value)
    return last


def kernel_env(kernel: str) -> dict[str, str]:
    """The environment of a run on ``kernel`` (``native``: torch's own choice for this CPU)."""
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    if kernel != "native":
        env["ATEN_CPU_CAPABILITY"] = kernel
    return env


def capability_under(env: dict[str, str]) -> str:
    """The kernels torch dispatches to in a process with ``env``."""
    probe = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def oracle_and_chance(root: Path) -> tuple[dict[str, float], dict[str, float]]:
    """Per category, the pixel oracle's held-out accuracy and chance (the majority answer's share)."""
    records = [json.loads(line) for line in (root / "val.jsonl").read_text(encoding="utf-8").splitlines()]
    scenes: dict[str, list[dict]] = {}
    right: dict[str, list[bool]] = {}
    for record in records:
        if record["image"] not in scenes:
            with Image.open(root / record["image"]) as image:
                scenes[record["image"]] = scene_from_pixels(image)
        answer = oracle_answer(scenes[record["image"]], record["question"])
        right.setdefault(record["category"], []).append(answer == record["answer"])
    oracle = {c: round(sum(r) / len(r), 4) for c, r in right.items()}
    return oracle, {c: round(v, 4) for c, v in majority_rates(records).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--kernels", nargs="+", default=["native", "avx2"], help="run every seed on each")
    parser.add_argument("--default-kernel-seeds", type=int, nargs="*", default=[0], help="seeds also run on 'default'")
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "demo.yaml")
    parser.add_argument("--workdir", type=Path, default=Path("runs/demo_reproduce"))
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "demo_reproduce.json")
    args = parser.parse_args()
    machine = run_record()
    args.workdir.mkdir(parents=True, exist_ok=True)
    data_args = yaml.safe_load(args.config.read_text(encoding="utf-8"))["data"]["init_args"]
    root = args.workdir / "shapes_vqa"
    ShapesVQADataModule(**{**data_args, "root": str(root)}).prepare_data()  # rendered once, outside the timed runs
    oracle, chance = oracle_and_chance(root)
    plan = [(seed, kernel) for kernel in args.kernels for seed in args.seeds]
    plan += [(seed, "default") for seed in args.default_kernel_seeds if "default" not in args.kernels]
    runs = []
    for seed, kernel in plan:
        folder = args.workdir / f"seed{seed}_{kernel}"
        env = {**kernel_env(kernel), "LYNX_ZOO_VARIANTS": str((args.workdir / "variants").resolve())}
        command = [sys.executable, "-m", "lynx_zoo", "fit", "--config", str(args.config),
                   f"--seed_everything={seed}", f"--trainer.default_root_dir={folder}",
                   f"--data.init_args.root={root}"]  # fmt: skip
        load_before = load_average()
        start = time.perf_counter()
        subprocess.run(command, check=True, env=env)
        runs.append(
            {
                "seed": seed,
                "kernel": kernel,
                "cpu_capability": capability_under(env),
                "wall_s": round(time.perf_counter() - start, 1),
                "load_average_before": load_before,
                "load_average_after": load_average(),
                "accuracy": held_out_accuracy(folder),
            }
        )
        print(f"seed {seed} on {kernel}: {runs[-1]['accuracy']} in {runs[-1]['wall_s']} s", flush=True)
    categories = {}
    for category in sorted(chance):
        values = [r["accuracy"][category] for r in runs]
        categories[category] = {
            "runs": values,
            "mean": round(statistics.fmean(values), 4),
            "min": min(values),
            "max": max(values),
            "spread": round(max(values) - min(values), 4),
            "chance": chance[category],
            "oracle": oracle[category],
        }
    meets = {
        "min_accuracy": all(c["min"] >= TARGETS["min_accuracy"] for c in categories.values()),
        "max_spread": all(c["spread"] <= TARGETS["max_spread"] for c in categories.values()),
        "max_wall_s": all(r["wall_s"] <= TARGETS["max_wall_s"] for r in runs),
    }
    result = {
        "command": machine["command"],
        "config": str(args.config),
        "runs": runs,
        "categories": categories,
        "targets": TARGETS,
        "meets_targets": meets,
        "machine": finish_record(machine),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    for category, row in categories.items():
        low, high, chance, oracle = row["min"], row["max"], row["chance"], row["oracle"]
        print(f"{category:<10} {low:.3f} - {high:.3f} (chance {chance:.3f}, oracle {oracle:.3f})")
    print(f"targets met: {meets}; wrote {args.out}")


if __name__ == "__main__":
    main()
