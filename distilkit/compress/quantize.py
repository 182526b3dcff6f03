"""Quantized distillation, differentiable quantization and post-training ("PM") quantization.

Polino, Pascanu and Alistarh, *Model compression via distillation and quantization* (ICLR
2018). Two registered methods:

``quantize`` (:class:`QuantizeConfig`): quantization-aware distillation in two steps.

* **prepare** (``compress_``): each selected weight (linear layers; embeddings and LSTM
  matrices on request) gets a :class:`FakeQuantize` parametrization. The module keeps its
  full-precision *master* weight (``parametrizations.weight.original``, the very Parameter
  the optimizer already knew); every forward uses its bucketed low-bit version
  ``w_hat = Q(w)``. The backward pass is straight-through: the gradient computed at
  ``w_hat`` is applied to ``w`` unchanged. Trained against the teacher with the
  distillation loss, this is the paper's *quantized distillation*.
* **convert** (``finalize_``): the master weights are quantized one last time
  (deterministic rounding) and stored packed (:mod:`distilkit.compress.packing`);
  ``save_compressed`` then writes ``b + 64/k`` bits per quantized weight.

With ``differentiable=True`` (scheme ``nonuniform``) the ``2**b`` quantization points of
each layer (in the bucket-scaled ``[0, 1]`` space) are ``nn.Parameter``s: each weight goes to
its nearest point, and autograd through ``w_hat = beta + alpha * p[code]`` gives each point
the sum of the gradients of the weights assigned to it (times the bucket's ``alpha``, the
chain rule through the scaling). By default the master weights are frozen, as in the paper's
Algorithm 2 (learn ``p`` with the weights fixed); ``train_weights=True`` trains both. The
learned points are saved, in the packed file's ``*_points`` tensors.

Bits are ``bits`` everywhere, or per module-name glob (``bits_per_pattern``, in ``ptq`` too: the
budget search writes the per-weight bits it chose there), or allocated for
a target average (``target_bits``) in proportion to the norm of each layer's gradient averaged
over ``alloc_batches`` batches of ``ctx.dataloader`` under ``ctx.loss_fn``, as in the paper.

Stochastic rounding (``rounding="stochastic"``) applies while the module is in training
mode and is drawn from a ``torch.Generator`` seeded by ``seed`` (and the layer's index), so
runs are reproducible; evaluation and the final convert round deterministically.

``ptq`` (:class:`PTQConfig`): the paper's PM baseline, quantize a trained model once and
pack, with buckets (``bucket_size=256``) or without (``bucket_size=None``: one bucket, i.e.
one min/max pair, for the *whole tensor*, the paper's "without bucketing").

A LoRA (peft) student: the layers an adapter wraps are quantized *merged*: the forward of
such a layer is ``Q(W + s B A) x`` (the base layer computes ``Q(W + s B A) - s B A``, the
adapter adds ``s B A x``), so distillation trains the weights that will be packed, and
peft's ``merge`` / ``unmerge`` / ``merge_and_unload`` run with the fake quantization lifted,
so the delta goes into the master weight (a fake-quantized weight is recomputed on every
access: merging into it would be lost). The adapter's ``lora_A`` / ``lora_B`` stay in full
precision; ``finalize`` refuses a layer whose adapter is not merged yet.

What is kept in full precision by default, and why: embeddings (the first layer; opt in with
``quantize_embeddings``), and the output head, matched by the ``exclude`` globs
(``*classifier*``, ``*lm_head*``, ``*pooler*``, ``*qa_outputs*``, ``score``): the paper, like
most quantization work, leaves the first and last layers alone because they hurt accuracy
most and weigh little. Biases and layer norms are never quantized.

How it differs from its neighbours: bitsandbytes NF4/int8 quantize a trained model in blocks
without training (use :mod:`distilkit.kernels.bnb` to run a quantized student through it);
torchao's QAT uses per-group symmetric scales. Here the scale is asymmetric (min/max per
bucket), buckets run over consecutive weights of the flattened tensor, the bit-width is any
of 1..8 (packed across bytes), points can be non-uniform and learned, and training is
against a teacher.
"""
from __future__ import annotations

import fnmatch
import math
import types
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn
from torch.nn.utils import parametrize

from distilkit.compress import packing
from distilkit.compress import quant_math as qm
from distilkit.compress.base import (CompressionContext, Method, adapter_layer,
                                     batches_on_device, get_target, register, select_modules,
                                     weights_replaced)
from distilkit.device import to_host

CITATION = ("Polino, Pascanu, Alistarh. Model compression via distillation and quantization. "
            "ICLR 2018. arXiv:1802.05668")
DEFAULT_EXCLUDE = ["*classifier*", "*lm_head*", "*pooler*", "*qa_outputs*", "score"]
LSTM_TYPES = (nn.LSTM,)


def _check_choice(field_name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{field_name}={value!r} is invalid: use one of {list(choices)}")


def _check_patterns(field_name: str, value) -> None:
    if value is None:
        return
    if isinstance(value, str) or not all(isinstance(p, str) for p in value):
        raise ValueError(f"{field_name}={value!r} is invalid: use a list of module-name globs, "
                         f"e.g. ['*.attention.*']")


@dataclass
class PTQConfig:
    """Post-training ("PM") quantization: quantize a trained model once and pack it."""

    bits: int = field(default=4, metadata={"help": "bits per weight, 1..8"})
    bucket_size: Optional[int] = field(default=256, metadata={
        "help": "consecutive weights sharing one (min, max) pair; None = one per tensor"})
    rounding: str = field(default="deterministic", metadata={
        "help": "'deterministic' (nearest) or 'stochastic' (unbiased, seeded)"})
    scheme: str = field(default="uniform", metadata={
        "help": "'uniform' (2**bits evenly spaced levels) or 'nonuniform' (points)"})
    points_init: str = field(default="uniform", metadata={
        "help": "non-uniform points: 'uniform', 'quantile' or 'kmeans'"})
    include: Optional[list] = field(default=None, metadata={
        "help": "module-name globs to quantize (None: every supported module)"})
    exclude: list = field(default_factory=lambda: list(DEFAULT_EXCLUDE), metadata={
        "help": "module-name globs kept in full precision (default: output heads)"})
    quantize_embeddings: bool = field(default=False, metadata={
        "help": "also quantize nn.Embedding weights (kept fp32 by default)"})
    quantize_lstm: bool = field(default=False, metadata={
        "help": "also quantize nn.LSTM weight matrices"})
    seed: int = field(default=0, metadata={"help": "seed of stochastic rounding"})
    bits_per_pattern: dict = field(default_factory=dict, metadata={
        "help": "{module glob: bits}; first matching glob wins over `bits`"})

    def __post_init__(self):
        qm.check_bits(self.bits)
        if not isinstance(self.bits_per_pattern, dict):
            raise ValueError(f"bits_per_pattern={self.bits_per_pattern!r} is invalid: use a "
                             f"mapping of module-name glob to bits, e.g. {{'*.output.dense': 2}}")
        for pat, b in self.bits_per_pattern.items():
            qm.check_bits(b, field=f"bits_per_pattern[{pat!r}]")
        qm.check_bucket_size(self.bucket_size)
        _check_choice("rounding", self.rounding, qm.ROUNDINGS)
        _check_choice("scheme", self.scheme, packing.SCHEMES)
        _check_choice("points_init", self.points_init, qm.POINT_INITS)
        _check_patterns("include", self.include)
        _check_patterns("exclude", self.exclude)


@dataclass
class QuantizeConfig(PTQConfig):
    """Quantized distillation (fake-quant training, then convert to packed low-bit weights)
    and differentiable quantization (learned points)."""

    differentiable: bool = field(default=False, metadata={
        "help": "learn the quantization points by SGD (needs scheme='nonuniform')"})
    train_weights: bool = field(default=False, metadata={
        "help": "differentiable mode: also train the full-precision weights"})
    target_bits: Optional[float] = field(default=None, metadata={
        "help": "average bits to allocate by gradient norm (needs ctx dataloader and loss_fn)"})
    alloc_batches: int = field(default=8, metadata={
        "help": "batches averaged for the gradient-norm allocation"})
    alloc_min_bits: int = field(default=2, metadata={"help": "fewest bits allocated to a layer"})
    alloc_max_bits: int = field(default=8, metadata={"help": "most bits allocated to a layer"})

    def __post_init__(self):
        super().__post_init__()
        if self.differentiable and self.scheme != "nonuniform":
            raise ValueError("differentiable=True learns quantization points, which needs "
                             "scheme='nonuniform' (set it, with points_init 'uniform', "
                             "'quantile' or 'kmeans')")
        qm.check_bits(self.alloc_min_bits, "alloc_min_bits")
        qm.check_bits(self.alloc_max_bits, "alloc_max_bits")
        if self.alloc_min_bits > self.alloc_max_bits:
            raise ValueError(f"alloc_min_bits={self.alloc_min_bits} is above alloc_max_bits="
                             f"{self.alloc_max_bits}: swap them")
        if self.target_bits is not None:
            if self.bits_per_pattern:
                raise ValueError("target_bits and bits_per_pattern both set: choose one (the "
                                 "allocation decides every layer's bits)")
            if not self.alloc_min_bits <= float(self.target_bits) <= self.alloc_max_bits:
                raise ValueError(f"target_bits={self.target_bits!r} is invalid: use a value "
                                 f"between alloc_min_bits={self.alloc_min_bits} and "
                                 f"alloc_max_bits={self.alloc_max_bits}")
        if not isinstance(self.alloc_batches, int) or self.alloc_batches <= 0:
            raise ValueError(f"alloc_batches={self.alloc_batches!r} is invalid: use a positive "
                             f"number of batches")


# ---------------------------------------------------------------------------------------
# The fake-quant parametrization
# ---------------------------------------------------------------------------------------

class FakeQuantize(nn.Module):
    """Parametrization ``w -> w_hat``: bucketed low-bit quantization with a straight-through
    gradient to ``w`` and, for learned points, a gradient to ``points``."""

    def __init__(self, bits: int, bucket_size: Optional[int], scheme: str = "uniform",
                 rounding: str = "deterministic", points: Optional[torch.Tensor] = None,
                 learn_points: bool = False, seed: int = 0):
        super().__init__()
        self.bits, self.bucket_size, self.scheme = bits, bucket_size, scheme
        self.rounding, self.seed = rounding, seed
        self._generator: Optional[torch.Generator] = None
        if scheme == "nonuniform":
            pts = points.detach().clone().float() if points is not None \
                else torch.linspace(0.0, 1.0, 1 << bits)
            if learn_points:
                self.points = nn.Parameter(pts)
            else:
                self.register_buffer("points", pts)
        else:
            self.points = None
        self.set_adapter(None)

    def set_adapter(self, layer: Optional[nn.Module]) -> None:
        """Quantize the weight together with the delta of peft LoRA ``layer``, the adapter
        layer wrapping the quantized module (None: no adapter)."""
        # A plain attribute, not a submodule: the adapter layer already holds this module.
        object.__setattr__(self, "_adapter", layer)

    def adapter_delta(self) -> Optional[torch.Tensor]:
        """``s B A`` of the adapter's active, unmerged LoRA weights (detached), or None."""
        layer = self._adapter
        if layer is None or getattr(layer, "disable_adapters", False):
            return None
        names = [a for a in layer.active_adapters
                 if a in layer.lora_A and a not in layer.merged_adapters]
        if not names:
            return None
        return sum(layer.get_delta_weight(a) for a in names).detach()

    def _gen(self, device: torch.device) -> torch.Generator:
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device).manual_seed(self.seed)
        return self._generator

    def encode(self, w: torch.Tensor, stochastic: Optional[bool] = None):
        """``(codes [nb, k], alpha, beta)`` of ``w``; stochastic only when asked (default:
        when configured and in training mode)."""
        if stochastic is None:
            stochastic = self.rounding == "stochastic" and self.training
        rounding = "stochastic" if stochastic else "deterministic"
        gen = self._gen(w.device) if stochastic else None
        scaled, alpha, beta = qm.bucket_scale(qm.to_buckets(w.detach().float(), self.bucket_size))
        if self.scheme == "nonuniform":
            codes = qm.nonuniform_codes(scaled, self.points, rounding, gen)
        else:
            codes = qm.uniform_codes(scaled, self.bits, rounding, gen)
        return codes, alpha, beta

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        delta = self.adapter_delta()
        codes, alpha, beta = self.encode(w if delta is None else w.detach() + delta.to(w.dtype))
        if self.scheme == "nonuniform":
            q = self.points[codes.long()]  # differentiable in the points when they learn
        else:
            q = qm.uniform_values(codes, self.bits)
        w_hat = qm.from_buckets(qm.dequantize_buckets(q, alpha, beta), w.shape).to(w.dtype)
        if delta is not None:
            # The adapter adds its delta after this layer: together they compute Q(W + delta).
            w_hat = w_hat - delta.to(w.dtype)
        if w.requires_grad:
            # Straight-through: the value is exactly w_hat (w - w is 0), the gradient reaches
            # w unchanged.
            w_hat = w_hat + (w - w.detach())
        return w_hat

    def extra_repr(self) -> str:
        return (f"bits={self.bits}, bucket_size={self.bucket_size}, scheme={self.scheme}, "
                f"rounding={self.rounding}")


# ---------------------------------------------------------------------------------------
# Selecting what to quantize
# ---------------------------------------------------------------------------------------

def _weight_names(module: nn.Module) -> list[str]:
    if isinstance(module, nn.LSTM):
        return [n for n in module._flat_weights_names if n.startswith("weight")]
    return ["weight"]


def _kind(module: nn.Module) -> str:
    return ("lstm" if isinstance(module, nn.LSTM) else
            "embedding" if isinstance(module, nn.Embedding) else "linear")


def supported_types(cfg: PTQConfig) -> tuple:
    types: tuple = (nn.Linear,)
    if cfg.quantize_embeddings:
        types += (nn.Embedding,)
    if cfg.quantize_lstm:
        types += LSTM_TYPES
    return types


def select_targets(model: nn.Module, cfg: PTQConfig) -> list[tuple[str, nn.Module]]:
    """The modules ``cfg`` quantizes, with clear errors for patterns that match nothing or
    only modules of a type this method cannot quantize."""
    types = supported_types(cfg)
    for pat in cfg.include or []:
        hits = [(n, get_target(model, n)) for n, _ in model.named_modules()
                if n and fnmatch.fnmatchcase(n, pat)]
        if hits and not any(isinstance(m, types) for _, m in hits):
            kinds = sorted({type(m).__name__ for _, m in hits})
            raise ValueError(
                f"include: pattern {pat!r} matches only modules of types this method cannot "
                f"quantize: {', '.join(kinds)} (e.g. {hits[0][0]!r}). Supported: nn.Linear, "
                f"nn.Embedding (set quantize_embeddings=True), nn.LSTM (set "
                f"quantize_lstm=True); point the pattern at those modules instead.")
    learns = isinstance(cfg, QuantizeConfig)  # a LoRA delta merges into the master weight
    chosen = select_modules(model, include=cfg.include, exclude=cfg.exclude, types=types,
                            method="quantize" if learns else "ptq", lora=learns)
    for name, mod in chosen:
        if parametrize.is_parametrized(mod) or isinstance(mod, packing.PackedMixin):
            raise ValueError(f"module {name!r} is already quantized; apply one quantization "
                             f"method per module")
    if not chosen:
        raise ValueError(f"nothing to quantize: include={cfg.include} exclude={cfg.exclude} "
                         f"leave no {'/'.join(t.__name__ for t in types)} module")
    if cfg.quantize_embeddings:
        _check_untied(model, chosen)
    return chosen


def _check_untied(model: nn.Module, chosen) -> None:
    owners: dict[int, list[str]] = {}
    for mname, mod in model.named_modules(remove_duplicate=False):
        for pname, p in mod.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append(f"{mname}.{pname}" if mname else pname)
    for name, mod in chosen:
        if isinstance(mod, nn.Embedding):
            # Its own paths (a peft adapter layer adds base_layer.weight) are not sharing.
            shared = sorted(o for o in set(owners.get(id(mod.weight), []))
                            if not o.startswith(name + "."))
            if shared:
                raise ValueError(
                    f"embedding {name!r} shares its weight with {shared}: quantizing it would "
                    f"untie them. Keep embeddings in full precision (quantize_embeddings=False) "
                    f"or untie the weights first (config tie_word_embeddings=False).")


def bits_for(names: list[str], cfg: PTQConfig) -> dict[str, int]:
    """Bits of each module: the first matching ``bits_per_pattern`` glob, else ``bits``.
    A glob that matches none of the quantized modules is an error listing them."""
    per = getattr(cfg, "bits_per_pattern", {}) or {}
    for pat in per:
        if not any(fnmatch.fnmatchcase(n, pat) for n in names):
            shown = ", ".join(names[:12]) + (" ..." if len(names) > 12 else "")
            raise ValueError(f"bits_per_pattern: pattern {pat!r} matches none of the quantized "
                             f"modules: {shown}")
    out = {}
    for n in names:
        out[n] = next((b for pat, b in per.items() if fnmatch.fnmatchcase(n, pat)), cfg.bits)
    return out


def _gradient_sums(model: nn.Module, weights: list, ctx: CompressionContext, batches: int,
                   squared: bool, what: str) -> tuple[list, int]:
    """Per weight tensor of ``weights`` (a list of lists), the sum over ``batches`` batches
    of ``ctx.dataloader`` of its gradient under ``ctx.loss_fn`` (of its square when
    ``squared``), frozen weights (a LoRA student's base) included, and the batch count.
    Leaves the model's ``.grad`` fields and ``requires_grad`` flags as they were."""
    params = [p for p in model.parameters() if p.requires_grad]
    saved = [p.grad for p in params]
    for p in params:
        p.grad = None
    acc = [[torch.zeros_like(w) for w in ws] for ws in weights]
    frozen = [w for ws in weights for w in ws if not w.requires_grad]
    n = 0
    try:
        for w in frozen:
            w.requires_grad_(True)
        for batch in batches_on_device(model, ctx, limit=batches):
            loss = ctx.loss_fn(model, batch)
            grads = torch.autograd.grad(loss, [w for ws in weights for w in ws],
                                        allow_unused=True)
            it = iter(grads)
            for a in acc:
                for t in a:
                    g = next(it)
                    if g is not None:
                        t.add_(g.square() if squared else g)
            n += 1
    finally:
        for w in frozen:
            w.requires_grad_(False)
        for p, g in zip(params, saved):
            p.grad = g
    if n == 0:
        raise ValueError(f"{what}: ctx.dataloader yielded no batch")
    return acc, n


def gradient_norms(model: nn.Module, targets, ctx: CompressionContext, batches: int
                   ) -> list[float]:
    """Norm of each target module's gradient averaged over ``batches`` batches (the
    paper's sensitivity measure), frozen weights (a LoRA student's base) included. Leaves
    the model's ``.grad`` fields and ``requires_grad`` flags as they were."""
    if ctx.dataloader is None or ctx.loss_fn is None:
        raise ValueError("target_bits allocates bits by gradient norm, which needs a "
                         "CompressionContext with a dataloader and a loss_fn; pass one to "
                         "compress_, or set per-layer bits with bits_per_pattern instead")
    weights = [[getattr(m, w) for w in _weight_names(m)] for _, m in targets]
    acc, n = _gradient_sums(model, weights, ctx, batches, False, "target_bits")
    norms = torch.stack([sum((t / n).pow(2).sum().to(acc[0][0].device) for t in a)
                         for a in acc]).sqrt()
    return to_host(norms).tolist()  # one transfer for every layer


def fisher_diagonals(model: nn.Module, names: list, ctx: CompressionContext, batches: int,
                     what: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per module of ``names``, ``(its weight, F)``: ``F`` the squared gradient of
    ``ctx.loss_fn`` averaged over ``batches`` batches, the diagonal of the empirical Fisher
    (``what``: the caller, for the error message)."""
    if ctx.dataloader is None or ctx.loss_fn is None:
        raise ValueError(f"{what} needs a CompressionContext with a dataloader and a loss_fn")
    weights = [[model.get_submodule(n).weight] for n in names]
    acc, n = _gradient_sums(model, weights, ctx, batches, True, what)
    return [(w, f / n) for (w,), (f,) in zip(weights, acc)]


def fisher_errors(model: nn.Module, names: list, ctx: CompressionContext, batches: int,
                  bits: list, bucket_size: Optional[int]) -> list[dict]:
    """Per module of ``names`` (each with a ``weight``), ``{b: sum(F * (Q_b(w) - w)^2)}`` for
    each ``b`` in ``bits``: the loss its weight adds when stored at ``b`` bits (uniform
    scheme, ``bucket_size`` buckets), to second order, with ``F`` the squared gradient of
    the loss averaged over ``batches`` batches (the diagonal of the empirical Fisher, standing
    in for the Hessian, as Hessian-aware bit allocation does)."""
    fisher = fisher_diagonals(model, names, ctx, batches, "fisher_errors")
    out = []
    with torch.no_grad():
        for w, f in fisher:
            fw = f.float()
            out.append({int(b): float((fw * (qm.quantize_uniform(w.float(), int(b), bucket_size)
                                             - w.float()).square()).sum()) for b in bits})
    return out


# ---------------------------------------------------------------------------------------
# Prepare, convert, restore
# ---------------------------------------------------------------------------------------

def quantized_weights(model: nn.Module, bits: dict, bucket_size: Optional[int]):
    """Within the block, the ``weight`` of each module named in ``bits`` ({name: bits})
    holds its uniform bucketed quantization at those bits (what ``ptq`` would store); the
    full-precision values are put back after it, also on error."""
    return weights_replaced(model, {name: (lambda w, b=int(b): qm.quantize_uniform(
        w, b, bucket_size)) for name, b in bits.items()})


def _layer_record(name: str, mod: nn.Module, bits: int, cfg: PTQConfig) -> dict:
    return {"kind": _kind(mod), "bits": bits,
            "weights": {w: packing.weight_spec(getattr(mod, w).shape, bits, cfg.bucket_size,
                                               cfg.scheme) for w in _weight_names(mod)}}


def _initial_points(w: torch.Tensor, bits: int, cfg: PTQConfig, gen: torch.Generator):
    if cfg.scheme != "nonuniform":
        return None
    scaled, _, _ = qm.bucket_scale(qm.to_buckets(w.detach().float(), cfg.bucket_size))
    # The generator is a CPU one (seeded the same on every device): sample on the host.
    return qm.init_points(to_host(scaled), bits, cfg.points_init, generator=gen)


def _fake_quant(spec: dict, cfg: PTQConfig, seed: int, points=None) -> FakeQuantize:
    learn = bool(getattr(cfg, "differentiable", False))
    # The record stores the effective bucket size; for "one per tensor" keep it per tensor.
    return FakeQuantize(spec["bits"], cfg.bucket_size, cfg.scheme, cfg.rounding,
                        points=points, learn_points=learn, seed=seed)


def prepare(model: nn.Module, layers: dict, cfg: PTQConfig, init: bool = True) -> None:
    """Register a :class:`FakeQuantize` on every weight in ``layers`` (a record's
    ``layers``). ``init=False`` (at load time) skips the data-dependent point init."""
    gen = torch.Generator().manual_seed(cfg.seed)
    # Differentiable quantization learns the points with the weights fixed (Algorithm 2).
    freeze = getattr(cfg, "differentiable", False) and not getattr(cfg, "train_weights", False)
    for i, (name, layer) in enumerate(layers.items()):
        mod = get_target(model, name)
        lora = adapter_layer(model, name)
        for j, (wname, spec) in enumerate(layer["weights"].items()):
            w = getattr(mod, wname)
            pts = _initial_points(w, spec["bits"], cfg, gen) if init else None
            fq = _fake_quant(spec, cfg, seed=cfg.seed * 100003 + 97 * i + j, points=pts)
            fq.to(w.device)
            fq.set_adapter(lora)
            parametrize.register_parametrization(mod, wname, fq, unsafe=True)
            if freeze:
                mod.parametrizations[wname].original.requires_grad_(False)
        if lora is not None:
            _merge_into_master(lora)


def _lifted(layer: nn.Module, name: str, *args, **kwargs):
    """peft's ``name`` (``merge`` or ``unmerge``) of LoRA ``layer``, run with its base
    layer's fake quantization removed, so peft's ``base_layer.weight.data += delta`` reaches
    the master weight; the same parametrization modules (learned points included) go back."""
    base = layer.get_base_layer()
    lifted = {n: list(base.parametrizations[n]) for n in list(base.parametrizations)}
    for n in lifted:
        parametrize.remove_parametrizations(base, n, leave_parametrized=False)
    try:
        return getattr(type(layer), name)(layer, *args, **kwargs)
    finally:
        for n, mods in lifted.items():
            for m in mods:
                parametrize.register_parametrization(base, n, m, unsafe=True)


def _merge(layer: nn.Module, *args, **kwargs):
    return _lifted(layer, "merge", *args, **kwargs)


def _unmerge(layer: nn.Module, *args, **kwargs):
    return _lifted(layer, "unmerge", *args, **kwargs)


def _merge_into_master(layer: nn.Module) -> None:
    """Make peft's merge and unmerge of LoRA ``layer`` (``merge_and_unload`` calls the
    merge) go into the master weight of its fake-quantized base layer. Bound methods on the
    instance, so that a deep copy of the model rebinds them to the copy."""
    for name, fn in (("merge", _merge), ("unmerge", _unmerge)):
        object.__setattr__(layer, name, types.MethodType(fn, layer))


@torch.no_grad()
def convert(model: nn.Module, layers: dict, stochastic: bool = False) -> None:
    """Replace every prepared weight in ``layers`` by its packed quantization, rounded
    deterministically (the end of quantized distillation) unless ``stochastic``."""
    for name, layer in layers.items():
        mod = get_target(model, name)
        staged = {}
        for wname in layer["weights"]:
            fq = mod.parametrizations[wname][0]
            if fq.adapter_delta() is not None:
                raise ValueError(f"quantize: {name} still has an unmerged peft LoRA adapter; "
                                 f"merge it first (model = model.merge_and_unload()), so that "
                                 f"its delta is packed with the weight")
            w = mod.parametrizations[wname].original
            codes, alpha, beta = fq.encode(w, stochastic=stochastic)
            pts = fq.points.detach().clone() if fq.points is not None else None
            staged[wname] = (codes, alpha, beta, pts)
        for wname in layer["weights"]:
            parametrize.remove_parametrizations(mod, wname, leave_parametrized=False)
        packing.to_packed(mod, layer["weights"])
        for wname, args in staged.items():
            mod.set_packed(wname, *args)


def restore_layers(model: nn.Module, record: dict, cfg: PTQConfig) -> None:
    """Rebuild the modules a record describes, at load time (no data): fake-quant
    parametrizations when saved mid-training, packed modules when converted."""
    layers = record["layers"]
    if record.get("stage") == "prepared":
        prepare(model, layers, cfg, init=False)
        return
    for name, layer in layers.items():
        packing.to_packed(get_target(model, name), layer["weights"])


def summarize(layers: dict) -> dict:
    """Counts and average bits per quantized weight implied by the layer specs."""
    n = sum(math.prod(s["shape"]) for layer in layers.values() for s in layer["weights"].values())
    bits = sum(math.prod(s["shape"]) * s["bits"] + 64 * qm.num_buckets(
        math.prod(s["shape"]), s["bucket_size"])
        for layer in layers.values() for s in layer["weights"].values())
    return {"quantized_modules": len(layers), "quantized_weights": n,
            "bits_per_quantized_weight": bits / n if n else None}


def _replaced(linears: frozenset, cfg: PTQConfig) -> frozenset:
    out = linears | {"plain_lstm"} if cfg.quantize_lstm else linears
    return out | {"plain_embedding"} if cfg.quantize_embeddings else out


@register
class QuantizeMethod(Method):
    """Quantized distillation / differentiable quantization: fake-quant now, packed at
    ``finalize``."""

    name = "quantize"
    config_cls = QuantizeConfig
    citation = CITATION
    replaces = frozenset({"plain_linear"})
    keeps = frozenset({"layer_names"})  # finalize converts the layers it names

    def replaced(self, config: QuantizeConfig) -> frozenset:
        return _replaced(self.replaces, config)

    def apply(self, model: nn.Module, config: QuantizeConfig, ctx: CompressionContext) -> dict:
        targets = select_targets(model, config)
        names = [n for n, _ in targets]
        extra: dict = {}
        if config.target_bits is not None:
            norms = gradient_norms(model, targets, ctx, config.alloc_batches)
            numels = [sum(getattr(m, w).numel() for w in _weight_names(m)) for _, m in targets]
            alloc = qm.allocate_bits(norms, numels, float(config.target_bits),
                                     config.alloc_min_bits, config.alloc_max_bits)
            bits = dict(zip(names, alloc))
            extra["bit_allocation"] = {n: {"grad_norm": g, "bits": b}
                                       for n, g, b in zip(names, norms, alloc)}
        else:
            bits = bits_for(names, config)
        layers = {n: _layer_record(n, m, bits[n], config) for n, m in targets}
        prepare(model, layers, config)
        return {"stage": "prepared", "layers": layers, "summary": summarize(layers), **extra}

    def finalize(self, model: nn.Module, config: QuantizeConfig, record: dict) -> dict:
        if record.get("stage") == "packed":
            return record
        convert(model, record["layers"])
        return {**record, "stage": "packed"}

    def restore(self, model: nn.Module, record: dict) -> None:
        restore_layers(model, record, QuantizeConfig(**record["config"]))


@register
class PTQMethod(Method):
    """Post-training ("PM") quantization: quantize once and pack, no training."""

    name = "ptq"
    config_cls = PTQConfig
    citation = CITATION
    replaces = frozenset({"plain_linear"})
    # In a run, the trained weights are quantized: applied before training, the packed
    # weights never trained (only biases, LayerNorms and the head did), and the 3-layer
    # student of the built-in data stored at 4 bits scored 72.1 instead of 80 (2026-12-03).
    post_training = True

    def replaced(self, config: PTQConfig) -> frozenset:
        return _replaced(self.replaces, config)

    def apply(self, model: nn.Module, config: PTQConfig, ctx: CompressionContext) -> dict:
        targets = select_targets(model, config)
        bits = bits_for([n for n, _ in targets], config)
        layers = {n: _layer_record(n, m, bits[n], config) for n, m in targets}
        prepare(model, layers, config)
        # Stochastic PM rounding draws once, here, from the seeded generator.
        convert(model, layers, stochastic=config.rounding == "stochastic")
        return {"stage": "packed", "layers": layers, "summary": summarize(layers)}

    def restore(self, model: nn.Module, record: dict) -> None:
        restore_layers(model, record, PTQConfig(**record["config"]))
