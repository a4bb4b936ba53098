"""A Markdown table like the paper's ablation table (rows = variants, columns = benchmark metrics) and PNG bar
charts comparing the variants per benchmark and category, from ``evaluate``'s results files.

Results of a study over seeds (each naming its row and seed: :class:`StudyRun`) make one row per study row, as
mean ± standard deviation over its seeds, with its training wall time; a row that stands for a row of the Lynx
paper's ablation table gets the paper's figure beside it and whether the study goes the paper's way
(:data:`FINDINGS`). Every chart draws the chance level of each category (always giving its most frequent answer).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lynx_zoo.data.answers import chance_levels

REQUIRED_KEYS = ("variant", "benchmark", "kind", "unit", "summary", "metrics")
UNIT_LABELS = {"accuracy": "accuracy (%)", "score": "MME score (max 200 per subtask)"}
# counts of a results file shown as their own columns: key -> column name
COUNT_COLUMNS = {"judge_failures": "judge failures", "num_skipped": "skipped"}
# MME answered at random: half the answers right (acc 50) and a quarter of the images with both right (acc+ 25)
MME_CHANCE = 75.0


@dataclass(frozen=True)
class StudyRun:
    """What a results file of a study over seeds records of its run (``study`` in the file).

    Args:
        row: the study row the run belongs to (its results are averaged with the row's other seeds).
        seed: the run's seed.
        paper_row: the row of the Lynx paper's ablation table it stands for (a key of :data:`PAPER_ROWS`), if any.
        train_seconds: wall time of its training.
        machine: where it ran.
        steps: its training steps.
        train_cpu_seconds: CPU time of its training (on a shared machine, what it costs alone).
    """

    row: str
    seed: int
    paper_row: str | None = None
    train_seconds: float | None = None
    machine: str = ""
    steps: int | None = None
    train_cpu_seconds: float | None = None


@dataclass(frozen=True)
class PaperRow:
    """A row of the Lynx paper's ablation table (arXiv 2307.02469): Open-VQA accuracy (%) on images and videos."""

    name: str
    image: float
    video: float


PAPER_ROWS: dict[str, PaperRow] = {
    "lynx": PaperRow("Lynx (PT + adapters, 420 px, diverse prompts)", 76.16, 66.22),
    "llama": PaperRow("w/ LLaMA", 70.86, 60.81),
    "single_prompt": PaperRow("w/o diverse prompts", 75.50, 59.46),
    "noisy_data": PaperRow("w/ large-scale noisy data", 72.85, 60.14),
    "cross_attn": PaperRow("w/ cross-attn (frozen LLM)", 31.79, 51.35),
    "cross_attn_trainable_llm": PaperRow("w/ cross-attn, trainable LLM + text data", 61.26, 52.70),
    "low_resolution": PaperRow("w/o high resolution", 73.51, 62.16),
}
# what the paper found, as (higher, lower) pairs of its rows on Open-VQA images
FINDINGS: tuple[tuple[str, str], ...] = (
    ("lynx", "cross_attn"),
    ("lynx", "cross_attn_trainable_llm"),
    ("cross_attn_trainable_llm", "cross_attn"),
    ("lynx", "low_resolution"),
    ("lynx", "single_prompt"),
    ("lynx", "llama"),
    ("lynx", "noisy_data"),
)


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

    @property
    def study(self) -> StudyRun | None:
        study = self.data.get("study")
        return StudyRun(**study) if study else None

    @property
    def row(self) -> str:
        """The table row it goes into: its study row, else its variant."""
        study = self.study
        return study.row if study else self.variant


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
        study = data.get("study")
        if study is not None and (not isinstance(study, dict) or not {"row", "seed"} <= set(study)):
            raise ValueError(f"{path}: `study` must name the run's row and seed, got {study!r}")
        key = (data["variant"], data["benchmark"])
        if key in seen:
            raise ValueError(f"{path} and {seen[key]} both hold variant {key[0]!r} on benchmark {key[1]!r}")
        seen[key] = path
        results.append(Result(path, data))
    if not results:
        raise FileNotFoundError(f"no results files in {[str(p) for p in paths]}")
    return results


# ----------------------------------------------------------------------------------------------- statistics
@dataclass(frozen=True)
class Stat:
    """A metric over a row's runs: mean, sample standard deviation (0 for one run) and the number of runs."""

    mean: float
    std: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float | None]) -> Stat | None:
        known = [v for v in values if v is not None and not math.isnan(v)]
        if not known:
            return None
        return cls(statistics.fmean(known), statistics.stdev(known) if len(known) > 1 else 0.0, len(known))


def _scale(unit: str) -> float:
    return 100.0 if unit == "accuracy" else 1.0


def _format(stat: Stat | None, unit: str) -> str:
    if stat is None:
        return "–"
    scale, digits = _scale(unit), 1 if unit == "accuracy" else 2
    text = f"{scale * stat.mean:.{digits}f}"
    return f"{text} ± {scale * stat.std:.{digits}f}" if stat.n > 1 else text


def _ordered(items: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _link(target: str, out_dir: Path) -> str:
    return os.path.relpath(target, out_dir).replace(os.sep, "/")


class Table:
    """The results grouped by table row and benchmark."""

    def __init__(self, results: Sequence[Result]) -> None:
        self.results = list(results)
        self.rows = _ordered([r.row for r in results])
        self.benchmarks = _ordered([r.benchmark for r in results if r.data["unit"] is not None])
        self.groups: dict[tuple[str, str], list[Result]] = {}
        self.study_runs: dict[str, list[StudyRun]] = {}  # study row -> what each of its results records, in order
        for r in results:
            self.groups.setdefault((r.row, r.benchmark), []).append(r)
            study = r.study
            if study is not None:
                self.study_runs.setdefault(study.row, []).append(study)
        self._chance: dict[str, dict[str, float]] = {}

    def unit(self, benchmark: str) -> str:
        return next(r.data["unit"] for r in self.results if r.benchmark == benchmark)

    def stat(self, row: str, benchmark: str, section: str, metric: str) -> Stat | None:
        return Stat.of([r.data[section].get(metric) for r in self.groups.get((row, benchmark), [])])

    def metrics(self, benchmark: str, section: str) -> list[str]:
        return _ordered([m for r in self.results if r.benchmark == benchmark for m in r.data[section]])

    def chance(self, benchmark: str) -> dict[str, float]:
        """Chance per metric of a benchmark (fractions for accuracy, scores for MME); empty if unknown. Worked out
        once per benchmark (for results files without ``chance``, it reads their predictions)."""
        if benchmark not in self._chance:
            self._chance[benchmark] = self._find_chance(benchmark)
        return self._chance[benchmark]

    def _find_chance(self, benchmark: str) -> dict[str, float]:
        of_bench = [r for r in self.results if r.benchmark == benchmark]
        if of_bench[0].data["unit"] == "score":
            return {m: MME_CHANCE for m in self.metrics(benchmark, "metrics")}
        for result in of_bench:
            chance = result.data.get("chance") or _chance_from_predictions(result)
            if chance:
                return chance
        return {}

    def study(self, row: str) -> StudyRun | None:
        """What the row's first result records of its run (``None``: not a study row)."""
        runs = self.study_runs.get(row)
        return runs[0] if runs else None

    def paper_rows(self) -> dict[str, str]:
        """Paper row -> the table row standing for it."""
        found: dict[str, str] = {}
        for row in self.rows:
            study = self.study(row)
            if study and study.paper_row:
                if study.paper_row not in PAPER_ROWS:
                    raise ValueError(
                        f"study row {row!r}: unknown paper row {study.paper_row!r}; known: {list(PAPER_ROWS)}"
                    )
                found.setdefault(study.paper_row, row)
        return found


def _chance_from_predictions(result: Result) -> dict[str, float]:
    """Chance levels from a results file's predictions beside it (files written before ``chance`` was recorded),
    worked out as ``evaluate`` records them (:func:`~lynx_zoo.data.answers.chance_levels`: answers compared after
    :func:`~lynx_zoo.data.answers.normalize_answer`)."""
    predictions = result.path.parent / str(result.data.get("predictions") or "")
    if not predictions.is_file():
        return {}
    records = []
    for line in predictions.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if "gt" in row and "category" in row:
            records.append({"category": row["category"], "answer": str(row["gt"])})
    return chance_levels(records) if records else {}


# ----------------------------------------------------------------------------------------------- the paper
@dataclass(frozen=True)
class Verdict:
    """How a study compares two rows against the paper's direction, on one benchmark's overall score."""

    higher: Stat
    lower: Stat

    @property
    def difference(self) -> float:
        return self.higher.mean - self.lower.mean

    @property
    def noise(self) -> float:
        return math.hypot(self.higher.std, self.lower.std)

    @property
    def word(self) -> str:
        if abs(self.difference) <= self.noise or self.difference == 0:
            return "no clear difference"
        return "agrees" if self.difference > 0 else "disagrees"


def findings(table: Table) -> list[tuple[str, str, str, str, dict[str, Verdict]]]:
    """For each finding of the paper the study has both rows of: (paper row higher, lower, study row higher, lower,
    verdict per benchmark on its overall score)."""
    rows = table.paper_rows()
    out = []
    for high, low in FINDINGS:
        if high in rows and low in rows:
            verdicts = {}
            for bench in table.benchmarks:
                a = table.stat(rows[high], bench, "summary", "overall")
                b = table.stat(rows[low], bench, "summary", "overall")
                if a is not None and b is not None:
                    verdicts[bench] = Verdict(a, b)
            out.append((high, low, rows[high], rows[low], verdicts))
    return out


def _paper_cells(table: Table, row: str, found: list[tuple[str, str, str, str, dict[str, Verdict]]]) -> list[str]:
    """The paper's figure for a study row (beside the one it is compared with) and the study's verdicts."""
    study = table.study(row)
    if study is None or study.paper_row is None:
        return ["no figure", "–"]
    paper = PAPER_ROWS[study.paper_row]
    if study.paper_row == "lynx":
        return [f"{paper.image:.2f}", "reference"]
    ours = [f for f in found if study.paper_row in f[:2]]
    finding = next((f for f in ours if "lynx" in f[:2]), ours[0] if ours else None)
    if finding is None:
        return [f"{paper.image:.2f}", "–"]
    high, low, *_, verdicts = finding
    other = PAPER_ROWS[low if high == study.paper_row else high]
    return [f"{paper.image:.2f} (vs {other.image:.2f})", " / ".join(v.word for v in verdicts.values()) or "–"]


# ----------------------------------------------------------------------------------------------- the report
def _shows_count(results: Sequence[Result], key: str) -> bool:
    """A count column is shown for every judged benchmark (judge failures), or where any result counts some."""
    return any(r.data.get(key) for r in results) or (
        key == "judge_failures" and any(r.data.get("kind") == "openvqa" for r in results)
    )


def _cell(table: Table, row: str, column: tuple[str, str, str]) -> str:
    """A metric's mean ± std over the row's runs, or a count summed over them ("N of M")."""
    bench, section, metric = column
    if section != "counts":
        return _format(table.stat(row, bench, section, metric), table.unit(bench))
    runs = table.groups.get((row, bench), [])
    if not runs:
        return "–"
    samples = sum(r.data.get("num_samples", 0) for r in runs)
    return f"{sum(r.data.get(metric, 0) for r in runs)} of {samples}"


def _metric_table(table: Table, columns: list[tuple[str, str, str]], names: dict[str, str]) -> list[str]:
    """Rows x ``columns`` (benchmark, section, metric; section ``counts``: a count column), then a chance row where
    chance levels are known."""
    header = ["variant", *(f"{b}: {COUNT_COLUMNS.get(m, m) if s == 'counts' else m}" for b, s, m in columns)]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for row in table.rows:
        lines.append(f"| {names[row]} | " + " | ".join(_cell(table, row, c) for c in columns) + " |")
    chance_cells = []
    for bench, section, metric in columns:
        value = table.chance(bench).get(metric) if section != "counts" else None
        chance_cells.append(_format(Stat(value, 0.0, 1), table.unit(bench)) if value is not None else "–")
    if any(c != "–" for c in chance_cells):
        lines.append("| chance | " + " | ".join(chance_cells) + " |")
    return lines


def markdown_table(results: Sequence[Result], out_dir: Path) -> str:
    """The ablation-style table (for a study: one per benchmark, mean ± std over a row's seeds, then the rows' seeds,
    training time and the paper's figures), the paper's findings beside the study's, and a table of the runs (model
    and run config, linked)."""
    table = Table(results)
    studied = any(table.study(row) for row in table.rows)
    if studied:  # the reference row first
        table.rows.sort(key=lambda row: (table.study(row) or StudyRun(row, 0)).paper_row != "lynx")
    configs = {r.row: r.data["run_config"] for r in results if r.data.get("run_config")}
    names = {row: f"[{row}]({_link(configs[row], out_dir)})" if row in configs else row for row in table.rows}
    columns: dict[str, list[tuple[str, str, str]]] = {}  # benchmark -> (benchmark, section, metric)
    for bench in table.benchmarks:
        for section in ("summary", "metrics"):
            columns.setdefault(bench, []).extend((bench, section, m) for m in table.metrics(bench, section))
        of_bench = [r for r in results if r.benchmark == bench]
        columns[bench].extend((bench, "counts", key) for key in COUNT_COLUMNS if _shows_count(of_bench, key))
    found = findings(table) if studied else []
    if not studied:
        lines = _metric_table(table, [c for cs in columns.values() for c in cs], names)
    else:
        lines = []
        for bench, bench_columns in columns.items():
            lines += [f"### {bench}", "", *_metric_table(table, bench_columns, names), ""]
        lines += ["### The rows", ""]
        lines += ["| variant | seeds | training: wall / CPU (s) | paper: Open-VQA image | study agrees |"]
        lines += ["|---|---|---|---|---|"]
        for row in table.rows:
            study_runs = table.study_runs.get(row, [])
            wall = Stat.of([s.train_seconds for s in study_runs])
            cpu = Stat.of([s.train_cpu_seconds for s in study_runs])
            time_cell = f"{wall.mean:.0f} / {cpu.mean:.0f}" if wall and cpu else (f"{wall.mean:.0f}" if wall else "–")
            seeds = str(len({s.seed for s in study_runs})) if study_runs else "1"
            lines.append(
                f"| {names[row]} | {seeds} | {time_cell} | " + " | ".join(_paper_cells(table, row, found)) + " |"
            )
    notes = [
        "Variants link to their run configs. Accuracy in %, of the answers the judge judged (its failures are "
        "counted apart, never as wrong answers); MME scores as the official tool (subtask max 200, perception max "
        "2000, cognition max 800). '–': not evaluated, or nothing judged. Skipped: questions whose image could not "
        "be read (listed in the results file)."
    ]
    if studied:
        notes.append(
            "A study row is the mean ± sample standard deviation over its seeds. Chance: always giving each "
            "category's most frequent answer. 'study agrees' compares the row with the row the paper compares it "
            "with, on each benchmark's overall accuracy (one verdict per benchmark, in the order above): 'agrees' "
            "when the difference goes the paper's way by more than the seeds' spread (the two standard deviations "
            "added in quadrature), 'disagrees' when it goes the other way by more, else 'no clear difference'."
        )
    text = [*lines, "", *notes]
    if found:
        text += ["", "## The paper's findings and this study", ""]
        text += ["| paper (Open-VQA image) | study rows | " + " | ".join(table.benchmarks) + " |"]
        text += ["|---|---|" + "---|" * len(table.benchmarks)]
        for high, low, row_high, row_low, verdicts in found:
            a, b = PAPER_ROWS[high], PAPER_ROWS[low]
            paper = f"{a.name} {a.image:.2f} > {b.name} {b.image:.2f}"
            cells = []
            for bench in table.benchmarks:
                v = verdicts.get(bench)
                unit = table.unit(bench)
                cells.append(f"{_format(v.higher, unit)} vs {_format(v.lower, unit)}: **{v.word}**" if v else "–")
            text.append(f"| {paper} | {row_high} vs {row_low} | " + " | ".join(cells) + " |")
    budget = [table.study(row) for row in table.rows if table.study(row)]
    if budget:
        steps = sorted({s.steps for s in budget if s.steps})
        machines = sorted({s.machine for s in budget if s.machine})
        text += ["", "## Budget", ""]
        if steps:
            text.append(f"- training steps per run: {', '.join(map(str, steps))}")
        runs_of = {(r.study.row, r.study.seed): r.study for r in results if r.study}.values()
        wall = Stat.of([s.train_seconds for s in runs_of])
        cpu = Stat.of([s.train_cpu_seconds for s in runs_of])
        if wall:
            text.append(
                f"- training time per run ({wall.n} runs): {wall.mean:.0f} s wall on average (max "
                f"{max(s.train_seconds or 0 for s in runs_of):.0f} s)"
                + (
                    f", {cpu.mean:.0f} s CPU (max {max(s.train_cpu_seconds or 0 for s in runs_of):.0f} s)"
                    if cpu
                    else ""
                )
            )
        text += [f"- machine: {m}" for m in machines]
    runs = ["| variant | benchmark | model | run config | samples |", "|---|---|---|---|---|"]
    for r in results:
        # the checkpoint or variant folder evaluated (`checkpoint` in results written before variants were taken)
        config, model = r.data.get("run_config"), r.data.get("model") or r.data.get("checkpoint")
        config_cell = f"[config]({_link(config, out_dir)})" if config else "–"
        model_cell = f"[{Path(model).name}]({_link(model, out_dir)})" if model else "–"
        runs.append(
            f"| {r.variant} | {r.benchmark} | {model_cell} | {config_cell} | {r.data.get('num_samples', '–')} |"
        )
    return "\n".join([*text, "", "## Runs", "", *runs]) + "\n"


def bar_chart(results: Sequence[Result], benchmark: str, path: Path) -> Path:
    """Grouped bars: one group per category/subtask of ``benchmark``, one bar per row (the mean over its seeds, the
    standard deviation as an error bar), and each category's chance level as a dashed line across its group."""
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError("charts need matplotlib: pip install 'lynx-zoo[report]'") from err
    table = Table([r for r in results if r.benchmark == benchmark])
    unit = table.unit(benchmark)
    metrics = table.metrics(benchmark, "metrics")
    scale = _scale(unit)
    rows = table.rows
    width = 0.8 / len(rows)
    figure = Figure(figsize=(max(6.0, 0.9 * len(metrics) * max(1, len(rows) / 2)), 4.0), layout="constrained")
    axes = figure.add_subplot()
    for i, row in enumerate(rows):
        stats = [table.stat(row, benchmark, "metrics", m) for m in metrics]
        heights = [scale * s.mean if s else math.nan for s in stats]  # no bar where not evaluated
        errors = [scale * s.std if s else 0.0 for s in stats]
        positions = [x + (i - (len(rows) - 1) / 2) * width for x in range(len(metrics))]
        with_error = any(s and s.n > 1 for s in stats)
        axes.bar(positions, heights, width, yerr=errors if with_error else None, capsize=2, label=row)
    chance = table.chance(benchmark)
    if chance:
        for x, metric in enumerate(metrics):
            if metric in chance:
                label = "chance" if x == 0 else None
                axes.hlines(
                    scale * chance[metric], x - 0.45, x + 0.45, colors="black", linestyles="dashed", label=label
                )
    else:
        warnings.warn(
            f"report: no chance level for benchmark {benchmark!r} (its results record none and have no predictions "
            "file beside them): its chart has no chance line; evaluate again to record it",
            stacklevel=2,
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


def write_report(
    paths: Sequence[str | Path], out_dir: str | Path, title: str = "Evaluation report", intro: str = ""
) -> Path:
    """``report.md`` with the table, the runs and the charts (one PNG per scored benchmark) in ``out_dir``, under
    ``title`` and an ``intro`` paragraph."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = load_results(paths)
    charts = []
    for bench in _ordered([r.benchmark for r in results if r.data["unit"] is not None and r.data["metrics"]]):
        charts.append(bar_chart(results, bench, out_dir / f"{bench}.png"))
    text = f"# {title}\n\n" + (f"{intro}\n\n" if intro else "") + markdown_table(results, out_dir)
    if charts:
        text += "\n## Charts\n\n" + "\n\n".join(f"![{c.stem}]({c.name})" for c in charts) + "\n"
    report = out_dir / "report.md"
    report.write_text(text, encoding="utf-8")
    return report
