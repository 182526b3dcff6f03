"""GPU paths checked on CPU: the Triton kernel under TRITON_INTERPRET=1 against
dequantize-then-matmul, and the bitsandbytes conversion (bitsandbytes runs on CPU)."""
import os
import subprocess
import sys

# The interpreter must be chosen before Triton is first imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import tiny_batch, tiny_bert  # noqa: E402
from torch import nn  # noqa: E402

from distilkit.compress import compress_, finalize_  # noqa: E402
from distilkit.compress.quantize import PTQConfig, QuantizeConfig  # noqa: E402
from distilkit.kernels import packed_linear_forward, to_bitsandbytes  # noqa: E402
from distilkit.kernels.triton_dequant import reference_matmul  # noqa: E402


def _packed_layer(n, k, bits, bucket, scheme="uniform", bias=True, seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(k, n, bias=bias))
    compress_(net, PTQConfig(bits=bits, bucket_size=bucket, scheme=scheme,
                             points_init="kmeans", exclude=[]))
    return net[0]


def test_kernels_import_lazily():
    code = ("import sys, distilkit.kernels, distilkit.compress.quantize; "
            "assert 'triton' not in sys.modules and 'bitsandbytes' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(
        os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("bits,bucket,scheme,bias", [
    (4, 64, "uniform", True), (2, 256, "uniform", False), (3, 50, "uniform", True),
    (8, 1000, "uniform", True), (5, 17, "nonuniform", True), (1, 32, "uniform", True),
])
def test_triton_kernel_equals_dequantize_then_matmul(bits, bucket, scheme, bias):
    # Shapes that are not multiples of the blocks, and buckets that cross rows.
    layer = _packed_layer(n=40, k=72, bits=bits, bucket=bucket, scheme=scheme, bias=bias)
    x = torch.randn(2, 5, 72)
    out = packed_linear_forward(layer, x)
    ref = reference_matmul(layer, x)
    assert out.shape == (2, 5, 40)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, layer(x), rtol=1e-5, atol=1e-5)


def test_triton_kernel_rejects_short_codes():
    from distilkit.kernels.triton_dequant import packed_matmul

    with pytest.raises(ValueError, match="needs 32"):
        packed_matmul(torch.randn(2, 8), torch.zeros(4, dtype=torch.uint8), torch.ones(1),
                      torch.zeros(1), 8, 4, 64)


@pytest.mark.parametrize("mode", ["4bit", "8bit"])
def test_bitsandbytes_conversion_runs_and_is_close(mode):
    import bitsandbytes as bnb

    model = tiny_bert(hidden=64, inter=128, layers=2)
    batch = tiny_batch()
    compress_(model, QuantizeConfig(bits=4, bucket_size=64))
    finalize_(model)
    with torch.no_grad():
        ref = model(**batch).logits
        hidden_ref = model.bert(input_ids=batch["input_ids"],
                                attention_mask=batch["attention_mask"]).last_hidden_state
    names = to_bitsandbytes(model, mode=mode)
    assert len(names) == 12 and type(model.classifier) is nn.Linear
    cls = bnb.nn.Linear4bit if mode == "4bit" else bnb.nn.Linear8bitLt
    assert isinstance(model.get_submodule(names[0]), cls)
    with torch.no_grad():
        out = model(**batch).logits
        hidden = model.bert(input_ids=batch["input_ids"],
                            attention_mask=batch["attention_mask"]).last_hidden_state
    # Re-quantized by bitsandbytes: close to, not equal to, the packed model.
    tol = 0.15 if mode == "4bit" else 0.03
    rel = (hidden - hidden_ref).norm() / hidden_ref.norm()
    assert 0 < rel < tol
    assert (out - ref).abs().max() < 0.1


def test_bitsandbytes_rejects_unquantized_and_bad_mode():
    with pytest.raises(ValueError, match="no linear layer to convert"):
        to_bitsandbytes(tiny_bert())
    with pytest.raises(ValueError, match="mode='2bit'"):
        to_bitsandbytes(tiny_bert(), mode="2bit")


def _spy_kernel(monkeypatch):
    from distilkit.compress import packing

    calls = []
    real = packing._KERNEL_FORWARD
    assert real is packed_linear_forward  # registered by importing distilkit.kernels

    def spy(module, x):
        calls.append(x.device.type)
        return real(module, x)

    monkeypatch.setattr(packing, "_KERNEL_FORWARD", spy)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_linear_forward_dispatches_to_the_kernel_when_forced(monkeypatch, dtype):
    calls = _spy_kernel(monkeypatch)
    layer = _packed_layer(n=40, k=72, bits=4, bucket=64)
    x = torch.randn(3, 72).to(dtype)
    monkeypatch.setenv("DISTILKIT_TRITON", "0")
    cpu = layer(x.float())  # the CPU path is nn.Linear's: fp32 weights want fp32 inputs
    assert calls == []
    monkeypatch.setenv("DISTILKIT_TRITON", "1")
    with torch.no_grad():
        out = layer(x)
    assert calls == ["cpu"] and out.dtype == dtype and out.shape == (3, 40)
    torch.testing.assert_close(out, cpu.to(dtype), **({} if dtype == torch.float32 else
                                                      dict(rtol=2e-2, atol=2e-2)))


def test_packed_linear_uses_the_cpu_path_on_cpu_by_default(monkeypatch):
    from distilkit.compress import packing

    calls = _spy_kernel(monkeypatch)
    monkeypatch.delenv("DISTILKIT_TRITON", raising=False)
    layer = _packed_layer(n=8, k=16, bits=4, bucket=64)
    layer(torch.randn(2, 16))
    assert calls == []
    # The switch in code overrides the variable.
    monkeypatch.setattr(packing, "FORCE_KERNEL", True)
    with torch.no_grad():
        layer(torch.randn(2, 16))
    assert calls == ["cpu"]


def test_packed_linear_keeps_autograd_through_the_cpu_path(monkeypatch):
    calls = _spy_kernel(monkeypatch)
    monkeypatch.setenv("DISTILKIT_TRITON", "1")
    layer = _packed_layer(n=8, k=16, bits=4, bucket=64)
    x = torch.randn(2, 16, requires_grad=True)
    layer(x).sum().backward()  # the kernel has no backward: inputs needing grad skip it
    assert calls == [] and x.grad is not None


def test_packed_model_forward_through_the_kernel_equals_the_cpu_path(monkeypatch):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(24, 48), nn.ReLU(), nn.Linear(48, 10))
    compress_(net, PTQConfig(bits=3, bucket_size=40, exclude=[]))
    x = torch.randn(2, 4, 24)
    calls = _spy_kernel(monkeypatch)
    with torch.no_grad():
        monkeypatch.setenv("DISTILKIT_TRITON", "0")
        ref = net(x)
        monkeypatch.setenv("DISTILKIT_TRITON", "1")
        out = net(x)
    assert calls == ["cpu", "cpu"]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_cpu_forward_of_a_packed_layer_never_imports_triton():
    # (compress_ itself may import peft, and through it triton: the layer is packed by hand.)
    code = ("import sys, torch; from torch import nn; import distilkit.kernels; "
            "from distilkit.compress.packing import to_packed, weight_spec; "
            "lin = to_packed(nn.Linear(16, 8), {'weight': weight_spec((8, 16), 4, 64, "
            "'uniform')}); lin(torch.randn(2, 16)); "
            "assert 'triton' not in sys.modules")
    env = {k: v for k, v in os.environ.items() if k != "DISTILKIT_TRITON"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=os.path.dirname(
        os.path.dirname(os.path.abspath(__file__))))
