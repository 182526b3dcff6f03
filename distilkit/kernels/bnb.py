"""Run a quantized student through bitsandbytes: ``Linear4bit`` (NF4/FP4) or ``Linear8bitLt``.

distilkit's own packed format (bucketed min/max scales, any of 1..8 bits, optional learned
points) is the *training and storage* format of quantized distillation. For inference with
an off-the-shelf low-bit GEMM, :func:`to_bitsandbytes` swaps linear layers for
bitsandbytes modules, built from each layer's current weight:

* a fake-quantized layer (prepared by ``compress_``) contributes its quantized ``w_hat``;
* a packed layer (after ``finalize_``/``ptq``) its dequantized weight;
* a plain ``nn.Linear`` (when selected) its fp32 weight.

bitsandbytes then re-quantizes that weight in its own format (NF4 or FP4 in blocks of 64 with
absmax scales, or int8 row-wise), so outputs are close to, not bit-equal with, distilkit's
packed model: a 4-bit quantized-distilled weight has at most 16 distinct values per bucket
and NF4 represents those with small extra error. Biases stay in full precision.

bitsandbytes is optional and imported here only when called. It runs on CPU (0.45+), which
is how this is tested; on a GPU, move the converted model with ``.cuda()``.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn
from torch.nn.utils import parametrize

from distilkit.compress.base import select_modules, set_module

MODES = ("4bit", "8bit")


def _import_bnb():
    try:
        import bitsandbytes as bnb
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("to_bitsandbytes needs bitsandbytes: pip install 'distilkit[gpu]' "
                          "(or bitsandbytes)") from e
    return bnb


def current_weight(module: nn.Linear) -> torch.Tensor:
    """The weight a linear layer computes with: quantized ``w_hat`` when fake-quantized,
    the dequantized weight when packed, else the plain weight."""
    with torch.no_grad():
        return module.weight.detach().float().clone()


def _convert_one(module: nn.Linear, mode: str, quant_type: str, compute_dtype: torch.dtype,
                 device: str) -> nn.Module:
    bnb = _import_bnb()
    w = current_weight(module)
    bias = module.bias.detach().float().clone() if module.bias is not None else None
    if mode == "4bit":
        new = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=bias is not None,
                                compute_dtype=compute_dtype, quant_type=quant_type)
        new.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type=quant_type)
    else:
        new = bnb.nn.Linear8bitLt(module.in_features, module.out_features,
                                  bias=bias is not None, has_fp16_weights=False, threshold=0.0)
        new.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
    if bias is not None:
        new.bias = nn.Parameter(bias, requires_grad=False)
    # Moving the module is what makes bitsandbytes quantize the weight (on CPU too).
    return new.to(device)


def to_bitsandbytes(model: nn.Module, mode: str = "4bit", quant_type: str = "nf4",
                    include: Optional[Iterable[str]] = None,
                    exclude: Iterable[str] = ("*classifier*", "*lm_head*", "*pooler*"),
                    quantized_only: bool = True, compute_dtype: torch.dtype = torch.float32,
                    device: str = "cpu") -> list[str]:
    """Swap linear layers of ``model`` for bitsandbytes modules, in place, for inference.

    ``quantized_only`` (default): only layers distilkit quantized (fake-quant or packed), so
    the layers kept in full precision stay so. Returns the names of the converted layers.
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is invalid: use one of {MODES}")
    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"quant_type={quant_type!r} is invalid: use 'nf4' or 'fp4'")
    from distilkit.compress.packing import PackedMixin

    chosen = select_modules(model, include=include, exclude=exclude, types=(nn.Linear,))
    if quantized_only:
        chosen = [(n, m) for n, m in chosen
                  if isinstance(m, PackedMixin) or parametrize.is_parametrized(m, "weight")]
    if not chosen:
        raise ValueError("to_bitsandbytes: no linear layer to convert (quantize the model "
                         "first, or pass quantized_only=False)")
    for name, mod in chosen:
        set_module(model, name, _convert_one(mod, mode, quant_type, compute_dtype, device))
    model.eval()
    return [n for n, _ in chosen]
