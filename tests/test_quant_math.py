"""Property tests of the pure quantizer functions (Polino et al. 2018, section 2)."""
import math

import pytest
import torch

from distilkit.compress import quant_math as qm


def _weights(n=5000, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Heavy-ish tails and a scale spread across buckets, like real weight matrices.
    return torch.randn(n, generator=g) * torch.linspace(0.01, 2.0, n)


@pytest.mark.parametrize("k", [1, 7, 64, 256, None])
def test_scaling_maps_each_bucket_to_unit_interval(k):
    w = _weights(1000)
    buckets = qm.to_buckets(w, k)
    scaled, alpha, beta = qm.bucket_scale(buckets)
    assert scaled.min() >= 0 and scaled.max() <= 1
    nontrivial = alpha > 0
    # Every non-constant bucket touches both ends: min -> 0, max -> 1.
    assert torch.allclose(scaled[nontrivial].amin(1), torch.zeros(int(nontrivial.sum())))
    assert torch.allclose(scaled[nontrivial].amax(1), torch.ones(int(nontrivial.sum())))
    back = qm.from_buckets(qm.dequantize_buckets(scaled, alpha, beta), w.shape)
    assert torch.allclose(back, w, atol=1e-6)


def test_bucket_padding_keeps_min_max_and_count():
    w = torch.arange(10.0)
    b = qm.to_buckets(w, 4)
    assert b.shape == (3, 4) and b[-1].tolist() == [8.0, 9.0, 9.0, 9.0]
    assert qm.num_buckets(10, 4) == 3 and qm.num_buckets(10, None) == 1
    assert torch.equal(qm.from_buckets(b, (10,)), w)


def test_constant_bucket_is_exact():
    w = torch.full((64,), 0.37)
    assert torch.equal(qm.quantize_uniform(w, 2, 16), w)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_deterministic_rounding_error_at_most_half_step(bits):
    w = _weights()
    k = 128
    q = qm.quantize_uniform(w, bits, k)
    _, alpha, _ = qm.bucket_scale(qm.to_buckets(w, k))
    half_step = qm.from_buckets((alpha / (2 * qm.levels(bits)))[:, None].expand(-1, k), w.shape)
    assert ((q - w).abs() <= half_step + 1e-6).all()
    # And values land on the 2**bits levels of their bucket.
    codes, _, _ = qm.encode_uniform(w, bits, k)
    assert int(codes.max()) <= 2 ** bits - 1 and len(torch.unique(codes)) <= 2 ** bits


def test_stochastic_rounding_is_unbiased_and_seeded():
    w = _weights(512)
    g = torch.Generator().manual_seed(123)
    draws = torch.stack([qm.quantize_uniform(w, 2, 64, "stochastic", g) for _ in range(3000)])
    _, alpha, _ = qm.bucket_scale(qm.to_buckets(w, 64))
    step = qm.from_buckets((alpha / 3)[:, None].expand(-1, 64), w.shape)
    # Per-value error of the mean: the std of one draw is <= step/2, so 3000 draws give a
    # standard error <= step/110; 6 standard errors leave no room for a biased rounding
    # (deterministic rounding is off by up to step/2 on these values).
    assert ((draws.mean(0) - w).abs() <= step / 18).all()
    det = qm.quantize_uniform(w, 2, 64)
    assert ((det - w).abs() > step / 18).any()
    a = qm.quantize_uniform(w, 2, 64, "stochastic", torch.Generator().manual_seed(5))
    b = qm.quantize_uniform(w, 2, 64, "stochastic", torch.Generator().manual_seed(5))
    c = qm.quantize_uniform(w, 2, 64, "stochastic", torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_nonuniform_stochastic_is_unbiased_inside_points():
    pts = torch.tensor([0.0, 0.1, 0.5, 1.0])
    x = torch.rand(200, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    mean = torch.stack([pts[qm.nonuniform_codes(x, pts, "stochastic", g)]
                        for _ in range(3000)]).mean(0)
    assert (mean - x).abs().max() < 0.04
    nearest = pts[qm.nonuniform_codes(x, pts)]
    assert torch.equal(nearest, pts[(x[:, None] - pts).abs().argmin(1)])


def test_nonuniform_unsorted_points_still_nearest():
    pts = torch.tensor([1.0, 0.0, 0.6, 0.2])
    x = torch.tensor([0.05, 0.45, 0.95, 0.3])
    assert qm.nonuniform_codes(x, pts).tolist() == [1, 2, 0, 3]


@pytest.mark.parametrize("method", qm.POINT_INITS)
def test_point_inits(method):
    x = torch.rand(4000, generator=torch.Generator().manual_seed(0)) ** 3  # skewed to 0
    p = qm.init_points(x, 2, method)
    assert p.shape == (4,) and torch.all(p[1:] >= p[:-1]) and p.min() >= 0 and p.max() <= 1
    err = (x - p[qm.nonuniform_codes(x, p)]).pow(2).mean()
    uni = qm.init_points(x, 2, "uniform")
    uni_err = (x - uni[qm.nonuniform_codes(x, uni)]).pow(2).mean()
    if method == "uniform":
        assert torch.allclose(p, torch.tensor([0, 1 / 3, 2 / 3, 1]))
    elif method == "kmeans":
        # Lloyd's iterations lower the squared error from their linear initialisation.
        assert err < 0.8 * uni_err
    else:
        # Quantiles: each point sits at the centre of an equal share of the values.
        share = (x[:, None] <= p).float().mean(0)
        assert torch.allclose(share, torch.tensor([0.125, 0.375, 0.625, 0.875]), atol=0.01)


def test_exact_size_arithmetic():
    assert qm.bits_per_weight(4, 256) == 4.25 and qm.bits_per_weight(2, 256) == 2.25
    assert math.floor(qm.compression_ratio(4, 256) * 100) / 100 == 7.52
    assert math.floor(qm.compression_ratio(2, 256) * 10) / 10 == 14.2
    assert math.floor(qm.compression_ratio(4, 512) * 100) / 100 == 7.75
    assert round(qm.compression_ratio(2, 512), 2) == 15.06  # the paper truncates: 15.05
    assert qm.compression_ratio(2, 256) == 32 / 2.25


def test_huffman():
    assert qm.huffman_code_lengths({0: 5}) == {0: 1}
    lengths = qm.huffman_code_lengths({0: 8, 1: 4, 2: 2, 3: 2})
    assert lengths == {0: 1, 1: 2, 2: 3, 3: 3}
    codes = torch.tensor([0] * 8 + [1] * 4 + [2] * 2 + [3] * 2, dtype=torch.uint8)
    assert qm.huffman_bits(codes) == 8 + 8 + 6 + 6
    # Uniformly spread codes gain nothing: 4 symbols -> 2 bits each.
    assert qm.huffman_bits(torch.arange(4).repeat(25)) == 200


def test_allocate_bits_proportional_and_within_budget():
    norms, numels = [1.0, 2.0, 4.0, 0.5], [1000, 1000, 2000, 4000]
    bits = qm.allocate_bits(norms, numels, 4.0, 2, 8)
    avg = sum(b * n for b, n in zip(bits, numels)) / sum(numels)
    assert avg <= 4.0 and avg > 3.5
    assert bits[2] >= bits[1] >= bits[0] >= bits[3]
    assert all(2 <= b <= 8 for b in bits)
    assert qm.allocate_bits([1, 1], [10, 10], 3) == [3, 3]


@pytest.mark.parametrize("bad", [0, 9, -1, 2.5, "4", True])
def test_bad_bits(bad):
    with pytest.raises(ValueError, match="bits"):
        qm.check_bits(bad)


@pytest.mark.parametrize("bad", [0, -4, 1.5])
def test_bad_bucket_size(bad):
    with pytest.raises(ValueError, match="bucket_size"):
        qm.check_bucket_size(bad)


def test_bad_rounding_and_init():
    with pytest.raises(ValueError, match="rounding"):
        qm.round_codes(torch.zeros(3), "nearest")
    with pytest.raises(ValueError, match="points_init"):
        qm.init_points(torch.zeros(3), 2, "random")


def test_a_bucket_larger_than_the_tensor_is_one_bucket_per_tensor():
    """Was: the tensor was padded up to the bucket size (bucket_size 1e9 allocated gigabytes)."""
    import torch

    from distilkit.compress import quant_math as qm

    w = torch.randn(64, 32)
    huge = qm.to_buckets(w, 10**9)
    assert huge.shape == (1, w.numel())          # no padding up to the bucket size
    assert torch.equal(huge, qm.to_buckets(w, None))
    assert qm.num_buckets(w.numel(), 10**9) == 1
