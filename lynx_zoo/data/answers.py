"""Comparing answers: normalisation for exact match, category names, and chance levels."""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and extra spaces: the exact-match comparison of answers."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def metric_key(category: str) -> str:
    """The name a category's metric has in a model (``all`` for none; no dots, which modules forbid)."""
    return (category or "all").replace(".", "_")


def majority_rates(records: list[dict], key: Callable[[str], str] = metric_key) -> dict[str, float]:
    """Per category (named by ``key``: by default as a model's metrics name it), the share of the most frequent
    answer: what always guessing it would score."""
    answers: dict[str, Counter] = {}
    for record in records:
        category = key(str(record.get("category") or ""))
        answers.setdefault(category, Counter())[normalize_answer(record["answer"])] += 1
    return {c: counts.most_common(1)[0][1] / sum(counts.values()) for c, counts in answers.items()}


def result_category(name: str) -> str:
    """A record's category as results files name it (in ``metrics``, ``details`` and ``chance``)."""
    return name or "all"


def chance_levels(records: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Per category, the accuracy of always giving the category's most frequent answer, and ``overall``, that of
    giving each question its category's (what a model that ignores the image and the question's details scores)."""
    rates = majority_rates(list(records), key=result_category)
    counts = Counter(result_category(str(r.get("category") or "")) for r in records)
    total = sum(counts.values())
    overall = sum(rates[c] * n for c, n in counts.items()) / total if total else math.nan
    return {"overall": overall, **rates}
