"""Token-level batching: the running sequences' KV caches, left-padded into one transformers ``DynamicCache``.

The requests admitted at a step are prefilled together (their prompts' input embeddings, visual tokens included,
computed once, left-padded into one LLM forward), then spliced into the running batch: the batch and the newcomers
are left-padded to the longer of the two and stacked. Each decode step runs the LLM once on the last token of every
running sequence (position ids skip the padding, as ``generate`` makes them); a finished sequence is indexed out at
once, and padding columns that no sequence needs any more are cut off.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from transformers import (
    DynamicCache,
    LogitsProcessorList,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from lynx_zoo.fusion.base import FusedInputs, positions_from_mask

#: the generation settings a decode step honours; a request with others (beam search, repetition penalties, ...)
#: is answered by ``generate`` as a whole
STEP_SETTINGS = {
    "max_new_tokens",
    "num_beams",
    "do_sample",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "typical_p",
    "seed",
}


def decodes_per_step(settings: dict[str, Any]) -> bool:
    """Whether a request with these ``generate`` settings can be decoded token by token in the shared batch."""
    return int(settings.get("num_beams", 1)) == 1 and set(settings) <= STEP_SETTINGS


class Sampler:
    """Chooses a sequence's next token from its logits: the argmax (greedy), or a draw after transformers'
    temperature / top-k / top-p / min-p / typical warpers (unset ones from the LLM's ``generation_config``, as
    ``generate`` takes them), from the sequence's own generator (seeded when the request says)."""

    def __init__(self, settings: dict[str, Any], defaults: Any, choice: int = 0) -> None:
        self.sample = bool(settings.get("do_sample", False))
        self.warpers = LogitsProcessorList()
        self.generator: torch.Generator | None = None
        if not self.sample:
            return

        def value(key: str) -> Any:
            return settings.get(key, getattr(defaults, key, None))

        temperature, top_k, top_p = value("temperature"), value("top_k"), value("top_p")
        if temperature is not None and temperature != 1.0:
            self.warpers.append(TemperatureLogitsWarper(float(temperature)))
        if top_k:
            self.warpers.append(TopKLogitsWarper(int(top_k)))
        if top_p is not None and top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(float(top_p)))
        if value("min_p") is not None:
            self.warpers.append(MinPLogitsWarper(float(value("min_p"))))
        if value("typical_p") is not None and value("typical_p") < 1.0:
            self.warpers.append(TypicalLogitsWarper(float(value("typical_p"))))
        self.generator = torch.Generator()
        seed = settings.get("seed")
        # a seeded request repeats; its choices differ from each other
        self.generator.manual_seed(int(seed) + choice if seed is not None else int(torch.randint(2**62, ()).item()))

    def __call__(self, ids: torch.Tensor, logits: torch.Tensor) -> int:
        """The next token of one sequence: ``ids`` ``(1, t)`` its tokens so far, ``logits`` ``(1, vocabulary)``."""
        if not self.sample:
            return int(logits.argmax(-1))
        scores = self.warpers(ids, logits.float())
        probs = scores.softmax(-1).cpu()
        return int(torch.multinomial(probs, 1, generator=self.generator))


class DecodeBatch:
    """The KV state of the running sequences: one cache, ``mask`` ``(B, L)`` over it (left padding is 0), each
    row's next position and the token it reads next."""

    def __init__(self, llm: torch.nn.Module) -> None:
        self.llm = llm
        # transformers 5.2x names the cache argument ``cache`` (``past_key_values`` is deprecated), earlier ones not
        self._cache_arg = "cache" if "cache" in inspect.signature(llm.forward).parameters else "past_key_values"
        self.clear()

    def clear(self) -> None:
        """No running sequences."""
        self.cache: DynamicCache | None = None
        self.mask = torch.zeros(0, 0, dtype=torch.long)
        self.positions = torch.zeros(0, dtype=torch.long)
        self.tokens = torch.zeros(0, dtype=torch.long)

    def __len__(self) -> int:
        return int(self.mask.shape[0])

    def prefill(self, inputs: FusedInputs) -> tuple[DynamicCache, torch.Tensor]:
        """Run prompts (one left-padded batch; position ids skip the padding): their cache and the logits
        ``(P, vocabulary)`` of each one's last position."""
        cache = DynamicCache(config=self.llm.config)
        out = self.llm(
            **inputs.llm_inputs(),
            position_ids=positions_from_mask(inputs.attention_mask),
            **{self._cache_arg: cache},
            use_cache=True,
            logits_to_keep=1,
        )
        return cache, out.logits[:, -1]

    def add(self, cache: DynamicCache, mask: torch.Tensor, prompts: list[int], tokens: list[int]) -> None:
        """Splice in prefilled prompts (their ``cache`` and left-padded ``mask`` ``(P, T)``) as ``len(tokens)``
        sequences: sequence ``i`` continues prompt ``prompts[i]`` (a request's choices share its prompt) and reads
        ``tokens[i]``, its first generated token, next."""
        device = mask.device
        index = torch.tensor(prompts, dtype=torch.long, device=device)
        new_mask = mask.index_select(0, index)
        start = int((new_mask.sum(0) > 0).nonzero()[0])  # padding columns none of these rows needs
        new_mask = new_mask[:, start:]
        new = [(k.index_select(0, index)[:, :, start:], v.index_select(0, index)[:, :, start:]) for k, v, *_ in cache]
        positions = new_mask.sum(-1)
        if self.cache is None:
            layers, self.mask = [(k.contiguous(), v.contiguous()) for k, v in new], new_mask.contiguous()
            self.positions = positions
        else:
            length = max(self.mask.shape[1], new_mask.shape[1])
            layers = [
                (
                    torch.cat([_left_pad(k, length), _left_pad(nk, length)]),
                    torch.cat([_left_pad(v, length), _left_pad(nv, length)]),
                )
                for (k, v, *_), (nk, nv) in zip(self.cache, new)
            ]
            self.mask = torch.cat([_left_pad(self.mask, length, dim=1), _left_pad(new_mask, length, dim=1)])
            self.positions = torch.cat([self.positions, positions])
        self.cache = DynamicCache(ddp_cache_data=layers)
        self.tokens = torch.cat([self.tokens.to(device), torch.tensor(tokens, dtype=torch.long, device=device)])

    def step(self) -> torch.Tensor:
        """One decode step of every running sequence: the logits ``(B, vocabulary)`` of its next token."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self), 1)], 1)
        out = self.llm(
            input_ids=self.tokens[:, None],
            attention_mask=self.mask,
            position_ids=self.positions[:, None],
            **{self._cache_arg: self.cache},
            use_cache=True,
            logits_to_keep=1,
        )
        self.positions = self.positions + 1
        return out.logits[:, -1]

    def keep(self, rows: list[int]) -> None:
        """Keep these rows (in this order) and drop the others; cut the padding columns no row needs."""
        if not rows:
            self.clear()
            return
        index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        mask = self.mask[index]
        start = int((mask.sum(0) > 0).nonzero()[0])
        assert self.cache is not None
        layers = [(k[index, :, start:].contiguous(), v[index, :, start:].contiguous()) for k, v, *_ in self.cache]
        self.cache = DynamicCache(ddp_cache_data=layers)
        self.mask, self.positions, self.tokens = mask[:, start:], self.positions[index], self.tokens[index]


def _left_pad(tensor: torch.Tensor, length: int, dim: int = 2) -> torch.Tensor:
    """``tensor`` padded with zeros before its entries along ``dim`` (a cache's sequence axis, or a mask's) to
    ``length``."""
    missing = length - tensor.shape[dim]
    if missing == 0:
        return tensor
    pad = [0, 0] * (tensor.dim() - 1 - dim) + [missing, 0]
    return F.pad(tensor, pad)
