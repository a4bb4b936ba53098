"""lmms-eval plugin: a lynx_zoo checkpoint as an lmms-eval model (``--model lynx_zoo``).

With the ``lmms-eval`` extra installed, ``LynxLMMS`` (this module) is a subclass of lmms-eval's
``lmms`` base class; lmms-eval finds it through the entry-point group ``lmms_eval.models``
(:func:`lmms_eval_manifest`), or pass an instance to ``lmms_eval.evaluator.simple_evaluate(model=...)``.
:class:`LynxHarnessModel` is the same adapter without lmms-eval (what ``LynxLMMS`` adds is the base class).

The interface is lmms-eval's (0.7): each request has ``.args``,

* ``generate_until``: ``(context, generation_kwargs, doc_to_visual, doc_id, task, split)``;
* ``loglikelihood``: ``(context, continuation or doc_to_target, doc_to_visual, doc_id, task, split)``;
* ``generate_until_multi_round``: ``(context, generation_kwargs, doc_to_visual, doc_to_text, doc_id, task, split)``,

and ``doc_to_visual(self.task_dict[task][split][doc_id])`` gives the document's images (the
harness fills ``task_dict``). A lynx_zoo model reads one image per prompt, or none.

``loglikelihood`` returns ``(loss, is_greedy)``: the negative log-likelihood of the continuation, as lmms-eval's own
models return a loss, because lmms-eval scores multiple choice with ``argmin`` (its interface docstring says
log-probability; docs/lmms-eval-loglikelihood-bug.md). ``LynxLMMS`` hands each pair to the harness inside a
``GenerationResult``, the one wrapper lmms-eval 0.7's evaluator passes through unchanged (it turns any other
non-text response into its ``str``).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from lynx_zoo.data.processor import Sample
from lynx_zoo.fusion.base import LynxModel
from lynx_zoo.hub import load_model

Request = Any  # an lmms-eval ``Instance``: anything with an ``args`` tuple


class LynxHarnessModel:
    """A lynx_zoo model answering lmms-eval requests.

    Args:
        pretrained: anything :func:`lynx_zoo.load_model` takes: a checkpoint, a variant folder, a variant name or
            ``hf://org/repo`` (or give ``model``).
        model: an already loaded model.
        device: where the model runs (default: CUDA when available).
        batch_size: prompts per ``generate`` / forward call, or ``auto`` (also lmms-eval's ``auto:N``): on a GPU, the
            largest power of two up to ``max_batch_size`` whose longest batch fits in memory; refused elsewhere.
        max_batch_size: the largest batch ``auto`` tries (default 64).
        max_rounds: the most rounds of a multi-round request.
        model_class: the registered model class for checkpoints that do not record one.
        dtype: the LLM's weight dtype (e.g. ``bfloat16``); default: as saved.
    """

    is_simple = True

    def __init__(
        self,
        pretrained: str | None = None,
        model: LynxModel | None = None,
        device: str | None = None,
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        max_rounds: int = 10,
        model_class: str | None = None,
        dtype: str | None = None,
    ) -> None:
        super().__init__()
        if (pretrained is None) == (model is None):
            raise ValueError(
                "lynx_zoo lmms-eval model: give exactly one of `pretrained` (a checkpoint, variant folder or variant "
                "name) or `model`"
            )
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if model is not None:
            self.model = model.eval()
        else:
            self.model = load_model(str(pretrained), device, dtype=dtype, model_class=model_class)
        self.batch_size = self._batch_size(batch_size, int(max_batch_size or 64))
        self.batch_sizes = {"auto": self.batch_size} if str(batch_size).startswith("auto") else {}
        self.max_rounds = int(max_rounds)
        self.task_dict: dict[str, Any] = {}
        self._rank, self._world_size = 0, 1

    # ----------------------------------------------------------------- batch size
    def _batch_size(self, batch_size: int | str, max_batch_size: int) -> int:
        """``batch_size`` as a number: as given, or what ``auto`` finds."""
        text = str(batch_size).strip()
        if text.isdigit() and int(text) > 0:
            return int(text)
        if text != "auto" and not re.fullmatch(r"auto:\d+", text):
            raise ValueError(f"batch_size: expected a positive integer, 'auto' or 'auto:N', got {batch_size!r}")
        device = self.model.device
        if device.type != "cuda":
            raise ValueError(
                f"batch_size={text}: it finds the largest batch that fits in GPU memory, but the model runs on "
                f"{device}; give a number instead, e.g. batch_size=8"
            )
        size = 1 << (max(1, max_batch_size).bit_length() - 1)  # the largest power of two <= max_batch_size
        while size >= 1:
            try:
                self._longest_batch(size)
                return size
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
                size //= 2
        raise RuntimeError(f"batch_size={text}: not even one prompt fits in the memory of {device}")

    @torch.no_grad()
    def _longest_batch(self, size: int) -> None:
        """A forward pass over ``size`` x beams sequences of the longest prompt plus its longest answer."""
        model = self.model
        generation = model.eval_generation
        rows = size * int(generation.get("num_beams") or 1)
        length = model.processor.prompt.max_length + int(generation.get("max_new_tokens") or 64)
        input_ids = torch.full((rows, length), model.tokenizer.eos_token_id, dtype=torch.long, device=model.device)
        side = model.vision_config.image_size
        images = torch.zeros(rows, 3, side, side, device=model.device)
        model(input_ids, torch.ones_like(input_ids), images)
        torch.cuda.synchronize(model.device)

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    # ----------------------------------------------------------------- inputs
    def _doc(self, task: str, split: str, doc_id: int) -> Any:
        try:
            return self.task_dict[task][split][doc_id]
        except (KeyError, IndexError):
            raise KeyError(f"lynx_zoo lmms-eval model: no document {task}/{split}/{doc_id} in task_dict") from None

    @staticmethod
    def _image(visuals: Any, where: str) -> Image.Image | None:
        """The one image of a document's visuals (nested lists flattened), or ``None``."""
        flat: list[Any] = []
        stack = [visuals]
        while stack:
            item = stack.pop()
            if isinstance(item, (list, tuple)):
                stack.extend(reversed(item))
            elif item is not None:
                flat.append(item)
        if not flat:
            return None
        if len(flat) > 1 or not isinstance(flat[0], Image.Image):
            kinds = sorted({type(v).__name__ for v in flat})
            raise ValueError(
                f"{where}: lynx_zoo models read one PIL image per prompt; got {len(flat)} visual(s) of type {kinds}"
            )
        return flat[0].convert("RGB")

    @staticmethod
    def _generation(kwargs: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """transformers ``generate`` settings and the stop strings of lmms-eval generation kwargs.

        Read: ``until``, ``max_new_tokens``, ``temperature``, ``do_sample``, ``top_p``, ``num_beams``;
        other (model-specific) keys that tasks pass are ignored.
        """
        until = kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        temperature = float(kwargs.get("temperature") or 0.0)
        settings: dict[str, Any] = {
            "do_sample": bool(kwargs.get("do_sample", temperature > 0)),
            "num_beams": int(kwargs.get("num_beams") or 1),
        }
        if "max_new_tokens" in kwargs:
            settings["max_new_tokens"] = int(kwargs["max_new_tokens"])
        if settings["do_sample"]:
            settings["temperature"] = temperature or 1.0
            if kwargs.get("top_p") is not None:
                settings["top_p"] = float(kwargs["top_p"])
        return settings, until

    @staticmethod
    def _cut(text: str, until: Sequence[str]) -> str:
        cuts = [text.find(stop) for stop in until if stop and stop in text]
        return text[: min(cuts)] if cuts else text

    def _answer(
        self, items: Sequence[tuple[str, Image.Image | None]], settings: dict[str, Any], until: Sequence[str]
    ) -> list[str]:
        """Answers to ``(context, image)`` pairs (images all given or all ``None``), in batches."""
        answers: list[str] = []
        for start in range(0, len(items), self.batch_size):
            chunk = items[start : start + self.batch_size]
            images = None if chunk[0][1] is None else [image for _, image in chunk]
            answers.extend(self._cut(a, until) for a in self.model.generate(images, [c for c, _ in chunk], **settings))
        return answers

    # ----------------------------------------------------------------- the lmms interface
    def generate_until(self, requests: Sequence[Request]) -> list[str]:
        """Answers to ``(context, generation_kwargs, doc_to_visual, doc_id, task, split)`` requests."""
        groups: dict[tuple[str, bool], list[tuple[int, str, Image.Image | None]]] = {}
        for index, request in enumerate(requests):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            image = self._image(doc_to_visual(self._doc(task, split, doc_id)), f"{task}/{split}/{doc_id}")
            key = (json.dumps(gen_kwargs, sort_keys=True, default=str), image is not None)
            groups.setdefault(key, []).append((index, context, image))
        results: list[str] = [""] * len(requests)
        for (gen_json, _), members in groups.items():
            settings, until = self._generation(json.loads(gen_json))
            answers = self._answer([(c, image) for _, c, image in members], settings, until)
            for (index, _, _), answer in zip(members, answers):
                results[index] = answer
        return results

    def loglikelihood(self, requests: Sequence[Request]) -> list[tuple[float, bool]]:
        """``(loss, is the continuation the greedy one)`` per request, where ``loss`` is ``-log p(continuation |
        context, image)`` (nats, summed over the continuation's tokens): lower is likelier, so lmms-eval's
        ``argmin`` over a question's choices picks the most likely one."""
        items: list[tuple[str, str, Image.Image | None]] = []
        for request in requests:
            if len(request.args) != 6:
                raise ValueError(
                    f"loglikelihood: a request without a document ({request.args!r}); lmms-eval sends these for "
                    "the acc_mutual_info metric, which it scores with argmax over differences of the values its "
                    "multiple-choice scorer minimises (docs/lmms-eval-loglikelihood-bug.md): drop acc_mutual_info "
                    "from the task's metric_list"
                )
            context, target, doc_to_visual, doc_id, task, split = request.args
            doc = self._doc(task, split, doc_id)
            continuation = target if isinstance(target, str) else target(doc)
            items.append((context, str(continuation), self._image(doc_to_visual(doc), f"{task}/{split}/{doc_id}")))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(items)
        for has_image in (False, True):
            indices = [i for i, item in enumerate(items) if (item[2] is not None) == has_image]
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                for index, scored in zip(chunk, self._score([items[i] for i in chunk])):
                    results[index] = scored
        return results

    @torch.no_grad()
    def _score(self, items: Sequence[tuple[str, str, Image.Image | None]]) -> list[tuple[float, bool]]:
        model, tokenizer = self.model, self.model.tokenizer
        sequences, lengths = [], []
        for context, continuation, _ in items:
            prompt_ids = model.processor.encode(Sample(context), with_answer=False)[0]
            answer_ids = tokenizer(continuation, add_special_tokens=False)["input_ids"]
            if not answer_ids:
                raise ValueError(f"loglikelihood: the continuation {continuation!r} has no tokens")
            sequences.append(prompt_ids + answer_ids)
            lengths.append(len(answer_ids))
        width = max(len(s) for s in sequences)
        input_ids = torch.full((len(sequences), width), tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, ids in enumerate(sequences):  # left padding, as the processor pads
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention_mask[row, width - len(ids) :] = 1
        pictures = [image for _, _, image in items if image is not None]  # all or none (grouped by the caller)
        images = (
            torch.stack([model.processor.image_transform(p) for p in pictures]).to(model.device) if pictures else None
        )
        logits = model(input_ids.to(model.device), attention_mask.to(model.device), images).logits  # eval mode (init)
        # text logits are the last `width` positions (a prefix fusion puts the visual tokens first)
        log_probs = torch.log_softmax(logits[:, -width:-1].float(), dim=-1)
        targets = input_ids[:, 1:].to(log_probs.device)
        scored = []
        for row, n in enumerate(lengths):
            token_log_probs = log_probs[row, -n:].gather(-1, targets[row, -n:, None]).squeeze(-1)
            greedy = bool((log_probs[row, -n:].argmax(-1) == targets[row, -n:]).all())
            scored.append((-float(token_log_probs.sum()), greedy))
        return scored

    def generate_until_multi_round(self, requests: Sequence[Request]) -> list[list[str]]:
        """Per request, the answers of each round; ``doc_to_text(doc, previous_output=..., round_idx=...,
        previous_round_info=...)`` gives each later round's ``(visuals, context, terminal, outputs, info)``."""
        results: list[list[str]] = []
        for request in requests:
            context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split = request.args
            doc, where = self._doc(task, split, doc_id), f"{task}/{split}/{doc_id}"
            settings, until = self._generation(gen_kwargs)
            outputs: list[str] = []
            visuals, info = doc_to_visual(doc), None
            for round_idx in range(self.max_rounds):
                if round_idx:
                    visuals, context, terminal, outputs, info = doc_to_text(
                        doc, previous_output=outputs, round_idx=round_idx, previous_round_info=info
                    )
                    outputs = list(outputs)
                    if terminal:
                        break
                outputs.append(self._answer([(context, self._image(visuals, where))], settings, until)[0])
            results.append(outputs)
        return results


def lmms_eval_manifest() -> Any:
    """What lmms-eval's ``lmms_eval.models`` entry point returns: the model ``lynx_zoo``."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="lynx_zoo", simple_class_path=f"{__name__}.LynxLMMS")


@functools.cache
def _lmms_class() -> type:
    from lmms_eval.api.instance import GenerationResult
    from lmms_eval.api.model import lmms

    class LynxLMMS(LynxHarnessModel, lmms):
        __doc__ = LynxHarnessModel.__doc__

        def loglikelihood(self, requests: Sequence[Request]) -> list[Any]:
            """The ``(loss, is_greedy)`` pairs, each inside a ``GenerationResult`` (which lmms-eval 0.7's evaluator
            unwraps to the pair; any other non-text response it turns into a string)."""
            return [GenerationResult(text=pair) for pair in super().loglikelihood(requests)]

    LynxLMMS.__qualname__ = "LynxLMMS"
    return LynxLMMS


def __getattr__(name: str) -> Any:
    """``LynxLMMS``: the adapter as an lmms-eval ``lmms`` subclass (built on first use; needs lmms-eval)."""
    if name == "LynxLMMS":
        return _lmms_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
