"""Property tests of every distillation loss."""
import math

import pytest
import torch

from distilkit import losses as L


def _logits(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 3


def test_soft_target_kl_zero_at_identity_and_positive_elsewhere():
    z = _logits(8, 5)
    assert L.soft_target_kl(z, z, 2.0).abs() < 1e-6
    assert L.soft_target_kl(_logits(8, 5, seed=1), z, 2.0) > 0.01


def test_soft_target_kl_matches_definition_with_t_squared():
    s, t, T = _logits(4, 3), _logits(4, 3, seed=1), 3.0
    pt = torch.softmax(t / T, -1)
    ref = (pt * (pt.log() - torch.log_softmax(s / T, -1))).sum(-1).mean() * T * T
    assert torch.allclose(L.soft_target_kl(s, t, T), ref, atol=1e-6)


def test_t_squared_keeps_gradient_scale_comparable_across_temperatures():
    # With the T^2 factor the gradient wrt the logits tends to (z_s - z_t)/N (Hinton et al.,
    # section 2.1) for large T: its norm stays of one scale instead of falling as 1/T^2.
    s0, t = _logits(64, 10) * 0.1, _logits(64, 10, seed=1) * 0.1
    norms = []
    for T in (1.0, 4.0, 16.0):
        s = s0.clone().requires_grad_(True)
        L.soft_target_kl(s, t, T).backward()
        norms.append(s.grad.norm().item())
    assert max(norms) / min(norms) < 2.5
    # Without it the gradient would have fallen by 16^2 between T=1 and T=16.
    s = s0.clone().requires_grad_(True)
    (L.soft_target_kl(s, t, 16.0) / 256).backward()
    assert s.grad.norm().item() < norms[0] / 50


def test_soft_target_kl_mask_ignores_padding():
    s, t = _logits(2, 6, 7), _logits(2, 6, 7, seed=1)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 3:] = False
    s2 = s.clone()
    s2[1, 3:] += 100  # garbage at padded positions changes nothing
    assert torch.allclose(L.soft_target_kl(s, t, 2.0, mask), L.soft_target_kl(s2, t, 2.0, mask))
    # and the mean is over counted positions only
    full = L.soft_target_kl(s, t, 2.0, mask, reduction="sum")
    assert torch.allclose(L.soft_target_kl(s, t, 2.0, mask), full / 9)


def test_temperature_must_be_positive():
    with pytest.raises(ValueError, match="temperature"):
        L.soft_target_kl(_logits(2, 2), _logits(2, 2), 0.0)


def test_hard_ce_matches_torch_and_ignores_index():
    z, y = _logits(5, 4), torch.tensor([0, 1, -100, 3, 2])
    ref = torch.nn.functional.cross_entropy(z, y, ignore_index=-100)
    assert torch.allclose(L.hard_ce(z, y), ref)


def test_logit_mse_zero_at_identity_and_value():
    z = _logits(3, 4)
    assert L.logit_mse(z, z) == 0
    assert torch.allclose(L.logit_mse(z, z + 2), torch.tensor(4.0))


def test_ensemble_averages_probabilities_not_logits():
    a, b = _logits(4, 3), _logits(4, 3, seed=1)
    p = L.ensemble_soft_targets([a, b], 2.0)
    ref = (torch.softmax(a / 2, -1) + torch.softmax(b / 2, -1)) / 2
    assert torch.allclose(p, ref)
    assert torch.allclose(p.sum(-1), torch.ones(4))
    w = L.ensemble_soft_targets([a, b], 2.0, weights=[3, 1])
    assert torch.allclose(w, 0.75 * torch.softmax(a / 2, -1) + 0.25 * torch.softmax(b / 2, -1))
    # a student matching the ensemble distribution has zero loss
    assert L.soft_target_kl(torch.log(p) * 2.0, None, 2.0, teacher_probs=p).abs() < 1e-5
    with pytest.raises(ValueError):
        L.ensemble_soft_targets([a], 2.0, weights=[0])


def test_hidden_mse_with_projection_and_gradients():
    s, t = torch.randn(2, 5, 4, requires_grad=True), torch.randn(2, 5, 6)
    proj = torch.nn.Linear(4, 6)
    loss = L.hidden_mse(s, t, proj)
    loss.backward()
    assert s.grad is not None and proj.weight.grad is not None
    assert L.hidden_mse(t, t) == 0
    with pytest.raises(ValueError, match="projection"):
        L.hidden_mse(s, t)


def test_patient_loss_normalises_cls_vectors():
    s = [torch.randn(3, 8), torch.randn(3, 8)]
    assert L.patient_loss(s, s).abs() < 1e-6
    # scale invariance: only directions count
    assert L.patient_loss([x * 7 for x in s], s).abs() < 1e-6
    # opposite unit vectors are at squared distance 4 per pair
    assert torch.allclose(L.patient_loss([-s[0]], [s[0]]), torch.tensor(4.0))
    with pytest.raises(ValueError):
        L.patient_loss(s, s[:1])


def test_attention_loss_zero_at_identity_and_masked():
    a = torch.softmax(torch.randn(2, 3, 5, 5), -1)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    for kind in ("kl", "mse"):
        assert L.attention_loss(a, a, mask, kind=kind).abs() < 1e-6
    b = torch.softmax(torch.randn(2, 3, 5, 5), -1)
    b2 = b.clone()
    b2[1, :, 3:, :] = a[1, :, 3:, :]  # padded query rows do not count
    assert torch.allclose(L.attention_loss(a, b, mask), L.attention_loss(a, b2, mask))
    with pytest.raises(ValueError, match="heads"):
        L.attention_loss(a, a[:, :2], mask)


def test_cosine_loss():
    h = torch.randn(2, 4, 8)
    assert L.cosine_loss(h, 3 * h).abs() < 1e-6
    assert torch.allclose(L.cosine_loss(h, -h), torch.tensor(2.0))


def test_patient_loss_on_token_states_ignores_masked_positions():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    base = L.patient_loss([s], [t], mask)
    s2 = s.clone()
    s2[0, 3:] = 100.0  # padded positions change, the loss does not
    assert torch.allclose(L.patient_loss([s2], [t], mask), base)
    kept = torch.cat([s[0, :3], s[1]]), torch.cat([t[0, :3], t[1]])
    assert torch.allclose(base, L.patient_loss([kept[0]], [kept[1]]))  # mean over counted tokens


@pytest.mark.parametrize("ensemble", [False, True])
def test_soft_target_kl_is_fp32_for_bf16_logits(ensemble):
    """bf16 logits give the fp32 loss of their values (no softmax in bf16), and the gradient
    comes back in the logits' dtype."""
    s = _logits(16, 50).bfloat16().requires_grad_(True)
    t = [_logits(16, 50, seed=1).bfloat16(), _logits(16, 50, seed=2).bfloat16()]
    if ensemble:
        got = L.soft_target_kl(s, None, 2.0, teacher_probs=L.ensemble_soft_targets(t, 2.0, [1, 3]))
        ref = L.soft_target_kl(s.detach().float(), None, 2.0,
                               teacher_probs=L.ensemble_soft_targets([z.float() for z in t], 2.0, [1, 3]))
    else:
        got, ref = L.soft_target_kl(s, t[0], 2.0), L.soft_target_kl(s.detach().float(), t[0].float(), 2.0)
    assert got.dtype == torch.float32 and torch.equal(got.detach(), ref)
    got.backward()
    assert s.grad.dtype == torch.bfloat16 and torch.isfinite(s.grad.float()).all()


def test_ensemble_logits_are_the_weighted_mean():
    a, b = _logits(4, 3), _logits(4, 3, seed=1)
    assert torch.allclose(L.ensemble_logits([a, b], [1, 3]), 0.25 * a + 0.75 * b)
    assert torch.allclose(L.ensemble_logits([a, b]), (a + b) / 2)
    assert torch.equal(L.ensemble_logits([a]), a)
    with pytest.raises(ValueError, match="weights"):
        L.ensemble_logits([a, b], [1])
