"""The structure of an encoder classifier as the budget search sees it, and what it weighs.

A :class:`Structure` is what structured pruning can change: per kept encoder layer, the
attention heads and FFN neurons it keeps, and the rows of the word-embedding table. A
:class:`BaseShape` is what it cannot: the unpruned widths of the model family, read from the
config (pruning heads or neurons leaves the config's counts as they were; dropping layers
changes only the depth, which a Structure holds). Latency tables are keyed by the BaseShape.

Parameters are counted, not estimated: a kept layer with ``h`` heads of width ``d`` and ``f``
FFN neurons in a model of width ``H`` holds

* attention: Q, K, V (``H x hd`` weights and ``hd`` biases each), the output projection
  (``hd x H`` and ``H``) and its LayerNorm (``2 H``);
* FFN: the up projection (``H x f`` and ``f``), the down projection (``f x H`` and ``H``) and
  its LayerNorm (``2 H``),

the same for every family the :class:`~distilkit.compress.families.FamilyAdapter` knows
(BERT, RoBERTa, XLM-R, ELECTRA, DistilBERT), and everything outside the layers is the word
table (``vocab x embed_dim``) plus ``other_params``: position and token-type tables, the
embedding LayerNorm (and ELECTRA's projection), the pooler and the classifier head, read off
the model once (:func:`base_shape_of`), so that each family's own head is counted exactly.
:func:`parameters` therefore equals ``sum(p.numel() for p in model.parameters())`` of the
pruned model (tested).

Encoder-decoder models (T5, BART, Marian) are structures too: a
:class:`Structure` then lists the encoder's layers and then the decoder's, ``stacks`` saying how
many of each are kept; heads are each layer's *self*-attention heads, and a decoder layer's
cross-attention is kept whole (``BaseShape.cross_params`` per decoder layer). A family's own
layer shapes enter as ``bias`` (T5's linears have none), ``norm`` (parameters per width of a
layer norm: 2 for LayerNorm, 1 for T5's RMS norm) and ``ups`` (T5's gated FFN has two up
projections). The count is exact for them too (tested); their latency is generation
(:mod:`~distilkit.search.latency`: a table per stack).
"""
from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

from torch import nn

from distilkit.compress.families import get_adapter

ENCODER_TYPES = ("bert", "roberta", "xlm-roberta", "electra", "distilbert")
SEQ2SEQ_TYPES = ("t5", "bart", "marian")   # encoder-decoder families (PyTorch latency)


@dataclass(frozen=True)
class Structure:
    """Heads and FFN neurons kept per kept encoder layer (in order), and word-table rows.

    Every layer keeps at least one head and one neuron: no supported attention class can
    express zero heads, and an empty FFN is refused by ``prune_ffn``; a layer with nothing
    left is a dropped layer (``prune_layers``), i.e. absent from the tuples."""

    heads: tuple[int, ...]
    ffn: tuple[int, ...]
    vocab: int
    # Per kept layer, the bits its quantized weights will be stored at, by role (as
    # :class:`~distilkit.search.storage.Storage` orders them: q, k, v, o, the FFN's up
    # projection(s), its down projection; 0 kept fp32). None: the bits are not searched.
    bits: Optional[tuple] = None
    # Per kept layer, the rank each of those weights is factorized at (same order; 0 dense):
    # the ``low_rank`` entry the search writes. None: no rank is searched. A rank at which
    # the two factors would not be smaller than the weight counts (and is written) as dense.
    ranks: Optional[tuple] = None
    # An encoder-decoder model: how many of the layers above are the encoder's and how many
    # the decoder's (in that order); None: one stack (an encoder classifier).
    stacks: Optional[tuple] = None

    def __post_init__(self):
        object.__setattr__(self, "heads", tuple(int(h) for h in self.heads))
        object.__setattr__(self, "ffn", tuple(int(f) for f in self.ffn))
        if len(self.heads) != len(self.ffn):
            raise ValueError(f"Structure: heads has {len(self.heads)} layers but ffn has "
                             f"{len(self.ffn)}; give one entry per kept layer in both")
        for name in ("bits", "ranks"):
            rows = getattr(self, name)
            if rows is None:
                continue
            object.__setattr__(self, name, tuple(tuple(int(b) for b in row) for row in rows))
            if len(rows) != len(self.heads):
                raise ValueError(f"Structure: {name} has {len(rows)} layers but heads has "
                                 f"{len(self.heads)}; give one row per kept layer")
        bad = [x for x in self.heads + self.ffn if x < 1]
        if bad:
            raise ValueError(f"Structure: heads={self.heads}, ffn={self.ffn}: every kept layer "
                             "keeps at least 1 head and 1 neuron; drop the layer instead")
        if int(self.vocab) < 1:
            raise ValueError(f"Structure: vocab={self.vocab!r} must be a positive row count")
        if self.stacks is not None:
            object.__setattr__(self, "stacks", tuple(int(n) for n in self.stacks))
            if sum(self.stacks) != len(self.heads) or min(self.stacks) < 1:
                raise ValueError(f"Structure: stacks={self.stacks} must count the "
                                 f"{len(self.heads)} layers, at least 1 per stack")

    def num_layers(self) -> int:
        return len(self.heads)

    def stack_of(self) -> list:
        """The stack (0: encoder, 1: decoder) of each layer position; all 0 with one stack."""
        return [s for s, n in enumerate(self.stacks or (len(self.heads),)) for _ in range(n)]


@dataclass(frozen=True)
class BaseShape:
    """The unpruned shapes of a model (module docstring); ``key()`` identifies a table."""

    family: str          # config.model_type, e.g. "bert"
    hidden: int
    num_heads: int
    head_dim: int
    intermediate: int
    vocab: int           # config.vocab_size (a vocabulary-pruned and saved model: its kept rows)
    num_labels: int
    max_positions: int
    embed_dim: int = 0   # width of a word-table row; 0: ``hidden`` (ELECTRA may differ)
    # Parameters outside the layers and the word table; None: BERT's (positions, two token
    # types, embedding LayerNorm, pooler, classifier).
    other_params: Optional[int] = None
    bias: bool = True      # the layers' linears have biases (T5's have none)
    norm: int = 2          # parameters per width of a layer norm (2: LayerNorm; 1: RMS norm)
    ups: int = 1           # FFN up projections (2: a gated FFN, T5 v1.1)
    cross_params: int = 0  # a decoder layer's cross-attention and its norm, kept whole

    def key(self) -> dict:
        d = asdict(self)
        d["embed_dim"] = self.row_width()
        d["other_params"] = self.other()
        for name in ("bias", "norm", "ups", "cross_params"):  # an encoder's key as it was
            if d[name] == BaseShape.__dataclass_fields__[name].default:
                del d[name]
        return d

    def row_width(self) -> int:
        return self.embed_dim or self.hidden

    def other(self) -> int:
        if self.other_params is not None:
            return int(self.other_params)
        h = self.hidden
        return (self.max_positions + 2) * h + 2 * h + (h * h + h) + (h * self.num_labels
                                                                    + self.num_labels)

    def full_structure(self, num_layers: int) -> Structure:
        """``num_layers`` unpruned layers and the whole word table."""
        return Structure((self.num_heads,) * num_layers, (self.intermediate,) * num_layers,
                         self.vocab)


def is_seq2seq(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def _check_family(model: nn.Module, what: str) -> None:
    cfg = getattr(model, "config", None)
    model_type = getattr(cfg, "model_type", None)
    seq2seq = is_seq2seq(model)
    ok = model_type in SEQ2SEQ_TYPES if seq2seq else (
        model_type in ENCODER_TYPES and not getattr(cfg, "add_cross_attention", False))
    if not ok:
        raise ValueError(f"{what}: model_type {model_type!r} ({type(model).__name__}) is not "
                         f"a model of a supported family; supported: encoder classifiers "
                         f"({', '.join(ENCODER_TYPES)}) and encoder-decoder models "
                         f"({', '.join(SEQ2SEQ_TYPES)})")


def _word_rows(model: nn.Module) -> int:
    # A vocabulary-pruned model's PrunedEmbedding exposes its kept rows as ``weight``.
    return int(model.get_input_embeddings().weight.shape[0])


def role_names(model: nn.Module) -> list:
    """Per layer position, the module names of its weights in :attr:`Structure.bits` order:
    the attention's q, k, v, o, the FFN's up projection(s), its down projection."""
    adapter = get_adapter(model, "method auto")
    attn = {b.layer: b for b in adapter.attention_blocks() if b.kind == "self"}
    ffns = {b.layer: b for b in adapter.ffn_blocks()}
    return [[attn[layer].q, attn[layer].k, attn[layer].v, attn[layer].o,
             *ffns[layer].up, ffns[layer].down] for layer in adapter.layers()]


def rank_patterns(model: nn.Module, ranks: tuple) -> dict:
    """``{module name: rank}`` of ``model``'s layer weights that ``ranks`` (a
    :attr:`Structure.ranks`, by position) factorizes at their current shapes (a rank that
    would not make the factors smaller leaves the weight dense, as :func:`weight_count`
    counts it), each rank at most what the weight's shape allows: a ``low_rank`` entry's
    ``ranks`` that stores ``model`` as counted (names are exact globs)."""
    out = {}
    for row, names in zip(ranks, role_names(model)):
        for r, name in zip(row, names):
            m, n = model.get_submodule(name).weight.shape
            if factorizes(m, n, r):
                out[name] = min(int(r), m, n)
    return out


def structure_of(model: nn.Module) -> Structure:
    """The heads and FFN neurons each encoder layer of ``model`` keeps now, and its word rows;
    with a factorized layer weight (``low_rank``), the ranks of every layer's weights."""
    _check_family(model, "structure_of")
    adapter = get_adapter(model, "structure_of")
    heads = {b.layer: adapter.num_heads(b) for b in adapter.attention_blocks() if b.kind == "self"}
    ffn = {b.layer: int(model.get_submodule(b.down).in_features) for b in adapter.ffn_blocks()}
    layers = adapter.layers()
    ranks = [[int(getattr(model.get_submodule(n), "rank", 0)) for n in row]
             for row in role_names(model)]
    stacks = tuple(len(model.get_submodule(s)) for s in adapter.stacks()) \
        if is_seq2seq(model) else None
    return Structure(tuple(heads[n] for n in layers), tuple(ffn[n] for n in layers),
                     _word_rows(model),
                     ranks=tuple(map(tuple, ranks)) if any(map(any, ranks)) else None,
                     stacks=stacks)


def _cfg(cfg, *names):
    for n in names:
        v = getattr(cfg, n, None)
        if v is not None:
            return int(v)
    raise ValueError(f"base_shape_of: the config has none of {names}")


def base_shape_of(model: nn.Module) -> BaseShape:
    """The config's (unpruned) shapes of ``model``, its layers' bias / norm / FFN form, and
    its parameters outside the layers and the word table: the rest of the model's count
    once the layers are counted by the formulas (T5's relative position tables, kept whole,
    are among them; so are a decoder's cross-attentions, in ``cross_params`` per layer)."""
    _check_family(model, "base_shape_of")
    adapter = get_adapter(model, "base_shape_of")
    cfg = model.config
    hidden = _cfg(cfg, "hidden_size", "dim", "d_model")
    heads = _cfg(cfg, "num_attention_heads", "n_heads", "num_heads")
    blocks = [b for b in adapter.attention_blocks() if b.kind == "self"]
    head_dim = adapter.head_dim(blocks[0]) if blocks else hidden // heads
    word = model.get_input_embeddings().weight
    seq2seq = is_seq2seq(model)
    ffns = adapter.ffn_blocks()
    shape = BaseShape(
        family=cfg.model_type, hidden=hidden, num_heads=heads, head_dim=head_dim,
        intermediate=_cfg(cfg, "intermediate_size", "hidden_dim", "d_ff", "encoder_ffn_dim"),
        vocab=int(cfg.vocab_size), num_labels=int(getattr(cfg, "num_labels", 0) or 0),
        max_positions=int(getattr(cfg, "max_position_embeddings", 0) or 0) if seq2seq
        else _cfg(cfg, "max_position_embeddings"),
        embed_dim=int(word.shape[1]), other_params=0,
        # T5's linears have no biases and its norms no shift; every other family's have both
        bias=cfg.model_type != "t5", norm=1 if cfg.model_type == "t5" else 2,
        ups=len(ffns[0].up) if ffns else 1)
    st = structure_of(model)
    if seq2seq:
        # the last decoder layer less its self-attention and FFN (and a T5 position table,
        # should it be the first layer too): its cross-attention and that block's norm
        name = adapter.layers()[-1]
        layer = model.get_submodule(name)
        own = sum(p.numel() for p in layer.parameters()) - sum(
            p.numel() for n, m in layer.named_modules() if n.endswith("relative_attention_bias")
            for p in m.parameters())
        ranks = st.ranks[-1] if st.ranks else ()
        cross = own - attention_parameters(st.heads[-1], shape, ranks[:4]) \
            - ffn_parameters(st.ffn[-1], shape, ranks[4:])
        shape = dataclasses.replace(shape, cross_params=int(cross))
    total = sum(p.numel() for p in model.parameters())
    other = total - parameters(st, shape)   # what the formulas do not hold
    return dataclasses.replace(shape, other_params=int(other))


def factorizes(m: int, n: int, rank: int) -> bool:
    """Whether an ``m x n`` weight at ``rank`` is stored as two factors: only when they hold
    fewer weights than it (``low_rank``'s break-even rank)."""
    return bool(rank) and (m + n) * min(rank, m, n) < m * n


def weight_count(m: int, n: int, rank: int = 0) -> int:
    """Weights of an ``m x n`` linear at ``rank`` (0: dense): ``(m + n) r`` factorized
    (the rank at most ``min(m, n)``, what the weight's own shape allows after pruning), else
    ``m n``."""
    return (m + n) * min(rank, m, n) if factorizes(m, n, rank) else m * n


def role_shapes(heads: int, neurons: int, shape: BaseShape, roles: int = 6) -> list:
    """``(out, in)`` of a layer's weights keeping ``heads`` heads and ``neurons`` FFN neurons,
    in :attr:`Structure.ranks` order: q, k, v, o, the FFN's up projection(s) (``roles - 5``
    of them), its down projection."""
    hd, h = heads * shape.head_dim, shape.hidden
    return [(hd, h)] * 3 + [(h, hd)] + [(neurons, h)] * (roles - 5) + [(h, neurons)]


def attention_parameters(heads: int, shape: BaseShape, ranks: Sequence[int] = ()) -> int:
    """Q/K/V/O weights (and biases) of ``heads`` heads, and the attention's layer norm;
    ``ranks``: the q, k, v, o weights' ranks (0 or absent: dense)."""
    hd, h, b = heads * shape.head_dim, shape.hidden, int(shape.bias)
    r = tuple(ranks[:4]) + (0,) * (4 - len(ranks[:4]))
    return (sum(weight_count(hd, h, r[j]) + b * hd for j in range(3))
            + weight_count(h, hd, r[3]) + b * h + shape.norm * h)


def ffn_parameters(neurons: int, shape: BaseShape, ranks: Sequence[int] = ()) -> int:
    """Up projection(s) and down projection of ``neurons`` neurons (and biases), and the
    FFN's layer norm; ``ranks``: the up and down weights' ranks (0 or absent: dense)."""
    h, b, u = shape.hidden, int(shape.bias), shape.ups
    r = tuple(ranks[:u + 1]) + (0,) * (u + 1 - len(ranks[:u + 1]))
    return sum(weight_count(neurons, h, r[j]) + b * neurons for j in range(u)) \
        + (weight_count(h, neurons, r[u]) + b * h) + shape.norm * h


def parameters(structure: Structure, shape: BaseShape) -> int:
    """The exact parameter count of a model of ``shape`` pruned to ``structure`` (and, with
    its ``ranks``, factorized)."""
    ranks = structure.ranks or ((),) * structure.num_layers()
    layers = sum(attention_parameters(a, shape, r[:4]) + ffn_parameters(f, shape, r[4:])
                 for a, f, r in zip(structure.heads, structure.ffn, ranks))
    decoder_layers = sum(structure.stack_of())   # stack 1: each keeps its cross-attention
    return layers + decoder_layers * shape.cross_params + structure.vocab * shape.row_width() \
        + shape.other()


def size_mb(structure: Structure, shape: BaseShape, bytes_per_param: float = 4.0,
            storage=None) -> float:
    """The saved weights in MB (10^6 bytes) at ``bytes_per_param`` (4: fp32), or, with a
    :class:`~distilkit.search.storage.Storage`, fp32 except the weights it quantizes, which
    count their packed codes and scales: an estimate of the file, which adds a small header
    (and, after vocabulary pruning in id-map form, the int32 id map)."""
    if not bytes_per_param > 0:
        raise ValueError(f"size_mb: bytes_per_param={bytes_per_param!r} must be positive, "
                         "e.g. 4.0 for fp32, 1.0 for int8")
    total = parameters(structure, shape) * float(bytes_per_param)
    if storage is not None:
        if bytes_per_param != 4.0:
            raise ValueError("size_mb: a storage counts against fp32 (bytes_per_param 4)")
        total -= storage.saving(structure, shape)
    return total / 1e6
