"""Scale-out strategies for lynx_zoo models: FSDP2 and FSDP1 set up for the zoo, and checkpoints they write whole.

Everything here is torch.distributed + Lightning; nothing launches processes or shards by itself. What a model
shards and recomputes is the model's own (:mod:`lynx_zoo.fusion.scale_out`); a strategy here only declares how.

* :class:`LynxFSDP2Strategy` is Lightning's ``ModelParallelStrategy`` (FSDP2) with the zoo's defaults: all
  processes in one data-parallel (sharding) dimension, a bf16-compute / fp32-reduce mixed-precision policy
  and a switch for activation checkpointing, declared to the model as its
  :class:`~lynx_zoo.fusion.scale_out.ScaleOutSettings` (``LynxModel.configure_model`` reads them).
* :func:`fsdp1_auto_wrap_policy` is the auto-wrap policy of Lightning's ``FSDPStrategy`` (FSDP1) for the zoo.
"""

from __future__ import annotations

import os
import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy

from lynx_zoo.fusion.scale_out import ScaleOutSettings
from lynx_zoo.llm.layers import InsertedBlock


def _dtype(name: str | None, option: str) -> torch.dtype | None:
    if name is None:
        return None
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"{option}: {name!r} is not a torch dtype (e.g. bfloat16, float16, float32, or null)")
    return value


class LynxFSDP2Strategy(ModelParallelStrategy, ScaleOutSettings):
    """FSDP2 (``fully_shard``) through Lightning's ``ModelParallelStrategy``, set up for the zoo.

    Args:
        data_parallel_size: processes that shard the model between them; ``"auto"``: all of them
            (nodes x devices / ``tensor_parallel_size``).
        tensor_parallel_size: must stay 1 (the zoo applies no tensor parallelism).
        param_dtype: dtype the sharded parameters are all-gathered and computed in (``bfloat16``; ``null``
            keeps each parameter's own dtype). The optimizer keeps fp32 master weights for trainable ones.
        reduce_dtype: dtype gradients are reduce-scattered in (``float32``).
        reshard_after_forward: free each unit's gathered parameters after its forward (ZeRO-3); ``false``
            keeps them until the backward (ZeRO-2-like: less communication, more memory).
        activation_checkpointing: recompute the LLM's decoder layers in the backward pass.
        save_distributed_checkpoint: each rank writes its own shard (a checkpoint folder, staged and swapped
            in whole); ``false`` gathers one full checkpoint file on rank 0 (written by the ``CheckpointIO``).
    """

    def __init__(
        self,
        data_parallel_size: Literal["auto"] | int = "auto",
        tensor_parallel_size: int = 1,
        param_dtype: str | None = "bfloat16",
        reduce_dtype: str | None = "float32",
        reshard_after_forward: bool = True,
        activation_checkpointing: bool = False,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        if tensor_parallel_size != 1:
            raise ValueError(
                f"strategy.tensor_parallel_size: {tensor_parallel_size}; lynx_zoo shards with FSDP2 only, "
                "keep it at 1 (all processes in the data-parallel dimension)"
            )
        super().__init__(
            data_parallel_size=data_parallel_size,
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        self.mp_policy = MixedPrecisionPolicy(
            param_dtype=_dtype(param_dtype, "strategy.param_dtype"),
            reduce_dtype=_dtype(reduce_dtype, "strategy.reduce_dtype"),
        )
        self.reshard_after_forward = reshard_after_forward
        self.activation_checkpointing = activation_checkpointing

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":
            # Lightning's "auto" is one data-parallel group per node; here every process shards
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        """A sharded checkpoint is written to a staging folder beside its target, then swapped in
        (:func:`swap_in_folder`): a save killed midway never leaves a half-written folder under the name."""
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(filepath))
        staging = path.with_name(f".{path.name}.saving")
        if self.global_rank == 0 and staging.exists():
            shutil.rmtree(staging)  # left by an earlier killed save
        self.barrier()
        super().save_checkpoint(checkpoint, staging, storage_options)
        self.barrier()
        if self.global_rank == 0:
            swap_in_folder(staging, path)
        self.barrier()

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        return super().load_checkpoint(surviving_checkpoint(Path(checkpoint_path)), weights_only)


def swap_in_folder(staging: Path, path: Path) -> None:
    """Replace the folder ``path`` by the complete folder ``staging``: the old one is first renamed to
    ``.<name>.old``, so that at every instant one complete checkpoint exists (see :func:`surviving_checkpoint`)."""
    old = path.with_name(f".{path.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if path.exists():
        os.replace(path, old)
    os.replace(staging, path)
    shutil.rmtree(old, ignore_errors=True)


def surviving_checkpoint(path: Path) -> Path:
    """``path``, or the previous checkpoint kept as ``.<name>.old`` if a save was killed between the two
    renames of :func:`swap_in_folder`."""
    old = path.with_name(f".{path.name}.old")
    return old if not path.exists() and old.exists() else path


def local_parameter_count(module: nn.Module) -> tuple[int, int]:
    """``(elements held by this process, elements of the full model)``: the local shards of sharded
    (DTensor) parameters, the whole of the others."""
    local = total = 0
    for p in module.parameters():
        total += p.numel()
        local += p.to_local().numel() if hasattr(p, "to_local") else p.numel()
    return local, total


# ---------------------------------------------------------------------------------------------- FSDP1
def _fsdp1_unit_types() -> tuple[type[nn.Module], ...]:
    from timm.models.eva import EvaBlock
    from timm.models.vision_transformer import Block
    from transformers import PreTrainedModel
    from transformers.modeling_layers import GradientCheckpointingLayer

    from lynx_zoo.bridge.bridges import PerceiverResampler, ResamplerLayer
    from lynx_zoo.vision.encoder import VisionEncoder

    # decoder layers (every transformers 5 decoder layer is a GradientCheckpointingLayer); the blocks inserted into
    # them (adapters, fusion blocks) on their own (FSDP1 flattens one dtype per unit: fp32 beside a bf16 LLM);
    # ViT/EVA blocks, the vision tower, the resampler and its layers, and the whole LLM
    return (
        GradientCheckpointingLayer,
        InsertedBlock,
        Block,
        EvaBlock,
        VisionEncoder,
        ResamplerLayer,
        PerceiverResampler,
        PreTrainedModel,
    )


def fsdp1_auto_wrap_policy(module: nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
    """``auto_wrap_policy`` of Lightning's ``FSDPStrategy`` (FSDP1) for lynx_zoo models: one FSDP unit per
    decoder layer, adapter, cross-attention block, vision block and resampler layer, then the vision tower,
    the resampler and the LLM (the model's root keeps a linear/MLP bridge). Use it with ``use_orig_params:
    true``: frozen and trainable parameters sit side by side."""
    return True if recurse else isinstance(module, _fsdp1_unit_types())
