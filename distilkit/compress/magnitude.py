"""Magnitude pruning with retraining (Han, Pool, Tran, Dally 2015), on a schedule.

Unstructured: individual weights with the smallest absolute value are set to zero and held
there by a 0/1 mask, either per layer (each chosen linear loses the same fraction) or
globally (one threshold over all chosen linears, so layers with many small weights lose
more). Han et al. alternate pruning and retraining; here the alternation is a schedule run by
:class:`MagnitudePruningCallback` inside a (distillation) training run:

* ``apply`` prunes to ``initial_sparsity`` at once (0 means: start dense);
* during training, ``num_rounds`` pruning rounds are spread evenly over steps
  ``begin_step..end_step`` (``end_step`` defaults to two thirds of the run, leaving the last
  third to retrain at the final sparsity); round ``i`` of ``N`` prunes to
  ``s_f + (s_i - s_f) (1 - i/N)^3`` (the cubic ramp of Zhu and Gupta 2017, which prunes fast
  while many weights are redundant) or linearly;
* after every optimizer step the masks are re-applied, so weights the optimizer (momentum,
  weight decay) moves away from zero are zeroed again;
* ``finalize`` brings the model to ``final_sparsity`` if training stopped before the schedule
  did (the record says so), then swaps every pruned linear for a :class:`SparseLinear` that
  *stores* only the kept values plus a 1-bit-per-weight mask.

Honest figures. The export is smaller (fp32 at sparsity ``s``: ``32 (1 - s) + 1`` bits per
weight instead of 32), but the model is not faster: :class:`SparseLinear` rebuilds the dense
weight at load time and runs the same dense kernel, and dense CPU/GPU kernels multiply the
zeros like any other value. Unstructured sparsity pays off in speed only with sparse kernels
at very high sparsity; use ``prune_heads``/``prune_ffn``/``low_rank`` for latency. The record
carries this as a ``note``, with the sparsity of the pruned layers and of the whole model.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn
from transformers import TrainerCallback

from distilkit.compress.base import (CompressionContext, Method, register, require_plain,
                                     select_modules, set_module, unwrap)

logger = logging.getLogger(__name__)

NOTE = ("unstructured sparsity: weights are stored as kept values plus a 1-bit mask, so the "
        "file shrinks, but inference uses dense kernels that multiply the zeros: no speed-up")
MASK = "distilkit_mask"


# ---------------------------------------------------------------------------------------
# Pure functions
# ---------------------------------------------------------------------------------------

def scheduled_sparsity(i: int, n: int, initial: float, final: float, ramp: str = "cubic") -> float:
    """Target sparsity after pruning round ``i`` of ``n`` (``i = 0``: initial, ``i = n``: final)."""
    t = min(max(i / n, 0.0), 1.0)
    if ramp == "linear":
        return initial + (final - initial) * t
    return final + (initial - final) * (1.0 - t) ** 3


def round_steps(begin: int, end: int, n: int) -> list[int]:
    """Training steps at which the ``n`` rounds run, evenly spaced over ``(begin, end]``."""
    return [begin + round((end - begin) * (i + 1) / n) for i in range(n)]


def magnitude_masks(weights: list[torch.Tensor], sparsity: float,
                    scope: str = "per_layer") -> list[torch.Tensor]:
    """Boolean keep-masks zeroing the ``sparsity`` fraction of smallest-magnitude weights,
    exactly ``round(sparsity * numel)`` of them, per tensor or over all tensors together."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity={sparsity!r} must be in [0, 1)")

    def mask_of(flat: torch.Tensor) -> torch.Tensor:
        k = int(round(sparsity * flat.numel()))
        keep = torch.ones(flat.numel(), dtype=torch.bool, device=flat.device)
        if k:
            keep[torch.topk(flat, k, largest=False, sorted=False).indices] = False
        return keep

    if scope == "per_layer":
        return [mask_of(w.detach().abs().flatten()).view_as(w) for w in weights]
    flat = mask_of(torch.cat([w.detach().abs().flatten().float() for w in weights]))
    return [m.view_as(w) for m, w in zip(flat.split([w.numel() for w in weights]), weights)]


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor as uint8, 8 entries per byte (little-endian bit order)."""
    flat = mask.flatten().to(torch.uint8)
    flat = torch.cat([flat, flat.new_zeros((-flat.numel()) % 8)])
    shifts = torch.arange(8, dtype=torch.uint8, device=flat.device)
    return (flat.view(-1, 8) << shifts).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``numel`` entries as a flat bool tensor."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    return ((packed[:, None] >> shifts) & 1).bool().flatten()[:numel]


# ---------------------------------------------------------------------------------------
# The compact module
# ---------------------------------------------------------------------------------------

class SparseLinear(nn.Module):
    """A linear layer saved as its nonzero ``values`` (in row-major order) plus ``mask_bits``.

    The dense ``weight`` is a non-persistent buffer rebuilt at construction and after every
    ``load_state_dict``; ``forward`` is the ordinary dense ``F.linear`` (no speed-up).
    """

    def __init__(self, in_features: int, out_features: int, nnz: int, bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.values = nn.Parameter(torch.zeros(nnz, device=device, dtype=dtype),
                                   requires_grad=False)
        self.register_buffer("mask_bits", torch.zeros((in_features * out_features + 7) // 8,
                                                      dtype=torch.uint8, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype),
                                 requires_grad=False) if bias else None
        self.register_buffer("weight", torch.zeros(out_features, in_features, device=device,
                                                   dtype=dtype), persistent=False)
        self.register_load_state_dict_post_hook(SparseLinear._after_load)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "SparseLinear":
        w = linear.weight.detach()
        keep = w != 0
        new = cls(linear.in_features, linear.out_features, int(keep.sum()),
                  bias=linear.bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            new.values.copy_(w[keep])
            new.mask_bits.copy_(pack_bits(keep))
            if linear.bias is not None:
                new.bias.copy_(linear.bias.detach())
        new.rebuild()
        return new

    @staticmethod
    def _after_load(module: "SparseLinear", incompatible_keys) -> None:
        module.rebuild()

    @torch.no_grad()
    def rebuild(self) -> None:
        keep = unpack_bits(self.mask_bits, self.in_features * self.out_features)
        w = torch.zeros(keep.numel(), dtype=self.values.dtype, device=self.values.device)
        w[keep] = self.values
        self.weight = w.view(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight, self.bias)

    def parameter_counts(self) -> tuple[int, int]:
        """(logical parameters: the dense weight and the bias, nonzero ones), for
        :func:`distilkit.evaluate.count_parameters`."""
        bias = 0 if self.bias is None else self.bias.numel()
        nonzero = int(torch.count_nonzero(self.values))
        if self.bias is not None:
            nonzero += int(torch.count_nonzero(self.bias))
        return self.in_features * self.out_features + bias, nonzero

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"nnz={self.values.numel()}")


# ---------------------------------------------------------------------------------------
# Config, callback, method
# ---------------------------------------------------------------------------------------

@dataclass
class MagnitudeConfig:
    final_sparsity: float = field(default=0.5, metadata={
        "help": "Fraction of the chosen weights that are zero at the end, in [0, 1)."})
    initial_sparsity: float = field(default=0.0, metadata={
        "help": "Sparsity applied at once by apply(), in [0, final_sparsity]."})
    num_rounds: int = field(default=4, metadata={
        "help": "Pruning rounds during training (prune, retrain, prune more)."})
    begin_step: int = field(default=0, metadata={"help": "Step after which rounds start."})
    end_step: Optional[int] = field(default=None, metadata={
        "help": "Step of the last round (default: 2/3 of the run's max_steps)."})
    ramp: str = field(default="cubic", metadata={"help": "'cubic' (Zhu & Gupta) or 'linear'."})
    scope: str = field(default="global", metadata={"help": "'global' or 'per_layer'."})
    include: Optional[list] = field(default=None, metadata={
        "help": "Globs over nn.Linear names (default: every linear inside the transformer "
                "layers of a supported family)."})
    exclude: list = field(default_factory=list, metadata={"help": "Globs to leave dense."})

    def __post_init__(self):
        for name in ("final_sparsity", "initial_sparsity"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
                raise ValueError(f"magnitude: {name}={v!r} must be in [0, 1) (1 would remove "
                                 f"every weight); e.g. 0.8 keeps 20%")
        if self.initial_sparsity > self.final_sparsity:
            raise ValueError(f"magnitude: initial_sparsity={self.initial_sparsity} exceeds "
                             f"final_sparsity={self.final_sparsity}; sparsity only grows")
        if not isinstance(self.num_rounds, int) or self.num_rounds < 1:
            raise ValueError(f"magnitude: num_rounds={self.num_rounds!r} must be an integer >= 1")
        if self.ramp not in ("cubic", "linear"):
            raise ValueError(f"magnitude: ramp={self.ramp!r} must be 'cubic' or 'linear'")
        if self.scope not in ("global", "per_layer"):
            raise ValueError(f"magnitude: scope={self.scope!r} must be 'global' or 'per_layer'")
        if self.end_step is not None and self.end_step <= self.begin_step:
            raise ValueError(f"magnitude: end_step={self.end_step} must be after "
                             f"begin_step={self.begin_step}")


def _targets(model: nn.Module, cfg: MagnitudeConfig) -> list[tuple[str, nn.Module]]:
    include = cfg.include
    if include is None:
        from distilkit.compress.families import get_adapter, supported_families
        try:
            include = get_adapter(model, "magnitude").layer_linears()
        except ValueError as e:
            raise ValueError(f"{e}. For other models pass include=[glob, ...] naming the "
                             f"linears to prune ({supported_families()} have a default)") from None
    chosen = select_modules(model, include, cfg.exclude, types=(nn.Linear,),
                            field_name="magnitude.include", method="magnitude")
    require_plain(chosen, "magnitude")
    if not chosen:
        raise ValueError("magnitude: no nn.Linear left to prune after include/exclude")
    return chosen


@torch.no_grad()
def prune_to(modules: list[nn.Linear], sparsity: float, scope: str) -> None:
    """Recompute the masks of ``modules`` at ``sparsity`` and zero the pruned weights."""
    masks = magnitude_masks([m.weight for m in modules], sparsity, scope)
    for m, mask in zip(modules, masks):
        m.register_buffer(MASK, mask, persistent=False)
        m.weight.mul_(mask)


@torch.no_grad()
def reapply_masks(modules: list[nn.Module]) -> None:
    for m in modules:
        mask = getattr(m, MASK, None)
        if mask is not None:
            m.weight.mul_(mask)


def measured_sparsity(modules: list[nn.Module]) -> float:
    total = sum(m.weight.numel() for m in modules)
    return sum(int((m.weight == 0).sum()) for m in modules) / max(total, 1)


class MagnitudePruningCallback(TrainerCallback):
    """Runs the pruning rounds and keeps pruned weights at zero after each optimizer step."""

    def __init__(self, modules: list[nn.Linear], cfg: MagnitudeConfig):
        self.modules, self.cfg = modules, cfg
        self.steps: list[int] = []
        self.history: list[tuple[int, float]] = []

    def on_train_begin(self, args, state, control, **kwargs):
        end = self.cfg.end_step or max(self.cfg.begin_step + 1, (2 * state.max_steps) // 3)
        self.steps = round_steps(self.cfg.begin_step, end, self.cfg.num_rounds)

    def on_optimizer_step(self, args, state, control, **kwargs):
        reapply_masks(self.modules)

    def on_step_end(self, args, state, control, **kwargs):
        # global_step has already been incremented for the step that just finished.
        for i, step in enumerate(self.steps, start=1):
            if state.global_step == step:
                s = scheduled_sparsity(i, len(self.steps), self.cfg.initial_sparsity,
                                       self.cfg.final_sparsity, self.cfg.ramp)
                prune_to(self.modules, s, self.cfg.scope)
                self.history.append((step, s))
                logger.info("magnitude pruning round %d/%d at step %d: sparsity %.3f",
                            i, len(self.steps), step, s)


@register
class Magnitude(Method):
    name = "magnitude"
    config_cls = MagnitudeConfig
    needs = frozenset({"plain_linear"})
    # Its linears are masked now and SparseLinear after finalize; until then the callback
    # re-applies the masks to those very nn.Linear modules, found again by name at finalize.
    replaces = frozenset({"plain_linear", "named_linears"})
    keeps = frozenset({"plain_linear", "layer_names"})
    citation = ("Han, Pool, Tran, Dally. Learning both Weights and Connections for Efficient "
                "Neural Networks. NeurIPS 2015; Zhu, Gupta. To prune, or not to prune. 2017")

    def apply(self, model: nn.Module, cfg: MagnitudeConfig, ctx: CompressionContext) -> dict:
        chosen = _targets(model, cfg)
        prune_to([m for _, m in chosen], cfg.initial_sparsity, cfg.scope)
        return {"targets": [n for n, _ in chosen], "sparsity": cfg.initial_sparsity}

    def callbacks(self, model: nn.Module, cfg: MagnitudeConfig, ctx: CompressionContext) -> list:
        # The names in cfg are relative to the model inside any wrapper, as in apply.
        modules = [m for _, m in _targets(unwrap(model), cfg)]
        return [MagnitudePruningCallback(modules, cfg)]

    def finalize(self, model: nn.Module, cfg: MagnitudeConfig, record: dict) -> dict:
        if "layers" in record:  # already finalized
            return record
        names = record["targets"]
        modules = [model.get_submodule(n) for n in names]
        reapply_masks(modules)
        reached = measured_sparsity(modules) >= cfg.final_sparsity - 1e-6
        if not reached:
            logger.warning("magnitude: training ended before the schedule reached sparsity %.3f; "
                           "pruning to it now, without retraining", cfg.final_sparsity)
            prune_to(modules, cfg.final_sparsity, cfg.scope)
        total_params = sum(p.numel() for p in model.parameters())
        dense_bytes = sum(m.weight.numel() * m.weight.element_size() for m in modules)
        layers = {}
        for name, m in zip(names, modules):
            sparse = SparseLinear.from_linear(m)
            layers[name] = {"nnz": sparse.values.numel(), "bias": m.bias is not None}
            set_module(model, name, sparse)
        sparse_mods = [model.get_submodule(n) for n in names]
        zeros = sum(m.weight.numel() - m.values.numel() for m in sparse_mods)
        packed_bytes = sum(m.values.numel() * m.values.element_size() + m.mask_bits.numel()
                           for m in sparse_mods)
        return {**record, "layers": layers,
                "sparsity": round(zeros / sum(m.weight.numel() for m in sparse_mods), 6),
                "model_sparsity": round(zeros / total_params, 6),
                "reached_in_training": reached,
                "weight_bytes_dense": dense_bytes, "weight_bytes_stored": packed_bytes,
                "note": NOTE}

    def restore(self, model: nn.Module, record: dict) -> None:
        for name, info in record.get("layers", {}).items():
            lin = model.get_submodule(name)
            set_module(model, name, SparseLinear(lin.in_features, lin.out_features,
                                                 int(info["nnz"]), bias=info["bias"],
                                                 device=lin.weight.device,
                                                 dtype=lin.weight.dtype))
