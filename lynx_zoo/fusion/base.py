"""The shared base of every lynx_zoo model, and the contract a fusion module fills in.

:class:`LynxModel` owns the vision tower, the bridge, the LLM and its adapters, freezing, the optimiser, the
training and validation steps and generation; ``forward`` and ``generate_ids`` are written once, here. A fusion
subclass (:class:`~lynx_zoo.fusion.prefix.PrefixLynx`, :class:`~lynx_zoo.fusion.cross_attn.CrossAttnLynx`, or
one of your own: ``docs/extending.md``) says how the visual tokens enter the LLM by implementing
:meth:`LynxModel.fused`, and declares the blocks it inserts into the LLM in :meth:`LynxModel.fusion_blocks`:
sharding, activation checkpointing, FLOP counting and the model cards read that declaration.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, ClassVar

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from lynx_zoo.adapters import AdapterConfig, insert_adapters
from lynx_zoo.bridge import BridgeConfig, build_bridge
from lynx_zoo.checkpoints import read_torch_checkpoint
from lynx_zoo.data.answers import metric_key, normalize_answer
from lynx_zoo.data.packing import PackedRows, samples_in
from lynx_zoo.data.processor import IGNORE_INDEX, LynxProcessor, PromptConfig, Sample
from lynx_zoo.errors import listed_problems
from lynx_zoo.fusion.scale_out import (
    attached_trainer,
    configure_lynx_model,
    ddp_anchor,
    destroy_process_group_at_exit,
    fill_missing_grads,
)
from lynx_zoo.generation import ImageLike, VideoLike, generation_settings, image_batch, seeded, video_batch
from lynx_zoo.llm import LLMConfig, build_llm, load_tokenizer
from lynx_zoo.llm.layers import InsertedBlock
from lynx_zoo.metrics import CategoryAccuracy
from lynx_zoo.optim import OptimizerConfig, build_optimizer
from lynx_zoo.skipped_samples import SkippedSampleReport
from lynx_zoo.vision import VisionConfig, VisionEncoder, resample_vision_pos_embed

# Checkpoints keep the model's config dataclasses as hyper-parameters; allow exactly these through
# torch's safe (weights-only) unpickler so checkpoints load without arbitrary code execution.
torch.serialization.add_safe_globals(
    [VisionConfig, BridgeConfig, LLMConfig, AdapterConfig, OptimizerConfig, PromptConfig]
    # where older checkpoints name these configs: before adapters.kind existed, and before the optimiser moved out
    # of training/
    + [
        (AdapterConfig, "lynx_zoo.adapters.bottleneck.AdapterConfig"),
        (OptimizerConfig, "lynx_zoo.training.optim.OptimizerConfig"),
    ]
)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip padding: 0, 1, 2, ... over the real tokens of each row (pads get 0)."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


# config fields with which an LLM's logits are more than its output embeddings applied to its last hidden states
# (soft-capping, scaling): such an LLM computes its loss through its own forward, on every position
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def answer_only_loss(hidden: torch.Tensor, labels: torch.Tensor, head: nn.Module) -> torch.Tensor:
    """transformers' causal-LM loss (position ``t`` predicts label ``t + 1``, the mean over target tokens, in fp32),
    with the LM head applied only to the positions that have a target: no ``(batch, length, vocabulary)`` logits."""
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    logits = head(hidden[:, :-1][keep])
    return F.cross_entropy(logits.float(), targets[keep], reduction="sum") / keep.sum()


@dataclass
class VisionTokens:
    """The vision tower's output read from a feature cache instead of computed: ``(B, N, width)`` for images,
    ``(B, T, N, width)`` for videos. :meth:`LynxModel.encode_images` takes it in place of pixels."""

    tokens: torch.Tensor

    @property
    def is_video(self) -> bool:
        return self.tokens.dim() == 4


Media = torch.Tensor | VisionTokens


def media_of(images: torch.Tensor | None, vision_tokens: torch.Tensor | None) -> Media | None:
    """The media of a batch: a feature cache's ``vision_tokens`` stand in for ``images``."""
    return VisionTokens(vision_tokens) if vision_tokens is not None else images


@dataclass
class FusedInputs:
    """What the LLM reads once a fusion has put the visual tokens in: token ids *or* input embeddings (a sequence
    that may start with visual tokens, which take no loss), and the attention mask over that sequence.

    ``position_ids`` are set for packed rows (several samples per row, :mod:`lynx_zoo.data.packing`): each sample's
    own positions, restarting at 0; the LLM then gets no 2-D mask and keeps attention inside each sample."""

    attention_mask: torch.Tensor
    input_ids: torch.Tensor | None = None
    inputs_embeds: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None

    def llm_inputs(self) -> dict[str, torch.Tensor]:
        """The keyword arguments of the LLM's ``forward``/``generate`` these stand for."""
        inputs = {"attention_mask": self.attention_mask}
        if self.inputs_embeds is not None:
            return {**inputs, "inputs_embeds": self.inputs_embeds}
        return {**inputs, "input_ids": self.input_ids}

    def forward_inputs(self) -> dict[str, torch.Tensor | None]:
        """The keyword arguments of a training forward: the position ids follow the mask (padding skipped), or are
        the packed rows' own, which transformers reads as separate sequences when no 2-D mask is given."""
        inputs: dict[str, torch.Tensor | None] = self.llm_inputs()
        if self.position_ids is None:
            return {**inputs, "position_ids": positions_from_mask(self.attention_mask)}
        return {**inputs, "attention_mask": None, "position_ids": self.position_ids}


class LynxModel(L.LightningModule):
    """Vision tower -> bridge -> LLM (+ adapters); subclasses choose how the visual tokens are fused.

    Args:
        vision: the vision tower (any timm ViT).
        bridge: the vision-to-LLM bridge (Perceiver resampler or a projector).
        llm: the causal LM (any HF model) and its tokenizer.
        adapters: adapters in the LLM's decoder layers: Lynx's bottleneck adapters or LoRA (kind, placement, size).
        optimizer: AdamW and the warmup + linear decay schedule.
        prompt: the prompt format and text length limit.
        eval_generation: ``generate`` settings of validation answers and the model's default (greedy by default).
        init_from: a lynx_zoo checkpoint whose weights start this run (weights only: fresh optimiser
            and schedule), e.g. stage 2 from stage 1 or 420 px from 224 px (the vision position
            embeddings are resampled to this model's resolution).
    """

    #: the fusion's short name in model cards and messages (``"PT"``), and what kind of fusion it is (a card tag)
    label: ClassVar[str] = "fusion"
    kind: ClassVar[str] = "fusion"
    #: whether the LLM reads the visual tokens inside its input sequence (PT) rather than beside it (CA)
    media_in_sequence: ClassVar[bool] = False
    #: whether :meth:`fused` takes packed rows (its ``packed`` argument, :class:`~lynx_zoo.data.packing.PackedRows`)
    supports_packing: ClassVar[bool] = False

    def __init__(
        self,
        vision: VisionConfig | None = None,
        bridge: BridgeConfig | None = None,
        llm: LLMConfig | None = None,
        adapters: AdapterConfig | None = None,
        optimizer: OptimizerConfig | None = None,
        prompt: PromptConfig | None = None,
        eval_generation: dict[str, Any] | None = None,
        init_from: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.vision_config = vision or VisionConfig()
        self.bridge_config = bridge or BridgeConfig()
        self.llm_config = llm or LLMConfig()
        self.adapter_config = adapters or AdapterConfig()
        self.optimizer_config = optimizer or OptimizerConfig()
        self.eval_generation = {"max_new_tokens": 16, "num_beams": 1, "do_sample": False, **(eval_generation or {})}

        self.vision = VisionEncoder(self.vision_config)
        tokenizer = load_tokenizer(self.llm_config)
        self.llm = build_llm(self.llm_config, tokenizer)
        self.llm_width: int = self.llm.config.hidden_size
        if self.adapter_config.kind == "lora" and self.llm_config.trainable:
            raise ValueError(
                "adapters.kind: lora trains low-rank updates of a frozen LLM, but llm.trainable is true (the whole "
                "LLM trains): set llm.trainable: false for LoRA, or use adapters.kind: bottleneck"
            )
        # by decoder layer, the modules that hold each layer's adapter weights
        self.adapter_blocks: dict[int, nn.Module] = insert_adapters(self.llm, self.adapter_config, self.llm_width)
        self.adapter_layers = sorted(self.adapter_blocks)
        self.bridge = build_bridge(self.bridge_config, self.vision.width, self.llm_width)
        # Lynx's video encoding: a learned embedding per frame, added to that frame's tokens
        self.frame_position = nn.Parameter(torch.zeros(1, self.vision_config.num_frames, 1, self.vision.width))
        nn.init.trunc_normal_(self.frame_position, std=0.02)
        self.processor = LynxProcessor(
            tokenizer, prompt or PromptConfig(), self.vision.image_transform(), self.vision.train_image_transform()
        )
        self.val_accuracy: CategoryAccuracy | None = None  # built once the DataModule names its categories
        self.init_from = init_from
        transforms = [f for f in LOGIT_TRANSFORMS if getattr(self.llm.config, f, None) not in (None, 1, 1.0)]
        #: the training loss applies the LM head to the target positions only (else through the LLM's own forward)
        self.answer_only_logits = not transforms
        if transforms:
            warnings.warn(
                f"{type(self.llm).__name__} transforms its logits ({', '.join(transforms)}): its loss is computed on "
                "the logits of every position, through its own forward",
                stacklevel=2,
            )

    # ----------------------------------------------------------------- the part a fusion module writes
    def fused(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, media: torch.Tensor | None, **fusion_inputs: Any
    ) -> AbstractContextManager[FusedInputs]:
        """How the visual tokens enter the LLM: a context in which the LLM reads the returned :class:`FusedInputs`.

        Args:
            input_ids: left-padded text ids ``(B, T)``.
            attention_mask: their mask.
            media: images ``(B, 3, H, W)``, videos ``(B, F, 3, H, W)``, the tower's tokens of either from a feature
                cache (:class:`VisionTokens`), or ``None`` (text only); turn them into visual tokens with
                :meth:`encode_images`.
            fusion_inputs: extra inputs of this fusion (``forward`` passes on its extra keyword arguments). A fusion
                that declares ``supports_packing`` gets ``packed`` (:class:`~lynx_zoo.data.packing.PackedRows`) for a
                packed batch: rows of several samples, one media item per sample in row order.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement fused (how visual tokens enter the LLM)")

    def fusion_blocks(self) -> dict[int, InsertedBlock]:
        """The blocks this fusion inserts into the LLM, by decoder layer: each is its own FSDP unit, runs inside its
        layer's activation-checkpointed region, and is counted in FLOPs and in the model card."""
        return {}

    # ----------------------------------------------------------------- forward and generation, for every fusion
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        images: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        *,
        vision_tokens: torch.Tensor | None = None,
        packed: PackedRows | None = None,
        return_logits: bool = False,
        **fusion_inputs: Any,
    ) -> CausalLMOutputWithPast:
        """The loss on the answer tokens when ``labels`` are given, the logits when there are none (or
        ``return_logits``).

        With labels, the LM head runs on the positions that have a target only (the loss equals transformers' own:
        the mean over target tokens, position ``t`` predicting label ``t + 1``); ``return_logits`` computes every
        position's logits and the loss from them, through the LLM's own forward. ``vision_tokens`` (a feature
        cache's) stand in for ``images``; ``packed`` says where the samples of packed rows sit.
        """
        if packed is not None:
            if not self.supports_packing:
                raise ValueError(f"{type(self).__name__} does not take packed batches (its supports_packing is off)")
            fusion_inputs["packed"] = packed
        with self.fused(input_ids, attention_mask, media_of(images, vision_tokens), **fusion_inputs) as inputs:
            mask = inputs.attention_mask
            if labels is not None and mask.shape[1] > labels.shape[1]:  # visual tokens before the text: no loss
                prefix = labels.new_full((labels.shape[0], mask.shape[1] - labels.shape[1]), IGNORE_INDEX)
                labels = torch.cat([prefix, labels], 1)
            llm_inputs = inputs.forward_inputs()
            if labels is None or return_logits or not self.answer_only_logits:
                return self.llm(**llm_inputs, labels=labels, use_cache=False)
            hidden = self.llm.get_decoder()(**llm_inputs, use_cache=False).last_hidden_state
            return CausalLMOutputWithPast(loss=answer_only_loss(hidden, labels, self.llm.get_output_embeddings()))

    def generate_ids(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, images: Media | None, **kwargs: Any
    ) -> torch.Tensor:
        """Newly generated token ids for left-padded prompts: transformers ``generate`` arguments in ``kwargs``, and
        ``seed`` (sampling inside repeats; torch's generators are given back their state afterwards)."""
        seed = kwargs.pop("seed", None)
        with seeded(seed, self.device), self.fused(input_ids, attention_mask, images) as inputs:
            ids = self.llm.generate(
                **inputs.llm_inputs(),
                pad_token_id=self.tokenizer.pad_token_id,
                eos_token_id=self.tokenizer.eos_token_id,
                **kwargs,
            )
        # from token ids transformers returns the prompt too; from embeddings, only what it generated
        return ids if inputs.input_ids is None else ids[:, inputs.input_ids.shape[1] :]

    def encode_images(self, images: Media) -> torch.Tensor:
        """Visual tokens ``(B, Q, llm_width)`` of images ``(B, 3, H, W)`` or videos ``(B, T, 3, H, W)``, or of the
        tower's tokens of either read from a feature cache (:class:`VisionTokens`: the tower does not run).

        A video's frames go through the tower one by one; each frame's tokens get its frame-position
        embedding and the ``T x N`` tokens go into the bridge together (Lynx), which returns ``Q``.
        """
        cached = isinstance(images, VisionTokens)
        video = images.is_video if cached else images.dim() == 5
        frames = images.tokens.shape[1] if cached else images.shape[1]
        if video and frames != self.vision_config.num_frames:
            raise ValueError(
                f"videos of {frames} frames for a model with vision.num_frames="
                f"{self.vision_config.num_frames}: sample the clips with that many frames"
            )
        if cached:
            tokens = images.tokens.to(self.frame_position.dtype)
            if tuple(tokens.shape[-2:]) != (self.vision.num_tokens, self.vision.width):
                raise ValueError(
                    f"cached vision tokens of shape {tuple(tokens.shape[-2:])} for a tower that makes "
                    f"{(self.vision.num_tokens, self.vision.width)} (tokens, width) per image: another tower's cache?"
                )
        else:
            with torch.set_grad_enabled(self.vision_config.trainable and torch.is_grad_enabled()):
                tokens = self.vision(images.flatten(0, 1) if video else images)
            if video:
                tokens = tokens.unflatten(0, images.shape[:2])
        if video:
            tokens = (tokens + self.frame_position).flatten(1, 2)
        return self.bridge(tokens).to(self.llm.dtype)

    def media_tokens_in_sequence(self, frames: int) -> int:
        """LLM sequence positions the media of one sample takes, for an image (``frames=1``) or a video of
        ``frames`` frames: its visual tokens when the fusion reads them in the sequence (PT), else 0 (CA)."""
        if not self.media_in_sequence:
            return 0
        return self.bridge.output_tokens(self.vision.num_tokens * frames)

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    def decode(self, ids: torch.Tensor) -> list[str]:
        return [t.strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    @torch.no_grad()
    def generate(
        self,
        images: Sequence[ImageLike] | torch.Tensor | None = None,
        prompts: Sequence[str] | str | None = None,
        *,
        videos: Sequence[VideoLike] | torch.Tensor | None = None,
        preset: str | None = None,
        **generation_kwargs: Any,
    ) -> list[str]:
        """Answer a batch of prompts about images, videos, or nothing (text only).

        Args:
            images: one per prompt: PIL images, image file paths, transformed ``(3, H, W)`` tensors, or a
                transformed batch ``(B, 3, H, W)``.
            prompts: the instructions (a single string is a batch of one).
            videos: one per prompt, instead of ``images``: video files (``vision.num_frames`` frames sampled at
                segment centres), frame lists, or a transformed batch ``(B, T, 3, H, W)``.
            preset: named settings from :data:`lynx_zoo.generation.GENERATION_PRESETS` over the model's own
                ``eval_generation`` (the default when no preset is named): ``lynx``, the released Lynx evaluation
                (5-beam sampling seeded with 42); ``lynx-beam``, the same beams without sampling; ``greedy``.
            generation_kwargs: transformers ``generate`` arguments (``num_beams``, ``do_sample``,
                ``max_new_tokens``, ...); they override the preset. The KV cache is on. ``seed=N`` seeds torch's
                generators for this call (and restores them after), so sampled answers repeat; ``seed=None``
                samples from the generators as they are.
        """
        if prompts is None:
            raise TypeError("generate: `prompts` is required (one instruction per image/video)")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts and (images is None or len(images) == 0) and (videos is None or len(videos) == 0):
            return []  # an empty batch has no answers
        if images is not None and videos is not None:
            raise ValueError("generate: a batch holds images or videos, not both; call generate once for each")
        transform = self.processor.image_transform
        media = None
        if images is not None:
            media = image_batch(images, transform)
        elif videos is not None:
            media = video_batch(videos, transform, self.vision_config.num_frames)
        if media is not None and len(media) != len(prompts):
            kind = "videos" if videos is not None else "images"
            raise ValueError(f"generate: {len(media)} {kind} for {len(prompts)} prompts")
        batch = self.processor.prompts([Sample(p) for p in prompts])
        kwargs = generation_settings(preset, self.eval_generation, generation_kwargs)
        seed = kwargs.pop("seed", None)
        was_training = self.training
        self.eval()
        try:
            with seeded(seed, self.device):
                ids = self.generate_ids(
                    batch["input_ids"].to(self.device),
                    batch["attention_mask"].to(self.device),
                    None if media is None else media.to(self.device),
                    **kwargs,
                )
        finally:
            self.train(was_training)
        return self.decode(ids)

    # ----------------------------------------------------------------- set-up, weights, training
    def setup(self, stage: str) -> None:
        destroy_process_group_at_exit()  # a multi-process run (DDP, FSDP) must not abort at exit on gloo
        # before Lightning restores a checkpoint of this run (resume), so a resumed run keeps its own weights
        if stage == "fit" and self.init_from:
            self.load_weights(self.init_from)
            self.init_from = None  # once: a second fit() must not go back to the starting weights
        categories = getattr(getattr(attached_trainer(self), "datamodule", None), "categories", None)
        keys = sorted({metric_key(c) for c in categories or []})
        if keys and (self.val_accuracy is None or self.val_accuracy.categories != keys):
            self.val_accuracy = CategoryAccuracy(keys).to(self.device)

    def configure_model(self) -> None:
        """Scale-out hook (after ``setup``, so after ``init_from``): activation checkpointing of the decoder
        layers and FSDP2 sharding when the strategy asks for them (:mod:`lynx_zoo.fusion.scale_out`)."""
        configure_lynx_model(self)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # the weights come from this checkpoint: never re-initialise them from `init_from`
        self.init_from = None

    def train(self, mode: bool = True) -> LynxModel:
        """Train mode for the trainable parts; a frozen LLM stays in eval mode (no dropout), its adapters follow
        ``mode`` (LoRA's dropout)."""
        super().train(mode)
        if not self.llm_config.trainable:
            self.llm.eval()
            for adapter in self.adapter_blocks.values():
                adapter.train(mode)
        return self

    def load_weights(self, path: str) -> None:
        """Initialise from another lynx_zoo checkpoint's weights, resampling vision position embeddings, or from a
        folder in transformers' LLaVA layout (:mod:`lynx_zoo.fusion.llava_import`: tower, projector and LLM)."""
        from lynx_zoo.fusion.llava_import import is_llava_folder, lynx_state_from_llava

        if is_llava_folder(path):
            state = lynx_state_from_llava(path, len(self.vision.blocks))
        else:
            state = read_torch_checkpoint(path)  # an unreadable file is an error naming it
            state = state.get("state_dict", state)
        resample_vision_pos_embed(state, self.vision, prefix="vision.")
        own = self.state_dict()
        mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
        unexpected = [k for k in state if k not in own]
        problems = listed_problems(("shape mismatches", mismatched), ("unknown keys", unexpected))
        if problems:
            raise ValueError(
                f"init_from {path}: does not fit this model: {problems} (a different fusion, bridge or LLM?)"
            )
        self.load_state_dict(state, strict=False)

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer, scheduler = build_optimizer(
            self.trainable_parameters(), self.trainer.estimated_stepping_batches, self.optimizer_config
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        size = batch["input_ids"].shape[0]
        trainer = attached_trainer(self)
        distributed = trainer is not None and trainer.world_size > 1
        if size == 0:  # every sample was unreadable
            if not distributed:
                return None  # nothing to learn from, and no other process waits for this one
            # this rank must still take part in the collectives the others run (DDP's all-reduce, FSDP's
            # all-gathers and reduce-scatters, in the same order): a placeholder sample's loss, weighted 0
            loss = self(**self.placeholder_batch()).loss * 0.0
        else:
            loss = self(**model_inputs(batch)).loss
            self.log("train/loss", loss, prog_bar=True, batch_size=samples_in(batch))
        if isinstance(trainer and trainer.strategy, DDPStrategy):
            loss = ddp_anchor(loss, self.trainable_parameters())
        return loss

    def placeholder_batch(self) -> dict[str, torch.Tensor]:
        """One sample that runs every part of the model as a training batch does: a blank image and two tokens, the
        second a target."""
        first = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.tokenizer.pad_token_id
        ids = torch.tensor([[first, self.tokenizer.eos_token_id]], device=self.device)
        size = self.vision_config.image_size
        return {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "images": torch.zeros(1, 3, size, size, device=self.device),
            "labels": torch.tensor([[IGNORE_INDEX, self.tokenizer.eos_token_id]], device=self.device),
        }

    def configure_callbacks(self) -> list[L.Callback]:
        """The callbacks every lynx_zoo run has: counts of unreadable and truncated samples."""
        return [SkippedSampleReport()]

    def on_after_backward(self) -> None:
        fill_missing_grads(self.trainable_parameters())

    # ----------------------------------------------------------------- validation: generated answers
    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        size = batch["input_ids"].shape[0]
        if size == 0:
            return
        loss = self(**model_inputs(batch)).loss
        self.log("val/loss", loss, prog_bar=True, batch_size=samples_in(batch), sync_dist=True)
        if self.val_accuracy is None:
            return  # the DataModule declares no categories: the loss is the validation
        histories = batch.get("histories") or [[] for _ in batch["instructions"]]
        prompts = self.processor.prompts([Sample(q, history=h) for q, h in zip(batch["instructions"], histories)])
        ids = self.generate_ids(
            prompts["input_ids"].to(self.device),
            prompts["attention_mask"].to(self.device),
            media_of(batch.get("images"), batch.get("vision_tokens")),
            **self.eval_generation,
        )
        correct = [normalize_answer(p) == normalize_answer(a) for p, a in zip(self.decode(ids), batch["answers"])]
        self.val_accuracy.update(correct, [metric_key(c) for c in batch["categories"]])

    def on_validation_epoch_end(self) -> None:
        if self.val_accuracy is None:
            return
        with warnings.catch_warnings():  # a rank that saw no batch still joins the sync
            warnings.filterwarnings("ignore", message=".*compute.*before.*update.*")
            accuracy = self.val_accuracy.compute()
        for category, value in accuracy.items():
            if category != "overall" and torch.isfinite(value):
                self.log(f"val/acc/{category}", value)
        self.val_accuracy.reset()


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of :meth:`LynxModel.forward` for a collated training batch (padded or packed, pixels or
    cached vision tokens)."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    inputs["images"] = batch.get("images")
    if batch.get("vision_tokens") is not None:
        inputs["vision_tokens"] = batch["vision_tokens"]
    packed = PackedRows.of(batch)
    if packed is not None:
        inputs["packed"] = packed
    return inputs
