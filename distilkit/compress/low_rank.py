"""Low-rank factorization: replace a linear layer by two thin ones from a truncated SVD.

A linear layer ``y = W x + b`` with ``W`` of shape ``m x n`` (``m`` outputs, ``n`` inputs)
is replaced by ``y = U (V x) + b`` with ``U`` ``m x r`` and ``V`` ``r x n``. Parameters and
multiply-adds fall from ``m n`` to ``(m + n) r``, so the factorization saves anything only
when ``r < m n / (m + n)``. By the Eckart-Young theorem the truncated SVD
``W = P S Q^T ~= P_r S_r Q_r^T`` is the best rank-``r`` approximation in Frobenius and
spectral norm; the singular values are split evenly between the factors
(``U = P_r sqrt(S_r)``, ``V = sqrt(S_r) Q_r^T``) so that both have the same scale, which
keeps their gradients balanced when the model is then distilled to recover accuracy
(Denton et al. 2014; Sainath et al. 2013). At full rank (``r = min(m, n)``) the product
reproduces ``W`` exactly, up to float rounding.

The rank of each chosen layer is given one of five ways (exactly one):

* ``rank``: an integer, the same for every layer; larger than ``min(m, n)`` is an error;
* ``ranks``: ``{module name or glob: rank}``, a rank per layer (the first matching pattern
  wins; the budget search writes one exact name per factorized linear); the layers named are
  the ones factorized unless ``include`` says otherwise;
* ``rank_fraction``: a fraction of each layer's full rank ``min(m, n)``;
* ``param_fraction``: a fraction of each layer's weight parameters, ``r = floor(f m n / (m + n))``
  (``0.5`` halves the parameters of the factorized layers);
* ``energy``: the smallest ``r`` whose singular values keep this fraction of
  ``sum(S_i^2)``, the retained spectral energy (so layers get different ranks).

With a fraction or an energy, a layer whose factors would not be smaller than the dense
weight is left dense (``keep_dense_if_larger``), and the record says so. The record stores the
rank of every factorized layer, which is all ``restore`` needs to rebuild the shapes.
"""
from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from distilkit.compress.base import (CompressionContext, Method, register, require_plain,
                                     select_modules, set_module, weights_replaced)


class LowRankLinear(nn.Module):
    """``y = up(down(x))``: ``down`` is ``rank x in_features`` without bias, ``up`` is
    ``out_features x rank`` with the original bias."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        if not 1 <= rank <= min(in_features, out_features):
            raise ValueError(f"rank={rank} must be in 1..min(in_features, out_features)="
                             f"{min(in_features, out_features)} for a {out_features}x{in_features} layer")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    @property
    def weight(self) -> torch.Tensor:
        """The dense ``out x in`` product ``U V``, detached and computed on each access (it is
        not stored, which would undo the saving). Model code reads ``.weight`` of the linears
        it calls (T5 checks ``wo.weight.dtype`` every forward); the cost, ``m n r``
        multiply-adds, is small next to a forward over a batch."""
        with torch.no_grad():
            return self.up.weight @ self.down.weight

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int) -> "LowRankLinear":
        """The best rank-``rank`` factorization of ``linear`` (truncated SVD, computed in float64
        so that full rank is exact to float32 rounding)."""
        m, n = linear.out_features, linear.in_features
        new = cls(n, m, rank, bias=linear.bias is not None,
                  device=linear.weight.device, dtype=linear.weight.dtype)
        u, v = svd_factors(linear.weight.detach(), rank)
        with torch.no_grad():
            new.up.weight.copy_(u)
            new.down.weight.copy_(v)
            if linear.bias is not None:
                new.up.bias.copy_(linear.bias.detach())
        new.train(linear.training)
        return new

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def svd_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U, V)`` with ``U @ V`` the best rank-``rank`` approximation of ``weight`` (m x n):
    ``U`` is m x r, ``V`` is r x n, singular values split as square roots between them."""
    m, n = weight.shape
    if not 1 <= rank <= min(m, n):
        raise ValueError(f"rank={rank} must be in 1..{min(m, n)} for a {m}x{n} weight")
    p, s, qh = torch.linalg.svd(weight.double(), full_matrices=False)
    root = s[:rank].sqrt()
    u = p[:, :rank] * root
    v = root[:, None] * qh[:rank]
    return u.to(weight.dtype), v.to(weight.dtype)


def rank_for_energy(singular_values: torch.Tensor, energy: float) -> int:
    """Smallest ``r`` with ``sum(S[:r]^2) >= energy * sum(S^2)``."""
    e = singular_values.double().pow(2)
    cum = torch.cumsum(e, 0) / e.sum().clamp_min(1e-300)
    # The tiny tolerance keeps energy=1.0 from asking for more than full rank through rounding.
    return min(int((cum < energy - 1e-12).sum()) + 1, len(singular_values))


def truncated(weight: torch.Tensor, rank: int) -> torch.Tensor:
    """The best rank-``rank`` approximation of ``weight`` as one dense matrix (what a
    :class:`LowRankLinear` of that rank made from it computes)."""
    u, v = svd_factors(weight.detach(), min(rank, min(weight.shape)))
    return u @ v


def project_(model: nn.Module, ranks: dict) -> None:
    """Replace the ``weight`` of each module named in ``ranks`` ({name: rank}) by its
    truncated SVD at that rank, in place: the module stays dense but computes what its
    factors would (the budget search's rank cut, before the short distillation)."""
    with torch.no_grad():
        for name, r in ranks.items():
            w = model.get_submodule(name).weight
            w.copy_(truncated(w, int(r)))


def low_rank_weights(model: nn.Module, ranks: dict):
    """Within the block, the ``weight`` of each module named in ``ranks`` ({name: rank})
    holds its truncated SVD (what ``low_rank`` would factorize it into); the dense values
    are put back after it, also on error."""
    return weights_replaced(model, {name: (lambda w, r=int(r): truncated(w, r))
                                    for name, r in ranks.items()})


def fisher_rank_errors(model: nn.Module, names: list, ctx: CompressionContext, batches: int,
                       ranks: list) -> list[dict]:
    """Per module of ``names``, ``{r: sum(F * (W_r - W)^2)}`` for each rank of its entry in
    ``ranks`` (a list of rank lists, one per name): the loss its weight adds when factorized
    at rank ``r``, to second order, with ``F`` the squared gradient averaged over ``batches``
    batches (the diagonal Fisher, as :func:`~distilkit.compress.quantize.fisher_errors`
    estimates the loss of fewer bits, so that the two are on one scale). One SVD per weight."""
    from distilkit.compress.quantize import fisher_diagonals

    fisher = fisher_diagonals(model, names, ctx, batches, "fisher_rank_errors")
    out = []
    with torch.no_grad():
        for (w, f), rs in zip(fisher, ranks):
            fw = f.double()
            wd = w.detach().double()
            p, s, qh = torch.linalg.svd(wd, full_matrices=False)
            errs = {}
            for r in rs:
                approx = (p[:, :r] * s[:r]) @ qh[:r]
                errs[int(r)] = float((fw * (approx - wd).square()).sum())
            out.append(errs)
    return out


def break_even_rank(m: int, n: int) -> int:
    """Largest rank at which the two factors have fewer weights than the dense ``m x n``."""
    return (m * n - 1) // (m + n)


RANK_KEYS = ("rank", "ranks", "rank_fraction", "param_fraction", "energy")


@dataclass
class LowRankConfig:
    rank: Optional[int] = field(default=None, metadata={
        "help": "The rank of every factorized layer (1..min(m, n))."})
    rank_fraction: Optional[float] = field(default=None, metadata={
        "help": "Rank as a fraction of each layer's full rank min(m, n), in (0, 1]."})
    ranks: Optional[dict] = field(default=None, metadata={
        "help": "{module name or glob: rank}: a rank per linear (first matching pattern "
                "wins); the linears it names are factorized unless include is given."})
    param_fraction: Optional[float] = field(default=None, metadata={
        "help": "Keep this fraction of each layer's weight parameters, in (0, 1)."})
    energy: Optional[float] = field(default=None, metadata={
        "help": "Retained spectral energy sum(S_r^2)/sum(S^2) per layer, in (0, 1]."})
    include: Optional[list] = field(default=None, metadata={
        "help": "Globs over nn.Linear names to factorize (default: every linear inside the "
                "transformer layers of a supported family)."})
    exclude: list = field(default_factory=list, metadata={"help": "Globs to leave dense."})
    keep_dense_if_larger: bool = field(default=True, metadata={
        "help": "With a fraction or energy, leave a layer dense when its factors would not "
                "be smaller."})

    def __post_init__(self):
        given = {k: getattr(self, k) for k in RANK_KEYS if getattr(self, k) is not None}
        if len(given) != 1:
            raise ValueError(f"low_rank: give exactly one of {', '.join(RANK_KEYS)} "
                             f"(got {given or 'none'})")
        if self.ranks is not None:
            if not isinstance(self.ranks, dict) or not self.ranks:
                raise ValueError(f"low_rank: ranks={self.ranks!r} must be a non-empty mapping "
                                 "{module name or glob: rank}")
            for pat, r in self.ranks.items():
                if isinstance(r, bool) or not isinstance(r, int) or r < 1:
                    raise ValueError(f"low_rank: ranks[{pat!r}]={r!r} must be a positive "
                                     "integer")
        if self.rank is not None and (not isinstance(self.rank, int) or self.rank < 1):
            raise ValueError(f"low_rank: rank={self.rank!r} must be a positive integer")
        if self.rank_fraction is not None and not 0 < self.rank_fraction <= 1:
            raise ValueError(f"low_rank: rank_fraction={self.rank_fraction!r} must be in (0, 1]")
        if self.param_fraction is not None and not 0 < self.param_fraction < 1:
            raise ValueError(f"low_rank: param_fraction={self.param_fraction!r} must be in (0, 1); "
                             f"0.5 halves the factorized layers")
        if self.energy is not None and not 0 < self.energy <= 1:
            raise ValueError(f"low_rank: energy={self.energy!r} must be in (0, 1], e.g. 0.9")


def choose_rank(cfg: LowRankConfig, weight: torch.Tensor, name: str) -> int:
    """The rank ``cfg`` asks for on this ``m x n`` weight (may exceed the break-even rank)."""
    m, n = weight.shape
    full = min(m, n)
    if cfg.ranks is not None:
        r = next((int(v) for pat, v in cfg.ranks.items() if fnmatch.fnmatchcase(name, pat)), None)
        if r is None:
            raise ValueError(f"low_rank: {name} is included but no pattern of ranks names it "
                             f"({sorted(cfg.ranks)}); add it to ranks or exclude it")
        if r > full:
            raise ValueError(f"low_rank: ranks[{name!r}]={r} is larger than its weight allows: "
                             f"it is {m}x{n}, so the rank is at most {full}")
        return r
    if cfg.rank is not None:
        if cfg.rank > full:
            raise ValueError(f"low_rank: rank={cfg.rank} is larger than {name} allows: its weight "
                             f"is {m}x{n}, so the rank is at most min(m, n)={full}")
        return cfg.rank
    if cfg.rank_fraction is not None:
        return max(1, min(full, int(math.floor(cfg.rank_fraction * full))))
    if cfg.param_fraction is not None:
        return max(1, min(full, int(math.floor(cfg.param_fraction * m * n / (m + n)))))
    s = torch.linalg.svdvals(weight.detach().double())
    return rank_for_energy(s, cfg.energy)


def factorized_shapes(model: nn.Module, ranks: dict) -> nn.Module:
    """A copy of ``model`` whose linears named in ``ranks`` ({name: rank}) are freshly
    initialised :class:`LowRankLinear` s of that rank: the shapes ``low_rank`` would serve,
    not its factors (no SVD). For timing only: a forward pass costs the same whatever the
    weights hold, and the budget search times its candidates this way while the student it
    trains stays dense (:func:`project_`)."""
    import copy

    out = copy.deepcopy(model)
    for name, r in ranks.items():
        lin = out.get_submodule(name)
        new = LowRankLinear(lin.in_features, lin.out_features, int(r), bias=lin.bias is not None,
                            device=lin.weight.device, dtype=lin.weight.dtype)
        new.train(lin.training)
        set_module(out, name, new)
    return out


def _default_targets(model: nn.Module) -> list[str]:
    from distilkit.compress.families import get_adapter, supported_families

    try:
        return get_adapter(model, "low_rank").layer_linears()
    except ValueError as e:
        raise ValueError(f"{e}. For other models pass include=[glob, ...] naming the linears "
                         f"to factorize (supported for the default: {supported_families()})") from None


@register
class LowRank(Method):
    name = "low_rank"
    config_cls = LowRankConfig
    needs = frozenset({"plain_linear"})
    # Its factors are plain nn.Linear (later methods may target them), the layer is not.
    replaces = frozenset({"named_linears"})
    citation = ("Denton, Zaremba, Bruna, LeCun, Fergus. Exploiting Linear Structure Within "
                "Convolutional Networks for Efficient Evaluation. NeurIPS 2014; Sainath et al. "
                "Low-rank matrix factorization for deep neural network training. ICASSP 2013")

    def apply(self, model: nn.Module, cfg: LowRankConfig, ctx: CompressionContext) -> dict:
        include = cfg.include if cfg.include is not None else \
            list(cfg.ranks) if cfg.ranks is not None else _default_targets(model)
        chosen = select_modules(model, include, cfg.exclude, types=(nn.Linear,),
                                field_name="low_rank.include", method="low_rank")
        require_plain(chosen, "low_rank")
        if not chosen:
            raise ValueError("low_rank: no nn.Linear left to factorize after include/exclude")
        ranks, kept_dense = {}, []
        before = sum(p.numel() for p in model.parameters())
        dense_w = lowrank_w = 0
        for name, lin in chosen:
            r = choose_rank(cfg, lin.weight, name)
            m, n = lin.weight.shape
            explicit = cfg.rank is not None or cfg.ranks is not None
            if not explicit and cfg.keep_dense_if_larger and r > break_even_rank(m, n):
                kept_dense.append(name)
                continue
            set_module(model, name, LowRankLinear.from_linear(lin, r))
            ranks[name] = r
            dense_w += m * n
            lowrank_w += (m + n) * r
        return {
            "ranks": ranks, "kept_dense": kept_dense,
            "factorized_weights_before": dense_w, "factorized_weights_after": lowrank_w,
            "params_before": before, "params_after": sum(p.numel() for p in model.parameters()),
        }

    def restore(self, model: nn.Module, record: dict) -> None:
        for name, r in record["ranks"].items():
            lin = model.get_submodule(name)
            set_module(model, name, LowRankLinear(lin.in_features, lin.out_features, int(r),
                                                  bias=lin.bias is not None,
                                                  device=lin.weight.device, dtype=lin.weight.dtype))
