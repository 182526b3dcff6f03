"""The order of compression methods: what each needs from the ones before it, refused before
any work (``compress_``, ``check_order``, recipe validation), and the orders that do work."""
import pytest
import torch
from conftest import tiny_batch, tiny_bert
from torch import nn

from distilkit.compress import (compress_, compression_records, config_from_dict, finalize_,
                                load_compressed, save_compressed)
from distilkit.compress.base import check_order, is_plain_linear
from distilkit.compress.families import slice_cols, slice_rows
from distilkit.compress.low_rank import LowRankLinear
from distilkit.compress.magnitude import SparseLinear
from distilkit.recipe import Recipe

Q = "bert.encoder.layer.0.attention.self.query"
ENTRY = {
    "prune_heads": {"method": "prune_heads", "fraction": 0.25, "importance": "weight"},
    "prune_ffn": {"method": "prune_ffn", "fraction": 0.25, "importance": "l1"},
    "prune_layers": {"method": "prune_layers", "layers": [1]},
    "low_rank": {"method": "low_rank", "rank": 4},
    "magnitude": {"method": "magnitude", "final_sparsity": 0.5},
    "quantize": {"method": "quantize", "bits": 4, "bucket_size": 64},
    "ptq": {"method": "ptq", "bits": 4, "bucket_size": 64},
}

# (first, second, what the error must say): each fails or silently undoes the first method
# on today's models (worked out by running every pair through finalize, save and load).
BAD = [
    ("quantize", "prune_heads", "prune_heads needs plain nn.Linear layers, which quantize "
                                "replaces; put prune_heads before quantize"),
    ("quantize", "prune_ffn", "put prune_ffn before quantize"),
    ("ptq", "prune_heads", "prune_heads needs plain nn.Linear layers, which ptq replaces; "
                           "put prune_heads before ptq"),
    ("ptq", "prune_ffn", "put prune_ffn before ptq"),
    ("quantize", "low_rank", "put low_rank before quantize"),
    ("ptq", "low_rank", "put low_rank before ptq"),
    ("ptq", "magnitude", "no order of ptq and magnitude works: keep one of them"),
    ("magnitude", "ptq", "magnitude needs plain nn.Linear layers until it finalizes"),
    ("quantize", "prune_layers", "quantize needs each layer at the name it had until it "
                                 "finalizes after training, which prune_layers renumbers; "
                                 "put prune_layers before quantize"),
    ("magnitude", "prune_layers", "put prune_layers before magnitude"),
    ("low_rank", "prune_heads", "prune_heads needs the attention and feed-forward projections "
                                "as nn.Linear layers, which low_rank replaces; put prune_heads "
                                "before low_rank"),
    ("low_rank", "prune_ffn", "put prune_ffn before low_rank"),
    ("magnitude", "prune_heads", "put prune_heads before magnitude"),
    ("magnitude", "low_rank", "put low_rank before magnitude"),
    ("magnitude", "quantize", "magnitude needs plain nn.Linear layers until it finalizes after "
                              "training, which quantize replaces; no order of magnitude and "
                              "quantize works: keep one of them"),
    ("quantize", "magnitude", "no order of quantize and magnitude works"),
    ("magnitude", "magnitude", "apply magnitude once"),
]

# Orders that work end to end (finalize, save, load with equal predictions).
GOOD = [
    ("prune_heads", "quantize"),  # recipes/prune_heads_minilm.yaml
    ("prune_heads", "prune_ffn", "prune_layers", "low_rank", "quantize"),
    ("prune_layers", "magnitude"),
    ("prune_ffn", "ptq"),
    ("low_rank", "magnitude"),
    ("low_rank", "quantize"),
    ("low_rank", "prune_layers"),
    ("ptq", "prune_layers"),
]


def _inputs():
    return {k: v for k, v in tiny_batch().items() if k != "labels"}


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("first,second,message", BAD)
def test_compress_refuses_a_bad_order_before_doing_anything(first, second, message):
    model = tiny_bert()
    compress_(model, config_from_dict(ENTRY[first]))
    before, kinds = _state(model), {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ValueError, match=f"compression: {second} after {first} cannot work"
                                         f".*{message}"):
        compress_(model, config_from_dict(ENTRY[second]))
    assert len(compression_records(model)) == 1
    assert {n: type(m) for n, m in model.named_modules()} == kinds
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize("first,second,message", BAD)
def test_recipe_with_a_bad_order_fails_at_validation(first, second, message):
    entries = [ENTRY[first], ENTRY[second]]
    with pytest.raises(ValueError, match=f"compression: {second} after {first} cannot work.*{message}"):
        check_order([config_from_dict(e) for e in entries])
    # Validation needs neither model nor data: the teacher and dataset named here do not exist.
    with pytest.raises(ValueError, match=f"{second} after {first} cannot work"):
        Recipe.from_dict({"teacher": "/nonexistent/teacher", "dataset": "/nonexistent/data",
                          "compression": entries})


def test_a_bad_pair_anywhere_in_the_list_is_found():
    entries = [ENTRY["quantize"], ENTRY["prune_layers"], ENTRY["low_rank"]]
    with pytest.raises(ValueError, match="prune_layers after quantize"):
        check_order([config_from_dict(e) for e in entries])


def test_lstm_projection_after_quantizing_the_lstm_is_refused_only_then():
    from distilkit.compress.lstm_projection import LSTMProjectionConfig
    from distilkit.compress.quantize import QuantizeConfig

    check_order([QuantizeConfig(), LSTMProjectionConfig()])  # LSTMs left in full precision
    check_order([LSTMProjectionConfig(), QuantizeConfig(quantize_lstm=True)])
    with pytest.raises(ValueError, match="lstm_projection needs plain nn.LSTM modules, which "
                                         "quantize replaces; put lstm_projection before quantize"):
        check_order([QuantizeConfig(quantize_lstm=True), LSTMProjectionConfig()])


@pytest.mark.parametrize("order", GOOD, ids="->".join)
def test_valid_orders_still_pass_and_round_trip(order, tmp_path):
    check_order([config_from_dict(ENTRY[m]) for m in order])
    Recipe.from_dict({"compression": [ENTRY[m] for m in order]})
    model, x = tiny_bert(), _inputs()
    for m in order:
        compress_(model, config_from_dict(ENTRY[m]))
    finalize_(model)
    with torch.no_grad():
        expected = model(**x).logits
    save_compressed(model, str(tmp_path))
    loaded = load_compressed(str(tmp_path))
    assert [r["method"] for r in compression_records(loaded)] == list(order)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**x).logits, expected, rtol=0, atol=1e-5)


def test_is_plain_linear():
    from distilkit.compress import packing
    from distilkit.compress.quantize import QuantizeConfig

    model = tiny_bert()
    assert is_plain_linear(model.get_submodule(Q))
    compress_(model, QuantizeConfig(bits=4, bucket_size=64))
    fake_quant = model.get_submodule(Q)
    assert isinstance(fake_quant, nn.Linear) and not is_plain_linear(fake_quant)
    finalize_(model)
    packed = model.get_submodule(Q)
    assert isinstance(packed, packing.PackedLinear) and isinstance(packed, nn.Linear)
    assert not is_plain_linear(packed)
    assert not is_plain_linear(LowRankLinear(8, 8, 2))
    assert not is_plain_linear(SparseLinear.from_linear(nn.Linear(8, 8)))
    assert not is_plain_linear(nn.LSTM(4, 4))


@pytest.mark.parametrize("method", ["quantize", "ptq"])
def test_structured_slicing_refuses_quantized_linears(method):
    """Bug 4: the slicing guard took any ``isinstance(lin, nn.Linear)``, so a fake-quantized
    or packed linear was silently sliced into a plain one (quantization dropped)."""
    model = tiny_bert()
    compress_(model, config_from_dict(ENTRY[method]))
    kind = type(model.get_submodule(Q))
    with pytest.raises(TypeError, match=f"{Q}.*{kind.__name__}.*not a plain nn.Linear"):
        slice_rows(model, Q, torch.arange(4))
    with pytest.raises(TypeError, match="not a plain nn.Linear"):
        slice_cols(model, "bert.encoder.layer.0.attention.output.dense", torch.arange(4))
    assert type(model.get_submodule(Q)) is kind


@pytest.mark.parametrize("entry", [ENTRY["low_rank"], ENTRY["magnitude"]])
def test_methods_that_rebuild_linears_refuse_quantized_ones(entry):
    """Bug 4, the same guard for the methods that select linears by type: a fake-quantized
    linear is an nn.Linear subclass, and was factorized / masked as if it were plain."""
    from distilkit.compress import CompressionContext, get_method

    model = tiny_bert()
    compress_(model, config_from_dict(ENTRY["quantize"]))
    cfg = config_from_dict(entry)
    with pytest.raises(ValueError, match=f"{entry['method']}: .* is a ParametrizedLinear, not a "
                                         f"plain nn.Linear"):
        get_method(cfg).apply(model, cfg, CompressionContext())
