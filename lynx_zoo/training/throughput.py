"""Model FLOPs of a Lynx training step, and throughput/MFU logging with Lightning's ``ThroughputMonitor``.

The FLOP count (:func:`lynx_step_flops`), used by the callback and by ``benchmarks/``:

* forward of a part = ``2 x (its parameters) x (tokens through it)`` + attention ``4 x layers x width x T^2`` per
  sequence (scores and weighted sum, causal masking not discounted: the PaLM / Megatron convention);
  vision: every image's tokens; bridge: its latents (the resampler's key/value projections: the vision tokens);
  LLM: text tokens (+ the visual prefix in PT); embeddings are look-ups (0).
* backward = ``2 x forward`` for a part with trainable weights (gradients of inputs and of weights),
  ``1 x forward`` for a frozen part that gradients must cross (the frozen LLM above the first trainable
  module: input gradients only), ``0`` for a frozen part nothing trainable precedes (a frozen vision tower;
  a frozen LLM's layers below the first adapter or cross-attention block in CA).

So a frozen-LLM PT step costs about ``4 x N_llm x T`` (not ``6 N T``, nor ``6 N_trainable T``), a
trainable LLM ``6 x N_llm x T``. It agrees with torch's ``FlopCounterMode`` within 5 % (tests/test_throughput.py;
norms and unmasked attention are counted here). Activation checkpointing adds a forward that the count leaves
out (model FLOPs, not hardware FLOPs).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.callbacks import ThroughputMonitor
from torch import nn

from lynx_zoo.data.packing import PackedRows, samples_in
from lynx_zoo.data.processor import IGNORE_INDEX
from lynx_zoo.llm.layers import decoder_layers

if TYPE_CHECKING:
    import lightning as L

    from lynx_zoo.fusion.base import LynxModel


def _numel(module: nn.Module | None, trainable: bool | None = None) -> int:
    """Parameters of ``module`` (only trainable / only frozen ones if ``trainable`` is set)."""
    if module is None:
        return 0
    return sum(p.numel() for p in module.parameters() if trainable is None or p.requires_grad == trainable)


def _attention(width: int, layers: int, tokens: int, queries: int | None = None) -> float:
    return 4.0 * layers * width * tokens * (tokens if queries is None else queries)


def _cost(frozen_fwd: float, trainable_fwd: float, grad_in: bool, backward: bool) -> float:
    """Forward, plus the backward: input gradients through frozen work where gradients flow in,
    input and weight gradients (2x) for trainable work."""
    if not backward:
        return frozen_fwd + trainable_fwd
    return frozen_fwd * (2 if grad_in else 1) + 3 * trainable_fwd


def vision_forward_flops(vision: nn.Module) -> float:
    """Model FLOPs of the vision tower's forward on one image: every parameter on every token, and attention."""
    tokens = vision.num_tokens
    return 2.0 * _numel(vision) * tokens + _attention(vision.width, len(vision.blocks), tokens)


def lynx_step_flops(
    model: LynxModel,
    batch_size: int,
    text_tokens: int,
    images_per_sample: int = 1,
    backward: bool = True,
    *,
    text_lengths: Sequence[int] | None = None,
    head_tokens: int | None = None,
) -> float:
    """Model FLOPs of one forward (+ backward) of ``batch_size`` samples of ``text_tokens`` tokens with
    ``images_per_sample`` images (video frames) each; the formula is in the module docstring.

    ``text_lengths`` gives each sample's own text tokens instead (samples of packed rows, or the real lengths of a
    padded batch: attention is counted within each sample); ``head_tokens`` the positions the LM head runs on (the
    target tokens, with the answer-only loss; default: every LLM token)."""
    lengths = list(text_lengths) if text_lengths is not None else [text_tokens] * batch_size
    batch_size = len(lengths)
    vision_tokens = model.vision.num_tokens
    images = batch_size * images_per_sample

    # vision tower: every token of every image (attention counted with the frozen or trainable work)
    vision = model.vision
    vision_forward = images * vision_forward_flops(vision)
    vision_trainable = _numel(vision, True) > 0
    frozen = images * 2.0 * _numel(vision, False) * vision_tokens if vision_trainable else vision_forward
    trainable = vision_forward - frozen
    total = _cost(frozen, trainable, False, backward)
    grad_flows = vision_trainable

    # bridge (it declares its output tokens and FLOPs: a resampler's latents read the vision tokens)
    visual_tokens = model.bridge.output_tokens(vision_tokens)
    bridge = images * model.bridge.forward_flops(vision_tokens)
    bridge_trainable = _numel(model.bridge, True) > 0
    total += _cost(0 if bridge_trainable else bridge, bridge if bridge_trainable else 0, grad_flows, backward)
    grad_flows = grad_flows or bridge_trainable

    # LLM: decoder layers in order (adapters and fusion blocks with them), then the output head
    media = visual_tokens * images_per_sample
    tokens = [length + (media if model.media_in_sequence else 0) for length in lengths]
    llm_grad = (grad_flows and model.media_in_sequence) or _numel(model.llm.get_input_embeddings(), True) > 0
    width = model.llm_width
    fusion_blocks = model.fusion_blocks()
    for index, layer in enumerate(decoder_layers(model.llm)):
        block = fusion_blocks.get(index)
        if block is not None:  # a fusion block runs before its layer
            work = sum(block.forward_flops(t, media) for t in tokens)
            block_trainable = _numel(block, True) > 0
            total += _cost(0 if block_trainable else work, work if block_trainable else 0, llm_grad, backward)
            llm_grad = llm_grad or block_trainable or grad_flows
        own = [(p, p.requires_grad) for p in layer.parameters() if block is None or not _holds(block, p)]
        attention = sum(_attention(width, 1, t) for t in tokens)
        frozen = 2.0 * sum(p.numel() for p, t in own if not t) * sum(tokens) + attention
        trainable = 2.0 * sum(p.numel() for p, t in own if t) * sum(tokens)
        total += _cost(frozen, trainable, llm_grad, backward)
        llm_grad = llm_grad or trainable > 0
    head = model.llm.get_output_embeddings()
    through_head = sum(tokens) if head_tokens is None else head_tokens
    frozen, trainable = (2.0 * _numel(head, t) * through_head for t in (False, True))
    return total + _cost(frozen, trainable, llm_grad, backward)


def _holds(module: nn.Module, param: nn.Parameter) -> bool:
    return any(p is param for p in module.parameters())


def batch_size_of(batch: dict[str, Any]) -> int:
    """Samples in a Lynx batch (packed rows hold several each)."""
    return samples_in(batch)


def text_tokens_of(batch: dict[str, Any]) -> int:
    """Real (unpadded) tokens in a Lynx batch: the text, and in packed rows the visual tokens of PT."""
    return int(batch["attention_mask"].sum())


def text_lengths_of(batch: dict[str, Any], model: LynxModel) -> list[int]:
    """Each sample's text tokens in a collated batch, padded or packed."""
    packed = PackedRows.of(batch)
    if packed is None:
        return batch["attention_mask"].sum(1).tolist()
    frames = images_per_sample_of(batch)
    media = model.media_tokens_in_sequence(frames) if frames else 0
    segments = packed.segment_ids
    counts = torch.stack([(segments == k).sum(1) for k in range(1, int(segments.max()) + 1)], 1)
    return [int(c) - media for c in counts.flatten() if c > 0]


def target_tokens_of(batch: dict[str, Any]) -> int:
    """Positions of a batch with a target (those the answer-only loss runs the LM head on)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def images_per_sample_of(batch: dict[str, Any]) -> int:
    """Images (or video frames) per sample: 0 without images."""
    images = batch.get("images")
    if images is not None:
        return int(images.shape[1]) if images.dim() == 5 else 1
    tokens = batch.get("vision_tokens")  # a feature cache's
    if tokens is not None:
        return int(tokens.shape[1]) if tokens.dim() == 4 else 1
    return 0


class LynxThroughputMonitor(ThroughputMonitor):
    """Lightning's ``ThroughputMonitor`` for Lynx batches: logs samples/s, tokens/s (real text tokens), batches/s
    and, where Lightning knows the device's peak (CUDA, TPU) or ``peak_flops`` is given, model FLOPs/s and MFU
    by :func:`lynx_step_flops` (``train/device/mfu`` ...).

    Args:
        window_size: batches in the moving average.
        peak_flops: peak FLOP/s of one device, overriding Lightning's table (e.g. ``989e12`` for dense bf16 on an
            H100 SXM when an FSDP2 bf16 policy computes in bf16 under ``32-true`` trainer precision).
    """

    def __init__(self, window_size: int = 50, peak_flops: float | None = None) -> None:
        super().__init__(batch_size_fn=batch_size_of, length_fn=text_tokens_of, window_size=window_size)
        self.peak_flops = peak_flops

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.peak_flops is not None:
            self.available_flops = int(self.peak_flops)
            for throughput in self._throughputs.values():
                throughput.available_flops = self.available_flops

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        lengths = text_lengths_of(batch, pl_module)
        head = target_tokens_of(batch) if pl_module.answer_only_logits else None
        pl_module.flops_per_batch = lynx_step_flops(
            pl_module, len(lengths), 0, max(1, images_per_sample_of(batch)), text_lengths=lengths, head_tokens=head
        )
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_validation_batch_end(self, *args: Any, **kwargs: Any) -> None:
        """Not measured: validation generates answers, whose FLOPs are not a training step's."""
