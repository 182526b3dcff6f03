"""Structured pruning (heads, layers, FFN neurons), plus the method x family matrix that runs
every structural compression method through forward, save, load and a size check."""
import os

import pytest
import torch
from conftest import tiny_bart, tiny_batch, tiny_bert, tiny_marian, tiny_t5
from transformers import AutoModelForSeq2SeqLM, AutoModelForSequenceClassification

from distilkit.compress import (
    CompressionContext, compress_, config_from_dict, finalize_, load_compressed, save_compressed,
)
from distilkit.compress.families import get_adapter
from distilkit.compress.importance import (
    _gated_input_hook, ffn_importance, head_importance, layer_importance,
)
from distilkit.compress.prune import lowest_global

FAMILIES = {
    "bert": (tiny_bert, AutoModelForSequenceClassification),
    "t5": (tiny_t5, AutoModelForSeq2SeqLM),
    "bart": (tiny_bart, AutoModelForSeq2SeqLM),
    "marian": (tiny_marian, AutoModelForSeq2SeqLM),
}

METHODS = {
    "prune_heads_global": {"method": "prune_heads", "fraction": 0.5},
    "prune_heads_per_layer": {"method": "prune_heads", "count": 1, "scope": "per_layer"},
    "prune_heads_weight": {"method": "prune_heads", "fraction": 0.25, "importance": "weight"},
    "prune_layers": {"method": "prune_layers", "count": 1},
    "prune_ffn_gradient": {"method": "prune_ffn", "fraction": 0.5, "importance": "gradient"},
    "prune_ffn_l1_global": {"method": "prune_ffn", "fraction": 0.5, "importance": "l1",
                            "scope": "global"},
    "low_rank": {"method": "low_rank", "param_fraction": 0.5},
    "magnitude": {"method": "magnitude", "final_sparsity": 0.6, "initial_sparsity": 0.3},
}


def family_batch(family):
    b = tiny_batch()
    if family != "bert":
        b["labels"] = b["input_ids"][:, :6].contiguous()
    return b


def nparams(model):
    return sum(p.numel() for p in model.parameters())


def predict(model, batch):
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"},
                     **({"decoder_input_ids": batch["labels"]} if "decoder_input_ids" not in batch
                        and model.config.is_encoder_decoder else {})).logits


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("method", list(METHODS))
def test_matrix_forward_save_load_equal_smaller(method, family, tmp_path):
    make, auto = FAMILIES[family]
    model, batch = make(), family_batch(family)
    dense_dir, out_dir = tmp_path / "dense", tmp_path / "out"
    model.save_pretrained(dense_dir)
    before = nparams(model)
    compress_(model, config_from_dict(METHODS[method]), CompressionContext(dataloader=[batch]))
    finalize_(model)
    expected = predict(model, batch)
    assert torch.isfinite(expected).all()
    assert nparams(model) < before
    save_compressed(model, str(out_dir))
    assert os.path.getsize(out_dir / "model.safetensors") < os.path.getsize(
        dense_dir / "model.safetensors")
    loaded = load_compressed(str(out_dir), auto_cls=auto)
    assert nparams(loaded) == nparams(model)
    torch.testing.assert_close(predict(loaded, batch), expected, rtol=0, atol=1e-6)


def gate_heads(model, adapter, remove):
    """Hooks zeroing the outputs of heads ``{holder: [heads]}`` on an unpruned model."""
    handles = []
    for b in adapter.attention_blocks():
        n = adapter.num_heads(b)
        gate = torch.ones(n)
        gate[remove.get(b.holder, [])] = 0.0
        handles.append(model.get_submodule(b.o).register_forward_pre_hook(
            _gated_input_hook(gate, adapter.head_dim(b))))
    return handles


@pytest.mark.parametrize("family", list(FAMILIES))
def test_physical_removal_equals_zeroed_heads(family):
    """Cutting rows/columns must compute exactly what the model computes with those heads'
    outputs zeroed, including T5's per-head relative bias and cached generation."""
    make, _ = FAMILIES[family]
    ref, pruned, batch = make(), make(), family_batch(family)
    blocks = get_adapter(ref).attention_blocks()
    remove = {b.holder: [(i % 4), (i + 2) % 4] for i, b in enumerate(blocks)}  # differ per block
    remove[blocks[0].holder] = [0, 1, 2]  # layers end with different head counts
    handles = gate_heads(ref, get_adapter(ref), remove)
    compress_(pruned, config_from_dict({"method": "prune_heads", "heads": remove}))
    torch.testing.assert_close(predict(pruned, batch), predict(ref, batch), rtol=0, atol=1e-5)
    if family != "bert":
        kw = dict(max_new_tokens=4, do_sample=False, num_beams=1)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        assert torch.equal(pruned.generate(input_ids=ids, attention_mask=mask, **kw),
                           ref.generate(input_ids=ids, attention_mask=mask, **kw))
    for h in handles:
        h.remove()


def test_head_importance_is_the_gate_gradient():
    """Known answer 1: a head whose output projection columns are zero cannot change the loss,
    so its importance is exactly 0 and it goes first. Known answer 2: each score equals the
    finite-difference derivative of the loss when that head's output is scaled."""
    model, batch = tiny_bert().double(), tiny_batch()  # float64: exact finite differences
    adapter = get_adapter(model)
    o = model.bert.encoder.layer[2].attention.output.dense
    with torch.no_grad():
        o.weight[:, 8:16] = 0.0  # head 1 of layer 2 (head_dim 8)
    ctx = CompressionContext(dataloader=[batch])
    scores = head_importance(adapter, ctx)
    holder = "bert.encoder.layer.2.attention.self"
    assert scores[holder][1] == 0.0
    assert all(float(s.min()) > 0 for h, s in scores.items() if h != holder)

    holder0 = "bert.encoder.layer.0.attention.self"
    block = [b for b in adapter.attention_blocks() if b.holder == holder0][0]
    for head in range(4):
        eps = 1e-4
        losses = []
        for g in (1 - eps, 1 + eps):
            gate = torch.ones(4)
            gate[head] = g
            h = model.get_submodule(block.o).register_forward_pre_hook(_gated_input_hook(gate, 8))
            with torch.no_grad():
                losses.append(model(**batch).loss.double())
            h.remove()
        fd = abs(losses[1] - losses[0]) / (2 * eps)
        assert float(scores[holder0][head]) == pytest.approx(float(fd), rel=1e-3)

    rec = compress_(model, config_from_dict({"method": "prune_heads", "count": 1}), ctx)
    assert rec["heads_kept"][holder] == [0, 2, 3]
    assert rec["importance"] == "gradient"


def test_layer_importance_and_t5_first_block_drop():
    """Known answer: a T5 block whose attention output and FFN output weights are zero is the
    identity (pre-norm residuals), so its importance is 0 and prune_layers drops it. It is
    block 0, which owns the relative position bias: after the drop the bias must move on."""
    model = tiny_t5()
    batch = family_batch("t5")
    with torch.no_grad():
        blk = model.encoder.block[0]
        blk.layer[0].SelfAttention.o.weight.zero_()
        blk.layer[-1].DenseReluDense.wo.weight.zero_()
    expected = predict(model, batch)
    adapter = get_adapter(model)
    scores = layer_importance(adapter, CompressionContext(dataloader=[batch]))
    assert scores["encoder.block.0"] == 0.0
    assert min(v for k, v in scores.items() if k != "encoder.block.0") > 0
    rec = compress_(model, config_from_dict({"method": "prune_layers", "count": 1}),
                    CompressionContext(dataloader=[batch]))
    assert rec["dropped"] == ["encoder.block.0"]
    assert model.encoder.block[0].layer[0].SelfAttention.has_relative_attention_bias
    torch.testing.assert_close(predict(model, batch), expected, rtol=0, atol=1e-5)


def test_ffn_importance_known_dead_neurons():
    model, batch = tiny_bert(), tiny_batch()
    with torch.no_grad():
        model.bert.encoder.layer[1].output.dense.weight[:, 5] = 0.0  # neuron 5 feeds nothing
        model.bert.encoder.layer[3].intermediate.dense.weight[7] = 0.0  # neuron 7 reads nothing
    adapter = get_adapter(model)
    grad = ffn_importance(adapter, CompressionContext(dataloader=[batch]), "gradient")
    l1 = ffn_importance(adapter, None, "l1")
    assert grad["bert.encoder.layer.1.intermediate"][5] == 0.0
    assert l1["bert.encoder.layer.3.intermediate"][7] == 0.0
    expected = predict(model, batch)
    # Removing the neuron that feeds nothing leaves the function unchanged.
    rec = compress_(model, config_from_dict({"method": "prune_ffn", "count": 1,
                                             "importance": "gradient",
                                             "include": ["bert.encoder.layer.1.*"]}),
                    CompressionContext(dataloader=[batch]))
    assert rec["neurons_kept"] == {"bert.encoder.layer.1.intermediate": 63}
    torch.testing.assert_close(predict(model, batch), expected, rtol=0, atol=1e-6)


def test_global_selection_keeps_a_head_per_block():
    scores = {"a": torch.tensor([0.0, 0.1, 0.2]), "b": torch.tensor([5.0, 6.0])}
    assert lowest_global(scores, 3) == {"a": [0, 1], "b": [0]}
    with pytest.raises(ValueError, match="at most 3"):
        lowest_global(scores, 4)


def test_other_bert_family_naming(tmp_path):
    from transformers import (
        DistilBertConfig, DistilBertForSequenceClassification, RobertaConfig,
        RobertaForSequenceClassification,
    )
    torch.manual_seed(0)
    models = [
        RobertaForSequenceClassification(RobertaConfig(
            vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=70, pad_token_id=1)).eval(),
        DistilBertForSequenceClassification(DistilBertConfig(
            vocab_size=120, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
            max_position_embeddings=64)).eval(),
    ]
    batch = tiny_batch()
    for i, model in enumerate(models):
        compress_(model, config_from_dict({"method": "prune_heads", "fraction": 0.5}),
                  CompressionContext(dataloader=[batch]))
        compress_(model, config_from_dict({"method": "prune_ffn", "fraction": 0.25}))
        expected = predict(model, batch)
        save_compressed(model, str(tmp_path / str(i)))
        loaded = load_compressed(str(tmp_path / str(i)))
        torch.testing.assert_close(predict(loaded, batch), expected, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------

def test_pruning_every_head_of_a_layer_is_refused():
    model = tiny_bert()
    with pytest.raises(ValueError, match="refused.*prune_layers"):
        compress_(model, config_from_dict({"method": "prune_heads", "heads": {1: [0, 1, 2, 3]}}))
    with pytest.raises(ValueError, match="refused"):
        compress_(model, config_from_dict({"method": "prune_heads", "count": 4,
                                           "scope": "per_layer", "importance": "weight"}))
    # Nothing was cut by the refused calls.
    assert model.bert.encoder.layer[1].attention.self.query.out_features == 32


def test_bad_amounts_and_patterns_and_layers():
    with pytest.raises(ValueError, match="fraction=1.0 must be in \\[0, 1\\)"):
        config_from_dict({"method": "prune_heads", "fraction": 1.0})
    with pytest.raises(ValueError, match="exactly one of"):
        config_from_dict({"method": "prune_heads", "fraction": 0.5, "count": 2})
    with pytest.raises(ValueError, match="scope"):
        config_from_dict({"method": "prune_ffn", "fraction": 0.5, "scope": "everywhere"})
    with pytest.raises(ValueError, match="matches nothing.*candidates"):
        compress_(tiny_bert(), config_from_dict({"method": "prune_heads", "fraction": 0.5,
                                                 "include": ["*.decoder.*"]}))
    with pytest.raises(ValueError, match="every layer"):
        compress_(tiny_bert(), config_from_dict({"method": "prune_layers",
                                                 "layers": [0, 1, 2, 3]}))
    with pytest.raises(ValueError, match="out of range"):
        compress_(tiny_bert(), config_from_dict({"method": "prune_layers", "layers": [9]}))
    with pytest.raises(ValueError, match="needs data"):
        compress_(tiny_bert(), config_from_dict({"method": "prune_layers", "count": 1}))


def test_unsupported_family_names_the_supported_ones():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=32, n_layer=1, n_head=4,
                                       n_positions=16))
    for entry in ({"method": "prune_heads", "fraction": 0.5},
                  {"method": "prune_ffn", "fraction": 0.5},
                  {"method": "low_rank", "rank": 2}):
        with pytest.raises(ValueError, match="'gpt2'.*not supported.*BERT family.*T5.*BART.*Marian"):
            compress_(model, config_from_dict(entry))


def test_prune_after_factorization_is_a_clear_error():
    from distilkit.compress import get_method

    model = tiny_bert()
    compress_(model, config_from_dict({"method": "low_rank", "rank": 4,
                                       "include": ["*.attention.self.query"]}))
    cfg = config_from_dict({"method": "prune_heads", "fraction": 0.25, "importance": "weight"})
    # compress_ refuses the order before any work (see tests/test_compress_order.py) ...
    with pytest.raises(ValueError, match="prune_heads after low_rank cannot work.*put "
                                         "prune_heads before low_rank"):
        compress_(model, cfg)
    # ... and the slicing itself still refuses a replaced linear, before cutting anything.
    with pytest.raises(TypeError, match="before methods that replace linears"):
        get_method(cfg).apply(model, cfg, CompressionContext())
    assert all(get_adapter(model).num_heads(b) == 4 for b in get_adapter(model).attention_blocks())


DEPTHS = {  # family -> {config attribute: depth after dropping layer 0 of the first stack}
    "bert": {"num_hidden_layers": 3},
    "t5": {"num_layers": 1, "num_decoder_layers": 2},
    "bart": {"encoder_layers": 1, "decoder_layers": 2, "num_hidden_layers": 1},
    "marian": {"encoder_layers": 1, "decoder_layers": 2},
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_prune_layers_updates_the_config_depth_and_round_trips(family, tmp_path):
    """Bug 3: the config kept the unpruned depth, so layer losses paired the wrong layers."""
    make, auto = FAMILIES[family]
    model, batch = make(), family_batch(family)
    compress_(model, config_from_dict({"method": "prune_layers", "layers": [0]}))
    adapter = get_adapter(model)
    for attr, depth in DEPTHS[family].items():
        assert getattr(model.config, attr) == depth, attr
    assert [len(model.get_submodule(s)) for s in adapter.stacks()] == \
        ([3] if family == "bert" else [1, 2])
    expected = predict(model, batch)
    save_compressed(model, str(tmp_path))
    loaded = load_compressed(str(tmp_path), auto_cls=auto)
    for attr, depth in DEPTHS[family].items():
        assert getattr(loaded.config, attr) == depth, attr
    assert nparams(loaded) == nparams(model)
    torch.testing.assert_close(predict(loaded, batch), expected, rtol=0, atol=1e-6)


def test_layer_map_resolves_against_the_pruned_depth(tmp_path):
    from datasets import Dataset

    from distilkit import DistilConfig, DistilTrainer
    from distilkit.config import resolve_layer_map

    teacher, student = tiny_bert(layers=4), tiny_bert(layers=4)
    compress_(student, config_from_dict({"method": "prune_layers", "layers": [1, 2]}))
    assert student.config.num_hidden_layers == 2
    assert resolve_layer_map("last", student.config.num_hidden_layers, 4) == [(1, 3)]
    b = tiny_batch()
    ds = Dataset.from_dict({k: v.tolist() for k, v in b.items()})
    args = dict(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_steps=1,
                per_device_train_batch_size=4, alpha_hidden=1.0)
    # A pair past the pruned depth is refused when the trainer is built, not mid-step.
    with pytest.raises(ValueError, match="student layer 3.*outside the student's depth 0..2"):
        DistilTrainer(model=student, teacher_model=teacher, train_dataset=ds,
                      args=DistilConfig(**args, layer_map=[[3, 4]]))
    trainer = DistilTrainer(model=student, teacher_model=teacher, train_dataset=ds,
                            args=DistilConfig(**args, layer_map="skip"))
    trainer.train()  # student hidden states 0..2 paired within range
    assert trainer.state.global_step == 1


def test_prune_layers_directory_saved_with_the_old_depth_still_loads(tmp_path):
    """Directories saved before the fix have the unpruned depth in config.json and no
    ``config_before`` in the record: restore drops the layers once and fixes the config."""
    import json

    model, batch = tiny_bert(), tiny_batch()
    compress_(model, config_from_dict({"method": "prune_layers", "layers": [1]}))
    expected = predict(model, batch)
    save_compressed(model, str(tmp_path))
    cfg_file, rec_file = tmp_path / "config.json", tmp_path / "compression_config.json"
    cfg, recs = json.loads(cfg_file.read_text()), json.loads(rec_file.read_text())
    assert cfg["num_hidden_layers"] == 3 and recs["records"][0]["config_before"] == {
        "num_hidden_layers": 4}
    cfg["num_hidden_layers"] = 4
    del recs["records"][0]["config_before"]
    cfg_file.write_text(json.dumps(cfg))
    rec_file.write_text(json.dumps(recs))
    loaded = load_compressed(str(tmp_path))
    assert loaded.config.num_hidden_layers == 3 and len(loaded.bert.encoder.layer) == 3
    torch.testing.assert_close(predict(loaded, batch), expected, rtol=0, atol=1e-6)
