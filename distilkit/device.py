"""Device handling, in one place: where a model lives and how a batch gets there.

Every path that runs a model outside the ``Trainer`` (teacher-output caching, evaluation and
latency, generation, importance scores) feeds it through :func:`to_device`, so a model that
accelerate (or the user) put on a GPU is never fed CPU tensors. Results go back to the host
only once per batch, with :func:`to_host`.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn


def model_device(model: nn.Module) -> torch.device:
    """The device a model computes on: its ``device`` attribute when it has one (transformers
    models, peft and accelerate wrappers), else that of its first parameter or buffer, else
    the CPU."""
    dev = getattr(model, "device", None)
    if isinstance(dev, (torch.device, str)):
        return torch.device(dev)
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` (a tensor, or a dict / list / tuple of them) on ``device``; other values are
    returned as they are. Copies are non-blocking where the source is pinned."""
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def to_host(t: torch.Tensor) -> torch.Tensor:
    """A detached CPU copy of ``t`` (one device-to-host transfer)."""
    return t.detach().to("cpu")


def synchronize(device: torch.device) -> None:
    """Wait until the work queued on ``device`` has finished. CUDA runs asynchronously, so a
    timer read without this measures how long the kernels took to *queue*. Only a CUDA device
    is synchronised: the CPU path never touches CUDA."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def processes() -> int:
    """How many processes the run's process group holds (1 without one)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def end_process_group() -> None:
    """Destroy the default process group a multi-process launch made, once the work is done.
    Left to the interpreter's exit, its communication threads can be torn down still running,
    which aborts a process whose run succeeded ("terminate called without an active
    exception", SIGABRT: a 2-process DeepSpeed ZeRO-2 launch on gloo, 2026-12-07). Nothing
    happens in a single process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
