"""The machine/run record every benchmark writes into its results JSON under ``"machine"``.

Light on purpose (torch and the standard library only), so that ``render_docs.py`` and the tests can read it:

    from record import finish_record, run_record

    machine = run_record()          # at the start of the run
    ...                             # measure
    finish_record(machine)          # adds the load average at the end
    result = {"command": machine["command"], "machine": machine, ...}
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
# the code a benchmark measures: a results file written with these differing from HEAD is marked dirty (the
# results themselves excluded, so that rerunning several benchmarks in turn does not mark the later ones)
MEASURED_PATHS = ("lynx_zoo", "benchmarks", ":(exclude)benchmarks/results")
LIBRARIES = ("torch", "transformers", "lightning", "timm")


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], capture_output=True, text=True, cwd=REPO, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return done.stdout.strip()


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages, rounded; None where the OS has none."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def library_versions() -> dict[str, str | None]:
    """The installed versions of the libraries the figures depend on (None: not installed)."""
    versions: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return versions


def run_record(command: list[str] | None = None) -> dict[str, Any]:
    """What a result was measured with: the commit and whether the measured code differed from it, the command,
    the CPU (model, the kernels torch dispatches to, ``ATEN_CPU_CAPABILITY`` if set), cores and torch threads,
    the load average at the start, and the Python and library versions. ``command``: the command line (default:
    this process's ``sys.argv``)."""
    status = _git("status", "--porcelain", "--", *MEASURED_PATHS)
    record: dict[str, Any] = {
        "git_commit": _git("rev-parse", "HEAD"),
        "dirty": None if status is None else bool(status),
        "command": " ".join(command or ["python", *sys.argv]),
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": load_average(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        **library_versions(),
    }
    if "ATEN_CPU_CAPABILITY" in os.environ:
        record["aten_cpu_capability"] = os.environ["ATEN_CPU_CAPABILITY"]
    if torch.cuda.is_available():
        record["gpu"] = torch.cuda.get_device_name()
    return record


def finish_record(record: dict[str, Any]) -> dict[str, Any]:
    """Add the load average at the end of the run (and the torch threads then, which a benchmark may have set)."""
    record["load_average_at_end"] = load_average()
    record["torch_threads"] = torch.get_num_threads()
    return record


if __name__ == "__main__":  # for shell-driven benchmarks: python benchmarks/record.py THE COMMAND LINE > machine.json
    print(json.dumps(run_record(sys.argv[1:] or None), indent=2))
