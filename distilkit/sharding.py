"""A teacher sharded across processes for inference only (FSDP2, ``fully_shard``).

A teacher as large as one device cannot be replicated on every rank. Under FSDP2 each rank
keeps 1/N of every teacher parameter; a forward all-gathers one layer's parameters at a time
(each decoder / encoder block is its own FSDP unit), runs it, and frees the gathered copy
straight after (``reshard_after_forward``), so a rank never holds more than its shard plus
one whole layer. The teacher is in eval mode, needs no gradients and is in no optimizer: it
has no gradient shards and no optimizer state. With ``offload`` (the accelerate config's
``fsdp_offload_params``) the shards themselves live in CPU memory and are copied to the
device layer by layer.

Every rank must run the teacher's forward the same number of times (each one is a collective);
the trainer runs it once per training step on every rank.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from distilkit.device import to_device


def teacher_layers(model: nn.Module) -> list:
    """The modules gathered one at a time: those of the classes transformers names as a
    model's unsplittable blocks (``_no_split_modules``: ``BertLayer``, ``T5Block``, ...),
    else the blocks of its first ``ModuleList``; innermost first, as ``fully_shard`` wants
    children before their parents."""
    names = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
    found = [m for m in model.modules() if type(m).__name__ in names]
    if not found:
        found = next((list(m) for m in model.modules() if isinstance(m, nn.ModuleList)), [])
    return found[::-1]


def shard_teacher(model: nn.Module, device: torch.device, world_size: int,
                  offload: bool = False, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """``model`` sharded in place over all ``world_size`` processes of the default process
    group for inference (see the module docstring), computing on ``device``; cast to
    ``dtype`` first when given. Its inputs are moved to ``device`` by a forward pre-hook,
    since with ``offload`` its parameters (the place callers look) are on the CPU."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    model.eval()
    model.requires_grad_(False)
    if dtype is not None:
        model.to(dtype)
    mesh = init_device_mesh(device.type, (world_size,))
    kw = dict(mesh=mesh, reshard_after_forward=True,
              offload_policy=CPUOffloadPolicy(pin_memory=device.type == "cuda") if offload
              else OffloadPolicy())
    for layer in teacher_layers(model):
        fully_shard(layer, **kw)
    fully_shard(model, **kw)
    model.register_forward_pre_hook(
        lambda m, args, kwargs: (to_device(args, device), to_device(kwargs, device)),
        with_kwargs=True)
    return model


def shard_for_accelerator(model: nn.Module, accelerator, dtype: Optional[torch.dtype] = None):
    """:func:`shard_teacher` over an FSDP2 ``accelerate`` run's processes, offloading the
    shards to the CPU when its FSDP config does (``fsdp_offload_params: true``)."""
    from torch.distributed.fsdp import CPUOffloadPolicy

    plugin = accelerator.state.fsdp_plugin
    offload = isinstance(getattr(plugin, "cpu_offload", None), CPUOffloadPolicy)
    return shard_teacher(model, accelerator.device, accelerator.num_processes,
                         offload=offload, dtype=dtype)


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model``'s parameters are FSDP2 shards (DTensors)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())
