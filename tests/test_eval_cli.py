"""``python -m lynx_zoo evaluate`` and ``report`` end to end: two tiny checkpoints on the four benchmark kinds,
with the Open-VQA judge behind a real loopback HTTP server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import tiny_checkpoint
from eval_fixtures import SECRET, ChatServer, write_mme_fixture
from PIL import Image

from lynx_zoo import PrefixLynx
from lynx_zoo.cli import main
from lynx_zoo.data.answers import chance_levels, normalize_answer
from lynx_zoo.data.shapes import write_shapes_vqa
from lynx_zoo.evaluation.runner import Variant, parse_benchmark, parse_variant

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """Checkpoints and the four benchmarks on disk."""
    root = tmp_path_factory.mktemp("eval")
    alpha_path = root / "runs/alpha/lightning_logs/version_0/checkpoints/last.ckpt"
    alpha = tiny_checkpoint(alpha_path, 0, "lynx_zoo.PrefixLynx")
    (alpha.parent.parent / "config.yaml").write_text("model:\n  class_path: PrefixLynx\n")
    beta = tiny_checkpoint(root / "other/beta.ckpt", 1, None)  # saved without a class path
    write_shapes_vqa(root / "shapes", num_train=0, num_val=3, image_size=32, seed=3)
    write_mme_fixture(root / "mme")
    Image.new("RGB", (32, 32), (220, 40, 40)).save(root / "red.png")
    open_questions = [  # (question, ground truth, category)
        ("what color is the circle?", "red", "colour"),
        ("what shape is it?", "circle", "shape"),
        ("how many shapes are there?", "one", "counting"),
        ("where is the circle?", "top", "position"),
    ]
    open_questions = [
        {"image": "red.png", "question": q, "answer": a, "category": c, "id": f"o{i}"}
        for i, (q, a, c) in enumerate(open_questions)
    ]
    (root / "open.jsonl").write_text("".join(json.dumps(q) + "\n" for q in open_questions))
    owl = [
        {"image": "red.png", "instruction": "describe the image", "id": "w1"},
        {"image": "red.png", "instruction": "what | is this?", "id": "w2"},
    ]
    (root / "owl.jsonl").write_text("".join(json.dumps(q) + "\n" for q in owl))
    return {"root": root, "alpha": alpha, "beta": beta}


def evaluate_args(bench: dict, server: ChatServer, results: Path, *benchmarks: str) -> list[str]:
    root = bench["root"]
    chosen = benchmarks or ("vqa", "openvqa", "mme", "owleval")
    specs = {
        "vqa": f"shapes={root / 'shapes/val.jsonl'}",
        "openvqa": f"open={root / 'open.jsonl'}",
        "mme": f"mme={root / 'mme'}",
        "owleval": f"owl={root / 'owl.jsonl'}",
    }
    judge = f"--judge openai --judge-url {server.base_url} --judge-model judge-model"
    judge += " --judge-api-key-env LYNX_TEST_JUDGE_KEY --judge-retries 1 --judge-timeout 5"
    args = ["evaluate", str(bench["alpha"]), f"beta={bench['beta']}", "--results", str(results)]
    args += ["--batch-size", "3", "--model-class", "PrefixLynx", *judge.split()]
    for kind in chosen:
        args += [f"--{kind}", specs[kind]]
    return args


@pytest.fixture(scope="module")
def run(bench, tmp_path_factory):
    """One ``evaluate`` over both variants and all benchmarks (the judge's first reply is malformed), then a second
    Open-VQA run on the same results folder."""
    results = tmp_path_factory.mktemp("results")
    with ChatServer() as server, pytest.MonkeyPatch.context() as patch:
        patch.setenv("LYNX_TEST_JUDGE_KEY", SECRET)
        server.script.append(("content", "Perhaps"))
        written = main(evaluate_args(bench, server, results))
        first_requests = len(server.requests)
        main(evaluate_args(bench, server, results, "openvqa"))
        second_requests = len(server.requests) - first_requests
    return {
        "results": results,
        "written": written,
        "first_requests": first_requests,
        "second_requests": second_requests,
        "server": server,
    }


def load(results: Path, stem: str) -> tuple[dict, list[dict]]:
    record = json.loads((results / f"{stem}.json").read_text())
    rows = [json.loads(line) for line in (results / record["predictions"]).read_text().splitlines()]
    return record, rows


def test_one_results_file_per_variant_and_benchmark_with_the_run_recorded(run, bench):
    results = run["results"]
    stems = [f"{v}__{b}" for v in ("alpha", "beta") for b in ("shapes", "open", "mme", "owl")]
    assert sorted(p.name for p in run["written"]) == sorted(f"{s}.json" for s in stems)
    for stem in stems:
        assert (results / f"{stem}.predictions.jsonl").is_file()
    alpha, _ = load(results, "alpha__shapes")
    assert alpha["model"] == str(bench["alpha"].resolve())
    assert alpha["run_config"] == str(bench["alpha"].parent.parent / "config.yaml")
    assert alpha["model_class"] == "lynx_zoo.fusion.prefix.PrefixLynx"
    assert alpha["init_args"]["bridge"]["num_queries"] == 4 and alpha["generation"]["max_new_tokens"] == 3
    beta, _ = load(results, "beta__shapes")
    assert beta["run_config"] is None and beta["model"] == str(bench["beta"].resolve())


def test_vqa_accuracy_per_category_is_exact_match_of_the_models_answers(run, bench):
    record, rows = load(run["results"], "alpha__shapes")
    model = PrefixLynx.load_from_checkpoint(bench["alpha"], map_location="cpu")
    manifest = bench["root"] / "shapes/val.jsonl"
    samples = [json.loads(line) for line in manifest.read_text().splitlines()]
    answers = []
    for sample in samples:
        with Image.open(manifest.parent / sample["image"]) as image:
            answers += model.generate([image.convert("RGB")], [sample["question"]])
    assert [r["prediction"] for r in rows] == answers
    for category in {s["category"] for s in samples}:
        right = [
            normalize_answer(a) == normalize_answer(s["answer"])
            for s, a in zip(samples, answers)
            if s["category"] == category
        ]
        assert record["metrics"][category] == pytest.approx(sum(right) / len(right))
        assert record["details"][category]["total"] == len(right)
    assert record["summary"]["overall"] == pytest.approx(
        sum(normalize_answer(a) == normalize_answer(s["answer"]) for s, a in zip(samples, answers)) / len(samples)
    )
    assert record["num_samples"] == len(samples) == 3 * 4


def test_mme_scores_follow_the_official_formula_on_the_predictions(run):
    for variant in ("alpha", "beta"):
        record, rows = load(run["results"], f"{variant}__mme")
        assert len(rows) == 14
        by_image: dict[tuple[str, str], list[bool]] = {}
        for row in rows:  # an independent re-implementation of the official tool on the written answers
            text = row["prediction"].strip().lower()
            read = (
                text if text in ("yes", "no") else "yes" if "yes" in text[:4] else "no" if "no" in text[:4] else "other"
            )
            assert read == row["read_as"]
            by_image.setdefault((row["subtask"], row["image"]), []).append(read == row["gt"])
        for subtask in ("existence", "count", "artwork", "code_reasoning"):
            images = [v for (s, _), v in by_image.items() if s == subtask]
            acc = sum(sum(v) for v in images) / (2 * len(images))
            acc_plus = sum(all(v) for v in images) / len(images)
            assert record["metrics"][subtask] == pytest.approx(100 * acc + 100 * acc_plus)
        assert record["summary"]["perception"] == pytest.approx(
            sum(record["metrics"][s] for s in ("existence", "count", "artwork"))
        )
        assert record["summary"]["cognition"] == pytest.approx(record["metrics"]["code_reasoning"])


def test_open_vqa_judgements_are_written_beside_the_predictions_and_cached(run):
    first_triple = None
    unique = set()
    for variant in ("alpha", "beta"):
        record, rows = load(run["results"], f"{variant}__open")
        assert record["judge"]["kind"] == "openai" and record["judge"]["api_key_env"] == "LYNX_TEST_JUDGE_KEY"
        for row in rows:
            assert set(row) >= {"question", "prediction", "gt", "category", "verdict", "raw"}
            triple = (row["question"], row["prediction"], row["gt"])
            first_triple = first_triple or triple
            unique.add(triple)
            if triple == first_triple:  # the server's first reply was "Perhaps": a failure, never a yes (and cached)
                assert (row["verdict"], row["raw"]) == ("failed", "Perhaps")
            else:
                assert row["verdict"] == ("yes" if row["gt"] in row["prediction"] else "no")
        yes = [r["verdict"] == "yes" for r in rows]  # of the judged answers: a failure is not a wrong answer
        assert record["summary"]["overall"] == pytest.approx(sum(yes) / sum(r["verdict"] != "failed" for r in rows))
        assert record["judge_failures"] == sum(r["verdict"] == "failed" for r in rows)
    assert run["first_requests"] == len(unique)  # each distinct triple asked once
    assert run["second_requests"] == 0  # the re-run is served from the cache
    for path in run["results"].iterdir():
        assert SECRET not in path.read_bytes().decode("latin-1"), path


def test_owleval_side_by_side_shows_every_variant(run):
    results = run["results"]
    markdown = (results / "owl.side_by_side.md").read_text()
    _, alpha_rows = load(results, "alpha__owl")
    _, beta_rows = load(results, "beta__owl")
    assert "| id | image | instruction | alpha | beta |" in markdown
    assert "what \\| is this?" in markdown  # table cells are escaped
    for a, b in zip(alpha_rows, beta_rows):
        assert f"| {a['answer']} | {b['answer']} |" in markdown
    entries = [json.loads(line) for line in (results / "owl.side_by_side.jsonl").read_text().splitlines()]
    assert [e["id"] for e in entries] == ["w1", "w2"]
    assert entries[0]["answers"] == {"alpha": alpha_rows[0]["answer"], "beta": beta_rows[0]["answer"]}
    assert entries[0]["ratings"] == {"alpha": None, "beta": None}


def test_report_writes_the_ablation_table_and_charts(run, tmp_path):
    report = main(["report", str(run["results"]), "--out", str(tmp_path / "report")])
    text = report.read_text()
    alpha, _ = load(run["results"], "alpha__shapes")
    beta_mme, _ = load(run["results"], "beta__mme")
    beta_shapes, _ = load(run["results"], "beta__shapes")
    lines = text.splitlines()
    start = lines.index(next(line for line in lines if line.startswith("| variant | ")))
    table = lines[start : lines.index("", start)]
    columns = [c.strip() for c in table[0].strip("|").split("|")]
    assert columns[:3] == ["variant", "mme: perception", "mme: cognition"]
    assert {"shapes: overall", "shapes: colour", "open: overall", "mme: existence"} <= set(columns)
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table[2:]]
    assert [r[0].split("]")[0] for r in rows] == ["[alpha", "beta", "chance"]  # beta has no run config: no link
    alpha_row, beta_row, chance_row = rows
    # chance: each category's most frequent answer (MME answered at random: acc 50 + acc+ 25)
    _, shapes_rows = load(run["results"], "alpha__shapes")
    colour = [r["gt"] for r in shapes_rows if r["category"] == "colour"]
    majority = max(colour.count(a) for a in set(colour)) / len(colour)
    assert chance_row[columns.index("shapes: colour")] == f"{100 * majority:.1f}"
    assert alpha["chance"]["colour"] == pytest.approx(majority)
    assert chance_row[columns.index("mme: existence")] == "75.00"
    assert alpha_row[columns.index("shapes: overall")] == f"{100 * alpha['summary']['overall']:.1f}"
    assert beta_row[columns.index("mme: perception")] == f"{beta_mme['summary']['perception']:.2f}"
    assert beta_row[columns.index("shapes: colour")] == f"{100 * beta_shapes['metrics']['colour']:.1f}"
    config_link = alpha_row[0][alpha_row[0].index("(") + 1 : -1]
    assert (report.parent / config_link).resolve() == Path(alpha["run_config"])
    for chart in ("shapes", "open", "mme"):
        with Image.open(report.parent / f"{chart}.png") as image:
            assert image.format == "PNG" and image.width > 300
        assert f"![{chart}]({chart}.png)" in text
    assert not (report.parent / "owl.png").exists()  # answers to rate, no metric


def test_input_errors_are_one_line_and_name_the_problem(bench, tmp_path, capsys):
    vqa = ["--vqa", str(bench["root"] / "shapes/val.jsonl"), "--results", str(tmp_path)]
    with pytest.raises(SystemExit) as info:
        main(["evaluate", str(bench["alpha"]), "--results", str(tmp_path)])
    assert info.value.code == 2 and "no benchmark given" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="not found: .*missing.ckpt"):
        main(["evaluate", str(tmp_path / "missing.ckpt"), *vqa])
    with pytest.raises(SystemExit, match="not found: .*no_mme_here"):
        main(["evaluate", str(bench["alpha"]), "--mme", str(tmp_path / "no_mme_here"), "--results", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"beta.ckpt: its hyper-parameters have no `_class_path`.*--model-class"):
        main(["evaluate", str(bench["beta"]), *vqa])
    with pytest.raises(SystemExit, match=r"variant names collide: \['alpha', 'alpha'\]"):
        main(["evaluate", str(bench["alpha"]), str(bench["alpha"]), *vqa])
    (tmp_path / "other.json").write_text('{"variant": "x"}')
    with pytest.raises(SystemExit, match=r"other.json: not an evaluate results file: missing keys \['benchmark'"):
        main(["report", str(tmp_path / "other.json"), "--out", str(tmp_path / "r")])


def test_names_come_from_the_spec_the_run_folder_or_the_file(tmp_path):
    lightning_name = tmp_path / "runs/pt420/lightning_logs/version_3/checkpoints/epoch=3-step=40.ckpt"
    assert parse_variant(str(lightning_name)) == Variant("pt420", str(lightning_name))  # '=' in a path: no NAME=
    assert parse_variant(f"ours={lightning_name}") == Variant("ours", str(lightning_name))
    assert parse_variant(str(tmp_path / "epoch=3-step=40.ckpt")).name == "epoch-3-step-40"
    assert parse_benchmark("mme", "data/MME_Benchmark").name == "mme-MME_Benchmark"
    assert parse_variant("not a name=x.ckpt") == Variant("not-a-name-x", "not a name=x.ckpt")  # so a path


def test_chance_levels_are_named_as_the_metrics_beside_them():
    """A category with a dot (``v1.2``) or none (``all``) gets its chance level under the name its metric has, so
    the report's chance row finds it (the model's metric names turn dots into underscores; results files do not)."""
    records = [{"category": "v1.2", "answer": a} for a in ("Red.", "red", "blue")] + [{"answer": "x"}]
    assert chance_levels(records) == pytest.approx({"overall": 3 / 4, "v1.2": 2 / 3, "all": 1.0})
