"""Every data source round-trips real files: photographs, PyAV-encoded clips, LLaVA JSON, tar shards."""

import json
import random

import pytest
from media import CODECS, decoded_index, save_photos, to_tensor, write_clip, write_jsonl, write_shards

from lynx_zoo.data import (
    ConversationSource,
    DataError,
    ImageTextSource,
    InstructionTemplates,
    LoadContext,
    ManifestError,
    Sample,
    ShardSource,
    Skipped,
    TextSource,
    VideoQASource,
)
from lynx_zoo.data.mixture import PassOrder
from lynx_zoo.data.video import VideoError, read_video_frames, segment_indices


def prepared(source, training=False, strict=False, templates=None, num_frames=5):
    source.prepare(LoadContext(to_tensor, templates or InstructionTemplates({}), num_frames, training, strict))
    return source


def test_image_text_source_reads_real_photographs_for_vqa_and_captions(tmp_path):
    files = save_photos(tmp_path / "img")
    records = [{"image": f"img/{f}", "question": "what is shown?", "answer": f.split(".")[0]} for f in files]
    vqa = prepared(ImageTextSource(str(write_jsonl(tmp_path / "vqa.jsonl", records)), name="vqa", task="vqa"))
    sample = vqa[2]
    assert isinstance(sample, Sample) and sample.image.shape == (3, 16, 16) and sample.source == "vqa"
    assert sample.answer == "coffee" if files[2].startswith("coffee") else sample.answer == files[2].split(".")[0]
    assert sample.instruction == "what is shown?"  # no templates for the task: the question itself
    captions = [{"image": f"img/{f}", "answer": "a photograph"} for f in files]
    templates = InstructionTemplates({"caption": ["Describe the image briefly.", "Caption this."]})
    caption = prepared(
        ImageTextSource(str(write_jsonl(tmp_path / "cap.jsonl", captions)), task="caption"), templates=templates
    )
    assert caption[0].instruction == "Describe the image briefly." and caption[0].answer == "a photograph"


def test_conversation_source_reads_llava_json_with_every_turn(tmp_path):
    files = save_photos(tmp_path)
    conversation = [
        {"from": "human", "value": "<image>\nWhat is in the picture?"},
        {"from": "gpt", "value": "An astronaut."},
        {"from": "human", "value": "What is she holding?"},
        {"from": "gpt", "value": "A helmet."},
    ]
    records = [
        {"id": "a", "image": files[0], "conversations": conversation},
        {"id": "b", "image": files[1], "conversations": conversation[:1]},  # no answer: malformed
        {"id": "c", "image": files[1], "conversations": [conversation[0], {"from": "gpt", "value": " "}]},
    ]
    (tmp_path / "llava.json").write_text(json.dumps(records))
    source = prepared(ConversationSource(str(tmp_path / "llava.json")))
    assert len(source) == 1 and source.skipped_lines == {"malformed_line": 1, "empty_answer": 1}
    sample = source[0]
    assert sample.history == [("What is in the picture?", "An astronaut.")]
    assert (sample.instruction, sample.answer) == ("What is she holding?", "A helmet.")
    bad = [{"id": "x", "conversations": conversation}]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ManifestError, match=r"bad.json: record 1: missing 'image'"):
        prepared(ConversationSource(str(tmp_path / "bad.json")))


@pytest.mark.parametrize("container", sorted(CODECS))
def test_video_frames_come_in_order_from_every_container(tmp_path, container):
    clip = write_clip(tmp_path / f"clip.{container}", num_frames=20)
    centres = [decoded_index(f) for f in read_video_frames(clip, 5)]
    assert centres == [2, 6, 10, 14, 18]  # the centre of each of 5 segments of 4 frames
    assert [decoded_index(f) for f in read_video_frames(clip, 5)] == centres  # evaluation is deterministic
    for seed in range(3):
        drawn = [decoded_index(f) for f in read_video_frames(clip, 5, training=True, rng=random.Random(seed))]
        assert all(4 * k <= index < 4 * (k + 1) for k, index in enumerate(drawn)), drawn  # one per segment


def test_segment_sampling_of_a_clip_shorter_than_the_frames_repeats_in_order():
    assert segment_indices(3, 5, training=False) == [0, 0, 1, 2, 2]
    assert segment_indices(100, 5, training=False) == [10, 30, 50, 70, 90]


def test_video_source_gives_num_frames_transformed_frames_and_skips_a_truncated_file(tmp_path):
    write_clip(tmp_path / "good.mp4")
    data = write_clip(tmp_path / "long.mkv", num_frames=60).read_bytes()
    (tmp_path / "cut.mkv").write_bytes(data[: len(data) // 2])  # the header still declares 6 s
    manifest = write_jsonl(
        tmp_path / "v.jsonl",
        [
            {"video": "good.mp4", "question": "what happens?", "answer": "nothing"},
            {"video": "cut.mkv", "question": "what happens?", "answer": "nothing"},
            {"video": "missing.webm", "question": "what happens?", "answer": "nothing"},
        ],
    )
    source = prepared(VideoQASource(str(manifest), name="clips"), num_frames=4)
    assert source[0].image.shape == (4, 3, 16, 16)
    assert source[1] == Skipped("clips", "unreadable_video", source[1].detail) and "truncated" in source[1].detail
    assert source[2].reason == "unreadable_video" and "missing.webm" in source[2].detail
    with pytest.raises(DataError, match="cut.mkv: truncated"):
        prepared(VideoQASource(str(manifest)), strict=True)[1]
    with pytest.raises(VideoError, match="not a video"):
        (tmp_path / "not a video.mp4").write_bytes(b"\x00" * 64)
        read_video_frames(tmp_path / "not a video.mp4", 5)


def test_text_source_has_no_image(tmp_path):
    manifest = write_jsonl(tmp_path / "t.jsonl", [{"instruction": "Say hi.", "answer": "hi"}])
    sample = prepared(TextSource(str(manifest)))[0]
    assert sample.image is None and (sample.instruction, sample.answer) == ("Say hi.", "hi")


def test_shard_source_indexes_tar_headers_and_reads_every_pair(tmp_path):
    keys = write_shards(tmp_path, num_shards=3, per_shard=4)
    source = prepared(ShardSource(str(tmp_path / "pairs-{000000..000002}.tar"), task="caption"))
    assert len(source) == 12
    samples = [source[i] for i in range(12)]
    assert [s.id for s in samples] == keys
    assert all(s.image.shape == (3, 16, 16) for s in samples)
    assert samples[1].answer == "a photo number 1" and samples[0].answer == "a photo number 0"
    # each shard is a block: a pass goes shard by shard (a shuffled shard order), each sample once
    assert source.chunk_sizes() == [4, 4, 4]
    order = PassOrder(source.chunk_sizes(), seed=[0]).take(0, 12)
    assert sorted(order.tolist()) == list(range(12))
    assert all(len({int(i) // 4 for i in order[k : k + 4]}) == 1 for k in range(0, 12, 4))


def test_a_corrupt_member_of_a_shard_is_skipped(tmp_path):
    write_shards(tmp_path, num_shards=1, per_shard=2)
    shard = tmp_path / "pairs-000000.tar"
    source = prepared(ShardSource(str(shard)))
    offset, size = source.shards[0].members[0]["jpg"]
    data = bytearray(shard.read_bytes())
    data[offset : offset + size] = b"\x00" * size
    shard.write_bytes(bytes(data))
    assert source[0].reason == "unreadable_image" and "s00-000.jpg" in source[0].detail
    assert isinstance(source[1], Sample)


def test_long_clips_with_sparse_keyframes_seek_without_looping(tmp_path):
    # 12 s at 10 fps with one keyframe: every seek lands on frame 0, and the targets are > 2 s apart
    clip = write_clip(tmp_path / "long.mp4", num_frames=120)
    assert [decoded_index(f) % 20 for f in read_video_frames(clip, 5)] == [i % 20 for i in (12, 36, 60, 84, 108)]


def test_the_shard_index_is_cached_beside_the_shard_and_renewed_when_it_changes(tmp_path, monkeypatch):
    keys = write_shards(tmp_path, num_shards=2, per_shard=3)
    first = prepared(ShardSource(str(tmp_path / "pairs-*.tar")))
    assert sorted(p.name for p in tmp_path.glob("*.index.json")) == [
        "pairs-000000.tar.index.json",
        "pairs-000001.tar.index.json",
    ]

    def no_tar(*args, **kwargs):
        raise AssertionError("the headers were read again")

    monkeypatch.setattr("lynx_zoo.data.sources.tarfile.open", no_tar)
    second = prepared(ShardSource(str(tmp_path / "pairs-*.tar")))
    assert [s.keys for s in second.shards] == [s.keys for s in first.shards] and second[4].id == keys[4]
    monkeypatch.undo()
    write_shards(tmp_path, num_shards=1, per_shard=5)  # shard 0 rewritten: its cached index is stale
    assert len(prepared(ShardSource(str(tmp_path / "pairs-*.tar")))) == 5 + 3


def test_training_segments_do_not_overlap_when_the_clip_has_enough_frames():
    rng = random.Random(0)
    assert all(len(set(segment_indices(7, 5, training=True, rng=rng))) == 5 for _ in range(200))


def test_shards_made_with_tar_from_a_folder_keep_their_pairs(tmp_path):
    import subprocess

    folder = tmp_path / "pairs"
    folder.mkdir()
    photo = (tmp_path / "img" / save_photos(tmp_path / "img")[0]).read_bytes()
    for key in ("a", "c"):
        (folder / f"{key}.jpg").write_bytes(photo)
        (folder / f"{key}.txt").write_text("a photograph")
    subprocess.run(["tar", "-cf", str(tmp_path / "dot.tar"), "-C", str(folder), "."], check=True)
    source = prepared(ShardSource(str(tmp_path / "dot.tar")))  # members are named ./a.jpg, ./a.txt, ...
    assert sorted(source.shards[0].keys) == ["a", "c"] and source.skipped_lines == {}
    assert source.categories == [""] and source[0].answer == "a photograph"


def test_a_template_with_a_stray_brace_fails_when_loaded():
    with pytest.raises(ValueError, match=r"template 'Answer \{answer\}' of task 'vqa': only \{question\}"):
        InstructionTemplates({"vqa": ["{question}", "Answer {answer}"]})


def test_llava_json_with_a_byte_order_mark_is_read(tmp_path):
    files = save_photos(tmp_path)
    record = {
        "image": files[0],
        "conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}],
    }
    (tmp_path / "bom.json").write_text(json.dumps([record]), encoding="utf-8-sig")
    assert prepared(ConversationSource(str(tmp_path / "bom.json")))[0].answer == "Hello."
