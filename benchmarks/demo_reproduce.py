"""Rerun the README's demo (``python -m lynx_zoo fit --config configs/demo.yaml``) over seeds and compare the
held-out accuracy with the table in README.md.

    python benchmarks/demo_reproduce.py                      # seeds 0 1 2, the README's table
    python benchmarks/demo_reproduce.py --seeds 0 --workdir /tmp/demo

Each seed is a fresh process in its own run folder (the data set is rendered once, shared), with variants
registered in a private folder (the runs do not overwrite your ``lynx-demo``). The result JSON holds, per
category, every seed's accuracy, their mean and spread, the README's figures, and whether the rerun agrees: each
category's mean within the README's min-max range over seeds. It also records the wall time of each run, the
machine and the library versions.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from record import finish_record, run_record

REPO = Path(__file__).resolve().parents[1]
# the README's table: | category | mean | min – max | chance |
ROW = re.compile(r"^\| (colour|counting|position|shape) +\| ([\d.]+) +\| ([\d.]+) – ([\d.]+) +\| ([\d.]+) +\|$", re.M)


def readme_table(readme: Path) -> dict[str, dict[str, float]]:
    """The demo's figures as README.md states them: per category, the mean, min, max over seeds and chance."""
    rows = ROW.findall(readme.read_text(encoding="utf-8"))
    if not rows:
        raise SystemExit(f"{readme}: no demo table (| category | mean | min – max | chance |) found")
    return {c: {"mean": float(m), "min": float(lo), "max": float(hi), "chance": float(ch)} for c, m, lo, hi, ch in rows}


def held_out_accuracy(run: Path) -> dict[str, float]:
    """The last logged ``val/acc/<category>`` of a run (Lightning's CSV logger)."""
    (metrics,) = run.rglob("metrics.csv")
    last: dict[str, float] = {}
    for row in csv.DictReader(metrics.open()):
        for key, value in row.items():
            if key.startswith("val/acc/") and value:
                last[key.removeprefix("val/acc/")] = float(value)
    return last


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--workdir", type=Path, default=Path("runs/demo_reproduce"))
    parser.add_argument("--readme", type=Path, default=REPO / "README.md")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "demo_reproduce.json")
    args = parser.parse_args()
    machine = run_record()
    stated = readme_table(args.readme)
    args.workdir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "LYNX_ZOO_VARIANTS": str((args.workdir / "variants").resolve())}
    runs = []
    for seed in args.seeds:
        folder = args.workdir / f"seed{seed}"
        command = [sys.executable, "-m", "lynx_zoo", "fit", "--config", str(REPO / "configs" / "demo.yaml"),
                   f"--seed_everything={seed}", f"--trainer.default_root_dir={folder}",
                   f"--data.init_args.root={args.workdir / 'shapes_vqa'}"]  # fmt: skip
        start = time.perf_counter()
        subprocess.run(command, check=True, env=env)
        runs.append({"seed": seed, "wall_s": round(time.perf_counter() - start, 1),
                     "accuracy": held_out_accuracy(folder)})  # fmt: skip
        print(f"seed {seed}: {runs[-1]['accuracy']} in {runs[-1]['wall_s']} s", flush=True)
    table = {}
    for category, figures in stated.items():
        values = [r["accuracy"][category] for r in runs]
        mean = statistics.fmean(values)
        table[category] = {
            "seeds": values,
            "mean": round(mean, 4),
            "min": min(values),
            "max": max(values),
            "readme": figures,
            "agrees": figures["min"] <= round(mean, 3) <= figures["max"],
        }
    result = {
        "command": machine["command"],
        "runs": runs,
        "categories": table,
        "agrees": all(c["agrees"] for c in table.values()),
        "machine": finish_record(machine),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"{'category':<10} {'rerun mean':>10} {'README mean':>12} {'README range':>14}  agrees")
    for category, row in table.items():
        r = row["readme"]
        print(
            f"{category:<10} {row['mean']:>10.3f} {r['mean']:>12.3f} {r['min']:>6.3f} – {r['max']:.3f}  {row['agrees']}"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
