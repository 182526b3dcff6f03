"""Compression feeds a model its batches on the model's own device: importance scores for
pruning and the gradient-norm bit allocation of quantization. Checked against a model that
reports another device (``meta``) and refuses inputs that are not there."""
import pytest
import torch
from conftest import tiny_batch, tiny_bert
from fake_device import FakeDeviceModel

from distilkit.compress import CompressionContext, compress_, config_from_dict
from distilkit.compress.families import get_adapter
from distilkit.compress.importance import ffn_importance, head_importance, layer_importance


def _ctx(n=2, **kw):
    return CompressionContext(dataloader=[tiny_batch(seed=i) for i in range(n)], **kw)


def test_the_fake_device_refuses_host_batches():
    with pytest.raises(RuntimeError, match="input on cpu, but the model is on meta"):
        FakeDeviceModel(tiny_bert())(**tiny_batch())


@pytest.mark.parametrize("score", [head_importance, layer_importance,
                                   lambda a, c: ffn_importance(a, c, "gradient")])
def test_importance_scores_feed_the_model_on_its_device(score):
    model = FakeDeviceModel(tiny_bert())
    scores = score(get_adapter(model), _ctx())
    assert model.calls == 2
    values = list(scores.values())
    assert values and all(torch.as_tensor(v).device.type == "cpu" for v in values)


@pytest.mark.parametrize("entry", [
    {"method": "prune_heads", "fraction": 0.25},
    {"method": "prune_layers", "count": 1},
    {"method": "prune_ffn", "fraction": 0.25, "importance": "gradient"},
])
def test_pruning_by_gradient_importance_on_a_device_model(entry):
    model = FakeDeviceModel(tiny_bert())
    rec = compress_(model, config_from_dict(entry), _ctx())
    assert model.calls == 2 and rec["params_after"] < rec["params_before"]


def test_bit_allocation_feeds_the_model_on_its_device():
    model = FakeDeviceModel(tiny_bert())
    rec = compress_(model, config_from_dict({"method": "quantize", "bits": 4, "bucket_size": 64,
                                             "target_bits": 3.0}),
                    _ctx(loss_fn=lambda m, b: m(**b).loss))
    assert model.calls == 2
    assert len(rec["bit_allocation"]) == 24
