import pytest
import torch

from lynx_zoo.data import IGNORE_INDEX, LynxProcessor, PromptConfig, Sample, Skipped
from lynx_zoo.data.shapes import shapes_tokenizer


def processor(**prompt) -> LynxProcessor:
    return LynxProcessor(shapes_tokenizer(), PromptConfig(**prompt), image_transform=lambda image: image)


def test_layout_bos_prompt_answer_eos_with_loss_on_answer_only():
    proc = processor()
    tok = proc.tokenizer
    ids, labels, truncated = proc.encode(Sample("what color is the circle?", "red"))
    assert not truncated
    words = tok.convert_ids_to_tokens(ids)
    assert words == ["<s>", "user", ":", "what", "color", "is", "the", "circle", "?", "bot", ":", "red", "</s>"]
    assert labels[:-2] == [IGNORE_INDEX] * (len(ids) - 2)
    assert labels[-2:] == [tok.convert_tokens_to_ids("red"), tok.eos_token_id]


def test_batches_are_left_padded_with_masked_labels():
    proc = processor()
    batch = proc(
        [
            Sample("how many shapes are there?", "two", image=torch.zeros(3, 4, 4)),
            Sample("what shape is the red object?", "top left", image=torch.ones(3, 4, 4)),
        ]
    )
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape == mask.shape == labels.shape
    short = int(mask[0].sum())
    assert mask[0, : ids.shape[1] - short].eq(0).all() and mask[0, -short:].eq(1).all()
    assert ids[0, : ids.shape[1] - short].eq(proc.tokenizer.pad_token_id).all()
    assert labels[mask == 0].eq(IGNORE_INDEX).all()
    assert batch["images"].shape == (2, 3, 4, 4)
    assert batch["answers"] == ["two", "top left"] and batch["num_skipped"] == 0


def test_unreadable_samples_are_dropped_and_counted_by_source_and_reason():
    unreadable = Skipped("vqa", "unreadable_image", "a.png: truncated")
    sample = Sample("how many shapes are there?", "one", image=torch.zeros(3, 2, 2))
    batch = processor()([unreadable, sample, Skipped("vqa", "unreadable_image"), Skipped("clips", "unreadable_video")])
    assert batch["input_ids"].shape[0] == 1 and batch["num_skipped"] == 3
    assert batch["skipped"] == {"vqa/unreadable_image": 2, "clips/unreadable_video": 1}


def test_conversations_have_the_loss_on_every_answer_and_drop_old_turns_first():
    proc = processor()
    tok = proc.tokenizer
    chat = Sample("what shape is the object?", "circle", history=[("what color is the circle?", "red")])
    ids, labels, truncated = proc.encode(chat)
    words = tok.convert_ids_to_tokens(ids)
    assert words == (
        ["<s>", "user", ":", "what", "color", "is", "the", "circle", "?", "bot", ":", "red", "</s>"]
        + ["user", ":", "what", "shape", "is", "the", "object", "?", "bot", ":", "circle", "</s>"]
    )
    answered = [tok.convert_ids_to_tokens(i) for i, label in zip(ids, labels) if label != IGNORE_INDEX]
    assert answered == ["red", "</s>", "circle", "</s>"] and not truncated
    short = processor(max_length=15)
    ids, labels, truncated = short.encode(chat)
    assert truncated
    kept = ["<s>", "user", ":", "what", "shape", "is", "the", "object", "?", "bot", ":", "circle", "</s>"]
    assert short.tokenizer.convert_ids_to_tokens(ids) == kept


def test_a_batch_of_videos_stacks_frames_and_refuses_mixing_with_images():
    proc = processor()
    clip = Sample("what happens?", "jumping", image=torch.zeros(5, 3, 4, 4))
    assert proc([clip, clip])["images"].shape == (2, 5, 3, 4, 4)
    with pytest.raises(ValueError, match="mixes images, videos"):
        proc([clip, Sample("what color?", "red", image=torch.zeros(3, 4, 4))])


def test_truncated_samples_are_counted():
    proc = processor(max_length=10)
    batch = proc([Sample("what color is the circle in the top left?", "red"), Sample("what color?", "red")])
    assert batch["num_truncated"] == 1


def test_truncation_shortens_the_instruction_and_keeps_the_answer_slot():
    proc = processor(max_length=10)
    ids, labels, truncated = proc.encode(Sample("what color is the circle in the top left?", "red"))
    words = proc.tokenizer.convert_ids_to_tokens(ids)
    assert truncated
    assert len(ids) == len(labels) == 10
    assert words == ["<s>", "user", ":", "what", "color", "is", "bot", ":", "red", "</s>"]
    assert labels[-2:] == ids[-2:]
    prompt = proc.prompts([Sample("what color is the circle in the top left?")])
    assert proc.tokenizer.convert_ids_to_tokens(prompt["input_ids"][0])[-2:] == ["bot", ":"]


def test_a_sample_whose_answer_cannot_fit_is_dropped_and_counted():
    proc = processor(max_length=5)  # "<s> user : bot :" alone fills it
    batch = proc([Sample("how many shapes are there?", "two", image=torch.zeros(3, 2, 2))])
    assert batch["input_ids"].shape[0] == 0 and batch["num_skipped"] == 1


def test_prompts_for_generation_have_no_answer():
    proc = processor(lower_text=True)
    batch = proc.prompts([Sample("WHAT color is the circle?")])
    assert "labels" not in batch
    assert proc.tokenizer.convert_ids_to_tokens(batch["input_ids"][0])[-2:] == ["bot", ":"]


def test_prompts_for_generation_keep_the_earlier_turns_of_a_conversation():
    proc = processor()
    chat = Sample("what shape is the object?", history=[("what color is the circle?", "red")])
    words = proc.tokenizer.convert_ids_to_tokens(proc.prompts([chat])["input_ids"][0])
    assert words[:13] == ["<s>", "user", ":", "what", "color", "is", "the", "circle", "?", "bot", ":", "red", "</s>"]
    assert words[-2:] == ["bot", ":"] and "circle" not in words[13:]
    assert proc([Sample("what color?", "red", history=[("how many?", "one")])])["histories"] == [[("how many?", "one")]]


def test_truncation_keeps_the_whole_answer_when_the_formatted_prompt_tokenizes_differently(tmp_path):
    # a LLaMA SentencePiece tokenizer: upper-case words split into more pieces than their lower-cased prompt
    import importlib.util
    import shutil
    from pathlib import Path

    from transformers import LlamaTokenizer

    source = Path(importlib.util.find_spec("mistral_common").origin).parent / "data" / "tokenizer.model.v1"
    shutil.copy(source, tmp_path / "tokenizer.model")
    tokenizer = LlamaTokenizer.from_pretrained(str(tmp_path))
    tokenizer.pad_token = tokenizer.unk_token
    answer = "a bright red circle"
    answer_ids = tokenizer(" " + answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    for lower_text in (True, False):
        proc = LynxProcessor(tokenizer, PromptConfig(max_length=24, lower_text=lower_text), lambda image: image)
        question = "WHAT COLOUR IS THE LARGE SHAPE IN THE TOP LEFT CORNER OF THE PICTURE?"
        ids, labels, truncated = proc.encode(Sample(question, answer))
        assert truncated and len(ids) <= 24
        assert [label for label in labels if label != IGNORE_INDEX] == answer_ids
        assert tokenizer.decode(ids, skip_special_tokens=True).endswith(("bot: " if lower_text else "Bot: ") + answer)


def test_lower_text_lowers_the_rendered_prompt_and_the_earlier_lower_case_the_instruction_only():
    assert processor(lower_text=True).format_prompt("WHAT Color?") == "user: what color?\nbot:"
    assert processor(lower_case=True).format_prompt("WHAT Color?") == "User: what color?\nBot:"
    assert processor().format_prompt("WHAT Color?") == "User: WHAT Color?\nBot:"
    # variants exported before lower_text existed name lower_case in their config.json: they still load
    from lynx_zoo import PrefixLynx
    from lynx_zoo.fusion.config import ModelConfig

    saved = {"prompt": {"template": "User: {instruction}\nBot:", "max_length": 32, "lower_case": False}}
    assert ModelConfig.of(PrefixLynx, saved).prompt == PromptConfig(max_length=32)
