"""Triton kernel: ``y = x @ W.T + b`` with ``W`` read from packed bucketed low-bit codes.

The weight never exists in full precision in memory: each program loads the bytes holding
its tile's codes, extracts the codes, looks up the tile's bucket scale and offset, and
dequantizes in registers right before the ``tl.dot``. This is the memory-bound inference
path of a quantized-distilled student on a GPU (the CPU path in
:mod:`distilkit.compress.packing` computes with a dequantized copy instead).

Layout (see :mod:`distilkit.compress.packing`): the flattened weight ``W[n, k]`` has flat
index ``f = n * K + k``; its code is the ``bits`` bits at bit offset ``f * bits`` of the
little-endian byte stream, read from the 16-bit window of bytes ``(f*bits) >> 3`` and the
next; its bucket is ``f // bucket_size``; its value is ``offset[bucket] + scale[bucket] *
code / (2**bits - 1)`` (uniform) or ``offset + scale * points[code]`` (non-uniform): the
exact arithmetic of the reference :meth:`~distilkit.compress.packing.PackedMixin.dequantized`.

Triton is optional and imported only when the kernel is first used. Without a GPU, set
``TRITON_INTERPRET=1`` before Triton is imported and pass CPU tensors: the interpreter runs
the same kernel in NumPy (slowly), which is how the tests check it against
dequantize-then-matmul.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

_KERNEL = None


def _build_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def packed_matmul_kernel(x_ptr, packed_ptr, scale_ptr, offset_ptr, points_ptr, bias_ptr,
                             out_ptr, M, N, K, n_bytes, bucket_size,
                             stride_xm, stride_om,
                             BITS: tl.constexpr, NONUNIFORM: tl.constexpr,
                             HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        levels = (1 << BITS) - 1
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            x_mask = (rm[:, None] < M) & (rk[None, :] < K)
            x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=x_mask, other=0.0)
            w_mask = (rn[:, None] < N) & (rk[None, :] < K)
            flat = rn[:, None].to(tl.int64) * K + rk[None, :]
            bit = flat * BITS
            byte = bit >> 3
            shift = (bit & 7).to(tl.int32)
            lo = tl.load(packed_ptr + byte, mask=w_mask, other=0).to(tl.int32)
            hi = tl.load(packed_ptr + byte + 1, mask=w_mask & (byte + 1 < n_bytes),
                         other=0).to(tl.int32)
            code = ((lo | (hi << 8)) >> shift) & levels
            bucket = flat // bucket_size
            sc = tl.load(scale_ptr + bucket, mask=w_mask, other=0.0)
            off = tl.load(offset_ptr + bucket, mask=w_mask, other=0.0)
            if NONUNIFORM:
                q = tl.load(points_ptr + code, mask=w_mask, other=0.0)
            else:
                q = code.to(tl.float32) / levels
            w = off + sc * q
            w = tl.where(w_mask, w, 0.0)
            acc += tl.dot(x, tl.trans(w))
        if HAS_BIAS:
            b = tl.load(bias_ptr + rn, mask=rn < N, other=0.0)
            acc += b[None, :]
        o_mask = (rm[:, None] < M) & (rn[None, :] < N)
        tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], acc, mask=o_mask)

    return packed_matmul_kernel


def _kernel():
    global _KERNEL
    if _KERNEL is None:
        try:
            _KERNEL = _build_kernel()
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("the packed matmul kernel needs Triton: pip install "
                              "'distilkit[gpu]' (or triton)") from e
    return _KERNEL


def packed_matmul(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor,
                  offset: torch.Tensor, out_features: int, bits: int, bucket_size: int,
                  points: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                  block_m: int = 16, block_n: int = 32, block_k: int = 32) -> torch.Tensor:
    """``x @ W.T (+ bias)`` in fp32 where ``W [out_features, x.shape[-1]]`` is given by its
    packed codes and per-bucket ``scale`` (alpha) and ``offset`` (beta). ``x`` may have
    leading batch dimensions. All tensors on the same device (CUDA, or CPU under
    ``TRITON_INTERPRET=1``)."""
    import triton

    if not 1 <= bits <= 8:
        raise ValueError(f"bits={bits} is invalid: use 1..8")
    lead, K = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, K).float().contiguous()
    M, N = x2.shape[0], out_features
    need = -(-N * K * bits // 8)
    if packed.numel() < need:
        raise ValueError(f"packed codes hold {packed.numel()} bytes; a {N}x{K} weight at "
                         f"{bits} bits needs {need}")
    out = torch.empty((M, N), device=x.device, dtype=torch.float32)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    dummy = scale  # any pointer for absent optional tensors (never read)
    _kernel()[grid](
        x2, packed.contiguous(), scale.float().contiguous(), offset.float().contiguous(),
        points.float().contiguous() if points is not None else dummy,
        bias.float().contiguous() if bias is not None else dummy,
        out, M, N, K, packed.numel(), bucket_size, x2.stride(0), out.stride(0),
        BITS=bits, NONUNIFORM=points is not None, HAS_BIAS=bias is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return out.view(*lead, N)


def packed_linear_forward(module, x: torch.Tensor, **blocks) -> torch.Tensor:
    """Run a :class:`~distilkit.compress.packing.PackedLinear` through the kernel."""
    spec = module.packed_specs["weight"]
    pts = module.weight_points if spec["scheme"] == "nonuniform" else None
    return packed_matmul(x, module.weight_packed, module.weight_scale, module.weight_offset,
                         spec["shape"][0], spec["bits"], spec["bucket_size"], pts,
                         module.bias, **blocks)


def reference_matmul(module, x: torch.Tensor) -> torch.Tensor:
    """Dequantize-then-matmul: what :func:`packed_linear_forward` must equal."""
    return torch.nn.functional.linear(x.float(), module.dequantized("weight"), module.bias)


def matmul_flops(m: int, n: int, k: int) -> int:
    """Floating-point operations of an ``[m, k] @ [k, n]`` product."""
    return 2 * m * n * k


def weight_bytes(n: int, k: int, bits: int, bucket_size: int) -> int:
    """Bytes the kernel reads for the weight: codes plus 8 per bucket."""
    return math.ceil(n * k * bits / 8) + 8 * math.ceil(n * k / bucket_size)
