"""A teacher sharded across processes for inference only: FSDP2 (``fully_shard``) or
DeepSpeed ZeRO-3 (:func:`zero3_teacher`), and the FSDP / DeepSpeed launches on CPU processes
that accelerate does not take by itself (:func:`engine_on_cpu`).

A teacher as large as one device cannot be replicated on every rank. Under FSDP2 each rank
keeps 1/N of every teacher parameter; a forward all-gathers one layer's parameters at a time
(each decoder / encoder block is its own FSDP unit), runs it, and frees the gathered copy
straight after (``reshard_after_forward``), so a rank never holds more than its shard plus
one whole layer. The teacher is in eval mode, needs no gradients and is in no optimizer: it
has no gradient shards and no optimizer state. With ``offload`` (the accelerate config's
``fsdp_offload_params``) the shards themselves live in CPU memory and are copied to the
device layer by layer.

Under ZeRO-3 DeepSpeed partitions every parameter above a size threshold across the ranks and
gathers a module's parameters when its forward starts (prefetching the next ones), releasing
them after; again no gradients and no optimizer. DeepSpeed is imported only there.

Every rank must run the teacher's forward the same number of times (each one is a collective);
the trainer runs it once per training step on every rank.
"""
from __future__ import annotations

import contextlib
import os
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


def engine_on_cpu(accelerator, fsdp_plugin_args: Optional[dict] = None) -> Optional[str]:
    """Turn a CPU-only (gloo) ``accelerate`` run launched for FSDP or DeepSpeed into the run it
    was launched as: ``"fsdp"`` / ``"deepspeed"`` when it did, else None.

    accelerate 1.15 takes ``distributed_type: FSDP`` or ``DEEPSPEED`` only on accelerators.
    With ``use_cpu`` (MULTI_CPU, the processes joined in a gloo group) ``AcceleratorState``
    silently drops both plugins (``accelerate/state.py``: the FSDP plugin is kept only for
    MULTI_GPU / MULTI_XPU / ... runs, DeepSpeed only ``and not cpu``); without it a CPU
    process finds no backend (``PartialState._prepare_backend``) and accelerate counts one
    process, each rank training alone. Both engines run on CPU over gloo (FSDP2's
    ``fully_shard`` on a CPU device mesh; DeepSpeed's CPU accelerator), so a MULTI_CPU run
    whose launch asked for one (``ACCELERATE_USE_FSDP`` / ``ACCELERATE_USE_DEEPSPEED``, which
    ``accelerate launch`` sets from the config; or the Trainer's own ``fsdp`` arguments) is
    given the plugin and distributed type accelerate gives it on GPUs. Must run right after
    the ``Accelerator`` is created, before any model is prepared."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    state = accelerator.state
    if state.distributed_type != DistributedType.MULTI_CPU:
        return None
    env = {k: os.environ.get(f"ACCELERATE_USE_{k.upper()}", "false").lower() == "true"
           for k in ("fsdp", "deepspeed")}
    if env["deepspeed"]:
        from accelerate.utils import DeepSpeedPlugin

        plugin = DeepSpeedPlugin()
        plugin.set_mixed_precision(state.mixed_precision)
        kind, dtype = "deepspeed", DistributedType.DEEPSPEED
        state.deepspeed_plugins = plugin
    elif env["fsdp"] or fsdp_plugin_args:
        from accelerate.utils import FullyShardedDataParallelPlugin

        plugin = FullyShardedDataParallelPlugin(**(fsdp_plugin_args or {}))
        if state.mixed_precision != "no":
            plugin.set_mixed_precision(state.mixed_precision)
        kind, dtype = "fsdp", DistributedType.FSDP
        state.fsdp_plugin = plugin
    else:
        return None
    # Both shared states, as AcceleratorState.__init__ leaves them on GPUs.
    AcceleratorState._shared_state["distributed_type"] = dtype
    PartialState._shared_state["distributed_type"] = dtype
    if kind == "deepspeed":
        plugin.select(_from_accelerator_state=True)
    return kind


def zero3_teacher(model: nn.Module, accelerator, dtype: Optional[torch.dtype] = None):
    """``model`` wrapped by DeepSpeed for inference only with ZeRO-3 parameter partitioning
    over the run's processes: each rank keeps 1/N of every parameter larger than the
    persistence threshold, and a forward gathers each module's parameters just before it
    runs and releases them after. There is no optimizer (so no gradient or optimizer
    partitions), the model is in eval mode and needs no gradients. The partitioning settings
    are the run's own ZeRO config (:func:`zero3_inference_config`), ``offload_param``
    included (the partitions then live in CPU memory)."""
    import deepspeed

    model.eval()
    model.requires_grad_(False)
    if dtype is not None:
        model.to(dtype)
    config = {"train_micro_batch_size_per_gpu": 1, "steps_per_print": 2 ** 31 - 1,
              "zero_optimization": zero3_inference_config(
                  accelerator.state.deepspeed_plugin.deepspeed_config, _hidden_size(model))}
    # ZeRO-3 partitions in the dtype DeepSpeed is told of.
    if dtype == torch.bfloat16:
        config["bf16"] = {"enabled": True}
    elif dtype == torch.float16:
        config["fp16"] = {"enabled": True}
    engine, *_ = deepspeed.initialize(model=model, config=config)
    # DeepSpeedEngine.eval() puts the wrapped model in eval mode but leaves the engine's own
    # flag on; nn.Module.train sets both.
    nn.Module.train(engine, False)
    return engine


# The ZeRO-3 settings that shape parameter partitioning (the rest concern gradients and
# optimizer state, which a teacher has not).
_PARTITION_KEYS = ("offload_param", "stage3_param_persistence_threshold",
                   "stage3_prefetch_bucket_size", "stage3_max_live_parameters",
                   "stage3_max_reuse_distance")


def zero3_inference_config(run_config: dict, hidden_size: Optional[int]) -> dict:
    """The ``zero_optimization`` section for a ZeRO-3 inference-only teacher: stage 3 with the
    run's partitioning settings (:data:`_PARTITION_KEYS`). A size the run leaves ``auto`` (or
    unset) is sized to the teacher's hidden width h, by the rule transformers applies to a
    trained model: parameters of at most 10 h elements stay whole on every rank (biases,
    norms: gathering them costs more than they save) and 0.9 h^2 elements are prefetched; with
    no width known DeepSpeed's defaults apply."""
    zero = run_config.get("zero_optimization") or {}
    out = {"stage": 3}
    out.update({k: zero[k] for k in _PARTITION_KEYS if k in zero and zero[k] != "auto"})
    if hidden_size:
        out.setdefault("stage3_param_persistence_threshold", 10 * hidden_size)
        out.setdefault("stage3_prefetch_bucket_size", int(0.9 * hidden_size * hidden_size))
    return out


def _hidden_size(model: nn.Module) -> Optional[int]:
    cfg = getattr(model, "config", None)
    h = getattr(cfg, "hidden_size", None) or getattr(cfg, "d_model", None)
    return int(h) if h else None


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model``'s parameters are FSDP2 shards (DTensors) or ZeRO-3 partitions
    (parameters DeepSpeed gave a ``ds_tensor``, their own partition)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) or hasattr(p, "ds_tensor") for p in model.parameters())


@contextlib.contextmanager
def loading_whole_models():
    """Within it, ``from_pretrained`` builds a whole model in this process. Under a DeepSpeed
    ZeRO-3 launch transformers builds every model partitioned across the processes (each
    parameter created under ``deepspeed.zero.Init``, a broadcast per parameter): the main
    process loading the saved student alone to score it would wait for the others for ever."""
    try:
        from transformers.integrations import deepspeed as hf_ds
    except ImportError:  # no DeepSpeed integration: models are always built whole
        yield
        return
    saved = hf_ds._hf_deepspeed_config_weak_ref
    hf_ds.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = saved
