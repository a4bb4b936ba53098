"""Start-up time of the package and the command line, against ``python -c "import torch"`` in the same run.

Each command is a fresh interpreter, timed from start to exit, ``--repeats`` times in turn (so a load that comes
and goes touches all alike); the table gives the median and the spread (min to max). Targets: ``import lynx_zoo``
under 1.2x ``import torch``; ``python -m lynx_zoo --help`` and each command's ``--help`` under 2 s.

    python benchmarks/startup.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from scale_common import report

from lynx_zoo.cli import COMMANDS

REPO = Path(__file__).resolve().parents[1]
HELP_LIMIT_S = 2.0
IMPORT_RATIO_LIMIT = 1.2


def commands() -> dict[str, list[str]]:
    """What is timed, by name: the baseline, the import, the overview and every command's help."""
    python = sys.executable
    timed = {
        "import torch": [python, "-c", "import torch"],
        "import lynx_zoo": [python, "-c", "import lynx_zoo"],
        "--help": [python, "-m", "lynx_zoo", "--help"],
    }
    timed |= {f"{name} --help": [python, "-m", "lynx_zoo", name, "--help"] for name in COMMANDS}
    return timed


def seconds(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="runs of each command (default: 5)")
    args = parser.parse_args()
    timed = commands()
    samples: dict[str, list[float]] = {name: [] for name in timed}
    for _ in range(args.repeats):
        for name, argv in timed.items():
            samples[name].append(seconds(argv))
    torch_s = statistics.median(samples["import torch"])
    rows = []
    for name, values in samples.items():
        median = statistics.median(values)
        if name.endswith("--help"):
            target, met = f"< {HELP_LIMIT_S} s", median < HELP_LIMIT_S
        elif name == "import lynx_zoo":
            target, met = f"< {IMPORT_RATIO_LIMIT}x import torch", median / torch_s < IMPORT_RATIO_LIMIT
        else:
            target, met = "baseline", None
        row = {"command": name, "median_s": round(median, 3), "min_s": round(min(values), 3)}
        row |= {"max_s": round(max(values), 3), "vs_import_torch": round(median / torch_s, 2)}
        rows.append(row | {"target": target, "met": met})
    report(
        "startup",
        rows,
        ["command", "median_s", "min_s", "max_s", "vs_import_torch", "target", "met"],
        repeats=args.repeats,
        load_average_at_end=os.getloadavg(),
        samples=samples,
    )


if __name__ == "__main__":
    main()
