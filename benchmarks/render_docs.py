"""Render the figures the docs quote from the results files under ``benchmarks/results/``.

    python benchmarks/render_docs.py            # rewrite every marked block in README.md and docs/**/*.md
    python benchmarks/render_docs.py --check    # exit 1 listing each block that differs (file, block, first line)

A rendered block in a doc sits between two markers; everything between them is this script's output::

    <!-- results:train_step -->
    ...
    <!-- /results:train_step -->

Its name is a results file's stem, or ``stem:part`` for several blocks from one file. Each block ends with a
one-line provenance: the results file, its commit, the command, the CPU model and capability, threads and load.

Adding a renderer: a function of the loaded results file that returns the block's Markdown (without the
provenance line), registered under the block's name::

    @renderer("demo_reproduce")                    # reads benchmarks/results/demo_reproduce.json
    def demo_reproduce(result: dict) -> str: ...

    @renderer("serve", results="serve.json")        # a name that differs from the file's stem names its file
    def serve(result: dict) -> str: ...

then put the two markers where the block goes and run this script. Renderers live here, not in the benchmark
scripts, so that rendering and its test import neither torch, Lightning nor transformers. A ``.jsonl`` results
file loads as ``{"lines": [...]}``, with its run record from ``<stem>_machine.json`` beside it when there is one.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
BLOCK = re.compile(r"(<!-- results:(?P<name>[\w.:-]+) -->\n)(?P<body>.*?)(<!-- /results:(?P=name) -->)", re.S)
OPENING = re.compile(r"<!-- (/?)results:([\w.:-]+) -->")


@dataclass(frozen=True)
class Renderer:
    """A block's renderer and the results file (relative to ``benchmarks/results/``) it reads."""

    render: Callable[[dict[str, Any]], str]
    results: str


RENDERERS: dict[str, Renderer] = {}


def renderer(name: str, results: str | None = None) -> Callable[[Callable[[dict[str, Any]], str]], Callable]:
    """Register ``function`` as the renderer of block ``name``, reading ``results`` (default: the name's stem
    before any ``:``, plus ``.json``)."""

    def register(function: Callable[[dict[str, Any]], str]) -> Callable[[dict[str, Any]], str]:
        if name in RENDERERS:
            raise ValueError(f"results block {name!r} has two renderers")
        RENDERERS[name] = Renderer(function, results or name.split(":", 1)[0] + ".json")
        return function

    return register


# ------------------------------------------------------------------------------------------------ the machinery


def load(results: str) -> dict[str, Any]:
    """A results file as a dict (a ``.jsonl`` one as ``{"lines": [...]}``, with its run record if it has one)."""
    path = RESULTS / results
    if not path.is_file():
        raise SystemExit(f"{path}: no such results file (run the benchmark that writes it)")
    try:
        if path.suffix == ".jsonl":
            lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            data: dict[str, Any] = {"lines": lines}
            record = path.with_name(path.stem + "_machine.json")
            if record.is_file():
                data["machine"] = json.loads(record.read_text(encoding="utf-8"))
                data["command"] = data["machine"].get("command")
            return data
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise SystemExit(f"{path}: not valid JSON ({error})") from error


def _load_figure(values: Any) -> str:
    return "not recorded" if not values else f"{values[0]:.2f}" if isinstance(values, list) else str(values)


def provenance(results: str, data: dict[str, Any]) -> str:
    """One line: where the figures come from and what they were measured with."""
    machine = data.get("machine") or {}
    if isinstance(machine, str):  # the one-line strings older runs wrote
        machine = {"cpu": machine}
    commit = machine.get("git_commit")
    if commit:
        commit = commit[:7] + (" (dirty)" if machine.get("dirty") else "")
    else:
        commit = f"not recorded ({data['code']})" if data.get("code") else "not recorded"
    command = data.get("command") or "; ".join(data.get("commands", [])) or machine.get("command") or "not recorded"
    # a benchmark's own load record first: older runs took the machine record's "at start" at their end
    loads = data.get("load_average") if isinstance(data.get("load_average"), dict) else {}
    start = loads.get("at_start") or machine.get("load_average_at_start")
    end = loads.get("at_end") or machine.get("load_average_at_end")
    capability = machine.get("cpu_capability", "capability not recorded")
    if "aten_cpu_capability" in machine:
        capability += f", ATEN_CPU_CAPABILITY={machine['aten_cpu_capability']}"
    gpu = f", {machine['gpu']}" if machine.get("gpu") else ""
    threads = f"torch threads {machine['torch_threads']}" if "torch_threads" in machine else "threads not recorded"
    return (
        f"<sub>Rendered from `benchmarks/results/{results}` by `benchmarks/render_docs.py`: commit {commit}; "
        f"`{command}`; {machine.get('cpu', 'CPU not recorded')} ({capability}){gpu}, {threads}; "
        f"load {_load_figure(start)} at start, {_load_figure(end)} at end.</sub>"
    )


def render(name: str) -> str:
    """Block ``name``'s text between its markers: the renderer's Markdown, then the provenance line."""
    if name not in RENDERERS:
        raise SystemExit(f"results block {name!r} has no renderer (known: {', '.join(sorted(RENDERERS))})")
    entry = RENDERERS[name]
    data = load(entry.results)
    try:
        body = entry.render(data)
    except (KeyError, IndexError, ValueError, TypeError) as error:  # a results file of another shape
        raise SystemExit(
            f"benchmarks/results/{entry.results}: block {name!r} cannot render it ({type(error).__name__}: {error}); "
            "update its renderer in benchmarks/render_docs.py"
        ) from error
    return wrap(body.strip("\n")) + "\n\n" + provenance(entry.results, data) + "\n"


def documents(root: Path = REPO) -> list[Path]:
    """README.md and every Markdown file under docs/."""
    return [root / "README.md", *sorted((root / "docs").rglob("*.md"))]


def rendered(text: str, where: str) -> tuple[str, list[tuple[str, int, str, str]]]:
    """``text`` with every marked block rendered, and each block that differed: (name, the line number in the
    document of its first differing line, that line as it is, as it renders)."""
    markers = [(m.group(1), m.group(2)) for m in OPENING.finditer(text)]
    opened = [name for close, name in markers if not close]
    closed = [name for close, name in markers if close]
    if sorted(opened) != sorted(closed) or len(BLOCK.findall(text)) != len(opened):
        raise SystemExit(f"{where}: unbalanced results markers (opened {opened}, closed {closed})")
    differences = []

    def replace(match: re.Match[str]) -> str:
        body, want = match.group("body"), render(match.group("name"))
        if body != want:
            have_lines, want_lines = body.splitlines(), want.splitlines()
            index = next(
                (i for i, (a, b) in enumerate(zip(have_lines, want_lines, strict=False)) if a != b),
                min(len(have_lines), len(want_lines)),
            )
            first_line = text.count("\n", 0, match.start("body")) + 1 + index
            have = have_lines[index] if index < len(have_lines) else "(block ends)"
            got = want_lines[index] if index < len(want_lines) else "(block ends)"
            differences.append((match.group("name"), first_line, have, got))
        return match.group(1) + want + match.group(4)

    return BLOCK.sub(replace, text), differences


def check(root: Path = REPO) -> list[str]:
    """One message per block that differs from what its results file renders (nothing: all agree)."""
    messages = []
    for path in documents(root):
        _, differences = rendered(path.read_text(encoding="utf-8"), str(path))
        for name, line, have, want in differences:
            messages.append(
                f"{path.relative_to(root)}:{line}: block results:{name} differs from its results file\n"
                f"    in the doc:   {have}\n    rendered:     {want}"
            )
    return messages


def write(root: Path = REPO) -> list[Path]:
    """Rewrite every marked block; the documents that changed."""
    changed = []
    for path in documents(root):
        text = path.read_text(encoding="utf-8")
        new, differences = rendered(text, str(path))
        if differences:
            path.write_text(new, encoding="utf-8")
            changed.append(path)
    return changed


# ------------------------------------------------------------------------------------------------ formatting


def wrap(markdown: str, width: int = 116) -> str:
    """``markdown`` with its prose lines wrapped at ``width`` (bullets indented under their text); table rows stay
    as they are."""
    lines = []
    for line in markdown.splitlines():
        if line.startswith("|") or len(line) <= width:
            lines.append(line)
        else:
            indent = "  " if line.startswith("- ") else ""
            lines += textwrap.wrap(
                line, width, subsequent_indent=indent, break_long_words=False, break_on_hyphens=False
            )
    return "\n".join(lines)


def table(header: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows])


def pct(value: float, digits: int = 1) -> str:
    return f"{100 * value:.{digits}f} %"


def times(value: float) -> str:
    return f"{value:.2f}x"


def span(values: list[float]) -> str:
    """The range of ``values`` in whole percent ("2 %" where it rounds to one figure)."""
    low, high = f"{100 * min(values):.0f}", f"{100 * max(values):.0f}"
    return f"{low} %" if low == high else f"{low}-{high} %"


def rate(value: float) -> str:
    return f"{value:.1f}" if value < 100 else f"{value:.0f}"


def g4(value: float) -> str:
    return f"{value:.4g}"


# ------------------------------------------------------------------------------------------------ throughput.md

ARM_LABELS = {
    "hf_llava": "`hf_llava` (baseline)",
    "lynx_mlp_full_logits": "`lynx_mlp_full_logits` (like for like)",
    "lynx_mlp": "`lynx_mlp` (+ answer-only logits)",
    "lynx_mlp_packed": "`lynx_mlp_packed` (+ packing)",
    "lynx_resampler_packed": "`lynx_resampler_packed` (Lynx's bridge)",
    "lynx_resampler_packed_compiled": "`lynx_resampler_packed_compiled`",
}


def _arms(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {row["arm"]: row for row in result["rows"]}


def _speedup(result: dict[str, Any], prefix: str) -> float:
    (value,) = [v for k, v in result["speedups"].items() if k.startswith(prefix)]
    return value


@renderer("train_throughput:setup")
def train_throughput_setup(result: dict[str, Any]) -> str:
    data, load = result["data"], result["load_average"]["per_round_1min"]
    return (
        f"{data['samples']} samples: {pct(data['text_only_share'])} text-only, text lengths median "
        f"{data['text_tokens']['median']:.0f} and p90 {data['text_tokens']['p90']:.0f} tokens, "
        f"{pct(data['target_share_of_text'], 0)} of text tokens targets; batch {result['settings']['batch']}, "
        f"{result['settings']['rounds']} measured rounds interleaved arm by arm; load average "
        f"{min(load):.1f} to {max(load):.1f} during the run."
    )


@renderer("train_throughput")
def train_throughput(result: dict[str, Any]) -> str:
    header = ["arm", "samples/s", "target tokens/s", "padded tokens", "peak memory (MB)", "samples/s vs HF"]
    header.append("memory vs HF")
    rows = [
        [
            ARM_LABELS.get(row["arm"], f"`{row['arm']}`"),
            f"{row['samples_per_s']:.3f}",
            f"{row['target_tokens_per_s']:.1f}",
            pct(row["padded_share"]),
            f"{row['peak_memory_MB']:.0f}",
            times(row["vs_hf_samples_per_s"]),
            times(row["vs_hf_peak_memory"]),
        ]
        for row in result["rows"]
    ]
    return table(header, rows)


@renderer("train_throughput:gains")
def train_throughput_gains(result: dict[str, Any]) -> str:
    arms = _arms(result)
    memory = arms["lynx_mlp"]["vs_hf_peak_memory"]
    padded, packed = arms["lynx_mlp"]["padded_share"], arms["lynx_mlp_packed"]["padded_share"]
    resampler = arms["lynx_resampler_packed"]
    return "\n".join(
        [
            "What each switch is worth here (ratios of samples/s):",
            "",
            f"- **answer-only logits: {times(_speedup(result, 'answer_only'))}** and {times(memory)} the memory: "
            "with a 32k vocabulary the logits of every position are the largest tensor of the step;",
            f"- **packing: {times(_speedup(result, 'packing'))}** on this CPU: padding falls from {pct(padded)} to "
            f"{pct(packed)}, but the grouped sampler already keeps padding low and the block-diagonal mask costs "
            "SDPA its fast path on a CPU. Packing pays where padding is high (ungrouped batches, long-tailed "
            "lengths) and on GPUs with FlashAttention-2's variable-length kernels; it is off by default;",
            f"- **the resampler: {times(_speedup(result, 'resampler'))}**: 32 visual tokens per image instead of 196;",
            f"- **`torch.compile`: {times(_speedup(result, 'compile'))}**: kept as a switch, off by default;",
            f"- **the framework itself: {times(_speedup(result, 'framework'))}** (lynx_zoo with HF's own loss path "
            "against HF LLaVA);",
            f"- **Lightning against the bare loop: {100 * result['lightning_overhead_vs_bare_loop']:+.1f} %** "
            "(target: at most +5 %).",
            "",
            f"Against the issue's targets: {times(resampler['vs_hf_samples_per_s'])} HF's samples/s with Lynx's "
            f"resampler bridge and {times(arms['lynx_mlp']['vs_hf_samples_per_s'])} with the MLP projector and "
            f"answer-only logits (target: at least 1.5x); {pct(packed)} and {pct(resampler['padded_share'])} "
            f"padded tokens with packing (target: under 5 %); peak memory {times(resampler['vs_hf_peak_memory'])} "
            f"HF's with the resampler, {times(memory)} with the MLP projector (target: at most 0.6x).",
        ]
    )


@renderer("feature_cache")
def feature_cache(result: dict[str, Any]) -> str:
    labels = {"tower runs (pixels)": "the tower runs (pixels in)"}
    rows = [
        [
            labels.get(row["run"], row["run"]),
            f"{row['median_step_s']:.2f}",
            f"{row['samples_per_s']:.2f}",
            "1" if row["vs_tower"] == 1 else times(row["vs_tower"]),
        ]
        for row in result["rows"]
    ]
    share = result["tower_share_of_step_flops"]
    tokens = result["tokens_per_image"]
    settings = result["settings"]
    return "\n".join(
        [
            f"{tokens} tower tokens per image, batch {settings['batch']}, captions of ~"
            f"{result['caption_text_tokens_mean']} tokens, {settings['steps'] - settings['warmup']} steps timed:",
            "",
            table(["run", "median step (s)", "samples/s", "vs the tower"], rows),
            "",
            f"The step time falls by {pct(result['step_time_saving'], 0)}: the tower is "
            f"{pct(share['this model'], 0)} of this model's step FLOPs ({pct(share['real Lynx'], 0)} of the real "
            f"Lynx's stage-1 step, `lynx_step_flops`), and reading the cache costs little. Its price is disk: "
            f"{result['cache_bytes_per_sample'] / 1e3:.0f} KB per image in fp16 ({tokens} x 384 values; at Lynx's "
            f"width, 1408, about {tokens * 1408 * 2 / 1e6:.1f} MB per image), written once at "
            f"{result['cache_write_s_per_sample']:.2f} s per image here.",
        ]
    )


def _gpu_rows(result: dict[str, Any]) -> dict[tuple[str, str, bool], dict[str, Any]]:
    return {(row["variant"], row["path"], row["activation_ckpt"]): row for row in result["rows"]}


def _packing_gain(result: dict[str, Any], variant: str) -> float:
    rows = _gpu_rows(result)
    return rows[variant, "packed", False]["samples_per_s"] / rows[variant, "padded_full_logits", False]["samples_per_s"]


@renderer("gpu_full_size:summary")
def gpu_full_size_summary(result: dict[str, Any]) -> str:
    rows = _gpu_rows(result)
    padded, answer_only = rows["pt420", "padded_full_logits", False], rows["pt420", "padded_answer_only", False]
    return (
        f"Packing gives {times(_packing_gain(result, 'pt420'))} the samples/s of padded batches for PT "
        f"({times(_packing_gain(result, 'ca420'))} for CA) and lifts MFU from {pct(padded['mfu'], 0)} to "
        f"{pct(rows['pt420', 'packed', False]['mfu'], 0)}, the fixed-length path's level; the answer-only loss "
        f"saves {pct(1 - answer_only['step_s'] / padded['step_s'], 0)} of the step and "
        f"{padded['peak_mem_GB'] - answer_only['peak_mem_GB']:.1f} GB there, since the 7B decoder, not the "
        "32k-vocabulary head, dominates."
    )


GPU_VARIANTS = {"pt420": "PT-420", "ca420": "CA-420", "pt224": "PT-224"}


@renderer("gpu_full_size")
def gpu_full_size(result: dict[str, Any]) -> str:
    header = ["variant", "path", "activation ckpt", "rows x length", "step (s)", "samples/s", "target tokens/s"]
    header += ["MFU", "peak memory (GB)"]
    rows = [
        [
            GPU_VARIANTS.get(row["variant"], row["variant"]),
            row["path"],
            "yes" if row["activation_ckpt"] else "no",
            row["rows_x_length"],
            f"{row['step_s']:.3f}",
            f"{row['samples_per_s']:.1f}",
            f"{row['target_tokens_per_s']:.0f}",
            pct(row["mfu"]),
            f"{row['peak_mem_GB']:.1f}",
        ]
        for row in result["rows"]
    ]
    return table(header, rows)


@renderer("gpu_full_size:findings")
def gpu_full_size_findings(result: dict[str, Any]) -> str:
    rows = _gpu_rows(result)
    fixed = [row["mfu"] for (_, path, ckpt), row in rows.items() if path == "fixed_full_logits" and not ckpt]
    packed = [row["mfu"] for (_, path, ckpt), row in rows.items() if path == "packed" and not ckpt]
    padded, answer_only = rows["pt420", "padded_full_logits", False], rows["pt420", "padded_answer_only", False]
    shape = padded["rows_x_length"].replace("x", " rows of ")
    costs = [
        row["step_s"] / rows[variant, path, False]["step_s"] - 1 for (variant, path, ckpt), row in rows.items() if ckpt
    ]
    return (
        f"On realistic samples, padding wastes most of a padded batch ({shape} tokens for samples of median "
        f"~150): packing gives **{times(_packing_gain(result, 'pt420'))} the "
        f"samples/s** of padded batches for PT-420 ({times(_packing_gain(result, 'ca420'))} for CA-420, "
        f"{times(_packing_gain(result, 'pt224'))} for PT-224) and brings MFU to {span(packed)}, the fixed-length "
        f"path's {span(fixed)}. On a GPU the "
        f"answer-only loss saves little time ({pct(1 - answer_only['step_s'] / padded['step_s'], 0)}: the 7B "
        f"LLM's layers dominate, not the 32k-vocabulary head) but "
        f"{padded['peak_mem_GB'] - answer_only['peak_mem_GB']:.1f} GB at 16 samples. Activation checkpointing "
        f"costs {span(costs)} more step time and, with padding, nearly halves the peak "
        "memory."
    )


# ------------------------------------------------------------------------------------------------ README.md


@renderer("demo_reproduce")
def demo_reproduce(result: dict[str, Any]) -> str:
    runs = result["runs"]
    header = ["category", *(f"seed {r['seed']}, {r['cpu_capability']}" for r in runs), "range", "chance", "oracle"]
    rows = [
        [category, *(f"{v:.3f}" for v in row["runs"]), f"{row['min']:.3f} – {row['max']:.3f}",
         f"{row['chance']:.3f}", f"{row['oracle']:.3f}"]
        for category, row in result["categories"].items()
    ]  # fmt: skip
    walls = ", ".join(f"{r['wall_s'] / 60:.1f} min" for r in runs)
    targets, meets = result["targets"], result["meets_targets"]
    verdict = "met" if all(meets.values()) else "not met: " + ", ".join(k for k, ok in meets.items() if not ok)
    return "\n".join(
        [
            table(header, rows),
            "",
            f"Training wall time per run: {walls}. The demo's targets (every category >= "
            f"{targets['min_accuracy']:.2f} in every run, a spread of at most {targets['max_spread']:.2f}, at most "
            f"{targets['max_wall_s'] / 60:.0f} min a run): {verdict}.",
        ]
    )


# ------------------------------------------------------------------------------------------------ scale.md


@renderer("train_step")
def train_step(result: dict[str, Any]) -> str:
    columns = ["run", "params", "trainable", "median_step_s", "min_step_s", "vs_bare_loop", "llm_tokens_per_s"]
    rows = [[row["run"], *(g4(row[c]) if isinstance(row[c], float) else row[c] for c in columns[1:])]
            for row in result["rows"]]  # fmt: skip
    by_run = {row["run"]: row for row in result["rows"]}
    lightning, bare = by_run["lynx_zoo (Lightning Trainer)"], by_run["bare PyTorch loop (same model)"]
    hf = by_run["HF LLaVA loop"]
    fastest = 100 * (lightning["min_step_s"] / bare["min_step_s"] - 1)
    return "\n".join(
        [
            table(columns, rows),
            "",
            f"The Lightning Trainer costs {pct(lightning['vs_bare_loop'] - 1)} over the bare loop in the median "
            f"(target: within 5 %) and {fastest:+.1f} % at the fastest step; lynx_zoo PT and HF LLaVA take the same "
            "time per step (same shapes, same work; "
            f"{pct(abs(lightning['median_step_s'] / hf['median_step_s'] - 1))} apart).",
        ]
    )


@renderer("generate")
def generate(result: dict[str, Any]) -> str:
    columns = ["run", "batch", "median_s", "new_tokens_per_s"]
    rows = [[g4(row[c]) if isinstance(row[c], float) else row[c] for c in columns] for row in result["rows"]]
    rates: dict[int, dict[str, float]] = {}
    for row in result["rows"]:
        rates.setdefault(row["batch"], {})[row["run"].split()[0]] = row["new_tokens_per_s"]
    behind = [1 - r["lynx_zoo"] / r["HF"] for r in rates.values()]
    return "\n".join(
        [
            table(columns, rows),
            "",
            f"lynx_zoo is {span(behind)} behind HF LLaVA at batch sizes "
            f"{' and '.join(map(str, rates))}: the same transformers `generate` over the same LLM, after a prefix "
            "built outside it.",
        ]
    )


@renderer("memory")
def memory(result: dict[str, Any]) -> str:
    columns = ["run", "rank", "param_MB", "grad_MB", "optimizer_MB", "state_MB", "state_vs_1_process", "peak_rss_MB"]
    rows = [[g4(row[c]) if isinstance(row[c], float) else row[c] for c in columns] for row in result["rows"]]
    return table(columns, rows)


# ------------------------------------------------------------------------------------------------ data.md

POWERS = {10**5: "10^5", 10**6: "10^6", 10**7: "10^7", 10**8: "10^8"}


def same(values: list[float]) -> str:
    spread = max(values) - min(values)
    return "is the same to the MB" if round(spread) == 0 else f"varies by {spread:.0f} MB"


@renderer("data_memory")
def data_memory(result: dict[str, Any]) -> str:
    rows = sorted(result["rows"], key=lambda r: (r["reader"] != "prepared", r["samples"]))
    cells = [
        [
            "prepared" if row["reader"] == "prepared" else "tar (`ShardSource`)",
            POWERS.get(row["samples"], row["samples"]),
            f"{row['startup_s']:.3g}",
            f"{row['rank']['rss_mb']:.0f}",
            f"{max(w['rss_mb'] for w in row['workers']):.0f}",
        ]
        for row in rows
    ]
    prepared = [r for r in rows if r["reader"] == "prepared"]
    tar = [r for r in rows if r["reader"] == "tar"]
    worker = [max(w["rss_mb"] for w in r["workers"]) for r in prepared]
    rank = [r["rank"]["rss_mb"] for r in prepared]
    pss = [p for r in prepared for p in [r["rank"]["pss_mb"], *(w["pss_mb"] for w in r["workers"])]]
    small, large = tar[0], tar[-1]
    index_bytes = (large["rank"]["rss_mb"] - small["rank"]["rss_mb"]) * 1e6 / (large["samples"] - small["samples"])
    startup_per_sample = large["startup_s"] / large["samples"]
    sizes = f"{POWERS[prepared[0]['samples']]} to {POWERS[prepared[-1]['samples']]}"
    return "\n".join(
        [
            table(["reader", "samples", "start-up (s)", "rank RSS (MB)", "worker RSS (MB, the larger)"], cells),
            "",
            f"- **Prepared:** from {sizes} samples the rank's memory {same(rank)}, a worker's varies by at most "
            f"{pct(max(worker) / min(worker) - 1, 0)} (it maps the 64 MB chunk it reads), and "
            f"start-up does not grow ({min(r['startup_s'] for r in prepared):.2f}-"
            f"{max(r['startup_s'] for r in prepared):.2f} s). Most of the memory is torch and the zoo themselves: "
            f"PSS, which splits the pages the processes share, is {min(pss):.0f}-{max(pss):.0f} MB per process."
            + (" All processes stay under 1 GB." if max(rank + worker) < 1024 else ""),
            f"- **Tar:** each sample costs about {index_bytes:.0f} bytes of index in every process, and start-up "
            f"reads the whole index ({large['startup_s']:.0f} s at {POWERS[large['samples']]}). The reader was not run "
            f"beyond {POWERS[large['samples']]}: at ten times that the index would need about "
            f"{index_bytes * large['samples'] * 10 / 1e9:.1f} GB in each process, beyond this shared machine. "
            "Extrapolated to "
            f"10^8 samples: about {index_bytes * 1e8 / 1e9:.0f} GB per process and a start-up of "
            f"{startup_per_sample * 1e8 / 60:.0f} minutes.",
        ]
    )


@renderer("data_throughput")
def data_throughput(result: dict[str, Any]) -> str:
    cells: dict[tuple[str, str], dict[int, float]] = {}
    spreads = []
    for row in result["pipelines"]:
        cells.setdefault((row["pipeline"], row["storage"]), {})[row["workers"]] = row["samples_per_s"]
        spreads.append((max(row["runs"]) - min(row["runs"])) / row["samples_per_s"])
    workers = sorted({w for by in cells.values() for w in by})
    header = ["pipeline", "storage", *(f"{w} worker{'s' if w != 1 else ''}" for w in workers)]
    rows = [[p, s, *(rate(by[w]) if w in by else "" for w in workers)] for (p, s), by in cells.items()]
    image = statistics.median(by[0] for (p, _), by in cells.items() if p == "image" and 0 in by)
    video = statistics.median(by[0] for (p, _), by in cells.items() if p == "video" and 0 in by)
    return "\n".join(
        [
            table(header, rows),
            "",
            f"Samples/s (median of {result['repeats']} runs); the demo model trains at "
            f"{result['model_samples_per_s']:.0f} samples/s in this run. The runs of a cell differ by up to "
            f"{pct(max(spreads), 0)} of its median; in one process a video sample costs {image / video:.0f}x an "
            "image sample.",
        ]
    )


# ------------------------------------------------------------------------------------------------ evaluation.md


@renderer("lmms_eval")
def lmms_eval(result: dict[str, Any]) -> str:
    return (
        f"On the project's 2-core machine the build took {result['build_seconds'] / 60:.1f} minutes and the tests "
        f"{result['test_seconds'] / 60:.1f} (`{result['pytest']}`; the versions are in the results file)."
    )


# ------------------------------------------------------------------------------------------------ study/README.md

SWEEP_ROWS = {  # the sweep configurations docs/study/README.md shows, as it labels them
    "p01_base": "lr 2e-3 (the first recipe)",
    "p03_s0lr1e-3": "lr 1e-3",
    "p07_w192": "lr 1e-3, width 192",
    "p06_w256": "lr 1e-3, width 256",
    "p09_L6": "lr 1e-3, 6 layers",
    "p08_L2": "lr 2e-3, 2 layers",
}
STAGE0_CATEGORIES = ("colour", "shape", "position", "pattern")
ROW_CATEGORIES = (*STAGE0_CATEGORIES, "counting")


@renderer("study_sweep", results="study_sweep.jsonl")
def study_sweep(result: dict[str, Any]) -> str:
    phases = {(line["name"], line["phase"]): line for line in result["lines"] if "progress" not in line}

    def scores(name: str, phase: str, categories: tuple[str, ...]) -> str:
        acc = phases[name, phase]["acc"]
        return " / ".join(f"{100 * acc[c]:.0f}" for c in categories)

    chance = next(line["chance"] for line in phases.values() if line["phase"] == "stage0")
    stage0 = [phases[name, "stage0"]["steps"] for name in SWEEP_ROWS]
    row_steps = [phases[name, row]["steps"] for name in SWEEP_ROWS for row in ("pt_every2", "pt_none")]
    header = [
        "stage 0",
        "stage 0 on text: " + " / ".join(STAGE0_CATEGORIES),
        "PT, adapters every 2nd: " + " / ".join(ROW_CATEGORIES),
        "PT, no adapters: same",
    ]
    rows = [
        [
            label,
            scores(name, "stage0", STAGE0_CATEGORIES),
            scores(name, "pt_every2", ROW_CATEGORIES),
            scores(name, "pt_none", ROW_CATEGORIES),
        ]
        for name, label in SWEEP_ROWS.items()
    ]
    return "\n".join(
        [
            f"At {min(stage0):,}-{max(stage0):,} stage-0 steps and {min(row_steps)}-{max(row_steps)} row steps "
            "(teacher-forced exact match, %, on held-out scenes; chance: "
            + ", ".join(f"{c} {100 * chance[c]:.0f}" for c in ROW_CATEGORIES)
            + "):",
            "",
            table(header, rows),
        ]
    )


# ------------------------------------------------------------------------------------------------ the command


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a block differs")
    parser.add_argument("--root", type=Path, default=REPO, help="the checkout whose README.md and docs/ to render")
    args = parser.parse_args()
    if args.check:
        messages = check(args.root)
        for message in messages:
            print(message)
        if messages:
            print(f"{len(messages)} results block(s) differ: run python benchmarks/render_docs.py")
            sys.exit(1)
        print("every results block agrees with its results file")
        return
    for path in write(args.root):
        print(f"rewrote {path.relative_to(args.root)}")


if __name__ == "__main__":
    main()
