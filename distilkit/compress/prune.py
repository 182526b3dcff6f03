"""Structured pruning that really shrinks the model: attention heads, whole layers, FFN neurons.

Three methods, each physical (weights are removed, not masked) and each reloadable:

``prune_heads``
    Michel et al. (2019): score every head by ``E|dL/d gate|`` over the context's data
    loader (see :mod:`distilkit.compress.importance`), then remove the lowest-scoring heads'
    rows of Q/K/V and columns of the output projection. Layers may end with different head
    counts. Choose how many by ``fraction`` or ``count`` of heads, ranked ``globally`` (the
    paper's setting; scores normalised per block) or ``per_layer``; or name them with
    ``heads={block: [head, ...]}``. **Every head of a block is never removed**: a global
    ranking always keeps the best head of each block, and an explicit or per-layer request
    that would empty a block is refused with an error pointing to ``prune_layers``.
``prune_layers``
    Drop transformer layers, named (``layers=[3, 5]`` or qualified names) or by layer
    importance (a gate on each layer's residual branch). A stack is never emptied.
``prune_ffn``
    Remove intermediate FFN neurons (rows of the up projection, columns of the down
    projection), by gradient importance or L1 norm (Li et al. 2017), globally or per layer;
    or name them with ``neurons={ffn: [neuron, ...]}`` (what the budget search writes).

What is removed is recorded (heads kept per block, layers kept per stack, neurons kept per
FFN), and ``restore`` replays the same surgery on a freshly built model before its tensors
are loaded, so ``load_compressed`` returns a model with equal predictions. ``prune_layers``
also writes the new depth into the config (``num_hidden_layers``; ``encoder_layers`` /
``decoder_layers`` or ``num_layers`` / ``num_decoder_layers`` for seq2seq families), so layer
losses pair the layers that exist; its record keeps the depth from before, which
``load_compressed`` builds the model with before replaying the records. Head and neuron
counts stay described by the records. Run ``prune_heads``/``prune_ffn`` before
``low_rank``/``magnitude``/``quantize``/``ptq``, which replace the linears they slice, and
``prune_layers`` before ``quantize``/``magnitude``, which finalize by layer name
(:func:`~distilkit.compress.base.check_order` refuses the other orders).

Speed: removing half the heads of MiniLM-L6 shrinks Q/K/V/O by half and the attention
matmuls likewise; Michel et al. report up to ~17.5% faster inference at large batch sizes on
GPU. ``scripts/bench_prune.py`` measures it on CPU.
"""
from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from torch import nn

from distilkit.compress.base import CompressionContext, Method, register
from distilkit.compress.families import get_adapter, slice_cols, slice_rows
from distilkit.compress.importance import (
    ffn_importance, head_importance, head_weight_norms, layer_importance,
)

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------
# Pure selection helpers
# ---------------------------------------------------------------------------------------

def how_many(total: int, fraction: Optional[float], count: Optional[int]) -> int:
    """Number of units to remove out of ``total`` given a fraction or a count."""
    return int(round(fraction * total)) if fraction is not None else int(count)


def lowest_global(scores: dict[str, torch.Tensor], k: int, min_keep: int = 1) -> dict[str, list]:
    """The ``k`` lowest-scoring units over all groups, never leaving a group with fewer than
    ``min_keep`` units. Returns ``{group: sorted indices to remove}``. Ties break by group
    order then index, so the choice is deterministic."""
    capacity = sum(max(0, len(s) - min_keep) for s in scores.values())
    if k > capacity:
        raise ValueError(f"cannot remove {k} units while keeping {min_keep} per group: at most "
                         f"{capacity} can go; lower fraction/count")
    flat = [(float(v), gi, i) for gi, (g, s) in enumerate(scores.items()) for i, v in enumerate(s)]
    flat.sort()
    left = {g: len(s) for g, s in scores.items()}
    names = list(scores)
    out: dict[str, list] = {g: [] for g in scores}
    for _, gi, i in flat:
        if k == 0:
            break
        g = names[gi]
        if left[g] > min_keep:
            out[g].append(i)
            left[g] -= 1
            k -= 1
    return {g: sorted(v) for g, v in out.items()}


def lowest_per_group(scores: dict[str, torch.Tensor], fraction: Optional[float],
                     count: Optional[int], what: str) -> dict[str, list]:
    """Per group, the lowest ``fraction`` (or ``count``) units; emptying a group is refused."""
    out = {}
    for g, s in scores.items():
        k = how_many(len(s), fraction, count)
        if k >= len(s):
            raise ValueError(f"{g}: removing {k} of its {len(s)} {what} would leave none; this is "
                             f"refused. Lower fraction/count, or drop the layer with prune_layers")
        out[g] = sorted(torch.argsort(torch.as_tensor(s), stable=True)[:k].tolist())
    return out


def _filter(names: list[str], include, exclude, field_name: str) -> list[str]:
    if include is not None:
        for pat in include:
            if not any(fnmatch.fnmatchcase(n, pat) for n in names):
                shown = ", ".join(names[:12]) + (" ..." if len(names) > 12 else "")
                raise ValueError(f"{field_name}: pattern {pat!r} matches nothing; "
                                 f"candidates: {shown}")
        names = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in include)]
    return [n for n in names if not any(fnmatch.fnmatchcase(n, p) for p in exclude or ())]


def _check_amount(method: str, fraction, count, explicit=None, explicit_name="") -> None:
    given = [x is not None for x in (fraction, count, explicit)]
    if sum(given) != 1:
        opts = "fraction, count" + (f" or {explicit_name}" if explicit_name else "")
        raise ValueError(f"{method}: give exactly one of {opts} "
                         f"(got fraction={fraction!r}, count={count!r}"
                         + (f", {explicit_name}={explicit!r}" if explicit_name else "") + ")")
    if fraction is not None and not 0.0 <= fraction < 1.0:
        raise ValueError(f"{method}: fraction={fraction!r} must be in [0, 1); e.g. 0.5 removes half")
    if count is not None and (not isinstance(count, int) or count < 0):
        raise ValueError(f"{method}: count={count!r} must be a non-negative integer")


def _check_choice(method: str, name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{method}: {name}={value!r} is not one of {list(choices)}")


def _resolve_keys(spec: dict, names: list[str], method: str, what: str) -> dict[str, list]:
    """Map explicit keys (an int position in ``names`` or a name) to names."""
    out = {}
    for key, units in spec.items():
        if isinstance(key, int) or (isinstance(key, str) and key.lstrip("-").isdigit()):
            i = int(key)
            if not 0 <= i < len(names):
                raise ValueError(f"{method}: {what} index {i} is out of range 0..{len(names) - 1}")
            out[names[i]] = list(units)
        elif key in names:
            out[key] = list(units)
        else:
            raise ValueError(f"{method}: {what} {key!r} is unknown; use an index 0..{len(names) - 1} "
                             f"or one of: {', '.join(names[:12])}")
    return out


def _scores_payload(scores: dict[str, torch.Tensor]) -> dict[str, list]:
    return {k: [round(float(x), 6) for x in v] for k, v in scores.items()}


# ---------------------------------------------------------------------------------------
# prune_heads
# ---------------------------------------------------------------------------------------

@dataclass
class PruneHeadsConfig:
    fraction: Optional[float] = field(default=None, metadata={
        "help": "Fraction of heads to remove, in [0, 1) (of all selected heads when "
                "scope='global', of each block's when 'per_layer')."})
    count: Optional[int] = field(default=None, metadata={"help": "Number of heads to remove."})
    heads: Optional[dict] = field(default=None, metadata={
        "help": "Explicit heads to remove: {block: [head, ...]}, block = index into the "
                "attention blocks (self then cross, layer by layer) or its module name."})
    scope: str = field(default="global", metadata={"help": "'global' or 'per_layer'."})
    importance: str = field(default="auto", metadata={
        "help": "'gradient' (Michel et al.; needs a data loader), 'weight' (head weight L2 "
                "norm, data-free) or 'auto' (gradient when data is given, else weight)."})
    normalize_by_layer: bool = field(default=True, metadata={
        "help": "Divide each block's gradient scores by their L2 norm before a global ranking."})
    include: Optional[list] = field(default=None, metadata={
        "help": "Globs over attention module names to consider (default: all)."})
    exclude: list = field(default_factory=list, metadata={"help": "Globs to leave alone."})

    def __post_init__(self):
        _check_amount("prune_heads", self.fraction, self.count, self.heads, "heads")
        _check_choice("prune_heads", "scope", self.scope, ("global", "per_layer"))
        _check_choice("prune_heads", "importance", self.importance, ("auto", "gradient", "weight"))


def lowest_in_scope(scores: dict[str, torch.Tensor], scope: str, fraction: Optional[float],
                    count: Optional[int], unit: str) -> dict[str, list]:
    """The units to remove: the lowest-scoring over the whole model (``scope="global"``,
    ``fraction`` / ``count`` of all units) or within each group (``"per_layer"``)."""
    if scope == "global":
        total = sum(len(s) for s in scores.values())
        return lowest_global(scores, how_many(total, fraction, count))
    return lowest_per_group(scores, fraction, count, unit)


def _importance_kind(requested: str, ctx: CompressionContext, data_free: str) -> str:
    if requested != "auto":
        return requested
    if ctx is not None and ctx.dataloader is not None:
        return "gradient"
    logger.warning("no data loader in the compression context: ranking by %s instead of "
                   "gradient importance", data_free)
    return data_free


@register
class PruneHeads(Method):
    name = "prune_heads"
    config_cls = PruneHeadsConfig
    needs = frozenset({"plain_linear", "named_linears"})
    citation = ("Michel, Levy, Neubig. Are Sixteen Heads Really Better than One? "
                "NeurIPS 2019. arXiv:1905.10650")

    def apply(self, model: nn.Module, cfg: PruneHeadsConfig, ctx: CompressionContext) -> dict:
        adapter = get_adapter(model, "prune_heads")
        blocks = {b.holder: b for b in adapter.attention_blocks()}
        names = _filter(list(blocks), cfg.include, cfg.exclude, "prune_heads.include")
        before = sum(p.numel() for p in model.parameters())
        record: dict = {}
        if cfg.heads is not None:
            remove = _resolve_keys(cfg.heads, names, "prune_heads", "attention block")
        else:
            kind = _importance_kind(cfg.importance, ctx, "weight")
            if kind == "gradient":
                scores = head_importance(adapter, ctx, cfg.normalize_by_layer and
                                         cfg.scope == "global")
            else:
                scores = head_weight_norms(adapter)
            scores = {n: scores[n] for n in names}
            record.update(importance=kind, scores=_scores_payload(scores))
            remove = lowest_in_scope(scores, cfg.scope, cfg.fraction, cfg.count, "heads")
        keep = {}
        total_heads = sum(adapter.num_heads(blocks[h]) for h in names)
        for holder in names:
            n = adapter.num_heads(blocks[holder])
            gone = set(remove.get(holder, []))
            bad = [h for h in gone if not 0 <= h < n]
            if bad:
                raise ValueError(f"prune_heads: {holder} has heads 0..{n - 1}; got {sorted(bad)}")
            keep[holder] = [h for h in range(n) if h not in gone]
        for holder in names:  # validate everything before cutting anything
            if not keep[holder]:
                adapter.prune_heads(blocks[holder], [])  # raises the documented refusal
        cut = [blocks[h] for h in names if len(keep[h]) < adapter.num_heads(blocks[h])]
        adapter.check_sliceable([x for b in cut for x in (b.q, b.k, b.v, b.o)], self.name)
        for holder in names:
            adapter.prune_heads(blocks[holder], keep[holder])
        record.update(
            heads_kept=keep,
            heads_removed=sum(len(remove.get(h, [])) for h in names),
            heads_total=total_heads,
            params_before=before, params_after=sum(p.numel() for p in model.parameters()),
        )
        return record

    def restore(self, model: nn.Module, record: dict) -> None:
        adapter = get_adapter(model, "prune_heads")
        blocks = {b.holder: b for b in adapter.attention_blocks()}
        for holder, keep in record["heads_kept"].items():
            adapter.prune_heads(blocks[holder], keep)


# ---------------------------------------------------------------------------------------
# prune_layers
# ---------------------------------------------------------------------------------------

@dataclass
class PruneLayersConfig:
    layers: Optional[list] = field(default=None, metadata={
        "help": "Layers to drop: indices into all layers in stack order (encoder then "
                "decoder) or qualified names such as 'model.decoder.layers.1'."})
    fraction: Optional[float] = field(default=None, metadata={
        "help": "Fraction of layers to drop by layer importance, in [0, 1)."})
    count: Optional[int] = field(default=None, metadata={
        "help": "Number of layers to drop by layer importance."})
    include: Optional[list] = field(default=None, metadata={
        "help": "Globs over layer names that may be dropped (default: all)."})
    exclude: list = field(default_factory=list, metadata={"help": "Globs to keep."})

    def __post_init__(self):
        _check_amount("prune_layers", self.fraction, self.count, self.layers, "layers")


@register
class PruneLayers(Method):
    name = "prune_layers"
    config_cls = PruneLayersConfig
    replaces = frozenset({"layer_names"})
    citation = ("Fan, Grave, Joulin. Reducing Transformer Depth on Demand with Structured "
                "Dropout. ICLR 2020 (layer dropping); Michel et al. 2019 (gate importance)")

    def apply(self, model: nn.Module, cfg: PruneLayersConfig, ctx: CompressionContext) -> dict:
        adapter = get_adapter(model, "prune_layers")
        names = _filter(adapter.layers(), cfg.include, cfg.exclude, "prune_layers.include")
        before = sum(p.numel() for p in model.parameters())
        record: dict = {}
        if cfg.layers is not None:
            drop = list(_resolve_keys({k: [] for k in cfg.layers}, adapter.layers(),
                                      "prune_layers", "layer"))
        else:
            scores = layer_importance(adapter, ctx)
            record.update(importance="gradient",
                          scores={n: round(scores[n], 6) for n in names})
            # Group per stack, so that no stack is emptied by a global choice.
            per_stack = {s: torch.tensor([scores[n] for n in names if n.rsplit(".", 1)[0] == s])
                         for s in adapter.stacks()}
            per_stack = {s: v for s, v in per_stack.items() if len(v)}
            k = how_many(len(names), cfg.fraction, cfg.count)
            chosen = lowest_global(per_stack, k)
            stack_names = {s: [n for n in names if n.rsplit(".", 1)[0] == s] for s in per_stack}
            drop = [stack_names[s][i] for s, idx in chosen.items() for i in idx]
        kept = {}
        for stack in adapter.stacks():
            n = len(model.get_submodule(stack))
            gone = {int(d.rsplit(".", 1)[1]) for d in drop if d.rsplit(".", 1)[0] == stack}
            kept[stack] = [i for i in range(n) if i not in gone]
            if not kept[stack]:
                raise ValueError(f"prune_layers: dropping every layer of {stack} is refused; "
                                 f"keep at least one")
        depth_before = adapter.depths()
        for stack, keep in kept.items():
            adapter.keep_layers(stack, keep)
        adapter.sync_config_depth()
        record.update(layers_kept=kept, dropped=sorted(drop), config_before=depth_before,
                      params_before=before,
                      params_after=sum(p.numel() for p in model.parameters()))
        return record

    def restore(self, model: nn.Module, record: dict) -> None:
        adapter = get_adapter(model, "prune_layers")
        for stack, keep in record["layers_kept"].items():
            adapter.keep_layers(stack, keep)
        adapter.sync_config_depth()

    def undo_config(self, config, record: dict) -> None:
        # Records saved before the config tracked the depth have none here: their
        # config.json still has the depth from before, which is what restore starts from.
        for attr, n in record.get("config_before", {}).items():
            setattr(config, attr, n)


# ---------------------------------------------------------------------------------------
# prune_ffn
# ---------------------------------------------------------------------------------------

@dataclass
class PruneFFNConfig:
    fraction: Optional[float] = field(default=None, metadata={
        "help": "Fraction of intermediate neurons to remove, in [0, 1)."})
    count: Optional[int] = field(default=None, metadata={
        "help": "Number of neurons to remove (in total for 'global', per FFN for 'per_layer')."})
    neurons: Optional[dict] = field(default=None, metadata={
        "help": "Explicit neurons to remove: {ffn: [neuron, ...]}, ffn = index into the FFN "
                "blocks (layer by layer) or its module name (what the budget search writes)."})
    scope: str = field(default="per_layer", metadata={"help": "'global' or 'per_layer'."})
    importance: str = field(default="auto", metadata={
        "help": "'gradient' (gate on each neuron; needs a data loader), 'l1' (L1 norm of the "
                "neuron's incoming weights, Li et al. 2017) or 'auto'."})
    include: Optional[list] = field(default=None, metadata={
        "help": "Globs over FFN names to prune (default: all)."})
    exclude: list = field(default_factory=list, metadata={"help": "Globs to leave alone."})

    def __post_init__(self):
        _check_amount("prune_ffn", self.fraction, self.count, self.neurons, "neurons")
        _check_choice("prune_ffn", "scope", self.scope, ("global", "per_layer"))
        _check_choice("prune_ffn", "importance", self.importance, ("auto", "gradient", "l1"))


def _keep_neurons(model: nn.Module, block, keep: torch.Tensor) -> None:
    for up in block.up:
        slice_rows(model, up, keep)
    slice_cols(model, block.down, keep)


@register
class PruneFFN(Method):
    name = "prune_ffn"
    config_cls = PruneFFNConfig
    needs = frozenset({"plain_linear", "named_linears"})
    citation = ("Li, Kadav, Durdanovic, Samet, Graf. Pruning Filters for Efficient ConvNets. "
                "ICLR 2017 (L1 structured pruning); Molchanov et al. 2019 (gradient importance)")

    def apply(self, model: nn.Module, cfg: PruneFFNConfig, ctx: CompressionContext) -> dict:
        adapter = get_adapter(model, "prune_ffn")
        blocks = {b.name: b for b in adapter.ffn_blocks()}
        names = _filter(list(blocks), cfg.include, cfg.exclude, "prune_ffn.include")
        before = sum(p.numel() for p in model.parameters())
        width = {n: model.get_submodule(blocks[n].down).in_features for n in names}
        if cfg.neurons is not None:
            kind = "explicit"
            given = _resolve_keys(cfg.neurons, list(blocks), "prune_ffn", "FFN")
            remove = {n: sorted(set(int(i) for i in given.get(n, []))) for n in names}
            for n in names:  # everything checked before anything is cut
                bad = [i for i in remove[n] if not 0 <= i < width[n]]
                if bad:
                    raise ValueError(f"prune_ffn: {n} has neurons 0..{width[n] - 1}; got {bad[:8]}")
                if len(remove[n]) >= width[n]:
                    raise ValueError(f"prune_ffn: removing every one of the {width[n]} neurons of "
                                     f"{n} is refused; keep some, or drop the layer with "
                                     "prune_layers")
        else:
            kind = _importance_kind(cfg.importance, ctx, "l1")
            scores = ffn_importance(adapter, ctx, kind)
            scores = {n: scores[n] for n in names}
            remove = lowest_in_scope(scores, cfg.scope, cfg.fraction, cfg.count, "neurons")
        adapter.check_sliceable([x for n in names if remove[n]
                                 for x in (*blocks[n].up, blocks[n].down)], self.name)
        kept = {}
        for n in names:
            gone = set(remove[n])
            keep = torch.tensor([i for i in range(width[n]) if i not in gone], dtype=torch.long)
            _keep_neurons(model, blocks[n], keep)
            kept[n] = len(keep)
        return {"importance": kind, "neurons_kept": kept,
                "neurons_removed": sum(len(v) for v in remove.values()),
                "params_before": before,
                "params_after": sum(p.numel() for p in model.parameters())}

    def restore(self, model: nn.Module, record: dict) -> None:
        adapter = get_adapter(model, "prune_ffn")
        blocks = {b.name: b for b in adapter.ffn_blocks()}
        for name, n in record["neurons_kept"].items():
            # Which neurons were kept does not matter here: the saved tensors overwrite them.
            _keep_neurons(model, blocks[name], torch.arange(int(n)))
