"""The MME benchmark on disk: 14 subtask folders of images with two yes/no questions per image.

Two layouts are read, per subtask folder ``ROOT/<subtask>/``:

* a ground-truth table ``<subtask>.txt`` in the folder (or in ``ROOT/eval_tool/Your_Results/``, the
  official tool's template), one question a line: ``image_name<TAB>question<TAB>Yes|No``; images
  are in the folder or in its ``images/`` subfolder;
* the release layout: one ``<image stem>.txt`` per image with two ``question<TAB>Yes|No`` lines, in
  the folder or in ``questions_answers_YN/``, the image next to it or in ``images/``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from lynx_zoo.metrics import MME_SUBTASKS, MMEScore

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")


class MMEFormatError(ValueError):
    """An MME file that does not follow the layout (names the file and line)."""


@dataclass(frozen=True)
class MMEQuestion:
    """One MME question: its subtask, image (and the image's integer id), question and yes/no answer."""

    subtask: str
    image: Path
    image_id: int
    question: str
    answer: str


@dataclass
class MMEBenchmark:
    """The questions of the subtasks found, in canonical subtask order, and each image's subtask index."""

    root: Path
    subtasks: list[str]
    questions: list[MMEQuestion]
    image_subtask: list[int]

    def metric(self) -> MMEScore:
        """A fresh :class:`MMEScore` over these subtasks and images."""
        return MMEScore(self.subtasks, self.image_subtask)

    def limit_images(self, per_subtask: int) -> MMEBenchmark:
        """The first ``per_subtask`` images of every subtask (both of their questions)."""
        kept_images: dict[str, list[int]] = {}
        for q in self.questions:
            ids = kept_images.setdefault(q.subtask, [])
            if q.image_id not in ids and len(ids) < per_subtask:
                ids.append(q.image_id)
        keep = {i for ids in kept_images.values() for i in ids}
        return MMEBenchmark(
            self.root, self.subtasks, [q for q in self.questions if q.image_id in keep], self.image_subtask
        )


def load_mme(root: str | Path, subtasks: Sequence[str] | None = None) -> MMEBenchmark:
    """Read the MME questions under ``root``; ``subtasks`` (default: every one present) must exist."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"MME root not found: {root}")
    unknown = [s for s in subtasks or () if s not in MME_SUBTASKS]
    if unknown:
        raise ValueError(f"MME: unknown subtasks {unknown}; expected some of {list(MME_SUBTASKS)}")
    wanted = [s for s in MME_SUBTASKS if s in subtasks] if subtasks else list(MME_SUBTASKS)
    missing = [s for s in wanted if not (root / s).is_dir()]
    if subtasks and missing:
        raise FileNotFoundError(f"MME root {root}: no folder for subtasks {missing}")
    present = [s for s in wanted if s not in missing]
    if not present:
        raise FileNotFoundError(f"MME root {root}: none of the subtask folders {list(MME_SUBTASKS)}")
    questions: list[MMEQuestion] = []
    image_subtask: list[int] = []
    for index, subtask in enumerate(present):
        for image, pair in _read_subtask(root, subtask):
            image_id = len(image_subtask)
            image_subtask.append(index)
            questions.extend(MMEQuestion(subtask, image, image_id, q, a) for q, a, _ in pair)
    return MMEBenchmark(root, present, questions, image_subtask)


def _answer(value: str, where: str) -> str:
    answer = value.strip().lower()
    if answer not in ("yes", "no"):
        raise MMEFormatError(f"{where}: expected the answer Yes or No, got {value.strip()!r}")
    return answer


def _image_path(folder: Path, name: str, where: str) -> Path:
    for candidate in (folder / "images" / name, folder / name):
        if candidate.is_file():
            return candidate
    raise MMEFormatError(f"{where}: image {name!r} not found in {folder} or {folder / 'images'}")


def _read_subtask(root: Path, subtask: str) -> list[tuple[Path, list[tuple[str, str, str]]]]:
    """``(image path, [(question, answer, file:line), (question, answer, file:line)])`` per image."""
    folder = root / subtask
    for table in (folder / f"{subtask}.txt", root / "eval_tool" / "Your_Results" / f"{subtask}.txt"):
        if table.is_file():
            return _read_table(table, folder)
    return _read_per_image(folder)


def _tab_rows(path: Path, columns: str) -> Iterator[tuple[str, list[str]]]:
    """``(file:line, fields)`` of each non-blank line, which must have the ``columns`` (comma-separated names)."""
    expected = len(columns.split(", "))
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        fields = line.split("\t")
        if len(fields) != expected:
            raise MMEFormatError(f"{where}: expected {expected} tab-separated fields ({columns}), got {len(fields)}")
        yield where, fields


def _read_table(table: Path, folder: Path) -> list[tuple[Path, list[tuple[str, str, str]]]]:
    by_image: dict[str, list[tuple[str, str, str]]] = {}
    for where, (name, question, answer) in _tab_rows(table, "image, question, Yes|No"):
        by_image.setdefault(name.strip(), []).append((question.strip(), _answer(answer, where), where))
    if not by_image:
        raise MMEFormatError(f"{table}: no questions")
    images = []
    for name, pair in by_image.items():
        if len(pair) != 2:
            raise MMEFormatError(f"{table}: image {name!r} has {len(pair)} question(s); MME has exactly 2 per image")
        images.append((_image_path(folder, name, pair[0][2]), pair))
    return images


def _read_per_image(folder: Path) -> list[tuple[Path, list[tuple[str, str, str]]]]:
    answers_dir = folder / "questions_answers_YN"
    files = sorted((answers_dir if answers_dir.is_dir() else folder).glob("*.txt"))
    if not files:
        raise MMEFormatError(
            f"{folder}: no ground truth: expected {folder.name}.txt (image<TAB>question<TAB>Yes|No lines) "
            "or one <image>.txt per image"
        )
    images = []
    for path in files:
        pair = [
            (question.strip(), _answer(answer, where), where)
            for where, (question, answer) in _tab_rows(path, "question, Yes|No")
        ]
        if len(pair) != 2:
            raise MMEFormatError(f"{path}: {len(pair)} question(s); MME has exactly 2 per image")
        matches = [folder / sub / (path.stem + s) for sub in ("images", ".") for s in IMAGE_SUFFIXES]
        image = next((m for m in matches if m.is_file()), None)
        if image is None:
            raise MMEFormatError(
                f"{path}: no image {path.stem}{{{','.join(IMAGE_SUFFIXES)}}} in {folder} or {folder / 'images'}"
            )
        images.append((image, pair))
    return images
