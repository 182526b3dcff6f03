"""Pure quantizer functions for bucketed low-bit weights (Polino, Pascanu, Alistarh 2018).

Everything here is a function of tensors and numbers: no modules, no state. The module
swaps in :mod:`distilkit.compress.quantize` and the packed storage in
:mod:`distilkit.compress.packing` are built on these, so the fake-quantized forward during
training and the packed model after export compute *the same* dequantized values.

The scheme, in the paper's notation:

* **Bucketing.** A weight tensor is flattened (row-major) and split into buckets of ``k``
  consecutive values. ``bucket_size=None`` means *one bucket for the whole tensor* (the
  paper's "without bucketing"). The last bucket is padded by repeating its final value, which
  leaves its min and max unchanged; the padding is dropped again on the way back.
* **Scaling.** In each bucket ``sc(v) = (v - beta) / alpha`` with ``beta = min`` and
  ``alpha = max - min``, so every value lands in ``[0, 1]``. A constant bucket
  (``alpha = 0``) maps to 0 and comes back exactly.
* **Uniform quantization** with ``s + 1`` levels, ``s = 2**bits - 1``: the code of a scaled
  value ``x`` is ``round(s * x)`` (deterministic; error at most half a step ``1 / (2s)``) or
  ``floor(s * x) + Bernoulli(frac(s * x))`` (stochastic; unbiased, ``E[Q(x)] = x``).
  Dequantized: ``beta + alpha * (code / s)``.
* **Non-uniform quantization** to points ``p_1..p_n`` in ``[0, 1]`` (``n = 2**bits``):
  nearest point (deterministic) or one of the two neighbouring points with probabilities
  that make it unbiased (stochastic). Points are initialised uniformly, at quantiles of the
  scaled weights, or by 1-D k-means from a linear initialisation (Deep Compression).
  Dequantized: ``beta + alpha * p[code]``.
* **Size.** ``bits`` per weight plus two fp32 scalars (``alpha``, ``beta``) per bucket:
  ``bits + 64 / k`` bits per weight, ``32 / (bits + 64 / k)`` times smaller than fp32.

Stochastic rounding takes a ``torch.Generator`` so that it is seeded and reproducible.
"""
from __future__ import annotations

import heapq
import math
from typing import Optional, Sequence

import torch

ROUNDINGS = ("deterministic", "stochastic")
POINT_INITS = ("uniform", "quantile", "kmeans")


def check_bits(bits: int, field: str = "bits") -> int:
    """``bits`` as an int in 1..8, or a ValueError that names the field and the fix."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"{field}={bits!r} is invalid: use an integer number of bits from "
                         f"1 to 8 (codes are packed into bytes)")
    return bits


def check_bucket_size(bucket_size: Optional[int], field: str = "bucket_size") -> Optional[int]:
    """``bucket_size`` as a positive int or None (one bucket per tensor)."""
    if bucket_size is None:
        return None
    if isinstance(bucket_size, bool) or not isinstance(bucket_size, int) or bucket_size <= 0:
        raise ValueError(f"{field}={bucket_size!r} is invalid: use a positive number of "
                         f"consecutive weights per bucket (e.g. 256), or None for one bucket "
                         f"per tensor")
    return bucket_size


def levels(bits: int) -> int:
    """``s = 2**bits - 1``: the number of steps between the ``s + 1`` uniform levels."""
    return (1 << check_bits(bits)) - 1


# ---------------------------------------------------------------------------------------
# Bucketing and scaling
# ---------------------------------------------------------------------------------------

def effective_bucket_size(numel: int, bucket_size: Optional[int]) -> int:
    """The bucket size actually used for a tensor of ``numel`` values: ``numel`` for None,
    and for a bucket larger than the tensor (one bucket per tensor either way; padding the
    tensor up to a huge bucket size would only spend memory: ``bucket_size: 1e9`` padded every
    weight to a billion values)."""
    n = max(1, numel)
    return n if bucket_size is None else min(bucket_size, n)


def num_buckets(numel: int, bucket_size: Optional[int]) -> int:
    """How many buckets (hence scale/offset pairs) a tensor of ``numel`` values needs."""
    return -(-numel // effective_bucket_size(numel, bucket_size))


def to_buckets(x: torch.Tensor, bucket_size: Optional[int]) -> torch.Tensor:
    """``x`` flattened into ``[num_buckets, k]`` rows of consecutive values; the last row is
    padded by repeating the final value (min/max unchanged)."""
    flat = x.reshape(-1)
    k = effective_bucket_size(flat.numel(), bucket_size)
    pad = (-flat.numel()) % k
    if pad:
        flat = torch.cat([flat, flat[-1:].expand(pad)])
    return flat.view(-1, k)


def from_buckets(b: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`to_buckets`: drop the padding and restore ``shape``."""
    n = math.prod(shape)
    return b.reshape(-1)[:n].view(*shape)


def bucket_scale(buckets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scale each bucket (row) to ``[0, 1]``.

    Returns ``(scaled, alpha, beta)`` with ``alpha = max - min`` and ``beta = min`` per row
    (shape ``[num_buckets]``), so that ``buckets == beta + alpha * scaled`` up to rounding.
    """
    beta = buckets.amin(dim=1)
    alpha = buckets.amax(dim=1) - beta
    # A constant bucket has alpha = 0: divide by 1 instead, which maps it to exactly 0.
    safe = torch.where(alpha > 0, alpha, torch.ones_like(alpha))
    scaled = ((buckets - beta[:, None]) / safe[:, None]).clamp_(0.0, 1.0)
    return scaled, alpha, beta


# ---------------------------------------------------------------------------------------
# Uniform quantization
# ---------------------------------------------------------------------------------------

def round_codes(v: torch.Tensor, rounding: str, generator: Optional[torch.Generator] = None
                ) -> torch.Tensor:
    """Round non-negative reals to integers: nearest (deterministic) or up with probability
    equal to the fractional part (stochastic, unbiased)."""
    if rounding == "deterministic":
        return torch.round(v)
    if rounding == "stochastic":
        low = torch.floor(v)
        u = torch.rand(v.shape, generator=generator, dtype=v.dtype, device=v.device)
        return low + (u < (v - low)).to(v.dtype)
    raise ValueError(f"rounding={rounding!r} is invalid: use one of {ROUNDINGS}")


def uniform_codes(scaled: torch.Tensor, bits: int, rounding: str = "deterministic",
                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Codes in ``0..2**bits-1`` (uint8) of values already scaled to ``[0, 1]``."""
    s = levels(bits)
    return round_codes(scaled * s, rounding, generator).clamp_(0, s).to(torch.uint8)


def uniform_values(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """The scaled value ``code / s`` of each uniform code (fp32, in ``[0, 1]``)."""
    return codes.to(torch.float32) / levels(bits)


def dequantize_buckets(qvals: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor
                       ) -> torch.Tensor:
    """``beta + alpha * q`` per bucket row: the one formula every path (fake-quant forward,
    packed modules, reference for the Triton kernel) uses, so they agree bit for bit."""
    return beta[:, None] + alpha[:, None] * qvals


def quantize_uniform(x: torch.Tensor, bits: int, bucket_size: Optional[int] = 256,
                     rounding: str = "deterministic",
                     generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Fake-quantize ``x``: bucket, scale, round to ``2**bits`` levels, map back. Same shape
    and dtype as ``x`` (computed in fp32)."""
    codes, alpha, beta = encode_uniform(x, bits, bucket_size, rounding, generator)
    q = dequantize_buckets(uniform_values(codes, bits), alpha, beta)
    return from_buckets(q, x.shape).to(x.dtype)


def encode_uniform(x: torch.Tensor, bits: int, bucket_size: Optional[int] = 256,
                   rounding: str = "deterministic", generator: Optional[torch.Generator] = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(codes [num_buckets, k] uint8, alpha, beta)`` of ``x`` under uniform quantization."""
    scaled, alpha, beta = bucket_scale(to_buckets(x.detach().float(), bucket_size))
    return uniform_codes(scaled, bits, rounding, generator), alpha, beta


# ---------------------------------------------------------------------------------------
# Non-uniform quantization
# ---------------------------------------------------------------------------------------

def nonuniform_codes(scaled: torch.Tensor, points: torch.Tensor, rounding: str = "deterministic",
                     generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Index (int64) of the point each scaled value goes to.

    ``points`` need not be sorted (learned points can cross). Deterministic: the nearest
    point. Stochastic: one of the two neighbouring points, the upper one with probability
    ``(x - lo) / (hi - lo)``, so the expectation is ``x`` inside the points' range; values
    outside it go to the end point."""
    p = points.detach().float()
    sp, order = torch.sort(p)
    n = sp.numel()
    if rounding == "deterministic":
        mids = (sp[1:] + sp[:-1]) / 2
        idx = torch.bucketize(scaled, mids)
    elif rounding == "stochastic":
        hi = torch.bucketize(scaled, sp).clamp_(1, max(1, n - 1)) if n > 1 else \
            torch.zeros_like(scaled, dtype=torch.long)
        if n == 1:
            return order[hi]
        lo = hi - 1
        plo, phi = sp[lo], sp[hi]
        gap = (phi - plo).clamp_min(1e-12)
        frac = ((scaled - plo) / gap).clamp_(0.0, 1.0)
        u = torch.rand(scaled.shape, generator=generator, dtype=frac.dtype, device=frac.device)
        idx = torch.where(u < frac, hi, lo)
    else:
        raise ValueError(f"rounding={rounding!r} is invalid: use one of {ROUNDINGS}")
    return order[idx]


def init_points(scaled: torch.Tensor, bits: int, method: str = "uniform",
                kmeans_iters: int = 25, max_samples: int = 1 << 16,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``2**bits`` sorted points in ``[0, 1]`` for the scaled values ``scaled``.

    ``uniform``: evenly spaced, ``0`` and ``1`` included. ``quantile``: the values'
    quantiles at ``(i + 0.5) / n``, so each point gets about as many weights. ``kmeans``:
    Lloyd's algorithm in 1-D from the uniform (linear) initialisation, as in Deep
    Compression; on a random subsample of at most ``max_samples`` values for speed.
    """
    n = 1 << check_bits(bits)
    if method == "uniform":
        return torch.linspace(0.0, 1.0, n)
    vals = scaled.detach().reshape(-1).float()
    if vals.numel() > max_samples:
        pick = torch.randperm(vals.numel(), generator=generator)[:max_samples]
        vals = vals[pick]
    if method == "quantile":
        q = (torch.arange(n, dtype=torch.float32) + 0.5) / n
        return torch.quantile(vals, q)
    if method == "kmeans":
        pts = torch.linspace(0.0, 1.0, n)
        for _ in range(kmeans_iters):
            idx = torch.bucketize(vals, (pts[1:] + pts[:-1]) / 2)
            sums = torch.zeros(n).index_add_(0, idx, vals)
            counts = torch.bincount(idx, minlength=n).float()
            # An empty cluster keeps its previous centre rather than collapsing to 0.
            new = torch.where(counts > 0, sums / counts.clamp_min(1), pts)
            new, _ = torch.sort(new)
            if torch.allclose(new, pts, atol=1e-7):
                break
            pts = new
        return pts
    raise ValueError(f"points_init={method!r} is invalid: use one of {POINT_INITS}")


# ---------------------------------------------------------------------------------------
# Size arithmetic, Huffman coding, bit allocation
# ---------------------------------------------------------------------------------------

def bits_per_weight(bits: int, bucket_size: int) -> float:
    """``b + 64 / k``: the code plus two fp32 scalars shared by the ``k`` weights of a bucket."""
    return check_bits(bits) + 64.0 / check_bucket_size(bucket_size)


def compression_ratio(bits: int, bucket_size: int) -> float:
    """``32 / (b + 64 / k)``: how many times smaller than fp32 (k=256: 7.53x at 4 bits,
    14.22x at 2 bits; the paper truncates these to 7.52 and 14.2)."""
    return 32.0 / bits_per_weight(bits, bucket_size)


def huffman_code_lengths(counts: dict) -> dict:
    """Code length in bits of each symbol of a Huffman code for the symbol ``counts``
    (a single symbol gets length 1)."""
    items = [(c, i, s) for i, (s, c) in enumerate(sorted(counts.items())) if c > 0]
    if not items:
        return {}
    if len(items) == 1:
        return {items[0][2]: 1}
    # Heap of (weight, tiebreak, symbols-in-subtree); each merge deepens its symbols by one.
    heap = [(c, i, [s]) for c, i, s in items]
    heapq.heapify(heap)
    lengths = {s: 0 for _, _, s in items}
    tie = len(items)
    while len(heap) > 1:
        c1, _, s1 = heapq.heappop(heap)
        c2, _, s2 = heapq.heappop(heap)
        for s in s1 + s2:
            lengths[s] += 1
        heapq.heappush(heap, (c1 + c2, tie, s1 + s2))
        tie += 1
    return lengths


def huffman_bits(codes: torch.Tensor) -> int:
    """Total bits of ``codes`` Huffman-coded (the codebook, at most 256 lengths, is not
    counted, as in the paper)."""
    hist = torch.bincount(codes.reshape(-1).to(torch.int64)).tolist()
    freq = {s: int(c) for s, c in enumerate(hist) if c}
    lengths = huffman_code_lengths(freq)
    return sum(freq[s] * lengths[s] for s in freq)


def allocate_bits(grad_norms: Sequence[float], numels: Sequence[int], target_bits: float,
                  min_bits: int = 1, max_bits: int = 8) -> list[int]:
    """Integer bits per layer, in proportion to each layer's gradient norm, whose
    ``numel``-weighted average is at most ``target_bits`` and as close to it as integers
    allow (Polino et al.: "allocate ... according to a simple linear proportion").

    The continuous solution ``clip(c * g_l, min, max)`` is found by bisection on ``c``; it is
    floored, then layers are raised one bit at a time, largest shortfall first, while the
    budget allows.
    """
    g = [max(float(x), 0.0) for x in grad_norms]
    n = [int(x) for x in numels]
    if len(g) != len(n) or not g:
        raise ValueError("allocate_bits needs one gradient norm per layer and at least one layer")
    if not min_bits <= target_bits <= max_bits:
        raise ValueError(f"target_bits={target_bits!r} is invalid: use a value between "
                         f"{min_bits} and {max_bits}")
    total = sum(n)
    budget = target_bits * total
    if sum(g) == 0:
        g = [1.0] * len(g)

    def used(c: float) -> float:
        return sum(ni * min(max(c * gi, min_bits), max_bits) for gi, ni in zip(g, n))

    lo, hi = 0.0, 1.0
    while used(hi) < budget and hi < 1e30:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if used(mid) < budget else (lo, mid)
    cont = [min(max(lo * gi, min_bits), max_bits) for gi in g]
    bits = [max(min_bits, min(max_bits, int(math.floor(b + 1e-9)))) for b in cont]
    spent = sum(b * ni for b, ni in zip(bits, n))
    for i in sorted(range(len(g)), key=lambda i: cont[i] - bits[i], reverse=True):
        if bits[i] < max_bits and spent + n[i] <= budget + 1e-6:
            bits[i] += 1
            spent += n[i]
    return bits
