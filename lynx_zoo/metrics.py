"""Benchmark metrics as torchmetrics ``Metric`` s with fixed-size tensor states (they sync across processes).

:class:`CategoryAccuracy` counts right answers per category (exact match or a judge's verdicts);
:class:`MMEScore` scores MME exactly as the official MME tool does (see :func:`mme_yes_no`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchmetrics import Metric

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
MME_SUBTASKS = PERCEPTION + COGNITION


def mme_yes_no(answer: str) -> str:
    """The yes/no of an answer as the official MME tool reads it: ``"yes"``, ``"no"`` or ``"other"``.

    The answer is stripped and lower-cased; ``yes``/``no`` alone are taken as they are, otherwise
    ``yes`` anywhere in the first four characters means yes, else ``no`` there means no ("Yes, it
    is" -> yes, "no." -> no, "not sure" -> no, "The answer is yes" -> other).
    """
    text = answer.strip().lower()
    if text in ("yes", "no"):
        return text
    head = text[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return "other"


def _as_index(values: Sequence[int] | torch.Tensor, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(values, dtype=torch.long, device=device).reshape(-1)


class CategoryAccuracy(Metric):
    """Accuracy per category, plus the micro-averaged ``overall``.

    ``update(correct, categories, failed=None)``: one bool per answer, its category, and optionally
    whether its judgement failed (a failed judgement counts as wrong and is counted in ``failed``).
    ``compute()`` -> ``{"overall": acc, category: acc, ...}`` (NaN for a category with no answers).
    """

    full_state_update = False
    correct: torch.Tensor
    total: torch.Tensor
    failed: torch.Tensor

    def __init__(self, categories: Sequence[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not categories or "overall" in categories or len(set(categories)) != len(categories):
            raise ValueError(
                f"CategoryAccuracy: categories must be distinct, not 'overall', and given; got {list(categories)}"
            )
        self.categories = list(categories)
        self._index = {name: i for i, name in enumerate(self.categories)}
        size = len(self.categories)
        self.add_state("correct", torch.zeros(size, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros(size, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("failed", torch.zeros(size, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, correct: Sequence[bool], categories: Sequence[str], failed: Sequence[bool] | None = None) -> None:
        failed = [False] * len(correct) if failed is None else failed
        if not len(correct) == len(categories) == len(failed):
            counts = f"{len(correct)} results, {len(categories)} categories, {len(failed)} failure flags"
            raise ValueError(f"CategoryAccuracy.update: {counts}")
        unknown = sorted({c for c in categories if c not in self._index})
        if unknown:
            raise KeyError(f"CategoryAccuracy: unknown categories {unknown}; expected one of {self.categories}")
        index = _as_index([self._index[c] for c in categories], self.total.device)
        self.total.index_add_(0, index, torch.ones_like(index))
        self.correct.index_add_(0, index, _as_index([bool(c) for c in correct], index.device))
        self.failed.index_add_(0, index, _as_index([bool(f) for f in failed], index.device))

    def compute(self) -> dict[str, torch.Tensor]:
        per_category = self.correct.double() / self.total.double()  # 0/0 -> NaN
        result = {"overall": self.correct.sum().double() / self.total.sum().double()}
        result.update(zip(self.categories, per_category))
        return result


class MMEScore(Metric):
    """MME's score: per subtask ``100 * acc + 100 * acc+`` (max 200), ``perception`` = the sum over the
    perception subtasks (max 2000), ``cognition`` = the sum over the cognition subtasks (max 800).

    ``acc`` is the share of questions answered right, ``acc+`` the share of images with both of
    their questions right (of the questions and images answered). Every image has an integer id
    (:func:`~lynx_zoo.evaluation.mme.load_mme` assigns them) and ``image_subtask[id]`` is the index
    of its subtask in ``subtasks``.
    ``update(predictions, targets, image_ids)`` takes the model's answers, the ground truth
    (``yes``/``no``) and the image id of each question.

    ``compute()`` gives ``{subtask}/acc``, ``{subtask}/acc_plus``, ``{subtask}/score`` and
    ``{subtask}/other`` (answers that are neither yes nor no) for every subtask with answers, and
    ``perception`` and ``cognition``; it raises if an answered image does not have exactly its
    two answers (a partial or duplicated run would change acc+).
    """

    full_state_update = False
    image_subtask: torch.Tensor
    correct: torch.Tensor
    questions: torch.Tensor
    other: torch.Tensor
    image_correct: torch.Tensor
    image_answers: torch.Tensor

    def __init__(self, subtasks: Sequence[str], image_subtask: Sequence[int], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        unknown = [s for s in subtasks if s not in MME_SUBTASKS]
        if unknown or not subtasks:
            raise ValueError(
                f"MMEScore: unknown subtasks {unknown} (of {list(subtasks)}); expected some of {list(MME_SUBTASKS)}"
            )
        self.subtasks = list(subtasks)
        mapping = torch.as_tensor(image_subtask, dtype=torch.long)
        if mapping.numel() and (mapping.min() < 0 or mapping.max() >= len(self.subtasks)):
            raise ValueError(f"MMEScore: image_subtask holds indices outside 0..{len(self.subtasks) - 1}")
        self.register_buffer("image_subtask", mapping, persistent=False)
        size = len(self.subtasks)
        self.add_state("correct", torch.zeros(size, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("questions", torch.zeros(size, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("other", torch.zeros(size, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("image_correct", torch.zeros(len(mapping), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("image_answers", torch.zeros(len(mapping), dtype=torch.long), dist_reduce_fx="sum")

    def update(
        self, predictions: Sequence[str], targets: Sequence[str], image_ids: Sequence[int] | torch.Tensor
    ) -> None:
        ids = _as_index(image_ids, self.image_answers.device)
        if not len(predictions) == len(targets) == len(ids):
            raise ValueError(
                f"MMEScore.update: {len(predictions)} predictions, {len(targets)} targets, {len(ids)} image ids"
            )
        if len(ids) and (ids.min() < 0 or ids.max() >= len(self.image_subtask)):
            raise IndexError(
                f"MMEScore.update: image ids must be in 0..{len(self.image_subtask) - 1}, got {ids.tolist()}"
            )
        truth = [t.strip().lower() for t in targets]
        bad = [t for t in truth if t not in ("yes", "no")]
        if bad:
            raise ValueError(f"MMEScore.update: ground truth must be yes or no, got {bad[:3]}")
        read = [mme_yes_no(p) for p in predictions]
        right = _as_index([r == t for r, t in zip(read, truth)], ids.device)
        subtask = self.image_subtask[ids]
        self.correct.index_add_(0, subtask, right)
        self.questions.index_add_(0, subtask, torch.ones_like(subtask))
        self.other.index_add_(0, subtask, _as_index([r == "other" for r in read], ids.device))
        self.image_correct.index_add_(0, ids, right)
        self.image_answers.index_add_(0, ids, torch.ones_like(ids))

    def compute(self) -> dict[str, torch.Tensor]:
        seen = self.image_answers > 0
        wrong_count = seen & (self.image_answers != 2)
        if wrong_count.any():
            bad = wrong_count.nonzero().flatten()[:5].tolist()
            raise ValueError(
                f"MMEScore: images {bad} got {self.image_answers[bad].tolist()} answers; each answered image "
                "needs exactly its two questions answered once"
            )
        size = len(self.subtasks)
        images = torch.bincount(self.image_subtask[seen], minlength=size)
        both_right = torch.bincount(self.image_subtask[seen & (self.image_correct == 2)], minlength=size)
        acc = self.correct.double() / self.questions.double()
        acc_plus = both_right.double() / images.double()
        score = 100 * acc + 100 * acc_plus
        result: dict[str, torch.Tensor] = {}
        for i, name in enumerate(self.subtasks):
            if self.questions[i] > 0:
                result.update(
                    {
                        f"{name}/acc": acc[i],
                        f"{name}/acc_plus": acc_plus[i],
                        f"{name}/score": score[i],
                        f"{name}/other": self.other[i],
                    }
                )
        for group, members in (("perception", PERCEPTION), ("cognition", COGNITION)):
            scores = [score[i] for i, name in enumerate(self.subtasks) if name in members and self.questions[i] > 0]
            result[group] = torch.stack(scores).sum() if scores else score.new_zeros(())
        return result
