"""The Triton dequantize-matmul kernel on CUDA against dequantize-then-matmul, at MiniLM's
FFN shapes and a bert-base FFN (768x3072), and PackedLinear's dispatch to it."""
import pytest
import torch
from torch import nn

import distilkit.kernels  # noqa: F401 - registers PackedLinear's CUDA kernel
from distilkit.compress import compress_, packing
from distilkit.compress.quantize import PTQConfig
from distilkit.kernels.triton_dequant import packed_linear_forward, reference_matmul


def _layer(n, k, bits, bucket=256, scheme="uniform"):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(k, n))
    compress_(net, PTQConfig(bits=bits, bucket_size=bucket, scheme=scheme,
                             points_init="kmeans", exclude=[]))
    return net.cuda()[0]


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("m", [1, 16, 256])
@pytest.mark.parametrize("n,k", [(1536, 384), (384, 1536), (3072, 768), (768, 3072)])
def test_kernel_equals_reference_on_cuda(m, n, k):
    layer = _layer(n, k, bits=4)
    x = torch.randn(m, k, device="cuda")
    out = packed_linear_forward(layer, x)
    assert out.is_cuda and out.shape == (m, n)
    # tl.dot multiplies fp32 in TF32 on recent GPUs: close, not bit-equal.
    assert _rel(out, reference_matmul(layer, x)) < 5e-3


@pytest.mark.parametrize("bits,scheme", [(2, "uniform"), (3, "uniform"), (5, "nonuniform")])
def test_kernel_other_widths_on_cuda(bits, scheme):
    layer = _layer(768, 3072, bits=bits, bucket=200, scheme=scheme)
    x = torch.randn(16, 3072, device="cuda")
    assert _rel(packed_linear_forward(layer, x), reference_matmul(layer, x)) < 5e-3


def test_packed_linear_dispatches_to_the_kernel_on_cuda(monkeypatch):
    monkeypatch.delenv(packing.TRITON_ENV, raising=False)
    calls = []
    real = packing._KERNEL_FORWARD
    monkeypatch.setattr(packing, "_KERNEL_FORWARD",
                        lambda mod, x: calls.append(x.device.type) or real(mod, x))
    layer = _layer(1536, 384, bits=4)
    x = torch.randn(2, 8, 384, device="cuda")
    with torch.inference_mode():
        out = layer(x)
        out16 = layer(x.bfloat16())
        monkeypatch.setenv(packing.TRITON_ENV, "0")
        dense = layer(x)
    assert calls == ["cuda", "cuda"]
    assert out16.dtype == torch.bfloat16 and out.shape == (2, 8, 1536)
    assert _rel(out, dense) < 5e-3 and _rel(out16, dense) < 2e-2
