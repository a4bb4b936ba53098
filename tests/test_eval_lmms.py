"""The lmms-eval adapter against the harness's request interface (``Instance.args`` tuples).

lmms-eval itself is not installed here (its dependencies are heavy; tests/test_eval_lmms_harness.py runs the real
harness in its own environment); requests are plain objects with the same ``args`` layouts that lmms-eval's tasks
build, and ``task_dict`` is filled as the harness fills it.
"""

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from conftest import tiny_checkpoint
from eval_fixtures import log_prob
from PIL import Image

from lynx_zoo import load_model
from lynx_zoo.cli import main
from lynx_zoo.data import Sample
from lynx_zoo.evaluation.lmms_eval_plugin import LynxHarnessModel
from lynx_zoo.hub import export_variant, register_local


@dataclass
class Request:
    """What the adapter reads of an lmms-eval ``Instance``."""

    args: tuple


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def docs():
    colours = [(220, 40, 40), (40, 80, 220), (40, 170, 60)]
    return [
        {"image": Image.new("RGB", (32, 32), c), "question": q}
        for c, q in zip(colours, ["what color is the circle?", "how many shapes are there?", "where is the square?"])
    ]


@pytest.fixture
def adapter(make_tiny, docs):
    model = make_tiny(eval_generation={"max_new_tokens": 4})
    with torch.no_grad():  # [PAD] <s> </s> <unk> never win: the random model always answers with words
        model.llm.get_output_embeddings().weight[model.tokenizer.all_special_ids] = 0
    harness = LynxHarnessModel(model=model, batch_size=2)
    harness.task_dict = {"shapes": {"test": docs}}
    return harness


def visual(doc):
    return [doc["image"]]


def test_generate_until_answers_as_the_model_does_and_stops_at_until(adapter, docs):
    requests = [
        Request(
            (d["question"], {"max_new_tokens": 4, "temperature": 0, "until": ["\n\n"]}, visual, i, "shapes", "test")
        )
        for i, d in enumerate(docs)
    ]
    answers = adapter.generate_until(requests)
    expected = adapter.model.generate(
        [d["image"] for d in docs], [d["question"] for d in docs], max_new_tokens=4, do_sample=False
    )
    assert answers == expected and all(answers)
    # a stop string cuts the answer where it first appears
    words = expected[0].split()
    assert len(words) >= 2
    stop = Request((docs[0]["question"], {"max_new_tokens": 4, "until": [" " + words[1]]}, visual, 0, "shapes", "test"))
    assert adapter.generate_until([stop]) == [expected[0][: expected[0].find(" " + words[1])]]


def test_text_only_and_image_requests_mix(adapter, docs):
    requests = [
        Request(("what color is the circle?", {"max_new_tokens": 3}, lambda doc: [], 0, "shapes", "test")),
        Request((docs[1]["question"], {"max_new_tokens": 3}, visual, 1, "shapes", "test")),
    ]
    answers = adapter.generate_until(requests)
    assert (
        answers[0] == adapter.model.generate(None, ["what color is the circle?"], max_new_tokens=3, do_sample=False)[0]
    )
    assert (
        answers[1]
        == adapter.model.generate([docs[1]["image"]], [docs[1]["question"]], max_new_tokens=3, do_sample=False)[0]
    )


def test_loglikelihood_is_the_continuations_negative_log_likelihood(adapter, docs):
    model = adapter.model
    continuation = " red circle"
    (score, greedy), (target_score, _) = adapter.loglikelihood(
        [
            Request((docs[0]["question"], continuation, visual, 0, "shapes", "test")),
            Request((docs[0]["question"], lambda doc: " red circle", visual, 0, "shapes", "test")),  # doc_to_target
        ]
    )
    assert score == target_score
    # independently: the model's mean loss over exactly the continuation tokens, times their number
    assert score == pytest.approx(-log_prob(model, docs[0]["question"], docs[0]["image"], continuation), rel=1e-4)
    assert score > 0 and isinstance(greedy, bool)


def test_loglikelihood_flags_the_greedy_continuation(adapter, docs):
    model = adapter.model
    # the continuation the model itself would produce (word-level tokenizer: it round-trips)
    ids = model.generate_ids(
        **{
            k: v
            for k, v in model.processor.prompts([Sample(docs[1]["question"])]).items()
            if k in ("input_ids", "attention_mask")
        },
        images=model.processor.image_transform(docs[1]["image"])[None],
        max_new_tokens=2,
        do_sample=False,
    )
    greedy_text = " " + model.tokenizer.decode(ids[0], skip_special_tokens=True)
    assert len(model.tokenizer(greedy_text, add_special_tokens=False)["input_ids"]) == 2
    other = " yellow yellow" if "yellow" not in greedy_text else " purple purple"
    results = adapter.loglikelihood(
        [
            Request((docs[1]["question"], greedy_text, visual, 1, "shapes", "test")),
            Request((docs[1]["question"], other, visual, 1, "shapes", "test")),
        ]
    )
    assert [g for _, g in results] == [True, False]
    assert results[0][0] < results[1][0]  # a loss: the greedy continuation is the likelier one


def test_multi_round_feeds_each_answer_to_the_next_round(adapter, docs):
    calls = []

    def doc_to_text(doc, previous_output=None, round_idx=None, previous_round_info=None):
        calls.append((round_idx, list(previous_output), previous_round_info))
        if round_idx == 2:
            return None, None, True, previous_output, None
        return [doc["image"]], f"{doc['question']} again", False, previous_output, {"round": round_idx}

    request = Request((docs[0]["question"], {"max_new_tokens": 3}, visual, doc_to_text, 0, "shapes", "test"))
    (rounds,) = adapter.generate_until_multi_round([request])
    first = adapter.model.generate([docs[0]["image"]], [docs[0]["question"]], max_new_tokens=3, do_sample=False)[0]
    second = adapter.model.generate(
        [docs[0]["image"]], [docs[0]["question"] + " again"], max_new_tokens=3, do_sample=False
    )[0]
    assert rounds == [first, second]
    assert calls == [(1, [first], None), (2, [first, second], {"round": 1})]


def test_multi_round_is_bounded(adapter, docs):
    adapter.max_rounds = 3

    def never_done(doc, previous_output=None, round_idx=None, previous_round_info=None):
        return [doc["image"]], doc["question"], False, previous_output, None

    (rounds,) = adapter.generate_until_multi_round(
        [Request((docs[0]["question"], {"max_new_tokens": 2}, visual, never_done, 0, "shapes", "test"))]
    )
    assert len(rounds) == 3


def test_unsupported_inputs_are_named(adapter, docs):
    two_images = Request((docs[0]["question"], {}, lambda doc: [doc["image"], doc["image"]], 0, "shapes", "test"))
    with pytest.raises(ValueError, match="shapes/test/0: lynx_zoo models read one PIL image per prompt; got 2"):
        adapter.generate_until([two_images])
    video = Request((docs[0]["question"], {}, lambda doc: ["clip.mp4"], 0, "shapes", "test"))
    with pytest.raises(ValueError, match=r"of type \['str'\]"):
        adapter.generate_until([video])
    with pytest.raises(KeyError, match="no document shapes/val/0"):
        adapter.generate_until([Request((docs[0]["question"], {}, visual, 0, "shapes", "val"))])
    with pytest.raises(ValueError, match="exactly one of"):
        LynxHarnessModel()


def test_registered_with_lmms_eval_when_installed():
    pytest.importorskip("lmms_eval", reason="needs the lmms-eval extra: bash .ci/lmms_eval builds that environment")
    from lmms_eval.api.model import lmms

    from lynx_zoo.evaluation import lmms_eval_plugin

    assert issubclass(lmms_eval_plugin.LynxLMMS, lmms)
    manifest = lmms_eval_plugin.lmms_eval_manifest()
    assert manifest.model_id == "lynx_zoo" and manifest.simple_class_path.endswith("lmms_eval_plugin.LynxLMMS")


def test_the_harness_argmin_picks_the_most_likely_choice(adapter, docs):
    """lmms-eval scores multiple choice with ``pred = np.argmin(lls)`` over a question's choices (api/task.py)."""
    choices = [" red", " blue", " green", " yellow", " purple", " top left"]  # one- and two-token choices
    for index, doc in enumerate(docs):
        requests = [Request((doc["question"], c, visual, index, "shapes", "test")) for c in choices]
        lls = [value for value, _ in adapter.loglikelihood(requests)]
        log_probs = [log_prob(adapter.model, doc["question"], doc["image"], c) for c in choices]
        assert np.argmin(lls) == np.argmax(log_probs)
        assert list(np.argsort(lls)) == list(np.argsort(log_probs)[::-1])  # the whole ranking, most likely first


def test_requests_without_a_document_are_refused_by_name(adapter):
    # what lmms-eval sends for acc_mutual_info: (context, continuation) only
    with pytest.raises(ValueError, match="acc_mutual_info"):
        adapter.loglikelihood([Request(("", " red"))])


def test_pretrained_takes_a_checkpoint_a_variant_folder_and_a_variant_name(tmp_path, monkeypatch, docs):
    monkeypatch.setenv("LYNX_ZOO_VARIANTS", str(tmp_path / "variants"))
    checkpoint = tiny_checkpoint(tmp_path / "run" / "last.ckpt", seed=3, class_path="PrefixLynx")
    folder = export_variant(load_model(checkpoint), tmp_path / "exported")
    register_local("lynx-demo", folder)
    requests = [
        Request((d["question"], {"max_new_tokens": 3}, visual, i, "shapes", "test")) for i, d in enumerate(docs)
    ]
    scored = [Request((docs[0]["question"], " red circle", visual, 0, "shapes", "test"))]
    outputs = []
    for pretrained in (str(checkpoint), str(folder), "lynx-demo"):
        harness = LynxHarnessModel(pretrained=pretrained, device="cpu", batch_size="2")
        harness.task_dict = {"shapes": {"test": docs}}
        outputs.append((harness.generate_until(requests), harness.loglikelihood(scored)))
    assert outputs[0] == outputs[1] == outputs[2]
    assert all(outputs[0][0])
    with pytest.raises(FileNotFoundError, match="no variant folder and no known variant"):
        LynxHarnessModel(pretrained="lynx-dem0")


def test_batch_size_is_a_positive_number_or_auto(make_tiny):
    model = make_tiny()
    assert LynxHarnessModel(model=model, batch_size="8").batch_size == 8
    for wrong in ("0", "eight", "-2", "auto:x"):
        with pytest.raises(
            ValueError, match=f"batch_size: expected a positive integer, 'auto' or 'auto:N', got '{wrong}'"
        ):
            LynxHarnessModel(model=model, batch_size=wrong)
    for auto in ("auto", "auto:4"):
        with pytest.raises(ValueError, match=rf"batch_size={auto}: .* GPU memory, but the model runs on cpu; give a"):
            LynxHarnessModel(model=model, batch_size=auto)


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA GPU: batch_size=auto probes GPU memory (its refusal on a CPU is tested above)",
)
def test_batch_size_auto_finds_a_batch_that_fits_on_a_gpu(make_tiny, docs):
    harness = LynxHarnessModel(model=make_tiny().cuda(), batch_size="auto", max_batch_size=48)
    assert harness.batch_size == 32 and harness.batch_sizes == {"auto": 32}  # a tiny model: the largest power of 2
    harness.task_dict = {"shapes": {"test": docs}}
    requests = [
        Request((d["question"], {"max_new_tokens": 3}, visual, i, "shapes", "test")) for i, d in enumerate(docs)
    ]
    assert all(harness.generate_until(requests))


def test_lmms_task_without_the_extra_names_it(shapes_root, tmp_path):
    try:
        import datasets  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("the lmms-eval extra is installed here: tests/test_eval_lmms_harness.py writes tasks")
    with pytest.raises(SystemExit, match=r"lmms-task: error: .*pip install 'lynx-zoo\[lmms-eval\]'"):
        main(["lmms-task", "--vqa", f"shapes={shapes_root / 'val.jsonl'}", "--out", str(tmp_path)])
