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
