"""How a ``quantize`` or ``ptq`` entry after ``auto`` will store the student: what a size
target counts when the weights will not stay fp32.

A size target (``size_mb``) is judged on the student as it is saved. With ``{method: ptq,
bits: 4}`` after ``auto``, every quantized weight is saved as packed codes and per-bucket
scales (:mod:`distilkit.compress.packing`: ``ceil(n * b / 8)`` bytes of codes, 8 bytes a
bucket, and ``4 * 2**b`` bytes of points for the non-uniform scheme), about an eighth of its
fp32 bytes. Counted in fp32, a 10 MB target would be met by a student pruned to 10 MB of
fp32 weights and then quantized to 2 MB: five times smaller than asked, every pruned unit
paid for in accuracy for nothing.

:func:`storage_of` reads, once on the recipe's (unpruned) student, which weights the entry
quantizes and at how many bits, by the same selection the method itself runs
(``select_targets``, ``bits_for``). Inside the layers a weight is known by its role (the
attention's q, k, v, o; the FFN's up and down projections) and its layer's *position*, which
is what the entry's module patterns match after ``prune_layers`` renumbers the layers; its
size follows the structure (heads and FFN neurons kept). The word table follows the rows kept.
Every other quantized weight (position tables, a pooler an ``include`` names) keeps its shape
whatever the search removes, so its saving is one fixed number.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import nn

from distilkit.compress import quant_math as qm
from distilkit.compress.families import get_adapter
from distilkit.compress.packing import packed_nbytes
from distilkit.search.structure import factorizes, role_names, role_shapes


def stored_bytes(numel: int, bits: int, bucket_size: Optional[int], scheme: str) -> int:
    """Bytes one quantized weight of ``numel`` values is saved in (codes, bucket scales and
    offsets, and the points table of the non-uniform scheme), as ``expected_buffers`` lays
    it out."""
    out = packed_nbytes(numel, bits) + 8 * qm.num_buckets(numel, bucket_size)
    return out + (4 << bits if scheme == "nonuniform" else 0)


@dataclass(frozen=True)
class Storage:
    """Bits of each quantized weight, by layer position and role (0: kept fp32):
    ``attention[i]`` the q, k, v, o weights of the i-th layer, ``ffn[i]`` its up projection(s)
    then its down projection; ``word`` the word table; ``fixed_saving`` the bytes every
    other quantized weight saves (module docstring)."""

    attention: tuple
    ffn: tuple
    word: int
    bucket_size: Optional[int]
    scheme: str
    fixed_saving: int = 0

    def _saving(self, numel: int, bits: int) -> int:
        return 4 * numel - stored_bytes(numel, bits, self.bucket_size, self.scheme) if bits else 0

    def rows(self) -> tuple:
        """Per layer position, its weights' bits in :attr:`Structure.bits` order (q, k, v, o,
        then the FFN's): where a search of the bits starts."""
        return tuple(tuple(a) + tuple(f) for a, f in zip(self.attention, self.ffn))

    def _weight_saving(self, m: int, n: int, bits: int, rank: int) -> int:
        """An ``m x n`` weight at ``bits``: dense, or (factorized at ``rank``) its two factors,
        each quantized at the weight's bits, as the entry after ``low_rank`` finds them."""
        if not factorizes(m, n, rank):
            return self._saving(m * n, bits)
        r = min(int(rank), m, n)
        return self._saving(m * r, bits) + self._saving(r * n, bits)

    def saving(self, structure, shape) -> int:
        """Bytes saved against fp32 by a model of ``shape`` pruned to ``structure`` (at the
        structure's own per-weight bits when it has them, else at this storage's; with its
        ``ranks``, factorized weights saved as their two factors)."""
        out = int(self.fixed_saving)
        for i, (a, f) in enumerate(zip(structure.heads, structure.ffn)):
            bits = (tuple(structure.bits[i]) if structure.bits is not None
                    else tuple(self.attention[i]) + tuple(self.ffn[i]))
            ranks = structure.ranks[i] if structure.ranks is not None else (0,) * len(bits)
            out += sum(self._weight_saving(m, n, b, r) for (m, n), b, r in
                       zip(role_shapes(a, f, shape, len(bits)), bits, ranks))
        return out + self._saving(structure.vocab * shape.row_width(), self.word)

    def describe(self) -> str:
        bits = sorted({b for row in self.attention + self.ffn for b in row if b} |
                      ({self.word} if self.word else set()))
        return f"{'/'.join(map(str, bits)) or '32'}-bit weights as packed codes"


def bits_patterns(model: nn.Module, bits: tuple, default: int) -> dict:
    """``{module name: bits}`` of ``model``'s quantized layer weights whose bits (a
    :attr:`Structure.bits`, by position) are not ``default``: a quantize or ptq entry's
    ``bits_per_pattern`` that stores ``model`` at those bits (names are exact globs); with
    ``default=0``, every quantized one."""
    out = {}
    for row, names in zip(bits, role_names(model)):
        for b, name in zip(row, names):
            if b and b != default:
                out[name] = int(b)
    return out


def storage_of(model: nn.Module, cfg) -> Storage:
    """The :class:`Storage` a quantization config ``cfg`` (PTQConfig / QuantizeConfig) gives
    ``model``, by the modules and bits the method itself would choose."""
    from distilkit.compress.quantize import _weight_names, bits_for, select_targets

    if getattr(cfg, "target_bits", None) is not None:
        raise ValueError("a size target cannot count a quantize entry with target_bits: its "
                         "bits are allocated by gradient norms after the search; give bits "
                         "(or bits_per_pattern) instead")
    chosen = dict(select_targets(model, cfg))
    bits = bits_for(list(chosen), cfg)
    adapter = get_adapter(model, "method auto")
    names = role_names(model)
    role: dict[str, tuple] = {}
    for pos, row in enumerate(names):
        for j, name in enumerate(row):
            role[name] = ("attention", pos, j) if j < 4 else ("ffn", pos, j - 4)
    word_module = model.get_input_embeddings()
    rows = {"attention": [[0] * 4 for _ in names], "ffn": [[0] * (len(r) - 4) for r in names]}
    word, fixed = 0, 0
    stacks = tuple(s + "." for s in adapter.stacks())
    for name, mod in chosen.items():
        b = int(bits[name])
        if name in role:
            kind, pos, j = role[name]
            rows[kind][pos][j] = b
        elif mod is word_module:
            word = b
        elif name.startswith(stacks):
            # a linear inside a layer that is neither attention nor FFN: its shape would
            # follow the pruning in a way this count does not know
            raise ValueError(f"a size target cannot count the quantization of {name!r}: it is "
                             "inside a layer but neither its attention nor its FFN")
        else:
            for w in _weight_names(mod):
                n = getattr(mod, w).numel()
                fixed += 4 * n - stored_bytes(n, b, cfg.bucket_size, cfg.scheme)
    return Storage(attention=tuple(tuple(r) for r in rows["attention"]),
                   ffn=tuple(tuple(r) for r in rows["ffn"]), word=word,
                   bucket_size=cfg.bucket_size, scheme=cfg.scheme, fixed_saving=fixed)
