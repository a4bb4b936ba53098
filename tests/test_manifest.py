import json

import pytest
import torch
from PIL import Image

from lynx_zoo.data import DataError, ImageTextSource, LoadContext, ManifestError, Skipped, read_manifest


def to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(__import__("numpy").asarray(image.resize((8, 8)))).permute(2, 0, 1).float()


def source(manifest, strict=False) -> ImageTextSource:
    data = ImageTextSource(str(manifest), name="m")
    data.prepare(LoadContext(to_tensor, strict=strict))
    return data


def write(path, lines):
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")


def test_round_trip_of_real_image_files(tmp_path):
    Image.new("RGB", (16, 16), (255, 0, 0)).save(tmp_path / "red.png")
    write(tmp_path / "m.jsonl", [{"image": "red.png", "question": "colour?", "answer": "red", "category": "c"}])
    data = source(tmp_path / "m.jsonl")
    sample = data[0]
    assert sample.answer == "red" and sample.category == "c" and sample.image.shape == (3, 8, 8)
    assert sample.image[0].mean() == 255 and sample.image[1].mean() == 0


def test_wrong_schema_on_line_one_fails_at_once_naming_the_field(tmp_path):
    write(tmp_path / "m.jsonl", [{"img": "a.png", "question": "q", "answer": "a"}])
    with pytest.raises(ManifestError, match=r"m.jsonl:1: missing or non-string field\(s\) \['image'\]"):
        read_manifest(tmp_path / "m.jsonl")


def test_later_bad_lines_are_skipped_and_counted(tmp_path):
    good = {"image": "a.png", "question": "q", "answer": "a"}
    write(tmp_path / "m.jsonl", [good, "{not json", {"image": "b.png", "answer": "x"}, {**good, "answer": " "}, good])
    records, skipped = read_manifest(tmp_path / "m.jsonl")
    assert len(records) == 2
    assert skipped == {"malformed_line": 1, "missing_field": 1, "empty_answer": 1}
    with pytest.raises(ManifestError, match=r"m.jsonl:2: not valid JSON"):
        read_manifest(tmp_path / "m.jsonl", strict=True)


def test_corrupt_image_is_skipped_with_its_reason_or_a_named_error(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    write(
        tmp_path / "m.jsonl",
        [
            {"image": "bad.png", "question": "q", "answer": "a"},
            {"image": "missing.png", "question": "q", "answer": "a"},
        ],
    )
    data = source(tmp_path / "m.jsonl")
    assert data[0] == Skipped("m", "unreadable_image", data[0].detail) and "bad.png" in data[0].detail
    assert data[1].reason == "unreadable_image" and "missing.png" in data[1].detail
    with pytest.raises(DataError, match="cannot read .*bad.png"):
        source(tmp_path / "m.jsonl", strict=True)[0]
