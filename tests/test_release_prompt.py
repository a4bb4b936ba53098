"""The prompt the release's evaluation sends (dataset/eval_datasets.py of bytedance/lynx-llm): the template
``User: {question}\\nBot:`` rendered, stripped and lower-cased as a whole (``lower_text: True``), ``<s>`` in front,
then only the last ``max_input_tokens: 40`` tokens kept. lynx_zoo's real-Lynx prompt settings give the same ids,
with the LLaMA-layout SentencePiece tokenizer of the mistral-common wheel."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import sentencepiece
import yaml

from lynx_zoo.data import LynxProcessor, PromptConfig, PromptCutWarning, Sample
from lynx_zoo.llm import LLMConfig, load_tokenizer

REPO = Path(__file__).resolve().parents[1]
QUESTIONS = [
    "What is the man in the red shirt holding?",
    "How many DOGS are in the Picture? Answer with a number, e.g. 3.",
    "Look at the image carefully and describe, in as much detail as you can, what the people in the background "
    "are doing, what they are wearing, and what time of day it probably is.",
]
# the ids of the release's rendering of QUESTIONS with this tokenizer (the third: its last 40, <s> cut off)
RELEASE_IDS = [
    [1, 2188, 28747, 767, 349, 272, 676, 297, 272, 2760, 11480, 6632, 28804, 13, 10093, 28747],
    [1, 2188, 28747, 910, 1287, 9540, 460, 297, 272, 5754, 28804, 4372, 395, 264, 1474, 28725, 317, 28723, 28721]
    + [28723, 28705, 28770, 28723, 13, 10093, 28747],
    [272, 3469, 9547, 304, 6685, 28725, 297, 390, 1188, 8291, 390, 368, 541, 28725, 767, 272, 905, 297, 272, 5414]
    + [460, 2548, 28725, 767, 590, 460, 8192, 28725, 304, 767, 727, 302, 1370, 378, 3049, 349, 28723, 13, 10093, 28747],
]


def release_rendering(sp: sentencepiece.SentencePieceProcessor, question: str) -> list[int]:
    """eval_datasets.py: prompt.format_map(ann).strip(), .lower(), [bos] + tokenize(text), [-max_input_tokens:]
    (its LlamaTokenizer._tokenize is sp_model.encode(text, out_type=str))."""
    text = "User: {question}\nBot:".format(question=question).strip().lower()
    return ([sp.bos_id()] + sp.encode(text))[-40:]


@pytest.fixture(scope="module")
def real_lynx_prompt() -> PromptConfig:
    """The prompt section of configs/pt_vicuna_420.yaml (what every real-Lynx config inherits)."""
    config = yaml.safe_load((REPO / "configs" / "pt_vicuna_420.yaml").read_text())
    return PromptConfig(**config["model"]["init_args"]["prompt"])


def test_the_real_lynx_prompt_is_the_releases(real_lynx_prompt):
    assert real_lynx_prompt.template == "User: {instruction}\nBot:"
    assert real_lynx_prompt.lower_text and real_lynx_prompt.max_input_tokens == 40


def test_three_questions_give_the_releases_token_ids(llama_tokenizer_dir, real_lynx_prompt):
    sp = sentencepiece.SentencePieceProcessor(model_file=str(Path(llama_tokenizer_dir) / "tokenizer.model"))
    assert [release_rendering(sp, q) for q in QUESTIONS] == RELEASE_IDS
    # the tokenizer as lynx_zoo loads an LLM's (with the [PAD] token Lynx adds)
    processor = LynxProcessor(load_tokenizer(LLMConfig(tokenizer=llama_tokenizer_dir)), real_lynx_prompt, str)
    assert processor.format_prompt(QUESTIONS[1]).startswith("user: how many dogs are in the picture?")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        one_by_one = [processor.prompts([Sample(q)]) for q in QUESTIONS]
    assert [b["input_ids"][0].tolist() for b in one_by_one] == RELEASE_IDS
    assert [b["num_cut"] for b in one_by_one] == [0, 0, 1]
    # the cut is never silent: one warning, for the long question, naming the limit
    cut = [w for w in caught if issubclass(w.category, PromptCutWarning)]
    assert len(cut) == 1 and "prompt.max_input_tokens=40" in str(cut[0].message)
    assert "1 of 1 prompts" in str(cut[0].message) and "5 dropped" in str(cut[0].message)
    # batched (left-padded), each row ends in the same ids
    with pytest.warns(PromptCutWarning, match="1 of 3 prompts"):
        batch = processor.prompts([Sample(q) for q in QUESTIONS])
    for row, mask, expected in zip(batch["input_ids"], batch["attention_mask"], RELEASE_IDS):
        assert row[mask.bool()].tolist() == expected


def test_no_limit_keeps_whole_prompts(llama_tokenizer_dir):
    tokenizer = load_tokenizer(LLMConfig(tokenizer=llama_tokenizer_dir))
    processor = LynxProcessor(tokenizer, PromptConfig(lower_text=True, max_input_tokens=None), str)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        batch = processor.prompts([Sample(QUESTIONS[2])])
    assert batch["num_cut"] == 0 and batch["input_ids"].shape[1] == 45 and batch["input_ids"][0, 0] == 1
    with pytest.raises(ValueError, match="prompt.max_input_tokens: expected a positive number"):
        LynxProcessor(tokenizer, PromptConfig(max_input_tokens=0), str)
