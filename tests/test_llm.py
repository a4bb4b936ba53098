"""The LLM loading path: local folders (as from the hub), random-weight builds, the Lynx [PAD] token."""

import pytest
import torch
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from lynx_zoo.llm import LLMConfig, build_llm, load_tokenizer

WORDS = ["<s>", "</s>", "<unk>", "user", "bot", ":", "hello", "world"]


@pytest.fixture
def hf_folder(tmp_path):
    """A tiny LLaMA and a tokenizer without a pad token, saved as a transformers folder."""
    backend = Tokenizer(WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(0)
    llm = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(WORDS),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            tie_word_embeddings=False,
        )
    )
    llm.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    return tmp_path, llm


def test_pretrained_folder_loads_frozen_with_a_mean_initialised_pad(hf_folder):
    folder, reference = hf_folder
    config = LLMConfig(model=str(folder))
    tokenizer = load_tokenizer(config)
    assert tokenizer.pad_token == "[PAD]" and tokenizer.pad_token_id == len(WORDS)
    llm = build_llm(config, tokenizer)
    assert not any(p.requires_grad for p in llm.parameters())
    embed_in, embed_out = llm.get_input_embeddings().weight, llm.get_output_embeddings().weight
    assert embed_in.shape[0] == embed_out.shape[0] == len(WORDS) + 1
    torch.testing.assert_close(embed_in[:-1], reference.get_input_embeddings().weight)
    torch.testing.assert_close(embed_in[-1], reference.get_input_embeddings().weight.mean(0))
    torch.testing.assert_close(embed_out[-1], reference.get_output_embeddings().weight.mean(0))
    ids = torch.tensor([[0, 3, 5, 6, 7]])
    torch.testing.assert_close(llm(ids).logits[..., : len(WORDS)], reference(ids).logits)
    assert llm.config.pad_token_id == tokenizer.pad_token_id


def test_random_weight_build_from_a_config_dict(hf_folder):
    folder, _ = hf_folder
    config = LLMConfig(
        pretrained=False,
        tokenizer=str(folder),
        trainable=True,
        config={
            "model_type": "llama",
            "hidden_size": 8,
            "intermediate_size": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
        },
    )
    tokenizer = load_tokenizer(config)
    llm = build_llm(config, tokenizer)
    assert llm.config.vocab_size == len(tokenizer) == len(WORDS) + 1
    assert all(p.requires_grad for p in llm.parameters())


def test_missing_sources_are_named(tmp_path):
    with pytest.raises(ValueError, match="llm.tokenizer: no tokenizer given and no llm.model"):
        load_tokenizer(LLMConfig())
    with pytest.raises(FileNotFoundError, match="llm.gguf_file: no GGUF file at"):
        load_tokenizer(LLMConfig(model=str(tmp_path), gguf_file="nope.gguf"))
    with pytest.raises(ValueError, match="llm.config: an HF config dict needs a `model_type`"):
        build_llm(
            LLMConfig(pretrained=False, tokenizer="lynx_zoo/shapes-words", config={"hidden_size": 8}),
            load_tokenizer(LLMConfig(tokenizer="lynx_zoo/shapes-words")),
        )
    with pytest.raises(FileNotFoundError, match="no installed package 'not_a_package'"):
        load_tokenizer(LLMConfig(model="package://not_a_package", gguf_file="x.gguf"))
