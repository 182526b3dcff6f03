"""Magnitude pruning: mask math, bit packing, the schedule inside a real Trainer, compact
export, honest reporting, bad input."""
import pytest
import torch
from conftest import tiny_batch, tiny_bert
from torch import nn

from distilkit.compress import (
    CompressionContext, compress_, compression_records, config_from_dict, finalize_, get_method,
    load_compressed, save_compressed,
)
from distilkit.compress.magnitude import (
    MagnitudeConfig, SparseLinear, magnitude_masks, pack_bits, round_steps, scheduled_sparsity,
    unpack_bits,
)


def test_masks_exact_count_per_layer_and_global():
    a = torch.tensor([[0.1, -0.2, 0.3, -0.4]])
    b = torch.tensor([[5.0, -6.0, 7.0, 8.0]])
    per = magnitude_masks([a, b], 0.5, "per_layer")
    assert per[0].tolist() == [[False, False, True, True]]
    assert per[1].tolist() == [[False, False, True, True]]
    # Known answer: one threshold over both tensors takes every small weight of ``a`` first.
    glob = magnitude_masks([a, b], 0.5, "global")
    assert glob[0].tolist() == [[False] * 4] and glob[1].all()
    torch.manual_seed(0)
    w = torch.randn(37, 11)
    assert int((~magnitude_masks([w], 0.3)[0]).sum()) == round(0.3 * w.numel())


def test_bit_packing_round_trip():
    torch.manual_seed(0)
    for n in (1, 7, 8, 9, 100):
        m = torch.rand(n) > 0.5
        packed = pack_bits(m)
        assert packed.dtype == torch.uint8 and packed.numel() == (n + 7) // 8
        assert torch.equal(unpack_bits(packed, n), m)


def test_schedule():
    assert scheduled_sparsity(0, 4, 0.1, 0.8) == pytest.approx(0.1)
    assert scheduled_sparsity(4, 4, 0.1, 0.8) == pytest.approx(0.8)
    cubic = [scheduled_sparsity(i, 4, 0.0, 0.8) for i in range(5)]
    linear = [scheduled_sparsity(i, 4, 0.0, 0.8, "linear") for i in range(5)]
    assert cubic == sorted(cubic) and cubic[1] > linear[1]  # cubic prunes early
    assert round_steps(0, 8, 4) == [2, 4, 6, 8]


def test_schedule_in_trainer_keeps_masks_after_optimizer_steps(tmp_path):
    """Prune, retrain, prune more inside transformers.Trainer: the weights pruned by each round
    stay exactly zero through AdamW updates, and the final sparsity is reached in training."""
    from transformers import Trainer, TrainingArguments

    model = tiny_bert().train()
    cfg = config_from_dict({"method": "magnitude", "final_sparsity": 0.7, "num_rounds": 2,
                            "end_step": 4, "scope": "per_layer"})
    compress_(model, cfg)
    cbs = get_method(cfg).callbacks(model, cfg, CompressionContext())
    rows = [{k: v[i] for k, v in tiny_batch(seed=s).items()} for s in range(3) for i in range(4)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4,
                             learning_rate=1e-2, weight_decay=0.1, report_to=[],
                             save_strategy="no", logging_strategy="no", use_cpu=True,
                             disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=rows, callbacks=cbs)
    trainer.train()
    assert [s for s, _ in cbs[0].history] == [2, 4]
    assert cbs[0].history[-1][1] == pytest.approx(0.7)
    lin = model.bert.encoder.layer[0].intermediate.dense
    assert float((lin.weight == 0).float().mean()) == pytest.approx(0.7, abs=1e-3)
    finalize_(model)
    rec = compression_records(model)[0]
    assert rec["reached_in_training"] is True
    assert isinstance(model.bert.encoder.layer[0].intermediate.dense, SparseLinear)


def test_finalize_exports_compactly_and_reports_honestly(tmp_path):
    model, batch = tiny_bert(), tiny_batch()
    dense = sum(p.numel() for p in model.parameters())
    compress_(model, MagnitudeConfig(final_sparsity=0.8))  # no training: finalize prunes
    finalize_(model)
    rec = compression_records(model)[0]
    assert rec["reached_in_training"] is False
    assert rec["sparsity"] == pytest.approx(0.8, abs=1e-3)
    assert 0 < rec["model_sparsity"] < rec["sparsity"]  # embeddings and heads stay dense
    assert "no speed-up" in rec["note"]
    # 4-byte values for 20% of weights plus 1 bit each: (0.2 * 32 + 1) / 32 of dense
    assert rec["weight_bytes_stored"] / rec["weight_bytes_dense"] == pytest.approx(
        (0.2 * 32 + 1) / 32, abs=0.01)
    assert sum(p.numel() for p in model.parameters()) < dense
    with torch.no_grad():
        expected = model(**batch).logits
    save_compressed(model, str(tmp_path))
    loaded = load_compressed(str(tmp_path))
    assert isinstance(loaded.bert.encoder.layer[3].output.dense, SparseLinear)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, expected, rtol=0, atol=1e-6)
    # evaluate counts the pruned layers at their dense shape, their zeros as zeros.
    from distilkit.evaluate import count_parameters
    total, nonzero = count_parameters(loaded)
    assert total == dense
    sparse = [m for m in loaded.modules() if isinstance(m, SparseLinear)]
    for m in sparse:  # the counts of the rebuilt dense weight and the bias
        assert m.parameter_counts() == (m.weight.numel() + m.bias.numel(),
                                        int((m.weight != 0).sum() + (m.bias != 0).sum()))
    pruned = sum(m.weight.numel() - m.values.numel() for m in sparse)
    assert total - nonzero >= pruned and pruned / total == pytest.approx(rec["model_sparsity"], abs=1e-3)


def test_global_scope_prunes_layers_unevenly():
    model = tiny_bert()
    with torch.no_grad():
        model.bert.encoder.layer[0].intermediate.dense.weight.mul_(1e-3)  # tiny weights
    compress_(model, MagnitudeConfig(initial_sparsity=0.3, final_sparsity=0.3))
    assert float((model.bert.encoder.layer[0].intermediate.dense.weight == 0).float().mean()) == 1.0


def test_bad_input():
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=f"final_sparsity={bad} must be in \\[0, 1\\)"):
            config_from_dict({"method": "magnitude", "final_sparsity": bad})
    with pytest.raises(ValueError, match="initial_sparsity=0.5 exceeds final_sparsity=0.2"):
        MagnitudeConfig(initial_sparsity=0.5, final_sparsity=0.2)
    with pytest.raises(ValueError, match="num_rounds"):
        MagnitudeConfig(num_rounds=0)
    with pytest.raises(ValueError, match="matches no Linear module"):
        compress_(tiny_bert(), MagnitudeConfig(include=["*.nothing"]))
    with pytest.raises(ValueError, match="sparsity=1.0 must be in"):
        magnitude_masks([torch.ones(3)], 1.0)
    assert isinstance(SparseLinear(4, 3, 5), nn.Module)
