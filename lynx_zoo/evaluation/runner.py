"""Evaluate lynx_zoo models (checkpoints, variant folders, variant names) on benchmarks and write one results file
per variant x benchmark.

Benchmark kinds:

* ``vqa``: a JSONL manifest (the training format), exact match after :func:`normalize_answer`,
  accuracy per category;
* ``openvqa``: a JSONL manifest of open-ended questions judged by a :class:`Judge` (Open-VQA);
* ``mme``: an MME folder (:func:`load_mme`), scored as the official MME tool does;
* ``owleval``: open instructions (JSONL: ``image``, ``instruction``, ``id``); answers only, for
  people to rate, with a Markdown side-by-side table over every variant in the results folder.

In ``RESULTS/``: ``<variant>__<benchmark>.json`` (metrics, the model, its config, settings) and
``<variant>__<benchmark>.predictions.jsonl`` (every answer; judged benchmarks add the verdict and
the judge's raw reply); owleval adds ``<benchmark>.side_by_side.md`` and ``.jsonl``.

Nothing fails silently: a question whose image cannot be read is skipped and recorded (``num_skipped``,
``skipped`` in the results, ``verdict: "skipped"`` in the predictions), as training skips it; a judge's failures are
counted apart (``judge_failures``) and left out of the accuracy, which is ``null`` when nothing was judged, never
0 %; and a judge that keeps failing ends the run (:class:`~lynx_zoo.evaluation.judges.JudgeBudget`), its
predictions written first.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import math
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm import tqdm

from lynx_zoo.data.answers import chance_levels, result_category
from lynx_zoo.data.manifest import read_manifest
from lynx_zoo.evaluation.judges import (
    ExactMatchJudge,
    Judge,
    JudgeBudget,
    JudgeBudgetExceeded,
    Judgement,
    JudgementCache,
    judge_all,
)
from lynx_zoo.evaluation.mme import load_mme
from lynx_zoo.evaluation.report import StudyRun
from lynx_zoo.fusion.base import LynxModel
from lynx_zoo.fusion.config import ModelConfig, jsonable
from lynx_zoo.generation import open_image
from lynx_zoo.hub import load_model, resolve_variant
from lynx_zoo.metrics import CategoryAccuracy, mme_yes_no

log = logging.getLogger(__name__)

BenchmarkKind = Literal["vqa", "openvqa", "mme", "owleval"]
BENCHMARK_KINDS: tuple[BenchmarkKind, ...] = ("vqa", "openvqa", "mme", "owleval")
_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


@dataclass(frozen=True)
class Variant:
    """A model to evaluate (anything :func:`lynx_zoo.load_model` takes), the name its results go under, and, for a
    run of a study over seeds, which row and seed it is (recorded in the results as ``study``)."""

    name: str
    source: str
    study: StudyRun | None = None

    def locate(self) -> Path:
        """The checkpoint file or variant folder this names; an error naming it if there is none."""
        path = Path(self.source).expanduser()
        return path if path.is_file() else resolve_variant(self.source)


@dataclass(frozen=True)
class Benchmark:
    """A benchmark: its kind, the name its results go under, and its file or folder."""

    kind: BenchmarkKind
    name: str
    path: Path


def _check_name(name: str, what: str) -> str:
    if not _NAME.match(name):
        raise ValueError(f"{what} name {name!r}: use only letters, digits, '.', '_' and '-'")
    return name


def split_spec(spec: str) -> tuple[str | None, Path]:
    """``NAME=PATH`` -> ``(NAME, PATH)``; a plain path -> ``(None, PATH)``.

    A path may hold '=' (Lightning names checkpoints ``epoch=3-step=40.ckpt``): an existing path, or
    text before the first '=' that is no valid name, is a plain path.
    """
    name, sep, path = spec.partition("=")
    if not sep or Path(spec).exists() or not _NAME.match(name):
        return None, Path(spec)
    return name, Path(path)


def _default_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text)


def parse_variant(spec: str) -> Variant:
    """``NAME=MODEL`` or ``MODEL``: a checkpoint (named after its run folder, ``runs/NAME/checkpoints/...`` or
    ``runs/NAME/lightning_logs/...``, else the file stem), a variant folder or a variant name (named after either)."""
    name, path = split_spec(spec)
    if name is None:
        parts = path.parts
        if "lightning_logs" in parts[1:]:
            name = parts[parts.index("lightning_logs") - 1]
        elif len(parts) > 2 and parts[-2] == "checkpoints" and path.suffix == ".ckpt":
            name = parts[-3]
        else:
            name = path.stem if path.suffix == ".ckpt" or path.is_file() else path.name
        name = _default_name(name)
    return Variant(_check_name(name, "variant"), str(path))


def parse_benchmark(kind: BenchmarkKind, spec: str) -> Benchmark:
    """``NAME=PATH`` or ``PATH`` (named ``<kind>-<file stem>``)."""
    name, path = split_spec(spec)
    return Benchmark(kind, _check_name(name or _default_name(f"{kind}-{path.stem}"), "benchmark"), path)


def _number(value: torch.Tensor | float) -> float | None:
    number = float(value)
    return None if math.isnan(number) else number


@dataclass
class Answers:
    """The model's answers to a benchmark's questions: ``texts[i]`` is ``None`` where question ``i`` was skipped,
    and ``errors[i]`` says why (its image could not be read)."""

    texts: list[str | None]
    errors: dict[int, str]

    def answered(self) -> list[int]:
        return [i for i, text in enumerate(self.texts) if text is not None]

    def skipped(self, ids: Sequence[str], images: Sequence[str]) -> list[dict[str, str]]:
        """What the results file records of each skipped question."""
        return [{"id": ids[i], "image": images[i], "error": error} for i, error in sorted(self.errors.items())]


def generate_answers(
    model: LynxModel, items: Sequence[tuple[Path, str]], batch_size: int, generation: dict[str, Any], desc: str
) -> Answers:
    """The model's answers to ``(image path, question)`` pairs, in batches; a question whose image cannot be read is
    skipped (logged, and its error kept) rather than ending the run."""
    texts: list[str | None] = [None] * len(items)
    errors: dict[int, str] = {}
    with tqdm(total=len(items), desc=desc, unit="q", leave=False) as progress:
        for start in range(0, len(items), batch_size):
            readable, images = [], []
            for index in range(start, min(start + batch_size, len(items))):
                try:
                    images.append(open_image(items[index][0]))
                    readable.append(index)
                except OSError as err:  # a MediaError names the file
                    errors[index] = str(err)
                    log.warning("%s: skipping question %d: %s", desc, index, err)
            if readable:
                answers = model.generate(images, [items[i][1] for i in readable], **generation)
                for index, answer in zip(readable, answers):
                    texts[index] = answer
            progress.update(min(batch_size, len(items) - start))
    return Answers(texts, errors)


def read_instructions(path: Path) -> list[dict[str, str]]:
    """OwlEval-style instructions: JSONL with ``image`` (relative to the file), ``instruction`` and ``id``."""
    if not path.is_file():
        raise FileNotFoundError(f"instructions file not found: {path}")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from None
        missing = [
            k
            for k in ("image", "instruction", "id")
            if not isinstance(record, dict) or not isinstance(record.get(k), (str, int))
        ]
        if missing:
            raise ValueError(
                f"{path}:{number}: missing or non-string field(s) {missing}; expected image, instruction, id"
            )
        records.append(
            {"image": str(record["image"]), "instruction": str(record["instruction"]), "id": str(record["id"])}
        )
    if not records:
        raise ValueError(f"{path}: no instructions")
    return records


@dataclass
class Evaluator:
    """Runs benchmarks for variants and writes the results (see the module docstring).

    Args:
        results_dir: where results go.
        judge: the judge of ``openvqa`` benchmarks (``vqa`` always uses normalised exact match).
        cache: the judgement cache (``None``: no cache).
        judge_budget: how many consecutive judge failures (and how long judging, over the whole run) end it.
        batch_size: questions per ``generate`` call.
        generation: ``generate`` settings (the model's ``eval_generation`` fills the rest).
        limit: at most this many questions per benchmark (MME: images per subtask).
        device: where the model runs.
        model_class: the registered model class for checkpoints that do not record one.
    """

    results_dir: Path
    judge: Judge
    cache: JudgementCache | None = None
    batch_size: int = 8
    generation: dict[str, Any] = dataclasses.field(default_factory=dict)
    limit: int | None = None
    device: str = "cpu"
    model_class: str | None = None
    judge_budget: JudgeBudget = dataclasses.field(default_factory=JudgeBudget)

    def run(self, variants: Sequence[Variant], benchmarks: Sequence[Benchmark]) -> list[Path]:
        """Evaluate every variant on every benchmark; the paths of the results files written."""
        names = [v.name for v in variants]
        if len(set(names)) != len(names):
            raise ValueError(f"variant names collide: {names}; name them with NAME=PATH")
        bench_names = [b.name for b in benchmarks]
        if len(set(bench_names)) != len(bench_names):
            raise ValueError(f"benchmark names collide: {bench_names}; name them with NAME=PATH")
        missing = [str(b.path) for b in benchmarks if not b.path.exists()]
        if missing:  # before any model loads
            raise FileNotFoundError(f"not found: {', '.join(missing)}")
        for variant in variants:
            variant.locate()
        self.results_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for variant in variants:
            model = load_model(variant.source, self.device, model_class=self.model_class)
            for benchmark in benchmarks:
                written.append(self.evaluate(model, variant, benchmark))
            del model  # free it before the next variant loads
        for benchmark in benchmarks:
            if benchmark.kind == "owleval":
                write_side_by_side(self.results_dir, benchmark.name)
        return written

    def evaluate(self, model: LynxModel, variant: Variant, benchmark: Benchmark) -> Path:
        """One variant on one benchmark: writes and returns its results file."""
        desc = f"{variant.name} {benchmark.name}"
        stem = f"{variant.name}__{benchmark.name}"
        if benchmark.kind == "mme":
            result, rows = self._mme(model, benchmark, desc)
        elif benchmark.kind == "owleval":
            result, rows = self._owleval(model, benchmark, desc)
        else:
            judge = self.judge if benchmark.kind == "openvqa" else ExactMatchJudge()
            result, rows = self._judged(model, benchmark, judge, desc, stem)
        predictions = self._write_predictions(stem, rows)
        location = variant.locate().resolve()
        record = {
            "variant": variant.name,
            "benchmark": benchmark.name,
            "kind": benchmark.kind,
            "data": str(benchmark.path.resolve()),
            "model": str(location),
            "run_config": run_config_of(location),
            **ModelConfig.from_model(model).to_dict(),
            "generation": {**model.eval_generation, **self.generation},
            "limit": self.limit,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "predictions": predictions.name,
            **result,
        }
        if variant.study is not None:
            record["study"] = dataclasses.asdict(variant.study)
        path = self.results_dir / f"{stem}.json"
        path.write_text(json.dumps(jsonable(record), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        summary = ", ".join(f"{k} {v:.4g}" for k, v in record["summary"].items() if v is not None)
        log.info("%s: %s -> %s", desc, summary or f"{record['num_samples']} answers", path)
        return path

    def _limited(self, items: list[Any]) -> list[Any]:
        return items[: self.limit] if self.limit is not None else items

    def _write_predictions(self, stem: str, rows: list[dict]) -> Path:
        predictions = self.results_dir / f"{stem}.predictions.jsonl"
        with predictions.open("w", encoding="utf-8") as out:
            for row in rows:
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
        return predictions

    def _judged(
        self, model: LynxModel, benchmark: Benchmark, judge: Judge, desc: str, stem: str
    ) -> tuple[dict, list[dict]]:
        records, skipped_lines = read_manifest(benchmark.path)
        records = self._limited(records)
        root = benchmark.path.parent
        answers = generate_answers(
            model, [(root / r["image"], r["question"]) for r in records], self.batch_size, self.generation, desc
        )
        answered = answers.answered()
        triples = [(records[i]["question"], answers.texts[i], records[i]["answer"]) for i in answered]
        judgements: list[Judgement | None] = [None] * len(records)  # None: skipped (its image is unreadable)
        categories = [result_category(str(r.get("category") or "")) for r in records]

        def rows() -> list[dict]:
            return [
                {
                    "id": r.get("id", str(i)),
                    "category": c,
                    "image": r["image"],
                    "question": r["question"],
                    "prediction": a,
                    "gt": r["answer"],
                    "verdict": "skipped" if j is None else j.verdict,
                    "raw": "" if j is None else j.raw,
                    "error": answers.errors.get(i) or ("" if j is None else j.error),
                    "judge": judge.judge_id,
                }
                for i, (r, c, a, j) in enumerate(zip(records, categories, answers.texts, judgements))
            ]

        try:
            for index, judgement in zip(answered, judge_all(judge, triples, self.cache, self.judge_budget)):
                judgements[index] = judgement
        except JudgeBudgetExceeded as err:  # keep the answers (and the verdicts so far) before the run ends
            for index, judgement in zip(answered, err.judgements):
                judgements[index] = judgement
            written = self._write_predictions(stem, rows())
            raise JudgeBudgetExceeded(f"{err}; {desc}: the answers so far are in {written}", err.judgements) from None
        verdicts = ["skipped" if j is None else j.verdict for j in judgements]
        judged = [i for i, v in enumerate(verdicts) if v in ("yes", "no")]
        metric = CategoryAccuracy(sorted(set(categories)))
        metric.update([verdicts[i] == "yes" for i in judged], [categories[i] for i in judged])
        accuracy = metric.compute()

        def count(verdict: str, category: str | None = None) -> int:
            return sum(v == verdict and category in (None, c) for v, c in zip(verdicts, categories))

        details = {
            c: {
                "correct": int(metric.correct[k]),
                "total": int(metric.total[k]),  # judged: the accuracy's denominator
                "judge_failures": count("failed", c),
                "skipped": count("skipped", c),
            }
            for k, c in enumerate(metric.categories)
        }
        ids = [str(r.get("id", i)) for i, r in enumerate(records)]
        result = {
            "judge": judge.describe(),
            "num_samples": len(records),
            "chance": chance_levels(records),
            "num_judged": len(judged),
            "judge_failures": count("failed"),
            "num_skipped": count("skipped"),
            "skipped": answers.skipped(ids, [r["image"] for r in records]),
            "skipped_lines": dict(skipped_lines),
            "unit": "accuracy",
            "summary": {"overall": _number(accuracy["overall"])},
            "metrics": {c: _number(accuracy[c]) for c in metric.categories},
            "details": details,
        }
        return result, rows()

    def _mme(self, model: LynxModel, benchmark: Benchmark, desc: str) -> tuple[dict, list[dict]]:
        mme = load_mme(benchmark.path)
        if self.limit is not None:
            mme = mme.limit_images(self.limit)
        questions = mme.questions
        answers = generate_answers(
            model, [(q.image, q.question) for q in questions], self.batch_size, self.generation, desc
        )
        answered = answers.answered()  # an unreadable image loses both of its questions: acc+ stays whole
        metric = mme.metric()
        metric.update(
            [answers.texts[i] for i in answered],
            [questions[i].answer for i in answered],
            [questions[i].image_id for i in answered],
        )
        scores = metric.compute()
        present = [s for s in mme.subtasks if f"{s}/score" in scores]
        images = [str(q.image.relative_to(mme.root)) for q in questions]
        rows = [
            {
                "subtask": q.subtask,
                "image": image,
                "question": q.question,
                "prediction": a,
                "gt": q.answer,
                "read_as": "skipped" if a is None else mme_yes_no(a),
                **({"error": answers.errors[i]} if i in answers.errors else {}),
            }
            for i, (q, a, image) in enumerate(zip(questions, answers.texts, images))
        ]
        result = {
            "num_samples": len(questions),
            "num_skipped": len(answers.errors),
            "skipped": answers.skipped([f"{q.subtask}/{q.image_id}" for q in questions], images),
            "unit": "score",
            "summary": {"perception": _number(scores["perception"]), "cognition": _number(scores["cognition"])},
            "metrics": {s: _number(scores[f"{s}/score"]) for s in present},
            "details": {
                s: {
                    "acc": _number(scores[f"{s}/acc"]),
                    "acc_plus": _number(scores[f"{s}/acc_plus"]),
                    "score": _number(scores[f"{s}/score"]),
                    "other_answers": int(scores[f"{s}/other"]),
                }
                for s in present
            },
        }
        return result, rows

    def _owleval(self, model: LynxModel, benchmark: Benchmark, desc: str) -> tuple[dict, list[dict]]:
        records = self._limited(read_instructions(benchmark.path))
        root = benchmark.path.parent
        answers = generate_answers(
            model, [(root / r["image"], r["instruction"]) for r in records], self.batch_size, self.generation, desc
        )
        rows = [
            {**r, "image": str((root / r["image"]).resolve()), "answer": a}
            | ({"error": answers.errors[i]} if i in answers.errors else {})
            for i, (r, a) in enumerate(zip(records, answers.texts))
        ]
        skipped = answers.skipped([r["id"] for r in records], [r["image"] for r in records])
        result = {"num_samples": len(records), "num_skipped": len(skipped), "skipped": skipped}
        return {**result, "unit": None, "summary": {}, "metrics": {}}, rows


def run_config_of(model: Path) -> str | None:
    """The config of the run that wrote checkpoint ``model``: beside its folder (``version_N/checkpoints/x.ckpt``), or
    the newest ``lightning_logs/version_*/config.yaml`` of its run (``runs/NAME/checkpoints/x.ckpt``)."""
    if not model.is_file():
        return None
    run = model.parent.parent
    beside = run / "config.yaml"
    if beside.is_file():
        return str(beside)
    configs = sorted(run.glob("lightning_logs/version_*/config.yaml"), key=lambda p: p.stat().st_mtime)
    return str(configs[-1]) if configs else None


def _owleval_results(results_dir: Path, benchmark: str) -> Iterator[dict]:
    for path in sorted(results_dir.glob(f"*__{benchmark}.json")):
        record = json.loads(path.read_text(encoding="utf-8"))
        if record.get("benchmark") == benchmark and record.get("kind") == "owleval":
            yield record


def _shown(answer: str | None) -> str:
    return "(skipped: unreadable image)" if answer is None else answer


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "<br>")


def write_side_by_side(results_dir: Path, benchmark: str) -> tuple[Path, Path]:
    """``<benchmark>.side_by_side.{jsonl,md}`` over every variant's answers in ``results_dir``.

    The JSONL has, per instruction, each variant's answer and an empty ``ratings`` slot (1-5) per
    variant for the raters; the Markdown table shows the image, the instruction and the answers.
    """
    variants: list[str] = []
    by_id: dict[str, dict] = {}
    for record in _owleval_results(results_dir, benchmark):
        variants.append(record["variant"])
        for line in (results_dir / record["predictions"]).read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            entry = by_id.setdefault(
                row["id"], {"id": row["id"], "image": row["image"], "instruction": row["instruction"], "answers": {}}
            )
            entry["answers"][record["variant"]] = row["answer"]
    if not variants:
        raise FileNotFoundError(f"{results_dir}: no results for benchmark {benchmark!r}")
    jsonl = results_dir / f"{benchmark}.side_by_side.jsonl"
    with jsonl.open("w", encoding="utf-8") as out:
        for entry in by_id.values():
            out.write(json.dumps({**entry, "ratings": {v: None for v in variants}}, ensure_ascii=False) + "\n")
    lines = [
        f"# {benchmark}: answers side by side",
        "",
        f"Rate each answer 1-5 in `{jsonl.name}` (`ratings`).",
        "",
        "| id | image | instruction | " + " | ".join(variants) + " |",
        "|---" * (3 + len(variants)) + "|",
    ]
    for entry in by_id.values():
        image = os.path.relpath(entry["image"], results_dir)
        answers = [_cell(_shown(entry["answers"].get(v, ""))) for v in variants]
        lines.append(
            f"| {_cell(entry['id'])} | ![{_cell(entry['id'])}]({image}) | {_cell(entry['instruction'])} | "
            + " | ".join(answers)
            + " |"
        )
    markdown = results_dir / f"{benchmark}.side_by_side.md"
    markdown.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return jsonl, markdown
