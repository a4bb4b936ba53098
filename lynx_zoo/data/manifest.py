"""JSONL manifests: one JSON object a line, e.g. visual QA ``{"image": "images/0001.png", "question": "...",
"answer": "...", "category": "colour", "id": "0001"}`` (paths relative to the manifest's folder or a given
root; ``category`` and ``id`` optional). The sources of :mod:`lynx_zoo.data.sources` read them.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

from lynx_zoo.errors import ReportedError

log = logging.getLogger(__name__)

REQUIRED_FIELDS = ("image", "question", "answer")


class ManifestError(ReportedError, ValueError):
    """A manifest that cannot be used at all (its schema is wrong from the first line)."""


def parse_line(
    line: str, required: tuple[str, ...] = REQUIRED_FIELDS, answer_field: str | None = "answer"
) -> tuple[dict | None, str, str]:
    """One manifest line checked: ``(record, "", "")``, or ``(None, reason, problem)`` when it is unusable
    (``malformed_line``, ``missing_field`` or ``empty_answer``)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        return None, "malformed_line", f"not valid JSON ({err.msg})"
    missing = [f for f in required if not isinstance(record, dict) or not isinstance(record.get(f), str)]
    if missing:
        return None, "missing_field", f"missing or non-string field(s) {missing}"
    if answer_field and not record[answer_field].strip():
        return None, "empty_answer", "empty answer"
    return record, "", ""


def read_manifest(
    path: str | Path,
    strict: bool = False,
    required: tuple[str, ...] = REQUIRED_FIELDS,
    answer_field: str | None = "answer",
) -> tuple[list[dict], Counter]:
    """Records of a JSONL manifest and the count of skipped lines per reason.

    Every record needs the string fields ``required``; an empty ``answer_field`` skips the line. A
    wrong schema on the first line raises at once; later malformed lines are skipped and counted
    (``strict=True`` raises on them, naming the file and line).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    records: list[dict] = []
    skipped: Counter = Counter()
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            record, reason, problem = parse_line(line, required, answer_field)
            if record is not None:
                records.append(record)
                continue
            message = f"{path}:{number}: {problem}"
            if strict or (number == 1 and reason != "empty_answer"):
                raise ManifestError(f"{message}; expected fields {list(required)} (strings)")
            skipped[reason] += 1
            log.warning("skipping %s", message)
    return records, skipped
