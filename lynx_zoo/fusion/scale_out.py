"""How a :class:`~lynx_zoo.fusion.base.LynxModel` scales out: its FSDP2 units, activation checkpointing of its
decoder layers, and the distributed-training hooks its Lightning methods call.

The model owns this knowledge (which modules are units, which blocks ride inside a checkpointed layer), as a
model in torchtitan owns its ``parallelize``; the strategies that ask for it live in
:mod:`lynx_zoo.training.distributed` and reach the model through the hooks Lightning calls (``configure_model``,
``setup``, ``training_step``, ``on_after_backward``) and the settings they declare (:class:`ScaleOutSettings`).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Protocol

import lightning as L
import torch
from torch import nn

# torch's composable activation checkpointing (pytorch/pytorch#87664: hooks, names and types kept) has no public
# path yet; torch's public alternative, a CheckpointWrapper module, would rename every parameter (see
# NVIDIA-NeMo/Automodel#2956 on the same choice)
from torch.distributed._composable import checkpoint
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from lynx_zoo.llm.layers import InsertedBlock, decoder_layers, rehook_attached_blocks

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh


class ScalableModel(Protocol):
    """What scaling out reads of a model (:class:`~lynx_zoo.fusion.base.LynxModel` has it): its parts, its fusion
    blocks, the device mesh a strategy gave it and its parameters."""

    vision: nn.Module
    bridge: nn.Module
    llm: nn.Module
    device_mesh: DeviceMesh | None

    def fusion_blocks(self) -> dict[int, InsertedBlock]: ...

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]: ...


class ScaleOutSettings:
    """What a strategy declares to :func:`configure_lynx_model` (the zoo's
    :class:`~lynx_zoo.training.distributed.LynxFSDP2Strategy` does): its FSDP2 mixed-precision policy, whether each
    unit frees its gathered parameters after its forward, and whether the decoder layers are recomputed."""

    mp_policy: MixedPrecisionPolicy
    reshard_after_forward: bool
    activation_checkpointing: bool


def sharding_units(model: ScalableModel) -> list[nn.Module | list[nn.Module]]:
    """The FSDP2 units of a Lynx model, innermost first (``fully_shard`` must see children before parents).

    Each vision block, bridge layer, fusion block (:meth:`LynxModel.fusion_blocks`; its own unit: a block that runs
    before its decoder layer does so before the layer's unshard) and decoder layer (with its adapter) is a unit;
    so are the input embeddings (PT calls them outside the LLM's forward) and the output head (grouped with the
    embeddings when tied), then the LLM's decoder (the training loss calls it and the head on their own, outside
    the LLM's forward: :func:`~lynx_zoo.fusion.base.answer_only_loss`), the vision tower, the bridge and the LLM.
    The model itself is the root (it catches any other parameter).
    """
    units: list[nn.Module | list[nn.Module]] = []
    units += list(model.vision.blocks)
    units += model.bridge.units()
    units += list(model.fusion_blocks().values())
    units += list(decoder_layers(model.llm))
    embeddings, head = model.llm.get_input_embeddings(), model.llm.get_output_embeddings()
    if head is not None and head.weight is embeddings.weight:
        units.append([embeddings, head])  # tied: one unit, so the shared weight is sharded once
    else:
        units += [embeddings] + ([head] if head is not None else [])
    units += [model.llm.get_decoder(), model.vision, model.bridge, model.llm]
    return units


def shard_lynx_model(
    model: ScalableModel, mesh: DeviceMesh, mp_policy: MixedPrecisionPolicy | None = None, reshard: bool = True
) -> int:
    """Apply ``fully_shard`` to every unit of :func:`sharding_units` and to the model (the root).

    Frozen parameters are sharded like the others but keep ``requires_grad=False``: they get no
    gradients, and the optimizer (built from the trainable ones) keeps no state for them. Scalar
    parameters (the adapters' scales), which FSDP2 cannot shard, stay whole on every rank; their
    gradients are averaged over the mesh by :func:`_average_grads_over`. Returns the number of units.
    """
    policy = mp_policy or MixedPrecisionPolicy()
    scalars = {p for p in model.parameters() if p.ndim == 0}
    units = sharding_units(model)
    for unit in [*units, model]:
        fully_shard(unit, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard, ignored_params=scalars)
    for p in scalars:
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(_average_grads_over(mesh))
    return len(units) + 1


def _average_grads_over(mesh: DeviceMesh) -> Callable[[torch.Tensor], None]:
    group, size = mesh.get_group(), mesh.size()

    def hook(param: torch.Tensor) -> None:
        torch.distributed.all_reduce(param.grad, group=group)
        param.grad.div_(size)

    return hook


def attached_trainer(module: L.LightningModule) -> L.Trainer | None:
    """The Trainer ``module`` is attached to, or ``None`` (Lightning's public ``trainer`` raises when there is none)."""
    try:
        return module.trainer
    except RuntimeError:
        return None


def configure_lynx_model(model: ScalableModel) -> None:
    """What ``LynxModel.configure_model`` does: activation checkpointing if the strategy asks for it, then
    FSDP2 sharding if the strategy gave the model a device mesh. Idempotent (Lightning may call it again)."""
    trainer = attached_trainer(model)
    # the zoo's strategy declares its settings; Lightning's ModelParallelStrategy shards with FSDP2's defaults
    ours = trainer.strategy if trainer is not None and isinstance(trainer.strategy, ScaleOutSettings) else None
    if ours is not None and ours.activation_checkpointing:
        apply_activation_checkpointing(model)
    mesh = model.device_mesh
    if mesh is None or isinstance(model, FSDPModule):
        return
    names = mesh.mesh_dim_names or ()
    if "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
        raise ValueError(
            f"{type(model).__name__}: got a device mesh with tensor_parallel size {mesh['tensor_parallel'].size()}; "
            "lynx_zoo shards with FSDP2 only: use lynx_zoo.training.LynxFSDP2Strategy, or ModelParallelStrategy "
            "with data_parallel_size=<number of processes> and tensor_parallel_size=1"
        )
    dp_mesh = mesh["data_parallel"] if "data_parallel" in names else mesh
    shard_lynx_model(model, dp_mesh, ours.mp_policy if ours else None, ours.reshard_after_forward if ours else True)


@functools.cache
def destroy_process_group_at_exit() -> None:
    """Destroy the default process group when the interpreter exits, while the interpreter is still whole.

    A run that leaves its gloo group to interpreter finalisation can abort after it finished (SIGABRT, "terminate
    called without an active exception"): gloo's threads outlive the objects they hold. Lightning registers this
    for NCCL only. Registered once per process; at exit, a process without a group (one that never had one, or
    whose group is already destroyed) is left alone."""

    def destroy() -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    atexit.register(destroy)


def ddp_anchor(loss: torch.Tensor, parameters: list[tuple[str, nn.Parameter]]) -> torch.Tensor:
    """``loss`` plus every trainable parameter times 0. DDP (with ``find_unused_parameters`` off) expects a gradient
    for every trainable parameter at every step; the parameters a batch leaves out (the vision side on text-only
    data, the frame embedding on images) then get an exact zero. Not for FSDP, whose parameters are sharded outside
    their unit's forward (it needs no anchor)."""
    return loss + 0.0 * sum(p.sum() for _, p in parameters)


def fill_missing_grads(parameters: list[tuple[str, nn.Parameter]]) -> None:
    """After the backward: a trainable parameter the step left out gets an exact zero gradient, as DDP's anchor gives
    it, so every strategy updates alike and the optimizer keeps state for every trainable parameter (which a
    sharded checkpoint expects when a run resumes)."""
    for _, param in parameters:
        if param.grad is None:
            param.grad = torch.zeros_like(param)


# ---------------------------------------------------------------------------------------------- checkpointing
# the names decoder layers give their KV cache across transformers releases (4.x/5.x: past_key_values; 5.24: cache)
KV_CACHE_ARGUMENTS = ("cache", "past_key_values", "layer_past")


def apply_activation_checkpointing(model: ScalableModel) -> int:
    """Recompute every decoder layer of the LLM in the backward pass, with torch's composable activation
    checkpointing (``torch.distributed._composable.checkpoint``: hooks, no wrapper module, so parameter and
    state-dict names stay those of the model; FSDP2's ``fully_shard`` applied afterwards composes with it).

    The layer's attached blocks (adapters, cross-attention blocks: :func:`~lynx_zoo.llm.layers.attach_block`)
    run inside the recomputed region, and get the inputs they read beside the layer's arguments at the forward
    back for the recomputation (:meth:`~lynx_zoo.llm.layers.InsertedBlock.replay_context`). A KV cache is kept out
    of the region. Works with a frozen LLM in eval mode (unlike transformers' switch, which needs ``training``).
    Idempotent; returns the number of checkpointed layers.
    """
    layers = decoder_layers(model.llm)
    for layer in layers:
        if checkpoint.state(layer) is not None:
            continue
        if isinstance(layer, FSDPModule):
            raise RuntimeError("apply_activation_checkpointing: apply it before fully_shard")
        layer.register_forward_pre_hook(_without_kv_cache, with_kwargs=True)
        checkpoint(layer, context_fn=_replay_context_fn(layer))
        rehook_attached_blocks(layer)
    return len(layers)


def _without_kv_cache(layer: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
    """Keep a KV cache out of a recomputed layer call (the recomputation would write the layer's keys and values
    into it a second time), as transformers' own gradient checkpointing does. Without gradients nothing is
    recomputed and the call keeps its cache."""
    if not torch.is_grad_enabled():
        return None
    kwargs = {k: None if k in KV_CACHE_ARGUMENTS else v for k, v in kwargs.items()}
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    return args, kwargs


def _replay_context_fn(layer: nn.Module) -> Callable[[], tuple[AbstractContextManager, AbstractContextManager]]:
    """``context_fn`` of the checkpoint of ``layer``: at the forward, every :class:`InsertedBlock` inside
    captures its per-call inputs; the recomputation in the backward pass runs with them restored."""

    def context_fn() -> tuple[AbstractContextManager, AbstractContextManager]:
        replays = [m.replay_context() for m in layer.modules() if isinstance(m, InsertedBlock)]
        return contextlib.nullcontext(), _entered(replays)

    return context_fn


@contextlib.contextmanager
def _entered(contexts: list[AbstractContextManager]) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for context in contexts:
            stack.enter_context(context)
        yield
