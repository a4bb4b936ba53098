"""MME: the loader (both layouts), the official yes/no reading, and the score on a fixture worked out by hand."""

import pytest
import torch
from eval_fixtures import write_image, write_mme_fixture

from lynx_zoo.evaluation import MMEFormatError, MMEScore, load_mme, mme_yes_no


@pytest.mark.parametrize(
    "answer, read",
    [
        ("Yes", "yes"),
        ("no", "no"),
        ("Yes, there is a dog.", "yes"),
        ("no.", "no"),
        ("  YES  ", "yes"),
        ("The answer is yes", "other"),
        ("Not sure", "no"),
        ("nope", "no"),
        ("", "other"),
        ("Yeah", "other"),
        ("no, yes", "no"),
        ("I think yes", "other"),
    ],
)
def test_yes_no_is_read_from_the_start_as_the_official_tool_does(answer, read):
    assert mme_yes_no(answer) == read


def test_loader_reads_both_layouts_and_numbers_images(tmp_path):
    write_mme_fixture(tmp_path)
    mme = load_mme(tmp_path)
    assert mme.subtasks == ["existence", "count", "artwork", "code_reasoning"]  # canonical order
    assert len(mme.questions) == 14 and len(mme.image_subtask) == 7
    assert mme.image_subtask == [0, 0, 0, 1, 1, 2, 3]
    first = mme.questions[0]
    assert (first.subtask, first.image.name, first.question, first.answer, first.image_id) == (
        "existence",
        "a.png",
        "Is there a dog?",
        "yes",
        0,
    )
    artwork = [q for q in mme.questions if q.subtask == "artwork"]
    assert {q.image for q in artwork} == {tmp_path / "artwork" / "images" / "g.jpg"} and [
        q.answer for q in artwork
    ] == ["yes", "no"]
    assert len(mme.limit_images(1).questions) == 8  # one image (two questions) of each of the 4 subtasks


def test_scores_match_the_hand_worked_values(tmp_path):
    answers = write_mme_fixture(tmp_path)
    mme = load_mme(tmp_path)
    metric = mme.metric()
    metric.update(
        [answers[(q.subtask, q.image.name, q.question)] for q in mme.questions],
        [q.answer for q in mme.questions],
        [q.image_id for q in mme.questions],
    )
    scores = metric.compute()
    # existence: a both right ("Yes, ..." and "no."); b one right ("The answer is yes" is neither);
    # c one right ("yes" wrong, "  YES  " right) -> acc 4/6, acc+ 1/3
    assert scores["existence/acc"].item() == pytest.approx(4 / 6)
    assert scores["existence/acc_plus"].item() == pytest.approx(1 / 3)
    assert scores["existence/score"].item() == pytest.approx(100 * 4 / 6 + 100 * 1 / 3)
    assert scores["existence/other"].item() == 1
    # count: d one right ("Not sure" reads as no, the truth is yes); e both right -> acc 3/4, acc+ 1/2
    assert scores["count/score"].item() == pytest.approx(100 * 3 / 4 + 100 * 1 / 2)
    # artwork: g one right -> acc 1/2, acc+ 0
    assert scores["artwork/score"].item() == pytest.approx(100 * 1 / 2 + 0)
    # code_reasoning: f both right -> 200
    assert scores["code_reasoning/score"].item() == pytest.approx(200)
    assert scores["perception"].item() == pytest.approx(100.0 + 125.0 + 50.0)
    assert scores["cognition"].item() == pytest.approx(200.0)
    assert "position/score" not in scores  # subtasks with no answers are left out


def test_states_are_fixed_size_and_merge_like_a_distributed_sync(tmp_path):
    answers = write_mme_fixture(tmp_path)
    mme = load_mme(tmp_path)
    predictions = [answers[(q.subtask, q.image.name, q.question)] for q in mme.questions]
    truths, ids = [q.answer for q in mme.questions], [q.image_id for q in mme.questions]
    whole = mme.metric()
    whole.update(predictions, truths, ids)
    # two "processes", each holding one question of every image: acc+ needs their per-image states summed
    even, odd = mme.metric(), mme.metric()
    shapes = {name: tuple(getattr(even, name).shape) for name in even._defaults}
    even.update(predictions[0::2], truths[0::2], ids[0::2])
    odd.update(predictions[1::2], truths[1::2], ids[1::2])
    assert {name: tuple(getattr(even, name).shape) for name in even._defaults} == shapes
    assert shapes == {"correct": (4,), "questions": (4,), "other": (4,), "image_correct": (7,), "image_answers": (7,)}
    with pytest.raises(ValueError, match="exactly its two questions"):
        even.compute()  # half of every image: acc+ is undefined
    even.merge_state(odd)
    merged, expected = even.compute(), whole.compute()
    assert merged.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(merged[key], expected[key])


def test_a_duplicated_answer_is_an_error_not_a_silent_score(tmp_path):
    write_mme_fixture(tmp_path)
    metric = load_mme(tmp_path).metric()
    metric.update(["yes", "no", "yes"], ["yes", "no", "yes"], [0, 0, 0])
    with pytest.raises(ValueError, match=r"images \[0\] got \[3\] answers"):
        metric.compute()
    with pytest.raises(ValueError, match="ground truth must be yes or no"):
        metric.update(["yes"], ["maybe"], [1])
    with pytest.raises(IndexError, match="image ids must be in 0..6"):
        metric.update(["yes"], ["yes"], [7])


@pytest.mark.parametrize(
    "line, message",
    [
        ("a.png\tIs there a dog?\tMaybe", r"existence\.txt:1: expected the answer Yes or No, got 'Maybe'"),
        ("a.png\tIs there a dog?", r"existence\.txt:1: expected 3 tab-separated fields"),
        ("zzz.png\tIs there a dog?\tYes\nzzz.png\tIs there a cat?\tNo", r"existence\.txt:1: image 'zzz.png' not found"),
        (
            "a.png\tIs there a dog?\tYes",
            r"existence\.txt: image 'a.png' has 1 question\(s\); MME has exactly 2 per image",
        ),
    ],
)
def test_malformed_ground_truth_names_the_file_and_line(tmp_path, line, message):
    write_image(tmp_path / "existence" / "a.png")
    (tmp_path / "existence" / "existence.txt").write_text(line + "\n")
    with pytest.raises(MMEFormatError, match=message):
        load_mme(tmp_path)


def test_missing_subtasks_and_roots_are_named(tmp_path):
    write_mme_fixture(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no folder for subtasks \['OCR'\]"):
        load_mme(tmp_path, ["existence", "OCR"])
    with pytest.raises(ValueError, match=r"unknown subtasks \['ocr'\]"):
        load_mme(tmp_path, ["ocr"])
    with pytest.raises(FileNotFoundError, match="none of the subtask folders"):
        load_mme(tmp_path / "existence")
    with pytest.raises(ValueError, match=r"unknown subtasks \['vqa'\]"):
        MMEScore(["existence", "vqa"], [0])
