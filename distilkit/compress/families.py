"""Where the prunable parts of a transformer are, per model family, and how to cut them out.

transformers 5 removed ``PreTrainedModel.prune_heads``, ``head_mask`` and
``find_pruneable_heads_and_indices``, so every structural change here is done by distilkit:
rows of Q/K/V and columns of the output projection are physically removed, FFN neurons are
removed as rows of the up projection(s) and columns of the down projection, and layers are
removed from their ``nn.ModuleList``. Parameter count, file size and latency all fall.

A *family adapter* answers three questions for a model, by qualified module name:

* the layer stacks (``bert.encoder.layer``; ``model.encoder.layers`` and
  ``model.decoder.layers``; ``encoder.block`` and ``decoder.block``),
* the attention blocks of each layer (self and cross attention), with their Q/K/V/O linears
  and the module that stores the head-count attributes,
* the FFN of each layer (up projection(s) producing the neurons, one down projection).

Supported families (checked against the transformers 5.23 sources):

* BERT family, ``model_type`` bert (incl. MiniLM), roberta, xlm-roberta, electra: heads in
  ``attention.self`` (``num_attention_heads``, ``all_head_size``), output projection
  ``attention.output.dense``; DistilBERT-style naming (``q_lin``/``k_lin``/``v_lin``/``out_lin``,
  ``n_heads``) for model_type distilbert.
* T5 (``n_heads``, ``inner_dim``). T5 computes one relative position bias per head in the
  first block of each stack and *passes it on* to every later block. After head pruning the
  blocks keep different heads, so a pruned T5 attention becomes :class:`PrunedT5Attention`:
  it slices the shared bias to its own kept heads and passes the full bias on. The bias table
  (``num_buckets x num_heads`` floats, a few hundred parameters) is therefore kept whole.
* BART and Marian (``num_heads``; ``embed_dim`` stays the model width, the input size of Q/K/V).

A layer of any family whose attention loses *every* head is refused (see
:func:`prune_attention_heads`): the reshape inside every attention class cannot express zero
heads; drop the whole layer with the ``prune_layers`` method instead.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn
from transformers.models.t5.modeling_t5 import T5Attention

from distilkit.compress.base import (is_peft_layer, is_plain_linear, raise_wrapped, set_module,
                                     target_names)


@dataclass(frozen=True)
class AttentionBlock:
    """One attention block, by qualified module names. ``holder`` stores the head count."""

    holder: str
    q: str
    k: str
    v: str
    o: str
    kind: str  # "self" or "cross"
    layer: str  # the transformer layer it belongs to


@dataclass(frozen=True)
class FFNBlock:
    """One feed-forward block: ``up`` linears produce the neurons (their rows), ``down``
    consumes them (its columns). T5's gated FFN has two up projections."""

    name: str
    up: tuple
    down: str
    layer: str


@dataclass(frozen=True)
class _Spec:
    family: str
    model_types: tuple
    stack_suffixes: tuple  # qualified-name endings of the layer ModuleLists
    # (holder, q, k, v, o, kind) relative to a layer; blocks absent from a layer are skipped
    attention: tuple
    heads_attr: str
    head_dim_attr: str
    total_dim_attr: Optional[str]  # attribute holding heads * head_dim, when there is one
    ffn: tuple  # (ffn name, (up, ...), down) relative to a layer; "{last}" = last sublayer
    depth_attrs: tuple  # the config attribute holding each stack's depth, as stack_suffixes


_BERT_ATTN = (
    ("attention.self", "attention.self.query", "attention.self.key", "attention.self.value",
     "attention.output.dense", "self"),
    ("crossattention.self", "crossattention.self.query", "crossattention.self.key",
     "crossattention.self.value", "crossattention.output.dense", "cross"),
)
_BART_ATTN = (
    ("self_attn", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
     "self_attn.out_proj", "self"),
    ("encoder_attn", "encoder_attn.q_proj", "encoder_attn.k_proj", "encoder_attn.v_proj",
     "encoder_attn.out_proj", "cross"),
)

_SPECS = (
    _Spec("BERT family", ("bert", "roberta", "xlm-roberta", "electra"), ("encoder.layer",),
          _BERT_ATTN, "num_attention_heads", "attention_head_size", "all_head_size",
          (("intermediate", ("intermediate.dense",), "output.dense"),), ("num_hidden_layers",)),
    _Spec("DistilBERT", ("distilbert",), ("transformer.layer",),
          (("attention", "attention.q_lin", "attention.k_lin", "attention.v_lin",
            "attention.out_lin", "self"),),
          "n_heads", "attention_head_size", None,
          (("ffn", ("ffn.lin1",), "ffn.lin2"),), ("n_layers",)),
    _Spec("T5", ("t5",), ("encoder.block", "decoder.block"),
          (("layer.0.SelfAttention", "layer.0.SelfAttention.q", "layer.0.SelfAttention.k",
            "layer.0.SelfAttention.v", "layer.0.SelfAttention.o", "self"),
           ("layer.1.EncDecAttention", "layer.1.EncDecAttention.q", "layer.1.EncDecAttention.k",
            "layer.1.EncDecAttention.v", "layer.1.EncDecAttention.o", "cross")),
          "n_heads", "key_value_proj_dim", "inner_dim",
          (("layer.{last}.DenseReluDense", ("layer.{last}.DenseReluDense.wi",
                                            "layer.{last}.DenseReluDense.wi_0",
                                            "layer.{last}.DenseReluDense.wi_1"),
            "layer.{last}.DenseReluDense.wo"),), ("num_layers", "num_decoder_layers")),
    _Spec("BART", ("bart",), ("encoder.layers", "decoder.layers"), _BART_ATTN,
          "num_heads", "head_dim", None, (("", ("fc1",), "fc2"),),
          ("encoder_layers", "decoder_layers")),
    _Spec("Marian", ("marian",), ("encoder.layers", "decoder.layers"), _BART_ATTN,
          "num_heads", "head_dim", None, (("", ("fc1",), "fc2"),),
          ("encoder_layers", "decoder_layers")),
)


def supported_families() -> str:
    """Human-readable list of the supported families and their ``model_type`` values."""
    return "; ".join(f"{s.family} ({', '.join(s.model_types)})" for s in _SPECS)


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


class FamilyAdapter:
    """The prunable structure of one model, located by its ``config.model_type``."""

    def __init__(self, model: nn.Module, spec: _Spec):
        self.model = model
        self.spec = spec

    @property
    def family(self) -> str:
        return self.spec.family

    # -- locating ------------------------------------------------------------------------
    def stacks(self) -> list[str]:
        """Qualified names of the layer ``ModuleList``s, encoder before decoder."""
        names = [n for n, m in self.model.named_modules()
                 if isinstance(m, nn.ModuleList)
                 and any(n == s or n.endswith("." + s) for s in self.spec.stack_suffixes)]
        if not names:
            raise ValueError(f"{type(self.model).__name__}: no layer stack ending in "
                             f"{self.spec.stack_suffixes} found for the {self.family} adapter")
        return names

    def layers(self) -> list[str]:
        """Qualified names of every transformer layer, in stack order."""
        return [f"{s}.{i}" for s in self.stacks()
                for i in range(len(self.model.get_submodule(s)))]

    def _has(self, name: str) -> bool:
        try:
            self.model.get_submodule(name)
            return True
        except AttributeError:
            return False

    def _rel(self, layer: str, rel: str) -> str:
        if "{last}" in rel:
            n = len(self.model.get_submodule(layer).layer)
            rel = rel.replace("{last}", str(n - 1))
        return _join(layer, rel)

    def attention_blocks(self) -> list[AttentionBlock]:
        """Every attention block (self, then cross) of every layer."""
        out = []
        for layer in self.layers():
            for holder, q, k, v, o, kind in self.spec.attention:
                names = [self._rel(layer, r) for r in (holder, q, k, v, o)]
                if all(self._has(n) for n in names):
                    out.append(AttentionBlock(*names, kind=kind, layer=layer))
        return out

    def ffn_blocks(self) -> list[FFNBlock]:
        """The feed-forward block of every layer."""
        out = []
        for layer in self.layers():
            for name, ups, down in self.spec.ffn:
                ups_found = tuple(self._rel(layer, u) for u in ups if self._has(self._rel(layer, u)))
                down = self._rel(layer, down)
                if ups_found and self._has(down):
                    out.append(FFNBlock(self._rel(layer, name) or layer, ups_found, down, layer))
        return out

    def layer_linears(self) -> list[str]:
        """Qualified names of every ``nn.Linear`` inside the transformer layers (the default
        target of low-rank and magnitude pruning: embeddings and task heads are left alone);
        a layer a peft adapter wraps is named by the adapter layer, its ``lora_*`` never."""
        prefixes = tuple(s + "." for s in self.stacks())
        return [n for n in target_names(self.model) if n.startswith(prefixes)]

    def depths(self) -> dict[str, int]:
        """``{config attribute: number of layers}`` of every stack, as the model is now."""
        out = {}
        for stack in self.stacks():
            i = next(i for i, s in enumerate(self.spec.stack_suffixes)
                     if stack == s or stack.endswith("." + s))
            out[self.spec.depth_attrs[i]] = len(self.model.get_submodule(stack))
        return out

    def sync_config_depth(self) -> None:
        """Write the stacks' current depths into the model config, so everything that reads
        the depth from the config (layer maps, ``save_pretrained``) sees the real one."""
        for attr, n in self.depths().items():
            setattr(self.model.config, attr, n)

    def check_sliceable(self, names: Sequence[str], method: str) -> None:
        """Refuse, before anything is cut, to slice a linear that is not a plain
        ``nn.Linear`` (see :func:`require_sliceable`)."""
        for name in names:
            require_sliceable(self.model.get_submodule(name), name, method)

    # -- heads ---------------------------------------------------------------------------
    def num_heads(self, block: AttentionBlock) -> int:
        return int(getattr(self.model.get_submodule(block.holder), self.spec.heads_attr))

    def head_dim(self, block: AttentionBlock) -> int:
        return int(getattr(self.model.get_submodule(block.holder), self.spec.head_dim_attr))

    def prune_heads(self, block: AttentionBlock, keep: Sequence[int]) -> None:
        """Keep only heads ``keep`` (indices into the block's *current* heads)."""
        prune_attention_heads(self, block, keep)

    # -- layers --------------------------------------------------------------------------
    def keep_layers(self, stack: str, keep: Sequence[int]) -> None:
        """Keep only layers ``keep`` (indices into the stack's current layers), in order."""
        layers = self.model.get_submodule(stack)
        keep = sorted(set(int(i) for i in keep))
        if not keep:
            raise ValueError(f"{stack}: cannot drop every layer of a stack; keep at least one")
        if keep[0] < 0 or keep[-1] >= len(layers):
            raise ValueError(f"{stack}: layer index out of range 0..{len(layers) - 1}: {keep}")
        if self.spec.family == "T5" and keep[0] != 0:
            _move_t5_relative_bias(layers[0], layers[keep[0]])
        set_module(self.model, stack, nn.ModuleList([layers[i] for i in keep]))
        # Caches index layers by ``layer_idx``; renumber so they stay 0..n-1.
        for new_idx, layer in enumerate(self.model.get_submodule(stack)):
            for m in layer.modules():
                if hasattr(m, "layer_idx") and m.layer_idx is not None:
                    m.layer_idx = new_idx


def get_adapter(model: nn.Module, method: str = "this method") -> FamilyAdapter:
    """The adapter for ``model``'s family, or a ``ValueError`` naming the supported ones."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for spec in _SPECS:
        if model_type in spec.model_types:
            return FamilyAdapter(model, spec)
    raise ValueError(
        f"{method}: model family {model_type!r} ({type(model).__name__}) is not supported; "
        f"supported families: {supported_families()}"
    )


# ---------------------------------------------------------------------------------------
# Physical surgery on linears
# ---------------------------------------------------------------------------------------

def require_sliceable(module: nn.Module, name: str, method: str = "structured pruning") -> None:
    """Slicing rebuilds a layer from its weight as a plain ``nn.Linear``: a fake-quantized or
    packed linear (still an ``nn.Linear`` subclass) would silently lose its quantization, a
    factorized or sparse one its structure, a peft-wrapped one its adapter."""
    if is_peft_layer(module):
        raise_wrapped(method, name, module)
    if not is_plain_linear(module):
        raise TypeError(f"{method}: {name} is a {type(module).__name__}, not a plain nn.Linear: "
                        f"structured pruning must run before methods that replace linears "
                        f"(low_rank, magnitude, quantize, ptq)")


def _sliced_linear(lin: nn.Linear, name: str, rows: Optional[torch.Tensor] = None,
                   cols: Optional[torch.Tensor] = None) -> nn.Linear:
    """A new ``nn.Linear`` holding rows (outputs) and/or columns (inputs) of ``lin``."""
    require_sliceable(lin, name)
    w = lin.weight.detach()
    b = lin.bias.detach() if lin.bias is not None else None
    if rows is not None:
        rows = rows.to(w.device)
        w = w.index_select(0, rows)
        b = b.index_select(0, rows) if b is not None else None
    if cols is not None:
        w = w.index_select(1, cols.to(w.device))
    new = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if b is not None:
            new.bias.copy_(b)
    new.train(lin.training)
    new.weight.requires_grad_(lin.weight.requires_grad)
    return new


def slice_rows(model: nn.Module, name: str, rows: torch.Tensor) -> None:
    set_module(model, name, _sliced_linear(model.get_submodule(name), name, rows=rows))


def slice_cols(model: nn.Module, name: str, cols: torch.Tensor) -> None:
    set_module(model, name, _sliced_linear(model.get_submodule(name), name, cols=cols))


def head_rows(heads: Sequence[int], head_dim: int) -> torch.Tensor:
    """Row indices of ``heads`` in a ``[num_heads * head_dim, ...]`` projection."""
    return torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in heads]) \
        if len(heads) else torch.zeros(0, dtype=torch.long)


def prune_attention_heads(adapter: FamilyAdapter, block: AttentionBlock,
                          keep: Sequence[int]) -> None:
    """Physically keep heads ``keep`` of ``block``: rows of Q/K/V, columns of O.

    Refuses to remove every head (``ValueError``): attention classes reshape with
    ``view(..., -1, head_dim)``, which cannot express zero heads, and silently turning the
    block into a constant would hide the choice. Use ``prune_layers`` to drop the layer.
    """
    model, spec = adapter.model, adapter.spec
    n, d = adapter.num_heads(block), adapter.head_dim(block)
    keep = sorted(set(int(h) for h in keep))
    if not keep:
        raise ValueError(f"{block.holder}: pruning every one of its {n} heads is refused "
                         f"(an attention block needs at least one head); keep one head or "
                         f"drop the whole layer with the 'prune_layers' method")
    if keep[0] < 0 or keep[-1] >= n:
        raise ValueError(f"{block.holder}: head index out of range 0..{n - 1}: {keep}")
    if len(keep) == n:
        return
    rows = head_rows(keep, d)
    for name in (block.q, block.k, block.v):
        slice_rows(model, name, rows)
    slice_cols(model, block.o, rows)
    holder = model.get_submodule(block.holder)
    if spec.family == "T5":
        _to_pruned_t5(holder, keep)
    setattr(holder, spec.heads_attr, len(keep))
    if spec.total_dim_attr:
        setattr(holder, spec.total_dim_attr, len(keep) * d)


# ---------------------------------------------------------------------------------------
# T5: per-head relative position bias shared across blocks
# ---------------------------------------------------------------------------------------

class PrunedT5Attention(T5Attention):
    """T5 attention with a subset of the original heads (``kept_heads``, original indices).

    The relative position bias is computed (first block) or received (later blocks) for
    *all* original heads; this block adds only its kept heads' slice to its scores and
    passes the full bias on, so blocks that kept different heads stay correct.
    """

    def compute_bias(self, query_length, key_length, device=None, past_seen_tokens=0):
        full = super().compute_bias(query_length, key_length, device, past_seen_tokens)
        self._full_bias = full
        return full.index_select(1, self.kept_heads.to(full.device))

    def forward(self, hidden_states, mask=None, key_value_states=None, position_bias=None,
                past_key_values=None, **kwargs):
        own = None
        if position_bias is not None:
            own = position_bias.index_select(1, self.kept_heads.to(position_bias.device))
        self._full_bias = None
        out, bias, weights = super().forward(
            hidden_states, mask=mask, key_value_states=key_value_states,
            position_bias=own, past_key_values=past_key_values, **kwargs)
        if position_bias is not None:
            full = position_bias
        elif self._full_bias is not None:
            full = self._full_bias
        else:  # no relative bias here: T5 starts the chain with zeros, one row per head
            full = bias.new_zeros((bias.shape[0], self.n_heads_original, *bias.shape[2:]))
        self._full_bias = None
        return out, full, weights


def _to_pruned_t5(attn: nn.Module, keep: Sequence[int]) -> None:
    if isinstance(attn, PrunedT5Attention):
        # Already pruned: ``keep`` indexes its current heads; map back to original heads.
        original = attn.kept_heads[torch.as_tensor(list(keep), dtype=torch.long)]
    else:
        attn.n_heads_original = attn.n_heads
        original = torch.as_tensor(list(keep), dtype=torch.long)
        attn.__class__ = PrunedT5Attention
    attn.register_buffer("kept_heads", original, persistent=False)
    attn._full_bias = None


def _move_t5_relative_bias(first: nn.Module, new_first: nn.Module) -> None:
    """Dropping block 0 of a T5 stack would lose the relative position bias table, which
    only block 0 owns; hand it to the block that becomes first."""
    src = first.layer[0].SelfAttention
    dst = new_first.layer[0].SelfAttention
    dst.relative_attention_bias = src.relative_attention_bias
    dst.has_relative_attention_bias = True
