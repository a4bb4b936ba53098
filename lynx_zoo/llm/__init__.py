"""The LLM backbone and its tokenizer."""

from typing import TYPE_CHECKING

from lynx_zoo.lazy import lazy_exports

if TYPE_CHECKING:
    from lynx_zoo.llm.bases import BASE_LLMS, BaseLLM, base_llm
    from lynx_zoo.llm.causal_lm import (
        BUILTIN_TOKENIZERS,
        LLMConfig,
        build_llm,
        load_tokenizer,
        register_tokenizer,
    )

__getattr__, __dir__ = lazy_exports(__name__, __file__)

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
