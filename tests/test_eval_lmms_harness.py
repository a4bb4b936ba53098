"""lmms-eval end to end: the real harness (``python -m lmms_eval``) runs local tasks on a tiny trained variant.

These tests need the ``lmms-eval`` extra, which lives in its own environment: ``bash .ci/lmms_eval`` builds it
(``.venv-lmms``) and runs this module there; elsewhere the module is skipped. Everything is offline: the tasks
are ``datasets`` folders written by ``python -m lynx_zoo lmms-task`` and loaded through ``--include_path``.
"""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, tiny_configs
from eval_fixtures import log_prob
from PIL import Image

pytest.importorskip("lmms_eval", reason="needs the lmms-eval extra: bash .ci/lmms_eval")

from lynx_zoo import PrefixLynx, load_model  # noqa: E402
from lynx_zoo.data import Sample  # noqa: E402
from lynx_zoo.data.shapes import COLOURS, write_shapes_vqa  # noqa: E402
from lynx_zoo.evaluation.cli import evaluate_main  # noqa: E402
from lynx_zoo.evaluation.lmms_tasks import write_mme_task, write_vqa_task  # noqa: E402
from lynx_zoo.evaluation.mme import load_mme  # noqa: E402
from lynx_zoo.hub import export_variant, register_local  # noqa: E402

pytestmark = pytest.mark.slow

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def train_tiny(shapes: Path, steps: int = 300) -> PrefixLynx:
    """A tiny PT model trained briefly on the shapes set (it answers some held-out questions right)."""
    torch.manual_seed(0)
    model = PrefixLynx(**tiny_configs(eval_generation={"max_new_tokens": 3}))
    transform = model.processor.image_transform
    records = [json.loads(line) for line in (shapes / "train.jsonl").read_text().splitlines()]
    samples = [
        Sample(r["question"], r["answer"], transform(Image.open(shapes / r["image"]).convert("RGB"))) for r in records
    ]
    optimizer = torch.optim.AdamW([p for _, p in model.trainable_parameters()], lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        batch = model.processor([samples[i] for i in torch.randint(len(samples), (16,), generator=generator)])
        loss = model(batch["input_ids"], batch["attention_mask"], batch["images"], batch["labels"]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def write_mme_folder(root: Path, shapes: Path) -> Path:
    """A small MME folder (table layout) over the held-out shapes images: existence (perception) and
    code_reasoning (cognition), two yes/no questions per image."""
    records = [json.loads(line) for line in (shapes / "val.jsonl").read_text().splitlines()]
    colour_of = {r["image"]: r["answer"] for r in records if r["category"] == "colour"}
    for subtask, images in (("existence", sorted(colour_of)[:6]), ("code_reasoning", sorted(colour_of)[6:10])):
        lines = []
        for image in images:
            (root / subtask).mkdir(parents=True, exist_ok=True)
            name = Path(image).name
            (root / subtask / name).write_bytes((shapes / image).read_bytes())
            other = next(c for c in COLOURS if c != colour_of[image])
            lines.append(f"{name}\tIs there a {colour_of[image]} object?\tYes")
            lines.append(f"{name}\tIs there a {other} object?\tNo")
        (root / subtask / f"{subtask}.txt").write_text("\n".join(lines) + "\n")
    return root


def run_harness(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lmms_eval", "--model", "lynx_zoo", *args],
        cwd=REPO,
        env={**os.environ, **OFFLINE, **env},
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A trained tiny variant registered as ``lynx-demo``, three local tasks, and one harness run over them."""
    root = tmp_path_factory.mktemp("lmms")
    shapes = root / "shapes"
    write_shapes_vqa(shapes, num_train=64, num_val=16, image_size=32, seed=1)
    env = {"LYNX_ZOO_VARIANTS": str(root / "variants")}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LYNX_ZOO_VARIANTS", env["LYNX_ZOO_VARIANTS"])
        folder = export_variant(train_tiny(shapes), root / "exported" / "tiny-trained")
        register_local("lynx-demo", folder)
    mme = write_mme_folder(root / "mme", shapes)
    tasks = root / "tasks"
    write_vqa_task(shapes / "val.jsonl", tasks, "shapes_vqa", max_new_tokens=3)
    write_vqa_task(shapes / "val.jsonl", tasks, "shapes_choice", multiple_choice=True)
    write_mme_task(mme, tasks, "mme_local")
    out = root / "harness"
    result = run_harness(
        env,
        "--model_args",
        "pretrained=lynx-demo,device=cpu",
        "--tasks",
        "shapes_vqa,shapes_choice,mme_local",
        "--include_path",
        str(tasks),
        "--batch_size",
        "4",
        "--log_samples",
        "--output_path",
        str(out),
    )
    assert result.returncode == 0, result.stderr[-4000:]
    (results_file,) = glob.glob(str(out / "*" / "*_results.json"))  # the harness exits 0 on errors too: read it
    results = json.loads(Path(results_file).read_text())
    samples = {}
    for task in ("shapes_vqa", "shapes_choice", "mme_local"):
        (path,) = glob.glob(str(out / "*" / f"*_samples_{task}.jsonl"))
        samples[task] = sorted(
            (json.loads(line) for line in Path(path).read_text().splitlines()), key=lambda s: s["doc_id"]
        )
    return dict(root=root, shapes=shapes, mme=mme, tasks=tasks, env=env, results=results, samples=samples)


@pytest.fixture
def variants_env(world, monkeypatch):
    monkeypatch.setenv("LYNX_ZOO_VARIANTS", world["env"]["LYNX_ZOO_VARIANTS"])


def test_the_harness_loads_the_variant_by_name_and_scores_every_task(world):
    results = world["results"]
    assert "pretrained=lynx-demo" in results["config"]["model_args"]
    assert set(results["results"]) == {"shapes_vqa", "shapes_choice", "mme_local"}
    assert len(world["samples"]["shapes_vqa"]) == 64 and len(world["samples"]["mme_local"]) == 20


def test_generation_answers_and_score_equal_lynx_zoo_evaluate(world, variants_env, tmp_path):
    (written,) = evaluate_main(
        ["lynx-demo", "--vqa", f"shapes={world['shapes'] / 'val.jsonl'}", "--max-new-tokens", "3"]
        + ["--num-beams", "1", "--batch-size", "4", "--device", "cpu", "--results", str(tmp_path)]
    )
    own = json.loads(written.read_text())
    predictions = [json.loads(line) for line in (tmp_path / own["predictions"]).read_text().splitlines()]
    harness = world["samples"]["shapes_vqa"]
    assert [s["filtered_resps"] for s in harness] == [p["prediction"].strip() for p in predictions]
    assert [s["target"] for s in harness] == [p["gt"] for p in predictions]
    exact_match = world["results"]["results"]["shapes_vqa"]["exact_match,none"]
    assert exact_match == pytest.approx(own["summary"]["overall"])
    assert 0 < exact_match < 1  # the trained model answers some questions right, so agreement is not trivial


def test_multiple_choice_accuracy_is_the_argmax_of_the_choice_log_probs(world, variants_env):
    import datasets

    model = load_model("lynx-demo")
    docs = datasets.load_from_disk(str(world["tasks"] / "shapes_choice_data"))["test"]
    best, worst = [], []
    for doc in docs:
        # log p(" " + choice | question, image) per choice, from the model's own loss over the choice's tokens
        scores = [log_prob(model, doc["question"], doc["image"], " " + choice) for choice in doc["choices"]]
        best.append(float(max(range(len(scores)), key=scores.__getitem__) == doc["label"]))
        worst.append(float(min(range(len(scores)), key=scores.__getitem__) == doc["label"]))
    harness = world["samples"]["shapes_choice"]
    assert [s["acc"] for s in harness] == best  # question by question
    accuracy = world["results"]["results"]["shapes_choice"]["acc,none"]
    assert accuracy == pytest.approx(sum(best) / len(best))
    assert accuracy > sum(worst) / len(worst)  # an inverted ranking would have scored this


def test_mme_scores_equal_lynx_zoo_mme_score_on_the_harness_answers(world):
    import datasets

    mme = load_mme(world["mme"])
    harness = world["samples"]["mme_local"]
    docs = datasets.load_from_disk(str(world["tasks"] / "mme_local_data"))["test"]
    answer_of = {(doc["question_id"], doc["question"]): s["filtered_resps"] for doc, s in zip(docs, harness)}
    answers = [answer_of[(f"{q.subtask}/{q.image.name}", q.question)] for q in mme.questions]
    metric = mme.metric()
    metric.update(answers, [q.answer for q in mme.questions], [q.image_id for q in mme.questions])
    scores = metric.compute()
    results = world["results"]["results"]["mme_local"]
    assert results["mme_perception_score,none"] == pytest.approx(float(scores["perception"]))
    assert results["mme_cognition_score,none"] == pytest.approx(float(scores["cognition"]))


# answers as models give them; lmms-eval's MME scorer and the official tool's rules read each the same way
MME_ANSWERS = ["Yes", "No", "yes.", "no", "Yes, there is.", "No, it is not.", "  YES  ", "not sure", "nope", "maybe"]
MME_ANSWERS += ["The answer is yes", "", "Yes!", "no."]


def harness_mme_scores(tasks: Path, answers: list[str]) -> dict[str, float]:
    """lmms-eval's own MME scorer (the task's process_results and aggregation) on the given answers."""
    from lmms_eval.tasks import TaskManager, get_task_dict

    task = get_task_dict(["mme_local"], TaskManager(include_path=str(tasks)))["mme_local"]
    per_metric: dict[str, list] = {}
    for doc, answer in zip(task.test_docs(), answers):
        for key, value in task.process_results(doc, [answer]).items():
            per_metric.setdefault(key, []).append(value)
    aggregation = task.aggregation()
    return {key: aggregation[key](values) for key, values in per_metric.items()}


def test_mme_scorers_agree_on_the_same_answers(world):
    mme = load_mme(world["mme"])
    answers = [MME_ANSWERS[i % len(MME_ANSWERS)] for i in range(len(mme.questions))]
    # the harness's documents are the questions in load_mme's order (write_mme_task writes them so)
    harness = harness_mme_scores(world["tasks"], answers)
    metric = mme.metric()
    metric.update(answers, [q.answer for q in mme.questions], [q.image_id for q in mme.questions])
    scores = metric.compute()
    assert harness["mme_perception_score"] == pytest.approx(float(scores["perception"]))
    assert harness["mme_cognition_score"] == pytest.approx(float(scores["cognition"]))
    assert 0 < float(scores["perception"]) < 200 and float(scores["cognition"]) > 0  # right, wrong and "other"


def test_mme_scorers_differ_only_on_one_letter_answers(world):
    """lmms-eval reads a lone "y"/"n" as yes/no and drops dots; the official tool (and lynx_zoo) reads them as
    neither: the only answers on which the two disagree."""
    mme = load_mme(world["mme"])
    truths = [q.answer for q in mme.questions]
    answers = ["y" if truth == "yes" else "n" for truth in truths]  # every one right, if read as lmms-eval does
    harness = harness_mme_scores(world["tasks"], answers)
    metric = mme.metric()
    metric.update(answers, truths, [q.image_id for q in mme.questions])
    scores = metric.compute()
    assert harness["mme_perception_score"] == harness["mme_cognition_score"] == pytest.approx(200.0)
    assert float(scores["perception"]) == float(scores["cognition"]) == 0.0


def test_batch_size_auto_on_a_cpu_is_refused_by_name_and_the_harness_still_exits_0(world, tmp_path):
    result = run_harness(
        world["env"],
        "--model_args",
        "pretrained=lynx-demo,device=cpu",
        "--tasks",
        "shapes_vqa",
        "--include_path",
        str(world["tasks"]),
        "--batch_size",
        "auto",
        "--output_path",
        str(tmp_path),
    )
    assert result.returncode == 0  # lmms-eval's CLI exits 0 whatever happened (docs/evaluation.md)
    assert "batch_size=auto: it finds the largest batch that fits in GPU memory" in result.stdout + result.stderr
    assert not glob.glob(str(tmp_path / "**" / "*_results.json"), recursive=True)


def test_the_recipe_in_the_docs_runs_as_written(tmp_path):
    text = (REPO / "docs" / "evaluation.md").read_text()
    (recipe,) = re.findall(r"<!-- lmms-eval recipe -->\n```bash\n(.*?)```", text, re.S)
    path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"  # `python` is this environment's
    env = {**os.environ, **OFFLINE, "DEMO": str(tmp_path), "PATH": path}
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", recipe], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "shapes_choice: acc" in result.stdout and "answers that differ: 0" in result.stdout
