"""LSTM projection factorization (Shi et al. 2018) and quantization of the BiLSTM student:
the factor math, a step-by-step LSTMP reference, full-rank equality, rank options, save/load
round trips and bad settings."""
import pytest
import torch
from torch import nn

from distilkit.compress.base import (compress_, config_from_dict, finalize_, load_compressed,
                                     save_compressed)
from distilkit.compress.lstm_projection import (LSTMProjectionConfig, ProjectedLSTM,
                                                energy_rank, least_squares_input,
                                                project_lstm, resolve_rank, svd_projection)
from distilkit.students.bilstm import build_bilstm_student

TEXTS = ["a good movie .", "a bad , bad film !", "the plot is thin", "great acting and a fine script"]


def lstm(layers=2, bidirectional=True, seed=0, inp=7, hidden=6):
    torch.manual_seed(seed)
    return nn.LSTM(inp, hidden, num_layers=layers, bidirectional=bidirectional,
                   batch_first=True).eval()


def lstmp_reference(m: nn.LSTM, x: torch.Tensor) -> torch.Tensor:
    """A plain loop over time of the LSTMP equations (Sak et al. 2014) with ``m``'s
    parameters: gates = W_ih x_t + b + W_hh r_{t-1}; h_t = o * tanh(c_t); r_t = W_hr h_t;
    the next layer reads [r_fwd, r_bwd]; the last layer's output is W_hr^T r_t."""
    dirs = ["", "_reverse"] if m.bidirectional else [""]
    proj = m.proj_size or m.hidden_size
    layer_in = x
    for l in range(m.num_layers):
        outs = []
        for s in dirs:
            w_ih, w_hh = getattr(m, f"weight_ih_l{l}{s}"), getattr(m, f"weight_hh_l{l}{s}")
            b = getattr(m, f"bias_ih_l{l}{s}") + getattr(m, f"bias_hh_l{l}{s}")
            w_hr = getattr(m, f"weight_hr_l{l}{s}") if m.proj_size else torch.eye(m.hidden_size)
            r = x.new_zeros(x.shape[0], proj)
            c = x.new_zeros(x.shape[0], m.hidden_size)
            steps = range(x.shape[1]) if not s else reversed(range(x.shape[1]))
            seq = [None] * x.shape[1]
            for t in steps:
                i, f, g, o = (layer_in[:, t] @ w_ih.T + r @ w_hh.T + b).chunk(4, dim=-1)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                r = (torch.sigmoid(o) * torch.tanh(c)) @ w_hr.T
                seq[t] = r
            outs.append(torch.stack(seq, dim=1))
        layer_in = torch.cat(outs, dim=-1)
    if not m.proj_size:
        return layer_in
    last = m.num_layers - 1
    return torch.cat([layer_in[..., k * proj:(k + 1) * proj] @ getattr(m, f"weight_hr_l{last}{s}")
                      for k, s in enumerate(dirs)], dim=-1)


def test_factors_reconstruct_the_matrices_at_full_rank_and_are_optimal_below():
    torch.manual_seed(0)
    w = torch.randn(24, 6, dtype=torch.float64)
    z, p = svd_projection(w, 6)
    torch.testing.assert_close(z @ p, w)
    torch.testing.assert_close(p @ p.T, torch.eye(6, dtype=torch.float64))
    z3, p3 = svd_projection(w, 3)
    s = torch.linalg.svdvals(w)
    # Eckart-Young: the rank-3 error is the norm of the dropped singular values.
    torch.testing.assert_close(torch.linalg.norm(w - z3 @ p3), s[3:].norm())
    w_x = torch.randn(24, 12, dtype=torch.float64)
    p_bd = torch.block_diag(p3, p3)
    z_x = least_squares_input(w_x, p_bd)
    # Least squares: the residual is orthogonal to the projection's row space.
    torch.testing.assert_close((w_x - z_x @ p_bd) @ p_bd.T, torch.zeros(24, 6, dtype=torch.float64))


@pytest.mark.parametrize("layers, bidirectional", [(1, True), (2, True), (3, False)])
def test_factorized_lstm_equals_the_original_at_full_rank(layers, bidirectional):
    m = lstm(layers, bidirectional)
    full = project_lstm(m, rank=6)
    x = torch.randn(3, 5, 7)
    packed = nn.utils.rnn.pack_padded_sequence(x, torch.tensor([5, 2, 4]), batch_first=True,
                                               enforce_sorted=False)
    with torch.no_grad():
        torch.testing.assert_close(full(x)[0], m(x)[0], rtol=0, atol=1e-6)
        torch.testing.assert_close(full(packed)[0].data, m(packed)[0].data, rtol=0, atol=1e-6)


@pytest.mark.parametrize("layers, bidirectional", [(2, True), (2, False)])
def test_projected_lstm_computes_the_lstmp_equations(layers, bidirectional):
    m = lstm(layers, bidirectional)
    p = project_lstm(m, rank=3)
    assert isinstance(p, ProjectedLSTM) and p.proj_size == 3
    x = torch.randn(2, 6, 7)
    with torch.no_grad():
        out, (h, c) = p(x)
        torch.testing.assert_close(out, lstmp_reference(p, x), rtol=1e-5, atol=1e-5)
        # The reference at full rank is the original LSTM: the chain is closed.
        torch.testing.assert_close(lstmp_reference(m, x), m(x)[0], rtol=1e-5, atol=1e-5)
    assert out.shape == m(x)[0].shape and h.shape[-1] == 6


def test_error_shrinks_as_rank_grows_and_parameters_shrink_with_rank():
    m = lstm(2, True)
    x = torch.randn(4, 6, 7)
    with torch.no_grad():
        ref = m(x)[0]
        errs = [float((project_lstm(m, rank=r)(x)[0] - ref).abs().mean()) for r in (1, 3, 5, 6)]
    assert errs[-1] < 1e-6 and errs[0] > errs[1] > errs[3]
    n = lambda mod: sum(q.numel() for q in mod.parameters())  # noqa: E731
    assert n(project_lstm(m, rank=2)) < n(project_lstm(m, rank=4)) < n(m)


def test_rank_options_int_fraction_energy():
    assert resolve_rank(3, 6) == 3 and resolve_rank(0.5, 6) == 3 and resolve_rank(0.34, 6) == 3
    assert resolve_rank(1.0, 6) == 6 and resolve_rank(0.01, 6) == 1
    s = torch.tensor([3.0, 2.0, 1.0, 0.0])
    assert energy_rank(s, 9 / 14) == 1 and energy_rank(s, 0.7) == 2 and energy_rank(s, 1.0) == 3
    m = lstm(1, True)
    assert project_lstm(m, energy=0.3).proj_size >= 1
    assert isinstance(project_lstm(m, energy=1.0), nn.LSTM)


@pytest.mark.parametrize("kw, match", [
    ({"rank": 0}, "rank"), ({"rank": 1.5}, "fraction"), ({"rank": -0.2}, "fraction"),
    ({"rank": "half"}, "rank"), ({"energy": 0.0}, "energy"), ({"rank": 3, "energy": 0.9}, "both"),
    ({"rank": None}, "rank"),
])
def test_bad_settings_are_clear_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        LSTMProjectionConfig(**kw)


def test_rank_larger_than_hidden_size_is_a_clear_error():
    model, _ = build_bilstm_student(None, None, TEXTS, embedding_init="random", seed=0,
                                    embedding_dim=8, hidden_size=6, mlp_hidden_size=4)
    with pytest.raises(ValueError, match="larger than the hidden size 6"):
        compress_(model, LSTMProjectionConfig(rank=7))
    with pytest.raises(ValueError, match="no nn.LSTM"):
        compress_(nn.Sequential(nn.Linear(2, 2)), LSTMProjectionConfig(rank=1))
    with pytest.raises(ValueError, match="matches no"):
        compress_(model, LSTMProjectionConfig(rank=2, include=["encoder.*"]))


def _student(**kw):
    model, tok = build_bilstm_student(None, None, TEXTS, embedding_init="random", seed=0,
                                      embedding_dim=8, hidden_size=6, mlp_hidden_size=4,
                                      dropout=0.0, **kw)
    return model.eval(), tok


def test_bilstm_projection_round_trips_through_load_compressed(tmp_path):
    model, tok = _student(num_layers=2)
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        before = model(**enc).logits
    rec = compress_(model, config_from_dict({"method": "lstm_projection", "rank": 0.5}))
    assert rec["modules"] == {"lstm": {"proj_size": 3, "hidden_size": 6}}
    assert rec["params_after"] < rec["params_before"]
    with torch.no_grad():
        after = model(**enc).logits
    assert after.shape == before.shape and not torch.equal(after, before)
    save_compressed(model, str(tmp_path))
    loaded = load_compressed(str(tmp_path))
    assert isinstance(loaded.lstm, ProjectedLSTM)
    with torch.no_grad():
        assert torch.equal(loaded(**enc).logits, after)


def test_full_rank_bilstm_keeps_its_predictions_and_round_trips(tmp_path):
    model, tok = _student()
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        before = model(**enc).logits
    compress_(model, LSTMProjectionConfig(rank=1.0))
    with torch.no_grad():
        torch.testing.assert_close(model(**enc).logits, before, rtol=0, atol=1e-6)
    save_compressed(model, str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(load_compressed(str(tmp_path))(**enc).logits, before,
                                   rtol=0, atol=1e-6)


@pytest.mark.parametrize("project", [False, True])
def test_quantizing_the_bilstm_weights_round_trips(tmp_path, project):
    from distilkit.compress.quantize import QuantizeConfig

    model, tok = _student()
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    if project:
        compress_(model, LSTMProjectionConfig(rank=3))
    with torch.no_grad():
        fp = model(**enc).logits
    compress_(model, QuantizeConfig(bits=4, bucket_size=16, quantize_lstm=True))
    model.train()
    loss = model(**enc, labels=torch.tensor([1, 0, 0, 1])).loss
    loss.backward()  # straight-through: the fake-quantized LSTM trains
    model.eval()
    finalize_(model)
    with torch.no_grad():
        q = model(**enc).logits
    assert q.shape == fp.shape and not torch.equal(q, fp)
    save_compressed(model, str(tmp_path))
    loaded = load_compressed(str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(loaded(**enc).logits, q, rtol=0, atol=1e-6)
