"""distilkit.search: exact parameter counts of pruned structures (structure.py) and the measured
latency table (latency.py): its predictions against measured pruned models, its cache, its
refusals."""
import pytest
import torch
from transformers import (BertConfig, BertForSequenceClassification, DistilBertConfig,
                          DistilBertForSequenceClassification, ElectraConfig,
                          ElectraForSequenceClassification)

from distilkit.compress import compress_
from distilkit.compress.prune import PruneFFNConfig, PruneHeadsConfig, PruneLayersConfig
from distilkit.search.structure import (BaseShape, Structure, base_shape_of, parameters,
                                        size_mb, structure_of)


def _numel(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _tiny_bert(**kw):
    cfg = dict(vocab_size=120, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
               intermediate_size=64, max_position_embeddings=40, num_labels=3)
    cfg.update(kw)
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(**cfg)).eval()


def _tiny(family: str):
    torch.manual_seed(0)
    if family == "distilbert":
        return DistilBertForSequenceClassification(DistilBertConfig(
            vocab_size=120, dim=32, n_layers=3, n_heads=4, hidden_dim=64,
            max_position_embeddings=40, num_labels=3)).eval()
    if family == "electra":  # a word table narrower than the model (its own projection)
        return ElectraForSequenceClassification(ElectraConfig(
            vocab_size=120, embedding_size=16, hidden_size=32, num_hidden_layers=3,
            num_attention_heads=4, intermediate_size=64, max_position_embeddings=40,
            num_labels=3)).eval()
    return _tiny_bert()


@pytest.mark.parametrize("family", ["bert", "distilbert", "electra"])
def test_parameters_equal_the_pruned_models_numel(family):
    model = _tiny(family)
    shape = base_shape_of(model)
    assert structure_of(model) == shape.full_structure(3)
    assert parameters(structure_of(model), shape) == _numel(model)
    compress_(model, PruneHeadsConfig(heads={0: [1, 2], 2: [0, 1, 3]}))
    assert structure_of(model).heads == (2, 4, 1)
    assert parameters(structure_of(model), shape) == _numel(model)
    compress_(model, PruneFFNConfig(neurons={1: list(range(0, 64, 3)), 2: [5]}))
    assert structure_of(model).ffn == (64, 42, 63)
    assert parameters(structure_of(model), shape) == _numel(model)
    compress_(model, PruneLayersConfig(layers=[0]))
    s = structure_of(model)
    assert s == Structure((4, 1), (42, 63), 120)
    # the config still names the unpruned widths: the shape a table is keyed by is unchanged
    assert base_shape_of(model) == shape
    assert parameters(s, shape) == _numel(model)
    assert size_mb(s, shape) == pytest.approx(4 * _numel(model) / 1e6)
    assert size_mb(s, shape, 1.0) == pytest.approx(_numel(model) / 1e6)


def test_default_other_params_is_berts():
    model = _tiny_bert()
    shape = base_shape_of(model)
    plain = BaseShape(**{**shape.key(), "other_params": None})
    assert plain.other() == shape.other()


def test_structure_refuses_what_pruning_cannot_make():
    with pytest.raises(ValueError, match="heads has 2 layers but ffn has 1"):
        Structure((1, 2), (4,), 10)
    with pytest.raises(ValueError, match="at least 1 head"):
        Structure((0,), (4,), 10)
    with pytest.raises(ValueError, match="vocab"):
        Structure((1,), (4,), 0)
    with pytest.raises(ValueError, match="bytes_per_param"):
        size_mb(Structure((1,), (4,), 10), base_shape_of(_tiny_bert()), 0)


def test_seq2seq_is_out_of_scope():
    from transformers import BartConfig, BartForSequenceClassification

    m = BartForSequenceClassification(BartConfig(vocab_size=50, d_model=16, encoder_layers=1,
                                                 decoder_layers=1, encoder_attention_heads=2,
                                                 decoder_attention_heads=2,
                                                 encoder_ffn_dim=16, decoder_ffn_dim=16))
    with pytest.raises(ValueError, match="model_type 'bart'.*seq2seq"):
        structure_of(m)
