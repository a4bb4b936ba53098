"""A Markdown table like the paper's ablation table (rows = variants, columns = benchmark metrics) and
PNG bar charts comparing the variants per benchmark and category, from ``evaluate``'s results files."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REQUIRED_KEYS = ("variant", "benchmark", "kind", "unit", "summary", "metrics")
UNIT_LABELS = {"accuracy": "accuracy (%)", "score": "MME score (max 200 per subtask)"}
# counts of a results file shown as their own columns: key -> column name
COUNT_COLUMNS = {"judge_failures": "judge failures", "num_skipped": "skipped"}


@dataclass(frozen=True)
class Result:
    """One results file of ``evaluate``."""

    path: Path
    data: dict[str, Any]

    @property
    def variant(self) -> str:
        return self.data["variant"]

    @property
    def benchmark(self) -> str:
        return self.data["benchmark"]


def load_results(paths: Sequence[str | Path]) -> list[Result]:
    """Results files, given as files or folders (every ``*.json`` in them)."""
    files: list[Path] = []
    for given in map(Path, paths):
        if given.is_dir():
            files.extend(sorted(given.glob("*.json")))
        elif given.is_file():
            files.append(given)
        else:
            raise FileNotFoundError(f"results not found: {given}")
    results: list[Result] = []
    seen: dict[tuple[str, str], Path] = {}
    for path in files:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err.msg})") from None
        missing = [k for k in REQUIRED_KEYS if not isinstance(data, dict) or k not in data]
        if missing:
            raise ValueError(f"{path}: not an evaluate results file: missing keys {missing}")
        key = (data["variant"], data["benchmark"])
        if key in seen:
            raise ValueError(f"{path} and {seen[key]} both hold variant {key[0]!r} on benchmark {key[1]!r}")
        seen[key] = path
        results.append(Result(path, data))
    if not results:
        raise FileNotFoundError(f"no results files in {[str(p) for p in paths]}")
    return results


def _shows_count(results: Sequence[Result], key: str) -> bool:
    """A count column is shown for every judged benchmark (judge failures), or where any result counts some."""
    return any(r.data.get(key) for r in results) or (
        key == "judge_failures" and any(r.data.get("kind") == "openvqa" for r in results)
    )


def _format(value: float | None, unit: str) -> str:
    if value is None or math.isnan(value):
        return "–"
    return f"{100 * value:.1f}" if unit == "accuracy" else f"{value:.2f}"


def _ordered(items: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _link(target: str, out_dir: Path) -> str:
    return os.path.relpath(target, out_dir).replace(os.sep, "/")


def markdown_table(results: Sequence[Result], out_dir: Path) -> str:
    """The ablation-style table plus a table of the runs (checkpoint and run config, linked)."""
    scored = [r for r in results if r.data["unit"] is not None]
    variants = _ordered([r.variant for r in results])
    benchmarks = _ordered([r.benchmark for r in scored])
    by_key = {(r.variant, r.benchmark): r for r in results}
    columns: list[tuple[str, str, str]] = []  # (benchmark, section, metric); section "counts": a count column
    for bench in benchmarks:
        of_bench = [r for r in scored if r.benchmark == bench]
        for section in ("summary", "metrics"):
            columns.extend((bench, section, m) for m in _ordered([m for r in of_bench for m in r.data[section]]))
        columns.extend((bench, "counts", key) for key in COUNT_COLUMNS if _shows_count(of_bench, key))
    header = [f"{b}: {COUNT_COLUMNS.get(m, m) if s == 'counts' else m}" for b, s, m in columns]
    lines = ["| variant | " + " | ".join(header) + " |", "|---" * (1 + len(columns)) + "|"]
    configs = {r.variant: r.data["run_config"] for r in results if r.data.get("run_config")}
    for variant in variants:
        name = f"[{variant}]({_link(configs[variant], out_dir)})" if variant in configs else variant
        cells = []
        for bench, section, metric in columns:
            result = by_key.get((variant, bench))
            if result is None:
                cells.append("–")
            elif section == "counts":
                cells.append(f"{result.data.get(metric, 0)} of {result.data.get('num_samples', '?')}")
            else:
                cells.append(_format(result.data[section].get(metric), result.data["unit"]))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    notes = [
        "Variants link to their run configs. Accuracy in %, of the answers the judge judged (its failures are "
        "counted apart, never as wrong answers); MME scores as the official tool (subtask max 200, perception max "
        "2000, cognition max 800). '–': not evaluated, or nothing judged. Skipped: questions whose image could not "
        "be read (listed in the results file)."
    ]
    runs = ["| variant | benchmark | model | run config | samples |", "|---|---|---|---|---|"]
    for r in results:
        # the checkpoint or variant folder evaluated (`checkpoint` in results written before variants were taken)
        config, model = r.data.get("run_config"), r.data.get("model") or r.data.get("checkpoint")
        config_cell = f"[config]({_link(config, out_dir)})" if config else "–"
        model_cell = f"[{Path(model).name}]({_link(model, out_dir)})" if model else "–"
        runs.append(
            f"| {r.variant} | {r.benchmark} | {model_cell} | {config_cell} | {r.data.get('num_samples', '–')} |"
        )
    return "\n".join([*lines, "", *notes, "", "## Runs", "", *runs]) + "\n"


def bar_chart(results: Sequence[Result], benchmark: str, path: Path) -> Path:
    """Grouped bars: one group per category/subtask of ``benchmark``, one bar per variant."""
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError("charts need matplotlib: pip install 'lynx-zoo[report]'") from err
    of_bench = [r for r in results if r.benchmark == benchmark]
    unit = of_bench[0].data["unit"]
    metrics = _ordered([m for r in of_bench for m in r.data["metrics"]])
    scale = 100.0 if unit == "accuracy" else 1.0
    width = 0.8 / len(of_bench)
    figure = Figure(figsize=(max(6.0, 0.9 * len(metrics) * max(1, len(of_bench) / 2)), 4.0), layout="constrained")
    axes = figure.add_subplot()
    for i, result in enumerate(of_bench):
        values = [result.data["metrics"].get(m) for m in metrics]
        heights = [scale * v if v is not None else math.nan for v in values]  # no bar where not evaluated
        axes.bar(
            [x + (i - (len(of_bench) - 1) / 2) * width for x in range(len(metrics))],
            heights,
            width,
            label=result.variant,
        )
    axes.set_xticks(
        range(len(metrics)),
        metrics,
        rotation=30 if len(metrics) > 6 else 0,
        ha="right" if len(metrics) > 6 else "center",
    )
    axes.set_ylabel(UNIT_LABELS.get(unit, unit))
    axes.set_ylim(0, 100 if unit == "accuracy" else 200)
    axes.set_title(benchmark)
    axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    figure.savefig(path, dpi=120)
    return path


def write_report(paths: Sequence[str | Path], out_dir: str | Path) -> Path:
    """``report.md`` with the table, the runs and the charts (one PNG per scored benchmark) in ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = load_results(paths)
    charts = []
    for bench in _ordered([r.benchmark for r in results if r.data["unit"] is not None and r.data["metrics"]]):
        charts.append(bar_chart(results, bench, out_dir / f"{bench}.png"))
    text = "# Evaluation report\n\n" + markdown_table(results, out_dir)
    if charts:
        text += "\n## Charts\n\n" + "\n\n".join(f"![{c.stem}]({c.name})" for c in charts) + "\n"
    report = out_dir / "report.md"
    report.write_text(text, encoding="utf-8")
    return report
