"""torch.distributed set-up from torchrun's environment, DDP and FSDP2. Nothing home-made.

DDP (the default) keeps a whole model on every rank. FSDP2 (`fully_shard`) shards every parameter
across the ranks as a DTensor (each decoder block and each MTP block its own all-gather unit, the
rest with the root), so a model that does not fit one device trains on several.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str) -> DistInfo:
    """Join the process group that torchrun describes (gloo on CPU, NCCL on
    CUDA); a plain run is world size 1."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return DistInfo()
    info = DistInfo(
        int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    )
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend)
    return info


def wrap_model(model: nn.Module, info: DistInfo) -> nn.Module:
    """DDP: each rank holds the whole model and gradients are averaged across ranks."""
    if not info.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    # broadcast_buffers=False: the routers' load counters are per rank (they are
    # all-reduced before the bias update), and the biases themselves stay identical
    # because every rank applies the same update.
    device_ids = [info.local_rank] if next(model.parameters()).is_cuda else None
    return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)


PARALLEL = ("ddp", "fsdp")


def shard_model(
    model: nn.Module, info: DistInfo, device: torch.device, mixed_precision: bool = False
) -> nn.Module:
    """FSDP2: a sharded twin of `model` on `device`, built on the meta device
    and filled from `model`'s weights.

    The caller's `model` is left a plain module (the trainer writes full weights back into it at
    each checkpoint, so whoever saves it afterwards gets a whole model). Each decoder block and each
    MTP block is sharded on its own, then the root (embedding, head, final norm, the MTP
    projections) with what is left. Buffers (the routers' correction biases, the load counters, the
    rope tables) are not sharded: every rank keeps its copy. mixed_precision: bf16 parameters in
    forward/backward, fp32 gradient reduction (on CUDA, with autocast)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (info.world_size,))
    with torch.device("meta"):
        sharded = type(model)(model.config)
    if mixed_precision:
        # blocks: bf16 weights, fp32 gradient reduction; their float inputs are left alone
        # (autocast casts the matmuls; the rope tables stay fp32). The routers keep fp32
        # weights, as routing is decided in fp32.
        block_policy = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False
        )
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for moe in sharded.moe_layers():
            fully_shard(moe.gate, mesh=mesh, mp_policy=MixedPrecisionPolicy())
    else:
        block_policy = policy = MixedPrecisionPolicy()
    for block in [*sharded.layers, *(m.block for m in sharded.mtp)]:
        fully_shard(block, mesh=mesh, mp_policy=block_policy)
    fully_shard(sharded, mesh=mesh, mp_policy=policy)
    sharded.to_empty(device=device)
    sharded.rebuild_derived_state()  # rope tables, load counters, tied head
    # every rank holds the full weights in `model`: each keeps its own
    # shard of them, no communication
    set_model_state_dict(
        sharded, model.state_dict(), options=StateDictOptions(full_state_dict=True)
    )
    return sharded


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def clip_grad_norm_(parameters, max_norm: float) -> torch.Tensor:
    """torch's clip_grad_norm_ in its two steps, so that it also works on FSDP's
    DTensor gradients: the global norm (a DTensor partial over the shards) is
    reduced to a plain tensor before scaling."""
    from torch.distributed.tensor import DTensor

    params = [p for p in parameters if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


def full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """FSDP: the whole model and optimizer state, gathered to CPU on rank 0
    (other ranks get empty dicts); a collective: every rank calls it. Keys are
    parameter names, as in the unsharded model."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return (
        get_model_state_dict(model, options=options),
        get_optimizer_state_dict(model, optimizer, options=options),
    )


def load_full_state_dicts(
    model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict, optimizer_state: dict
) -> None:
    """FSDP: load whole (unsharded) model and optimizer state, which every
    rank holds, into the sharded ones."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=options)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        t = t.clone()
        dist.all_reduce(t)
    return t


def main_decides(decide, info: DistInfo):
    """decide() run on rank 0 only, its result given to every rank (a choice made by timing, which
    every rank must share)."""
    chosen = [decide() if info.is_main else None]
    if info.enabled:
        dist.broadcast_object_list(chosen, src=0)
    return chosen[0]


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        # On the normal path every rank waits for the others first: a gloo rank that tears down
        # its connections while a peer is still working (rank 0 gathering a checkpoint, say) can
        # abort the peer ("terminate called without an active exception"), failing a run that
        # finished. A rank leaving with an exception (shutdown runs in a `finally`) must not wait:
        # its peers may be blocked in a collective it will never join; torchrun stops them once it
        # exits.
        if sys.exc_info()[0] is None:
            dist.barrier()
        dist.destroy_process_group()
