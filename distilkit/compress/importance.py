"""Importance scores for structured pruning: attention heads, layers, FFN neurons.

Head importance follows Michel, Levy and Neubig (2019), "Are Sixteen Heads Really Better than
One?": put a gate ``xi_h`` (value 1) on the output of every head ``h`` and score it by the
expected absolute gradient of the loss with respect to the gate,

    I_h = E_x | dL(x) / d xi_h |,

a first-order estimate of how much the loss changes when the head is removed (``xi_h = 0``).
The gate is applied where every family's heads meet: the input of the attention output
projection, ``[..., num_heads * head_dim]``, viewed per head. The same idea scores

* a **layer**, with a gate ``g`` on its residual branch (``out = in + g * (layer(in) - in)``),
  so ``dL/dg`` estimates the effect of skipping the layer, and
* an **FFN neuron**, with a gate on the input of the FFN's down projection.

The expectation is the mean over the batches of ``ctx.dataloader`` (at most
``ctx.max_batches``), each batch's loss being ``ctx.loss_fn(model, batch)`` when given (the
distillation loss, say) or the model's own loss (``model(**batch).loss``, which needs labels).
Gradients are taken with ``torch.autograd.grad`` on the gates only: the model's ``.grad``
fields are never touched, and dropout is off while scoring. Batches go to the model's own
device; each gate lives on the device of the module it gates, the sums stay there, and the
scores come back to the host once, at the end.

Data-free alternatives, used when there is no data loader: a head's weight norm (L2 of its
Q/K/V rows and O columns) and a neuron's L1 norm (Li et al. 2017, "Pruning Filters for
Efficient ConvNets": the L1 norm of the neuron's incoming weights).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch
from torch import nn

from distilkit.compress.base import CompressionContext, batches_on_device
from distilkit.compress.families import FamilyAdapter
from distilkit.device import to_host


def _default_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    out = model(**batch)
    loss = getattr(out, "loss", None)
    if loss is None:
        raise ValueError("importance scores need a loss: the batches carry no labels, so the "
                         "model returned no loss; pass CompressionContext(loss_fn=...) (e.g. the "
                         "distillation loss) or batches with labels")
    return loss


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def gate_gradients(model: nn.Module, gates: list[torch.Tensor], install: Callable[[], list],
                   ctx: CompressionContext) -> list[torch.Tensor]:
    """Mean over batches of ``|dL/d gate|`` for each gate tensor.

    ``install()`` registers the hooks that multiply activations by the gates and returns
    their handles; they are removed afterwards whatever happens.
    """
    loss_fn = ctx.loss_fn or _default_loss
    totals = [torch.zeros_like(g) for g in gates]
    n = 0
    handles = install()
    try:
        with _eval_mode(model):
            for batch in batches_on_device(model, ctx):
                loss = loss_fn(model, batch)
                grads = torch.autograd.grad(loss, gates, allow_unused=True)
                for t, g in zip(totals, grads):
                    if g is not None:
                        t += g.detach().abs()
                n += 1
    finally:
        for h in handles:
            h.remove()
    if n == 0:
        raise ValueError("importance: the data loader yielded no batch")
    return [to_host(t / n) for t in totals]


def _gate(module: nn.Module, size: tuple) -> torch.Tensor:
    """A gate of ones on the device of the module it multiplies into."""
    ref = next(module.parameters())
    return torch.ones(size, device=ref.device, requires_grad=True)


def _gated_input_hook(gate: torch.Tensor, group: int):
    """A forward pre-hook multiplying the last dimension, in groups of ``group``, by ``gate``."""
    def hook(module, args):
        x = args[0]
        shaped = x.view(*x.shape[:-1], gate.numel(), group) * gate.to(x.dtype).view(-1, 1)
        return (shaped.view_as(x), *args[1:])
    return hook


def head_importance(adapter: FamilyAdapter, ctx: CompressionContext,
                    normalize_by_layer: bool = False) -> dict[str, torch.Tensor]:
    """Michel et al. head importance, ``{attention holder name: [num_heads] scores}``.

    With ``normalize_by_layer`` each block's scores are divided by their L2 norm, as in the
    authors' code, so that a global ranking is not dominated by the layers with the largest
    gradients.
    """
    model = adapter.model
    blocks = adapter.attention_blocks()
    gates = [_gate(model.get_submodule(b.o), (adapter.num_heads(b),)) for b in blocks]

    def install():
        return [model.get_submodule(b.o).register_forward_pre_hook(
            _gated_input_hook(g, adapter.head_dim(b))) for b, g in zip(blocks, gates)]

    scores = gate_gradients(model, gates, install, ctx)
    if normalize_by_layer:
        scores = [s / s.norm().clamp_min(1e-20) for s in scores]
    return {b.holder: s for b, s in zip(blocks, scores)}


def head_weight_norms(adapter: FamilyAdapter) -> dict[str, torch.Tensor]:
    """Data-free head scores: the L2 norm of each head's Q/K/V rows and O columns."""
    model = adapter.model
    out = {}
    for b in adapter.attention_blocks():
        n, d = adapter.num_heads(b), adapter.head_dim(b)
        # Rows of Q/K/V and columns of O, grouped per head: [n, d, ...] summed per head.
        sq = sum(model.get_submodule(x).weight.detach().view(n, d, -1).pow(2).sum(dim=(1, 2))
                 for x in (b.q, b.k, b.v))
        o = model.get_submodule(b.o).weight.detach()
        sq = sq + o.view(o.shape[0], n, d).pow(2).sum(dim=(0, 2))
        out[b.holder] = to_host(sq.sqrt().float())
    return out


def _residual_gate_hook(gate: torch.Tensor):
    def hook(module, args, kwargs, output):
        x = args[0] if args else kwargs["hidden_states"]
        y = output[0] if isinstance(output, tuple) else output
        gated = x + gate.to(y.dtype) * (y - x)
        return (gated, *output[1:]) if isinstance(output, tuple) else gated
    return hook


def layer_importance(adapter: FamilyAdapter, ctx: CompressionContext) -> dict[str, float]:
    """``{layer name: E|dL/dg|}`` with a gate on each layer's residual branch; a layer that
    computes the identity scores exactly 0."""
    model = adapter.model
    layers = adapter.layers()
    gates = [_gate(model.get_submodule(name), ()) for name in layers]

    def install():
        return [model.get_submodule(name).register_forward_hook(
            _residual_gate_hook(g), with_kwargs=True) for name, g in zip(layers, gates)]

    scores = gate_gradients(model, gates, install, ctx)
    return {name: s.item() for name, s in zip(layers, scores)}


def ffn_importance(adapter: FamilyAdapter, ctx: Optional[CompressionContext],
                   kind: str = "gradient") -> dict[str, torch.Tensor]:
    """Per-neuron scores of every FFN block, ``{ffn name: [intermediate size] scores}``.

    ``kind="gradient"``: ``E|dL/d gate|`` with a gate on each neuron (input of the down
    projection). ``kind="l1"``: L1 norm of the neuron's incoming weights (all up projections).
    """
    model = adapter.model
    blocks = adapter.ffn_blocks()
    if kind == "l1":
        return {b.name: to_host(sum(model.get_submodule(u).weight.detach().abs().sum(dim=1)
                                    for u in b.up)) for b in blocks}
    if kind != "gradient":
        raise ValueError(f"ffn importance kind {kind!r} is unknown; use 'gradient' or 'l1'")
    gates = [_gate(model.get_submodule(b.down), (model.get_submodule(b.down).in_features,))
             for b in blocks]

    def install():
        return [model.get_submodule(b.down).register_forward_pre_hook(_gated_input_hook(g, 1))
                for b, g in zip(blocks, gates)]

    scores = gate_gradients(model, gates, install, ctx)
    return {b.name: s for b, s in zip(blocks, scores)}
