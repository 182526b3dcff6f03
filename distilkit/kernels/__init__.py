"""Inference paths for quantized students beyond the CPU one: a Triton kernel over distilkit's
packed bucketed weights (:mod:`distilkit.kernels.triton_dequant`) and conversion to
bitsandbytes modules (:mod:`distilkit.kernels.bnb`).

Triton and bitsandbytes are optional: nothing here imports them until a function that needs
them is called, so ``import distilkit.kernels`` works without either.
"""
from __future__ import annotations

from distilkit.compress.packing import register_kernel_forward


def packed_linear_forward(module, x, **blocks):
    """Triton kernel forward of a ``PackedLinear`` (see :mod:`.triton_dequant`)."""
    from distilkit.kernels.triton_dequant import packed_linear_forward as f

    return f(module, x, **blocks)


def to_bitsandbytes(model, mode="4bit", **kwargs):
    """Swap quantized linear layers for bitsandbytes modules (see :mod:`.bnb`)."""
    from distilkit.kernels.bnb import to_bitsandbytes as f

    return f(model, mode=mode, **kwargs)


# PackedLinear (a layer below) dispatches to the kernel once this package is imported.
register_kernel_forward(packed_linear_forward)

__all__ = ["packed_linear_forward", "to_bitsandbytes"]
