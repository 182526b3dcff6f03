"""Packed low-bit storage: bit layouts, packed modules, metadata checks, size on disk."""
import json
import math
import os

import pytest
import torch
from conftest import tiny_bert, tiny_batch
from torch import nn

from distilkit.compress import compress_, finalize_, load_compressed, save_compressed
from distilkit.compress import packing
from distilkit.compress import quant_math as qm
from distilkit.compress.quantize import PTQConfig


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [1, 7, 64, 1001])
def test_pack_unpack_round_trip(bits, n):
    codes = torch.randint(0, 2 ** bits, (n,), generator=torch.Generator().manual_seed(bits))
    packed = packing.pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(n * bits / 8)
    assert torch.equal(packing.unpack_codes(packed, bits, n), codes.to(torch.uint8))


def test_documented_layouts():
    # Two 4-bit codes a byte, low nibble first; four 2-bit codes a byte; eight 1-bit.
    assert packing.pack_codes(torch.tensor([0x3, 0xA]), 4).tolist() == [0xA3]
    assert packing.pack_codes(torch.tensor([1, 2, 3, 0]), 2).tolist() == [0b00111001]
    assert packing.pack_codes(torch.tensor([1, 0, 0, 0, 0, 0, 0, 1]), 1).tolist() == [0x81]
    # 3-bit codes straddle bytes: 5 (101), 6 (110), 7 (111) -> bits 101 011 11|1 -> 0xF5, 0x01.
    assert packing.pack_codes(torch.tensor([5, 6, 7]), 3).tolist() == [0b11110101, 0b1]


def test_pack_rejects_codes_that_do_not_fit():
    with pytest.raises(ValueError, match="fit in 2 bits"):
        packing.pack_codes(torch.tensor([4]), 2)
    with pytest.raises(ValueError, match="cannot hold"):
        packing.unpack_codes(torch.zeros(1, dtype=torch.uint8), 4, 3)


@pytest.mark.parametrize("scheme", ["uniform", "nonuniform"])
def test_packed_linear_matches_fake_quant_and_saves_only_packed(scheme):
    torch.manual_seed(0)
    lin = nn.Linear(30, 11)
    ref_w = lin.weight.detach().clone()
    spec = packing.weight_spec(lin.weight.shape, 3, 16, scheme)
    scaled, alpha, beta = qm.bucket_scale(qm.to_buckets(ref_w, 16))
    if scheme == "uniform":
        codes, pts = qm.uniform_codes(scaled, 3), None
        expect = qm.quantize_uniform(ref_w, 3, 16)
    else:
        pts = qm.init_points(scaled, 3, "kmeans")
        codes = qm.nonuniform_codes(scaled, pts)
        expect = qm.from_buckets(qm.dequantize_buckets(pts[codes], alpha, beta), ref_w.shape)
    packing.to_packed(lin, {"weight": spec})
    assert isinstance(lin, packing.PackedLinear)
    lin.set_packed("weight", codes, alpha, beta, pts)
    assert torch.equal(lin.weight, expect) and not lin.weight.requires_grad
    sd = lin.state_dict()
    assert "weight" not in sd and sd["weight_packed"].dtype == torch.uint8
    assert ("weight_points" in sd) == (scheme == "nonuniform")
    # A fresh module of the same metadata loads it back bit-exactly.
    other = packing.to_packed(nn.Linear(30, 11), {"weight": spec})
    other.load_state_dict(sd)
    assert torch.equal(other.weight, expect)
    x = torch.randn(2, 30)
    assert torch.equal(other(x), lin(x))


def test_packed_metadata_mismatch_is_a_clear_error():
    lin = nn.Linear(16, 8)
    packing.to_packed(lin, {"weight": packing.weight_spec((8, 16), 4, 32, "uniform")})
    sd = lin.state_dict()
    wrong = packing.to_packed(nn.Linear(16, 8),
                              {"weight": packing.weight_spec((8, 16), 2, 32, "uniform")})
    with pytest.raises(ValueError, match=r"weight_packed.*bits=2.*implies shape \[32\].*\[64\]"):
        wrong.load_state_dict(sd)


def test_embedding_subclass_keeps_its_forward():
    class Scaled(nn.Embedding):
        def forward(self, ids):
            return super().forward(ids) * 3.0

    emb = Scaled(20, 8)
    packing.to_packed(emb, {"weight": packing.weight_spec((20, 8), 8, 40, "uniform")})
    assert type(emb).__name__.startswith("Packed_") and isinstance(emb, Scaled)
    ids = torch.tensor([1, 2])
    assert torch.equal(emb(ids), emb.weight[ids] * 3.0)


def _saved_sizes(model, tmp_path):
    save_compressed(model, str(tmp_path))
    return packing.safetensors_payload_bytes(os.path.join(tmp_path, "model.safetensors"))


@pytest.mark.parametrize("bits,k", [(4, 256), (2, 256), (3, 64), (8, None)])
def test_size_on_disk_matches_b_plus_64_over_k(tmp_path, bits, k):
    model = tiny_bert(hidden=64, inter=256, layers=2, vocab=64)
    compress_(model, PTQConfig(bits=bits, bucket_size=k))
    rep = packing.size_report(model, huffman=True)
    n = rep["quantized_weights"]
    # b bits per weight + 64 bits per bucket; without buckets one (alpha, beta) per tensor
    # (2 layers x 6 linears).
    side_bits = n * 64 / k if k else 12 * 64
    expected = (n * bits + side_bits) / 8 + rep["fp_bytes"]
    file_bytes, header = _saved_sizes(model, tmp_path)
    assert abs((file_bytes - header) - expected) <= 0.02 * expected
    assert file_bytes - header == rep["total_bytes"]
    if k:
        assert abs(rep["bits_per_quantized_weight"] - qm.bits_per_weight(bits, k)) \
            <= 0.02 * qm.bits_per_weight(bits, k)
    assert rep["huffman_total_bytes"] <= rep["total_bytes"]


def test_compressed_file_is_really_smaller(tmp_path):
    model = tiny_bert(hidden=64, inter=256, layers=2, vocab=64)
    save_compressed(model, str(tmp_path / "fp"))
    compress_(model, PTQConfig(bits=2, bucket_size=256))
    save_compressed(model, str(tmp_path / "q"))
    fp = os.path.getsize(tmp_path / "fp" / "model.safetensors")
    q = os.path.getsize(tmp_path / "q" / "model.safetensors")
    rep = packing.size_report(model)
    # Encoder weights at 2.25 bits instead of 32; embeddings and head stay fp32.
    assert q < 0.6 * fp
    assert abs(rep["fp32_bytes"] - (fp - packing.safetensors_payload_bytes(
        str(tmp_path / "fp" / "model.safetensors"))[1])) <= 0.001 * fp


def test_tampered_compression_config_fails_to_load(tmp_path):
    model = tiny_bert()
    compress_(model, PTQConfig(bits=4, bucket_size=64))
    save_compressed(model, str(tmp_path))
    cfg_path = tmp_path / "compression_config.json"
    data = json.loads(cfg_path.read_text())
    layer = next(iter(data["records"][0]["layers"].values()))
    layer["weights"]["weight"]["bits"] = 2
    cfg_path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="metadata does not match"):
        load_compressed(str(tmp_path))


def test_finalize_is_idempotent_and_ptq_round_trip(tmp_path):
    model = tiny_bert()
    batch = tiny_batch()
    compress_(model, PTQConfig(bits=3, bucket_size=None))
    finalize_(model)
    with torch.no_grad():
        before = model(**batch).logits
    save_compressed(model, str(tmp_path))
    loaded = load_compressed(str(tmp_path))
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, before)
