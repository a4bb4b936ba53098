"""The LLM backbone and its tokenizer."""

from lynx_zoo.llm.bases import BASE_LLMS, BaseLLM, base_llm
from lynx_zoo.llm.causal_lm import (
    BUILTIN_TOKENIZERS,
    LLMConfig,
    build_llm,
    load_tokenizer,
    register_tokenizer,
)

__all__ = [
    "BUILTIN_TOKENIZERS",
    "BASE_LLMS",
    "BaseLLM",
    "base_llm",
    "LLMConfig",
    "build_llm",
    "load_tokenizer",
    "register_tokenizer",
]
