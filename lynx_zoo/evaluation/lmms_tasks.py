"""Local lmms-eval tasks from lynx_zoo benchmarks, for offline runs of the harness.

A VQA manifest (the training format: ``image``, ``question``, ``answer``, ``category``, ``id``) or an MME folder
(:func:`lynx_zoo.evaluation.mme.load_mme`) becomes a task on disk: a ``datasets`` folder written with
``save_to_disk`` (images embedded) and a task YAML beside it. Then
``lmms-eval --include_path OUT --tasks NAME ...`` runs it with no network.

* ``vqa``: ``generate_until``, scored with lmms-eval's ``exact_match`` (case and punctuation ignored);
* ``choice``: the same questions as ``multiple_choice``: the choices are the answers the manifest gives to the
  question's category (or the record's own ``choices``), scored with ``acc``;
* ``mme``: lmms-eval's own ``mme`` task (its YAML included, its scorer) on the local images, in the layout of the
  ``lmms-lab/MME`` data set (``question_id``, ``image``, ``question``, ``answer``, ``category``).

Needs the ``lmms-eval`` extra (``datasets``; ``mme`` also lmms-eval itself).
``python -m lynx_zoo lmms-task --vqa NAME=MANIFEST --choice NAME=MANIFEST --mme NAME=ROOT --out DIR``.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from lynx_zoo.data.images import open_rgb
from lynx_zoo.data.manifest import read_manifest

log = logging.getLogger(__name__)

SPLIT = "test"


def _datasets() -> Any:
    try:
        import datasets
    except ImportError as err:
        raise ImportError(
            "lmms-eval tasks are written with the `datasets` library: pip install 'lynx-zoo[lmms-eval]'"
        ) from err
    return datasets


def _image_bytes(path: Path) -> bytes | None:
    """The file's bytes if it holds a usable image, else ``None`` (logged).

    The image is checked with :func:`~lynx_zoo.data.images.open_rgb`, as ``evaluate`` opens it, so a task skips
    exactly the images ``evaluate`` skips: unreadable, not an image, truncated, degenerate or over the pixel cap.
    """
    try:
        data = path.read_bytes()
        open_rgb(data=data, where=str(path))
        return data
    except OSError as err:  # a MediaError (an OSError) names the file and says what is wrong with it
        log.warning("skipping %s", err)
        return None


def _save(rows: dict[str, list[Any]], columns: dict[str, Any], folder: Path) -> None:
    datasets = _datasets()
    features = datasets.Features({"image": datasets.Image(), **columns})
    dataset = datasets.Dataset.from_dict(rows, features=features)
    datasets.DatasetDict({SPLIT: dataset}).save_to_disk(str(folder))


def _write_yaml(path: Path, config: dict[str, Any], source: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    header = f"# written by `python -m lynx_zoo lmms-task` from {source}\n"
    path.write_text(header + yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def _local_data(out: Path, name: str) -> tuple[Path, dict[str, Any]]:
    """Where a task's data set goes and the YAML keys that load it from there."""
    folder = (out / f"{name}_data").resolve()
    return folder, {"dataset_path": str(folder), "dataset_kwargs": {"load_from_disk": True}, "test_split": SPLIT}


def _manifest_rows(manifest: Path, limit: int | None) -> tuple[list[dict[str, Any]], Counter]:
    """Records of a VQA manifest with their image bytes; unreadable lines and images skipped and counted."""
    records, skipped = read_manifest(manifest)
    rows = []
    for record in records[:limit] if limit is not None else records:
        data = _image_bytes(manifest.parent / record["image"])
        if data is None:
            skipped["unreadable_image"] += 1
            continue
        rows.append({**record, "image_bytes": data})
    if not rows:
        raise ValueError(f"{manifest}: no question with a readable image (skipped: {dict(skipped)})")
    return rows, skipped


def _choices(rows: list[dict[str, Any]], manifest: Path) -> list[list[str]]:
    """Each row's choices: its own ``choices``, else every answer its category has in the manifest."""
    by_category: dict[str, set[str]] = {}
    for row in rows:
        by_category.setdefault(row.get("category") or "", set()).add(row["answer"])
    result = []
    for number, row in enumerate(rows, start=1):
        choices = row.get("choices") or sorted(by_category[row.get("category") or ""])
        if row["answer"] not in choices or len(choices) < 2:
            raise ValueError(
                f"{manifest}: question {row.get('id') or number} ({row['question']!r}): its answer "
                f"{row['answer']!r} must be one of at least two choices, got {choices}"
            )
        result.append(list(choices))
    return result


def write_vqa_task(
    manifest: str | Path,
    out: str | Path,
    name: str,
    multiple_choice: bool = False,
    limit: int | None = None,
    max_new_tokens: int = 16,
) -> Path:
    """Write a VQA manifest as the lmms-eval task ``name`` under ``out``; returns its YAML file.

    Args:
        manifest: the JSONL manifest (images relative to it).
        out: the folder to pass as ``--include_path``.
        name: the task name (``--tasks NAME``).
        multiple_choice: a ``multiple_choice`` task (``acc``) instead of ``generate_until`` (``exact_match``).
        limit: only the first ``limit`` questions.
        max_new_tokens: the answer length of the generation task (greedy, one beam).
    """
    manifest, out = Path(manifest), Path(out)
    datasets = _datasets()
    rows, skipped = _manifest_rows(manifest, limit)
    folder, loading = _local_data(out, name)
    columns = {
        "question": [r["question"] for r in rows],
        "answer": [r["answer"] for r in rows],
        "category": [r.get("category") or "" for r in rows],
        "id": [str(r.get("id") or i) for i, r in enumerate(rows)],
    }
    features = {key: datasets.Value("string") for key in columns}
    config: dict[str, Any] = {"task": name, **loading, "doc_to_visual": "image", "doc_to_text": "question"}
    if multiple_choice:
        choices = _choices(rows, manifest)
        columns |= {"choices": choices, "label": [c.index(r["answer"]) for c, r in zip(choices, rows)]}
        features |= {"choices": datasets.Sequence(datasets.Value("string")), "label": datasets.Value("int64")}
        config |= {
            "output_type": "multiple_choice",
            "doc_to_choice": "choices",
            "doc_to_target": "label",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        }
    else:
        config |= {
            "output_type": "generate_until",
            "doc_to_target": "answer",
            "generation_kwargs": {
                "max_new_tokens": max_new_tokens,
                "temperature": 0,
                "do_sample": False,
                "num_beams": 1,
                "until": ["\n"],
            },
            "metric_list": [
                {
                    "metric": "exact_match",
                    "aggregation": "mean",
                    "higher_is_better": True,
                    "ignore_case": True,
                    "ignore_punctuation": True,
                }
            ],
        }
    config["metadata"] = {"version": 1.0}
    _save({"image": [{"bytes": r["image_bytes"], "path": r["image"]} for r in rows], **columns}, features, folder)
    log.info("lmms-eval task %s: %d questions from %s (skipped: %s)", name, len(rows), manifest, dict(skipped))
    source = f"{manifest.resolve()}: {len(rows)} questions, skipped {dict(skipped)}"
    return _write_yaml(out / f"{name}.yaml", config, source)


def lmms_eval_mme_yaml() -> Path:
    """lmms-eval's own MME task file (``lmms_eval/tasks/mme/mme.yaml``)."""
    spec = importlib.util.find_spec("lmms_eval")
    if spec is None or spec.origin is None:
        raise ImportError("the mme task includes lmms-eval's own MME task: pip install 'lynx-zoo[lmms-eval]'")
    path = Path(spec.origin).parent / "tasks" / "mme" / "mme.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"lmms-eval has no MME task at {path}")
    return path


def write_mme_task(root: str | Path, out: str | Path, name: str = "mme_local", limit: int | None = None) -> Path:
    """Write an MME folder as a copy of lmms-eval's ``mme`` task named ``name`` under ``out``; returns its YAML.

    The data set has the layout of ``lmms-lab/MME``: ``question_id`` (``<subtask>/<image file>``, one per image,
    which lmms-eval's scorer pairs questions by), ``image``, ``question``, ``answer`` (``Yes``/``No``) and
    ``category`` (the subtask). ``limit``: the first ``limit`` images of every subtask.
    """
    from lynx_zoo.evaluation.mme import load_mme  # torchmetrics: imported after --help

    root, out = Path(root), Path(out)
    datasets = _datasets()
    include = lmms_eval_mme_yaml()
    mme = load_mme(root)
    if limit is not None:
        mme = mme.limit_images(limit)
    images: dict[Path, bytes | None] = {}
    rows: dict[str, list[Any]] = {k: [] for k in ("question_id", "image", "question", "answer", "category")}
    skipped = 0
    for question in mme.questions:
        if question.image not in images:
            images[question.image] = _image_bytes(question.image)
        data = images[question.image]
        if data is None:
            skipped += 1
            continue
        relative = question.image.relative_to(mme.root).as_posix()
        rows["question_id"].append(f"{question.subtask}/{question.image.name}")
        rows["image"].append({"bytes": data, "path": relative})
        rows["question"].append(question.question)
        rows["answer"].append(question.answer.capitalize())
        rows["category"].append(question.subtask)
    if not rows["question_id"]:
        raise ValueError(f"MME root {root}: no question with a readable image")
    folder, loading = _local_data(out, name)
    _save(rows, {k: datasets.Value("string") for k in rows if k != "image"}, folder)
    log.info("lmms-eval task %s: %d MME questions from %s (skipped: %d)", name, len(rows["question"]), root, skipped)
    config = {"include": str(include), "task": name, **loading}
    source = f"{root.resolve()}: {len(rows['question'])} MME questions, skipped {skipped} (unreadable images)"
    return _write_yaml(out / f"{name}.yaml", config, source)


def _named(spec: str, kind: str) -> tuple[str, Path]:
    """``NAME=PATH`` or ``PATH`` (read as ``evaluate`` reads them: :func:`~lynx_zoo.evaluation.runner.split_spec`),
    named ``<file stem>_<kind>`` (MME: ``mme_local``) when no name is given."""
    from lynx_zoo.evaluation.runner import split_spec  # the evaluator: imported after --help

    name, path = split_spec(spec)
    if name is None:
        name = f"{path.stem}_{kind}" if kind != "mme" else "mme_local"
    return name, path


def main(argv: Sequence[str] | None = None) -> list[Path]:
    """``python -m lynx_zoo lmms-task``: write lmms-eval tasks; returns their YAML files."""
    parser = argparse.ArgumentParser(
        prog="python -m lynx_zoo lmms-task",
        description="Write local lmms-eval tasks (a datasets folder and a task YAML each) for --include_path.",
    )
    parser.add_argument("--vqa", action="append", default=[], metavar="[NAME=]MANIFEST", help="generate_until task")
    parser.add_argument("--choice", action="append", default=[], metavar="[NAME=]MANIFEST", help="multiple_choice task")
    parser.add_argument("--mme", action="append", default=[], metavar="[NAME=]ROOT", help="lmms-eval's MME task")
    parser.add_argument("--out", type=Path, required=True, help="the folder to pass to lmms-eval's --include_path")
    parser.add_argument("--limit", type=int, help="the first N questions (MME: N images per subtask)")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="answer length of --vqa tasks (default 16)")
    args = parser.parse_args(argv)
    if not (args.vqa or args.choice or args.mme):
        parser.error("name at least one benchmark: --vqa, --choice or --mme")
    written = []
    for spec in args.vqa:
        name, path = _named(spec, "vqa")
        written.append(write_vqa_task(path, args.out, name, limit=args.limit, max_new_tokens=args.max_new_tokens))
    for spec in args.choice:
        name, path = _named(spec, "choice")
        written.append(write_vqa_task(path, args.out, name, multiple_choice=True, limit=args.limit))
    for spec in args.mme:
        name, path = _named(spec, "mme")
        written.append(write_mme_task(path, args.out, name, limit=args.limit))
    for path in written:
        print(path)
    return written
