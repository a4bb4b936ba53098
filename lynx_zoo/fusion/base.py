"""The shared base of every lynx_zoo model.

:class:`LynxModel` owns everything but the fusion: the vision tower, the bridge, the LLM and its
adapters, freezing, the optimiser, the training/validation loops, generation and metrics. A fusion
subclass (:class:`~lynx_zoo.fusion.prefix.PrefixLynx`, ...) says only how visual tokens enter the LLM,
by implementing :meth:`LynxModel.forward` and :meth:`LynxModel.generate_ids`.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torchmetrics import MeanMetric
from transformers.modeling_outputs import CausalLMOutputWithPast

from lynx_zoo.adapters import AdapterConfig, insert_adapters
from lynx_zoo.bridge import BridgeConfig, build_bridge
from lynx_zoo.data.answers import metric_key, normalize_answer
from lynx_zoo.data.processor import LynxProcessor, PromptConfig, Sample
from lynx_zoo.generation import ImageLike, VideoLike, generation_settings, image_batch, seeded, video_batch
from lynx_zoo.llm import LLMConfig, build_llm, load_tokenizer
from lynx_zoo.training.optim import OptimizerConfig, build_optimizer
from lynx_zoo.vision import VisionConfig, VisionEncoder, resample_vision_pos_embed

# Checkpoints keep the model's config dataclasses as hyper-parameters; allow exactly these through
# torch's safe (weights-only) unpickler so checkpoints load without arbitrary code execution.
torch.serialization.add_safe_globals(
    [VisionConfig, BridgeConfig, LLMConfig, AdapterConfig, OptimizerConfig, PromptConfig]
)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip padding: 0, 1, 2, ... over the real tokens of each row (pads get 0)."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


class LynxModel(L.LightningModule):
    """Vision tower -> bridge -> LLM (+ adapters); subclasses choose how the visual tokens are fused.

    Args:
        vision: the vision tower (any timm ViT).
        bridge: the vision-to-LLM bridge (Perceiver resampler or a projector).
        llm: the causal LM (any HF model) and its tokenizer.
        adapters: bottleneck adapters in the LLM's decoder layers (placement and size).
        optimizer: AdamW and the warmup + linear decay schedule.
        prompt: the prompt format and text length limit.
        eval_generation: ``generate`` settings for validation answers (greedy by default).
        init_from: a lynx_zoo checkpoint whose weights start this run (weights only: fresh optimiser
            and schedule), e.g. stage 2 from stage 1 or 420 px from 224 px (the vision position
            embeddings are resampled to this model's resolution).
    """

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
        self.adapter_layers = insert_adapters(self.llm, self.adapter_config, self.llm_width)
        self.bridge = build_bridge(self.bridge_config, self.vision.width, self.llm_width)
        # Lynx's video encoding: a learned embedding per frame, added to that frame's tokens
        self.frame_position = nn.Parameter(torch.zeros(1, self.vision_config.num_frames, 1, self.vision.width))
        nn.init.trunc_normal_(self.frame_position, std=0.02)
        self.processor = LynxProcessor(
            tokenizer, prompt or PromptConfig(), self.vision.image_transform(), self.vision.train_image_transform()
        )
        self.val_accuracy = nn.ModuleDict()
        self.skipped_samples: Counter = Counter()  # this epoch's unreadable samples by source/reason (this rank)
        self.init_from = init_from

    def setup(self, stage: str) -> None:
        # before Lightning restores a checkpoint of this run (resume), so a resumed run keeps its own weights
        if stage == "fit" and self.init_from:
            self.load_weights(self.init_from)
            self.init_from = None  # once: a second fit() must not go back to the starting weights

    def configure_model(self) -> None:
        """Scale-out hook (after ``setup``, so after ``init_from``): activation checkpointing of the decoder
        layers and FSDP2 sharding when the strategy asks for them (:mod:`lynx_zoo.training.distributed`)."""
        from lynx_zoo.training.distributed import configure_lynx_model

        configure_lynx_model(self)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # the weights come from this checkpoint: never re-initialise them from `init_from`
        self.init_from = None

    def train(self, mode: bool = True) -> LynxModel:
        """Train mode for the trainable parts; a frozen LLM stays in eval mode (no dropout)."""
        super().train(mode)
        if not self.llm_config.trainable:
            self.llm.eval()
        return self

    def load_weights(self, path: str) -> None:
        """Initialise from another lynx_zoo checkpoint's weights, resampling vision position embeddings."""
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
        resample_vision_pos_embed(state, self.vision, prefix="vision.")
        own = self.state_dict()
        mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
        unexpected = [k for k in state if k not in own]
        if mismatched or unexpected:
            raise ValueError(
                f"init_from {path}: does not fit this model: shape mismatches {mismatched[:5]}, "
                f"unknown keys {unexpected[:5]} (a different fusion, bridge or LLM?)"
            )
        self.load_state_dict(state, strict=False)

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    # ----------------------------------------------------------------- the part a fusion module writes
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        images: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> CausalLMOutputWithPast:
        """LLM outputs (logits, and the loss on answer tokens if ``labels`` are given)."""
        raise NotImplementedError(f"{type(self).__name__} must implement forward (how visual tokens enter the LLM)")

    def generate_ids(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, images: torch.Tensor | None, **kwargs: Any
    ) -> torch.Tensor:
        """Newly generated token ids for left-padded prompts."""
        raise NotImplementedError(f"{type(self).__name__} must implement generate_ids")

    # ----------------------------------------------------------------- shared parts
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Visual tokens ``(B, Q, llm_width)`` of images ``(B, 3, H, W)`` or videos ``(B, T, 3, H, W)``.

        A video's frames go through the tower one by one; each frame's tokens get its frame-position
        embedding and the ``T x N`` tokens go into the bridge together (Lynx), which returns ``Q``.
        """
        video = images.dim() == 5
        if video and images.shape[1] != self.vision_config.num_frames:
            raise ValueError(
                f"videos of {images.shape[1]} frames for a model with vision.num_frames="
                f"{self.vision_config.num_frames}: sample the clips with that many frames"
            )
        with torch.set_grad_enabled(self.vision_config.trainable and torch.is_grad_enabled()):
            tokens = self.vision(images.flatten(0, 1) if video else images)
        if video:
            tokens = (tokens.unflatten(0, images.shape[:2]) + self.frame_position).flatten(1, 2)
        return self.bridge(tokens).to(self.llm.dtype)

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer, scheduler = build_optimizer(
            self.trainable_parameters(), self.trainer.estimated_stepping_batches, self.optimizer_config
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _step_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        return self(batch["input_ids"], batch["attention_mask"], batch.get("images"), batch["labels"]).loss

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        self.skipped_samples.update(batch.get("skipped", {}))
        size = batch["input_ids"].shape[0]
        if size == 0:  # every sample of this batch was unreadable: nothing to learn from
            return None
        loss = self._step_loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        if self._trainer is not None and isinstance(self._trainer.strategy, DDPStrategy):
            loss = loss + 0.0 * sum(p.sum() for p in self.unused_parameters(batch.get("images")))
        for key in ("skipped", "truncated"):
            value = float(batch.get(f"num_{key}", 0))
            self.log(
                f"data/{key}", value, reduce_fx="sum", on_step=False, on_epoch=True, batch_size=size, sync_dist=True
            )
        return loss

    def on_after_backward(self) -> None:
        """Trainable parameters the step left out get an exact zero gradient, as DDP's anchor gives them, so
        every strategy updates alike and the optimizer keeps state for every trainable parameter (which a
        sharded checkpoint expects when a run resumes)."""
        for _, param in self.trainable_parameters():
            if param.grad is None:
                param.grad = torch.zeros_like(param)

    def unused_parameters(self, images: torch.Tensor | None) -> list[nn.Parameter]:
        """Trainable parameters a batch leaves out: the frame embedding without videos; the vision side, the
        bridge and the cross-attention blocks' attention without any media (text-only data; their gated
        feed-forward still runs). The training loss adds them times 0 under DDP, which expects a gradient for
        every trainable parameter at every step (FSDP does not)."""
        if images is None:
            return [
                p
                for n, p in self.trainable_parameters()
                if not n.startswith("llm.") or (".gated_xattn." in n and ".gated_xattn.ff" not in n)
            ]
        return [self.frame_position] if images.dim() == 4 and self.frame_position.requires_grad else []

    def on_train_epoch_end(self) -> None:
        """Sum the epoch's skipped samples over ranks; log and summarise them by source and reason."""
        counts = Counter(self.skipped_samples)
        self.skipped_samples.clear()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[dict[str, int]] = [{} for _ in range(torch.distributed.get_world_size())]
            torch.distributed.all_gather_object(gathered, dict(counts))
            counts = sum((Counter(g) for g in gathered), Counter())
        for key, count in sorted(counts.items()):
            self.log(f"data/skipped/{key}", float(count), rank_zero_only=True)
        if counts:
            listed = ", ".join(f"{key}: {count}" for key, count in sorted(counts.items()))
            rank_zero_info(f"epoch {self.current_epoch}: skipped {sum(counts.values())} unreadable samples ({listed})")

    def on_validation_epoch_start(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        for category in getattr(datamodule, "categories", []):
            key = metric_key(category)
            if key not in self.val_accuracy:
                self.val_accuracy[key] = MeanMetric().to(self.device)

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        size = batch["input_ids"].shape[0]
        if size == 0:
            return
        self.log("val/loss", self._step_loss(batch), prog_bar=True, batch_size=size, sync_dist=True)
        histories = batch.get("histories") or [[] for _ in batch["instructions"]]
        samples = [Sample(q, history=h) for q, h in zip(batch["instructions"], histories)]
        prompts = self.processor.prompts(samples)
        settings = dict(self.eval_generation)
        with seeded(settings.pop("seed", None), self.device):
            ids = self.generate_ids(
                prompts["input_ids"].to(self.device),
                prompts["attention_mask"].to(self.device),
                batch.get("images"),
                **settings,
            )
        predictions = self.decode(ids)
        for prediction, answer, category in zip(predictions, batch["answers"], batch["categories"]):
            key = metric_key(category)
            if key not in self.val_accuracy:
                raise KeyError(f"validation category {key!r} was not declared by the DataModule's `categories`")
            self.val_accuracy[key].update(float(normalize_answer(prediction) == normalize_answer(answer)))

    def on_validation_epoch_end(self) -> None:
        # every rank computes every metric (compute() syncs across processes), seen or not
        for key, metric in self.val_accuracy.items():
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*compute.*before.*update.*")
                value = metric.compute()
            if torch.isfinite(value):
                self.log(f"val/acc/{key}", value)
            metric.reset()

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
            preset: named settings from :data:`lynx_zoo.generation.GENERATION_PRESETS` (``lynx``: the released
                Lynx evaluation, 5-beam sampling seeded with 42; ``lynx-beam``: the same beams without sampling;
                ``greedy``); the model's ``eval_generation`` fills the rest.
            generation_kwargs: transformers ``generate`` arguments (``num_beams``, ``do_sample``,
                ``max_new_tokens``, ...); they override the preset. The KV cache is on. ``seed=N`` seeds torch's
                generators for this call (and restores them after), so sampled answers repeat; ``seed=None``
                samples from the generators as they are.
        """
        if prompts is None:
            raise TypeError("generate: `prompts` is required (one instruction per image/video)")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
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
