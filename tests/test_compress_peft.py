"""Compression of a LoRA (peft) student: the records live on the base model and survive
``merge_and_unload``, the adapter's own modules are never targets, and quantized
distillation quantizes the merged weight, so the merged model predicts what the trained one did."""
import os

import pytest
import torch
from conftest import tiny_batch, tiny_bert, tiny_tokenizer
from torch import nn
from torch.nn.utils import parametrize

from distilkit.compress import (compress_, compression_records, config_from_dict, finalize_,
                                load_compressed, save_compressed)
from distilkit.compress.base import COMPRESSION_FILE
from distilkit.compress.quantize import QuantizeConfig

Q = "bert.encoder.layer.0.attention.self.query"


def lora_bert(seed=0):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_bert(seed=seed), LoraConfig(r=2, target_modules=["query", "value"]))
    # peft starts lora_B at zero (delta 0); a trained adapter has a real delta.
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def inputs():
    return {k: v for k, v in tiny_batch().items() if k != "labels"}


def predict(model):
    with torch.no_grad():
        return model(**inputs()).logits


def test_records_live_on_the_base_model_and_survive_merge():
    model = lora_bert()
    compress_(model, QuantizeConfig(bits=4, bucket_size=64))
    base = model.get_base_model()
    assert [r["method"] for r in compression_records(base)] == ["quantize"]
    assert compression_records(model) == compression_records(base)
    merged = model.merge_and_unload()
    assert merged is base and [r["method"] for r in compression_records(merged)] == ["quantize"]


def test_quantize_never_targets_the_adapter_modules():
    model = lora_bert()
    rec = compress_(model, QuantizeConfig(bits=4, bucket_size=64))
    names = list(rec["layers"])
    assert Q in names and "bert.encoder.layer.0.attention.self.value" in names
    assert not any("lora_" in n or "base_layer" in n or n.startswith("base_model") for n in names)
    assert len(names) == 4 * 6  # the same layers as without the adapter
    for name, module in model.named_modules():
        if "lora_" in name:
            assert not parametrize.is_parametrized(module), name
    assert parametrize.is_parametrized(model.get_base_model().get_submodule(Q).base_layer)


def test_merge_puts_the_delta_into_the_master_weight_and_keeps_predictions():
    model = lora_bert()
    compress_(model, QuantizeConfig(bits=4, bucket_size=64))
    layer = model.get_base_model().get_submodule(Q)
    master = layer.base_layer.parametrizations.weight.original.detach().clone()
    delta = layer.get_delta_weight("default").detach().clone()
    assert delta.abs().max() > 0.01
    before = predict(model)
    merged = model.merge_and_unload()
    lin = merged.get_submodule(Q)
    assert parametrize.is_parametrized(lin)  # still fake-quantized, now of the merged weight
    torch.testing.assert_close(lin.parametrizations.weight.original, master + delta)
    torch.testing.assert_close(predict(merged), before, rtol=0, atol=1e-5)
    finalize_(merged)
    torch.testing.assert_close(predict(merged), before, rtol=0, atol=1e-5)


def test_merge_and_unmerge_without_unloading_keep_the_master_weight():
    model = lora_bert()
    compress_(model, QuantizeConfig(bits=4, bucket_size=64))
    master = model.get_base_model().get_submodule(Q).base_layer.parametrizations.weight.original
    kept, before = master.detach().clone(), predict(model)
    model.merge_adapter()
    assert not torch.allclose(master, kept)
    torch.testing.assert_close(predict(model), before, rtol=0, atol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(master, kept, rtol=0, atol=1e-6)
    torch.testing.assert_close(predict(model), before, rtol=0, atol=1e-5)


def test_a_deep_copy_merges_into_its_own_master_weight():
    import copy

    model = lora_bert()
    compress_(model, QuantizeConfig(bits=4, bucket_size=64))
    original = model.get_base_model().get_submodule(Q).base_layer.parametrizations.weight.original
    kept = original.detach().clone()
    before = predict(model)
    merged = copy.deepcopy(model).merge_and_unload()
    assert torch.equal(original, kept)  # the original model is untouched
    assert not torch.equal(merged.get_submodule(Q).parametrizations.weight.original, kept)
    torch.testing.assert_close(predict(merged), before, rtol=0, atol=1e-5)
    assert compression_records(merged) == compression_records(model)


def test_the_adapter_trains_through_the_quantized_merged_weight():
    model = lora_bert()
    compress_(model, QuantizeConfig(bits=4, bucket_size=64))
    model.train()
    model(**tiny_batch()).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in grads) and all(g is not None for g in grads.values())
    assert all(g.abs().sum() > 0 for n, g in grads.items() if "lora_" in n)
    master = model.get_base_model().get_submodule(Q).base_layer.parametrizations.weight.original
    assert not master.requires_grad  # LoRA freezes the base weights


def test_lora_quantize_end_to_end_through_save_student(tmp_path):
    from distilkit.pipeline import save_student

    model = lora_bert()
    compress_(model, config_from_dict({"method": "quantize", "bits": 4, "bucket_size": 64}))
    expected = predict(model)
    out = save_student(model, tiny_tokenizer(str(tmp_path / "tok")), str(tmp_path / "run"))
    assert os.path.isfile(os.path.join(out, COMPRESSION_FILE))
    loaded = load_compressed(out)
    assert [r["method"] for r in compression_records(loaded)] == ["quantize"]
    assert compression_records(loaded)[0]["stage"] == "packed"
    assert not any("lora" in k for k in loaded.state_dict())
    torch.testing.assert_close(predict(loaded), expected, rtol=0, atol=1e-5)


def test_merge_then_finalize_then_save_compressed(tmp_path):
    model = lora_bert()
    compress_(model, QuantizeConfig(bits=4, bucket_size=64))
    merged = model.merge_and_unload()
    finalize_(merged)
    expected = predict(merged)
    save_compressed(merged, str(tmp_path))
    assert (tmp_path / COMPRESSION_FILE).is_file()
    torch.testing.assert_close(predict(load_compressed(str(tmp_path))), expected, rtol=0, atol=1e-6)


def test_include_globs_and_bit_allocation_see_the_wrapped_layers():
    from distilkit.compress import CompressionContext

    model = lora_bert()
    rec = compress_(model, QuantizeConfig(bits=4, bucket_size=64,
                                          include=["*.attention.self.query"]))
    assert sorted(rec["layers"]) == [f"bert.encoder.layer.{i}.attention.self.query"
                                     for i in range(4)]
    model = lora_bert()
    ctx = CompressionContext(dataloader=[tiny_batch()], loss_fn=lambda m, b: m(**b).loss)
    rec = compress_(model, QuantizeConfig(bits=4, bucket_size=64, target_bits=3.0), ctx)
    assert all(v["grad_norm"] > 0 for v in rec["bit_allocation"].values())
    base = model.get_base_model().get_submodule(Q).base_layer
    assert not base.parametrizations.weight.original.requires_grad  # still frozen


def test_finalize_and_save_of_an_unmerged_adapter_are_refused(tmp_path):
    model = lora_bert()
    compress_(model, QuantizeConfig(bits=4, bucket_size=64))
    with pytest.raises(ValueError, match=f"{Q}.*unmerged peft LoRA adapter.*merge_and_unload"):
        finalize_(model)
    with pytest.raises(ValueError, match="peft model.*merge_and_unload"):
        save_compressed(model, str(tmp_path / "x"))


@pytest.mark.parametrize("entry", [
    {"method": "low_rank", "rank": 4},
    {"method": "magnitude", "final_sparsity": 0.5},
    {"method": "ptq", "bits": 4, "bucket_size": 64},
    {"method": "prune_heads", "fraction": 0.25, "importance": "weight"},
])
def test_methods_that_cannot_take_a_lora_delta_refuse_wrapped_layers(entry):
    model = lora_bert()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=f"{entry['method']}: .*attention.self.query is wrapped "
                                         f"by a peft LoRA adapter"):
        compress_(model, config_from_dict(entry))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_layers_outside_the_adapter_can_still_be_factorized():
    model = lora_bert()
    rec = compress_(model, config_from_dict({"method": "low_rank", "rank": 4,
                                             "include": ["*.intermediate.dense"]}))
    assert len(rec["ranks"]) == 4
    merged = model.merge_and_unload()
    assert compression_records(merged)[0]["method"] == "low_rank"


def test_records_of_a_module_wrapper_live_on_the_wrapped_model():
    class Wrapper(nn.Module):  # what DDP and accelerate put around a model
        def __init__(self, module):
            super().__init__()
            self.module = module

    inner = tiny_bert()
    compress_(Wrapper(inner), QuantizeConfig(bits=4, bucket_size=64))
    assert [r["method"] for r in compression_records(inner)] == ["quantize"]
