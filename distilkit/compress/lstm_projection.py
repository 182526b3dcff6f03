"""LSTM projection factorization (Shi et al. 2018): method ``lstm_projection``.

How it works
------------
An LSTM layer with hidden size H spends most of its parameters and time on the recurrent
matrix ``W_h`` (4H x H, the four gates stacked) and on the next layer's input matrix
``W_x`` (4H x H per input direction). Shi et al. factor the recurrent matrix through a
rank-r projection of the hidden state,

    W_h  ~=  Z_h P          Z_h: 4H x r,   P: r x H,

and *share* ``P`` with the next layer: that layer reads the projected state ``P h`` instead
of ``h``, so its input matrix becomes ``Z_x`` with ``W_x ~= Z_x P``. This is exactly the
LSTMP cell (Sak et al. 2014) that ``torch.nn.LSTM(proj_size=r)`` implements:
``weight_hr = P``, ``weight_hh = Z_h``, ``weight_ih`` of the next layer ``= Z_x``.

* ``P`` and ``Z_h`` come from the truncated SVD ``W_h = U S V^T``: ``P = V_r^T`` (orthonormal
  rows), ``Z_h = U_r S_r`` -- the best rank-r approximation of ``W_h``.
* ``Z_x`` is the least-squares solution of ``Z_x P_bd = W_x``, ``P_bd`` being the
  block-diagonal of the forward and backward directions' ``P`` (a bidirectional layer
  feeds ``[P_f h_f, P_b h_b]`` to the next).
* The last layer's output is mapped back to width H with ``P^T`` (``h ~= P^T P h``), so the
  code that reads the LSTM (max-pool, classifier, decoder) is unchanged. ``P^T`` is the
  transposed ``weight_hr`` itself, not a new parameter; at full rank ``P`` is orthogonal and
  the factorized LSTM computes exactly what the original did. (torch's kernel needs
  ``proj_size < hidden_size``, so a full-rank result is stored as a plain LSTM holding the
  factor products; it exists to check the factorization, and saves nothing.)

``nn.LSTM`` has one ``proj_size`` for all its layers and directions, so the rank is common:
with ``energy`` it is the largest of the per-matrix ranks that keep that share of the
squared singular values.

What it trades
--------------
Per layer and direction, ``4H*H`` recurrent weights become ``4H*r + r*H``, and the next
layer's ``4H*2H`` input weights ``4H*2r``; e.g. H=300, r=75 keeps 31% of the recurrent
weights. The approximation error is then recovered by distilling from the teacher (or the
uncompressed LSTM), which the recipe pipeline does after ``apply``. Unlike low-rank factoring
of ``nn.Linear`` layers (``factorize``), this changes the recurrence itself and keeps one
projection per layer, which is why it needs its own method.

Save/load: the record lists each factorized module and its rank; ``restore`` rebuilds the
projected LSTM shapes from the saved config before the strict state-dict load.

References: Shi et al. (2018), who apply it to LSTM acoustic event detection models, after
Prabhavalkar et al. (2016); see :data:`CITATION`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from distilkit.compress.base import (CompressionContext, Method, register, select_modules,
                                     set_module)

CITATION = ("Shi, B., Sun, M., Kao, C.-C., Rozgic, V., Matsoukas, S., Wang, C. (2018). "
            "Compression of Acoustic Event Detection Models with Low-rank Matrix Factorization "
            "and Quantization Training. NeurIPS 2018 CDNNRIA Workshop. Shared projection: "
            "Prabhavalkar, Alsharif, Bruguier, McGraw (2016). On the Compression of Recurrent "
            "Neural Networks with an Application to LVCSR Acoustic Modeling for Embedded Speech "
            "Recognition. ICASSP 2016.")


@dataclass
class LSTMProjectionConfig:
    """Settings of ``lstm_projection``. Give ``rank`` or ``energy``, not both."""

    rank: Optional[Union[int, float]] = field(default=0.5, metadata={
        "help": "projection size: an int (absolute, <= hidden size) or a float in (0, 1] "
                "(fraction of the hidden size, rounded up)"})
    energy: Optional[float] = field(default=None, metadata={
        "help": "instead of rank: keep this share in (0, 1] of the squared singular values "
                "of every recurrent matrix"})
    include: Optional[list] = field(default=None, metadata={
        "help": "globs of nn.LSTM module names to factorize (None: every LSTM)"})
    exclude: list = field(default_factory=list, metadata={"help": "globs to leave alone"})

    def __post_init__(self):
        if self.energy is not None:
            if self.rank is not None and self.rank != 0.5:
                raise ValueError(f"lstm_projection: rank={self.rank!r} and energy="
                                 f"{self.energy!r} both given; set only one")
            self.rank = None
            if isinstance(self.energy, bool) or not isinstance(self.energy, (int, float)) \
                    or not 0.0 < self.energy <= 1.0:
                raise ValueError(f"lstm_projection.energy={self.energy!r}: use a float in "
                                 "(0, 1], e.g. 0.9")
        elif self.rank is None:
            raise ValueError("lstm_projection: give rank (int or fraction) or energy")
        elif isinstance(self.rank, bool) or not isinstance(self.rank, (int, float)):
            raise ValueError(f"lstm_projection.rank={self.rank!r}: use an int >= 1 or a "
                             "float fraction in (0, 1]")
        elif isinstance(self.rank, int) and self.rank < 1:
            raise ValueError(f"lstm_projection.rank={self.rank!r}: an absolute rank must be >= 1")
        elif isinstance(self.rank, float) and not 0.0 < self.rank <= 1.0:
            raise ValueError(f"lstm_projection.rank={self.rank!r}: a fractional rank must be "
                             "in (0, 1]; use an int for an absolute rank")
        if isinstance(self.include, str):
            self.include = [self.include]
        if isinstance(self.exclude, str):
            self.exclude = [self.exclude]


# ---------------------------------------------------------------------------------------
# Pure math
# ---------------------------------------------------------------------------------------

def energy_rank(singular_values: torch.Tensor, energy: float) -> int:
    """Smallest r whose top-r squared singular values hold ``energy`` of the total."""
    s2 = singular_values.double().pow(2)
    total = float(s2.sum())
    if total == 0.0:
        return 1
    cum = torch.cumsum(s2, 0) / total
    return int(torch.searchsorted(cum, torch.tensor(energy - 1e-12, dtype=cum.dtype)).item()) + 1


def resolve_rank(rank: Union[int, float], hidden_size: int, where: str = "") -> int:
    """An absolute projection size from an int or a fraction of ``hidden_size``; a rank
    above the hidden size is an error (a projection cannot widen the state)."""
    if isinstance(rank, float):
        r = max(1, int(-(-rank * hidden_size // 1)))  # ceil
    else:
        r = int(rank)
    if r > hidden_size:
        raise ValueError(f"lstm_projection.rank={rank!r}{where}: larger than the hidden size "
                         f"{hidden_size}; use a rank <= {hidden_size} (or a fraction <= 1)")
    return r


def svd_projection(w_h: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Z_h, P)`` with ``Z_h @ P`` the best rank-r approximation of ``w_h`` (4H x H);
    ``P`` (r x H) has orthonormal rows."""
    u, s, vh = torch.linalg.svd(w_h.double(), full_matrices=False)
    return (u[:, :r] * s[:r]), vh[:r]


def block_diag_projection(projections: list[torch.Tensor]) -> torch.Tensor:
    """The projection applied to a (bi)directional layer's concatenated output."""
    return torch.block_diag(*projections)


def least_squares_input(w_x: torch.Tensor, p_bd: torch.Tensor) -> torch.Tensor:
    """``Z_x`` minimising ``||Z_x P_bd - W_x||_F`` (W_x: 4H x D*H, P_bd: D*r x D*H)."""
    sol = torch.linalg.lstsq(p_bd.double().T, w_x.double().T).solution
    return sol.T


# ---------------------------------------------------------------------------------------
# The projected LSTM module
# ---------------------------------------------------------------------------------------

class ProjectedLSTM(nn.LSTM):
    """``nn.LSTM`` with ``proj_size`` whose outputs are mapped back to ``hidden_size`` by
    each layer's ``weight_hr`` transposed, so it is a drop-in replacement for the LSTM it was
    factorized from (same output widths). Its parameters are those of ``nn.LSTM(proj_size)``."""

    def _unproject(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        r = self.proj_size
        parts = []
        for d in range(2 if self.bidirectional else 1):
            p = getattr(self, f"weight_hr_l{layer}{'_reverse' if d else ''}")
            parts.append(x[..., d * r:(d + 1) * r] @ p)
        return torch.cat(parts, dim=-1)

    def forward(self, input, hx=None):  # noqa: A002 - nn.LSTM's argument name
        if hx is not None and hx[0].shape[-1] == self.hidden_size != self.proj_size:
            # An initial state of the original width is projected like every later one.
            dirs = 2 if self.bidirectional else 1
            h0 = torch.stack([hx[0][i] @ getattr(
                self, f"weight_hr_l{i // dirs}{'_reverse' if i % dirs else ''}").T
                for i in range(hx[0].shape[0])])
            hx = (h0, hx[1])
        out, (h, c) = super().forward(input, hx)
        last = self.num_layers - 1
        if isinstance(out, PackedSequence):
            out = out._replace(data=self._unproject(out.data, last))
        else:
            out = self._unproject(out, last)
        dirs = 2 if self.bidirectional else 1
        h = torch.stack([h[i] @ getattr(self, f"weight_hr_l{i // dirs}{'_reverse' if i % dirs else ''}")
                         for i in range(h.shape[0])])
        return out, (h, c)


def _lstm_kwargs(m: nn.LSTM) -> dict:
    return dict(input_size=m.input_size, hidden_size=m.hidden_size, num_layers=m.num_layers,
                bias=m.bias, batch_first=m.batch_first, dropout=m.dropout,
                bidirectional=m.bidirectional)


def project_lstm(lstm: nn.LSTM, rank: Optional[Union[int, float]] = None,
                 energy: Optional[float] = None, name: str = "") -> nn.LSTM:
    """A :class:`ProjectedLSTM` factorized from ``lstm`` (which is left unchanged).

    At full rank (``rank == hidden_size``) the result is a plain ``nn.LSTM`` whose matrices
    are the products of the factors, because torch's kernel cannot run ``proj_size ==
    hidden_size``; it computes the same function as ``lstm``."""
    if lstm.proj_size:
        raise ValueError(f"{name or 'LSTM'} already has proj_size={lstm.proj_size}")
    H, L = lstm.hidden_size, lstm.num_layers
    sfx = ["", "_reverse"] if lstm.bidirectional else [""]
    where = f" for {name!r}" if name else ""
    w_hh = {(l, s): getattr(lstm, f"weight_hh_l{l}{s}").detach() for l in range(L) for s in sfx}
    if energy is not None:
        r = max(energy_rank(torch.linalg.svdvals(w.double()), energy) for w in w_hh.values())
    else:
        r = resolve_rank(rank, H, where)
    factors = {k: svd_projection(w, r) for k, w in w_hh.items()}
    ref = next(iter(w_hh.values()))
    # torch's LSTM kernel needs proj_size < hidden_size. At full rank the factorization is
    # exact and saves nothing, so the LSTM is rebuilt from the factor products instead
    # (Z_h P and Z_x P): the same function, computed through the factors.
    full = r == H
    if full:
        new: nn.LSTM = nn.LSTM(**_lstm_kwargs(lstm))
    else:
        new = ProjectedLSTM(**_lstm_kwargs(lstm), proj_size=r)
    new = new.to(device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        for l in range(L):
            if l > 0:
                p_bd = block_diag_projection([factors[(l - 1, s)][1] for s in sfx])
            for s in sfx:
                z_h, p = factors[(l, s)]
                w_ih = getattr(lstm, f"weight_ih_l{l}{s}").detach()
                z_x = w_ih.double() if l == 0 else least_squares_input(w_ih, p_bd)
                if full:
                    getattr(new, f"weight_hh_l{l}{s}").copy_(z_h @ p)
                    getattr(new, f"weight_ih_l{l}{s}").copy_(z_x if l == 0 else z_x @ p_bd)
                else:
                    getattr(new, f"weight_hh_l{l}{s}").copy_(z_h)
                    getattr(new, f"weight_hr_l{l}{s}").copy_(p)
                    getattr(new, f"weight_ih_l{l}{s}").copy_(z_x)
                if lstm.bias:
                    for b in ("bias_ih", "bias_hh"):
                        getattr(new, f"{b}_l{l}{s}").copy_(getattr(lstm, f"{b}_l{l}{s}"))
    new.train(lstm.training)
    return new


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@register
class LSTMProjection(Method):
    """Registered as ``lstm_projection``; see the module docstring."""

    name = "lstm_projection"
    config_cls = LSTMProjectionConfig
    citation = CITATION
    needs = frozenset({"plain_lstm"})
    replaces = frozenset({"plain_lstm"})

    def apply(self, model: nn.Module, config: LSTMProjectionConfig, ctx: CompressionContext) -> dict:
        chosen = select_modules(model, config.include, config.exclude, types=(nn.LSTM,),
                                method="lstm_projection")
        if not chosen:
            raise ValueError("lstm_projection: the model has no nn.LSTM module to factorize")
        modules, before, after = {}, 0, 0
        for fqn, lstm in chosen:
            new = project_lstm(lstm, config.rank, config.energy, fqn)
            before, after = before + _params(lstm), after + _params(new)
            set_module(model, fqn, new)
            modules[fqn] = {"proj_size": new.proj_size or new.hidden_size,
                            "hidden_size": new.hidden_size}
        return {"modules": modules, "params_before": before, "params_after": after}

    def restore(self, model: nn.Module, record: dict) -> None:
        for fqn, info in record["modules"].items():
            lstm = model.get_submodule(fqn)
            if not isinstance(lstm, nn.LSTM):
                raise ValueError(f"lstm_projection record names {fqn!r}, which is a "
                                 f"{type(lstm).__name__} in this model, not an nn.LSTM")
            if int(info["proj_size"]) >= lstm.hidden_size:
                continue  # full rank: stored as a plain LSTM (see project_lstm)
            new = ProjectedLSTM(**_lstm_kwargs(lstm), proj_size=int(info["proj_size"]))
            ref = next(lstm.parameters())
            set_module(model, fqn, new.to(device=ref.device, dtype=ref.dtype))
