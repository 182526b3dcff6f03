"""Low-rank factorization: SVD math, rank choice, module swap, save/load, bad input."""
import pytest
import torch
from conftest import tiny_batch, tiny_bert
from torch import nn

from distilkit.compress import (
    compress_, config_from_dict, load_compressed, save_compressed,
)
from distilkit.compress.low_rank import (
    LowRankConfig, LowRankLinear, break_even_rank, choose_rank, rank_for_energy, svd_factors,
)


def with_spectrum(m, n, s, seed=0):
    """An m x n matrix with singular values ``s`` (random orthonormal bases)."""
    g = torch.Generator().manual_seed(seed)
    p, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    k = len(s)
    return (p[:, :k] * torch.tensor(s, dtype=torch.float64)) @ q[:, :k].T


@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (16, 16)])
def test_full_rank_is_exact(shape):
    torch.manual_seed(0)
    lin = nn.Linear(shape[1], shape[0])
    lr = LowRankLinear.from_linear(lin, min(shape))
    x = torch.randn(5, 7, shape[1])
    torch.testing.assert_close(lr(x), lin(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lr.weight, lin.weight, rtol=1e-5, atol=1e-6)


def test_truncation_error_is_eckart_young():
    """Known answer: the best rank-r error in Frobenius norm is sqrt(sum of dropped S_i^2)."""
    s = [5.0, 3.0, 2.0, 1.0, 0.5]
    w = with_spectrum(12, 9, s)
    for r in range(1, 5):
        u, v = svd_factors(w, r)
        err = torch.linalg.matrix_norm(w - u @ v)
        assert float(err) == pytest.approx(sum(x * x for x in s[r:]) ** 0.5, rel=1e-9)
        # balanced split: both factors carry sqrt(S)
        assert torch.allclose(u.norm(dim=0), v.norm(dim=1), rtol=1e-9)


def test_rank_by_energy_fraction_and_params():
    s = torch.tensor([4.0, 2.0, 1.0])  # energies 16, 4, 1 of 21
    assert rank_for_energy(s, 16 / 21) == 1
    assert rank_for_energy(s, 0.9) == 2
    assert rank_for_energy(s, 1.0) == 3
    w = torch.zeros(64, 32)
    assert choose_rank(LowRankConfig(param_fraction=0.5), w, "x") == 64 * 32 // 2 // 96
    assert choose_rank(LowRankConfig(rank_fraction=0.25), w, "x") == 8
    assert break_even_rank(64, 32) == 21  # (64+32)*21 < 2048 <= (64+32)*22
    w = with_spectrum(20, 10, [3.0, 1.0, 0.1]).float()
    assert choose_rank(LowRankConfig(energy=0.99), w, "x") == 2


def test_method_halves_factorized_params_and_round_trips(tmp_path):
    model, batch = tiny_bert(), tiny_batch()
    rec = compress_(model, config_from_dict({"method": "low_rank", "param_fraction": 0.5}))
    assert rec["factorized_weights_after"] <= rec["factorized_weights_before"] // 2
    assert set(rec["ranks"]) == {n for n, m in tiny_bert().named_modules()
                                 if isinstance(m, nn.Linear) and ".layer." in n}
    assert isinstance(model.bert.encoder.layer[0].intermediate.dense, LowRankLinear)
    assert isinstance(model.classifier, nn.Linear)  # the task head is left alone
    with torch.no_grad():
        expected = model(**batch).logits
    save_compressed(model, str(tmp_path))
    loaded = load_compressed(str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, expected, rtol=0, atol=1e-6)


def test_full_rank_method_keeps_predictions():
    model, batch = tiny_bert(), tiny_batch()
    with torch.no_grad():
        expected = model(**batch).logits
    compress_(model, config_from_dict({"method": "low_rank", "rank": 32,
                                       "include": ["*.attention.self.*"]}))
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, expected, rtol=1e-4, atol=1e-5)


def test_energy_keeps_dense_when_factors_are_larger():
    model = tiny_bert()
    rec = compress_(model, config_from_dict({"method": "low_rank", "energy": 1.0}))
    assert rec["ranks"] == {}
    assert len(rec["kept_dense"]) == 4 * 6


def test_bad_input():
    with pytest.raises(ValueError, match="rank=33 is larger than .*query allows.*32x32.*32"):
        compress_(tiny_bert(), config_from_dict({"method": "low_rank", "rank": 33,
                                                 "include": ["*.layer.0.attention.self.query"]}))
    with pytest.raises(ValueError, match="exactly one of"):
        LowRankConfig(rank=4, energy=0.9)
    with pytest.raises(ValueError, match="exactly one of"):
        LowRankConfig()
    with pytest.raises(ValueError, match="param_fraction=1.0 must be in \\(0, 1\\)"):
        LowRankConfig(param_fraction=1.0)
    with pytest.raises(ValueError, match="energy=0 must be in"):
        LowRankConfig(energy=0)
    with pytest.raises(ValueError, match="rank=0 must be a positive integer"):
        LowRankConfig(rank=0)
    with pytest.raises(ValueError, match="pattern '\\*.fc9' matches no Linear module"):
        compress_(tiny_bert(), config_from_dict({"method": "low_rank", "rank": 2,
                                                 "include": ["*.fc9"]}))
    with pytest.raises(ValueError, match="rank=0 must be in 1..min\\(in_features, out_features\\)=16"):
        LowRankLinear(16, 20, 0)
