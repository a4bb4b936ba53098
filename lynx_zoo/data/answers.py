"""Comparing answers: normalisation for exact match, and category names for metrics."""

from __future__ import annotations

import re


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and extra spaces: the exact-match comparison of answers."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def metric_key(category: str) -> str:
    """The name a category's metric has in a model (``all`` for none; no dots, which modules forbid)."""
    return (category or "all").replace(".", "_")
