"""The LLM backbone and its tokenizer."""

from lynx_zoo.llm.causal_lm import (
    BUILTIN_TOKENIZERS,
    KNOWN_ARCHITECTURES,
    LLMConfig,
    build_llm,
    load_tokenizer,
    register_tokenizer,
)

__all__ = [
    "BUILTIN_TOKENIZERS",
    "KNOWN_ARCHITECTURES",
    "LLMConfig",
    "build_llm",
    "load_tokenizer",
    "register_tokenizer",
]
