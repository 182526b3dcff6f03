"""prune_vocab: keep the embedding rows of the training data's tokens and the specials; the
model maps every other id to [UNK]'s row, through save and load."""
import os

import pytest
import torch
from conftest import tiny_bert
from transformers import BertForMaskedLM

from distilkit.compress import (
    CompressionContext, compress_, config_from_dict, load_compressed, save_compressed,
)
from distilkit.compress.vocab import PrunedEmbedding, id_map_for
from distilkit.recipe import Recipe

UNK = 100  # tiny BERT vocabulary: 120 ids


def data_batches(n=3, seed=0):
    """Batches whose ids are drawn from 5..39 only, so most of the vocabulary is unseen."""
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(5, 40, (4, 10), generator=g),
             "attention_mask": torch.ones(4, 10, dtype=torch.long)} for _ in range(n)]


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def pruned(**cfg):
    model = tiny_bert()
    original = tiny_bert()
    batches = data_batches()
    # max_batches must not limit which tokens are kept: the last batch's ids are kept too.
    record = compress_(model, config_from_dict({"method": "prune_vocab", **cfg}),
                       CompressionContext(dataloader=batches, max_batches=1))
    return model, original, batches, record


def test_kept_ids_are_the_data_and_the_specials():
    model, _, batches, record = pruned(special_token_ids=[101, 102, 103])
    seen = set(torch.cat([b["input_ids"].flatten() for b in batches]).tolist())
    assert record["kept_ids"] == sorted(seen | {0, UNK, 101, 102, 103})  # 0: config pad id
    emb = model.get_input_embeddings()
    assert isinstance(emb, PrunedEmbedding)
    assert emb.embedding.num_embeddings == len(record["kept_ids"]) < 120
    assert emb.embedding.padding_idx == 0  # pad is id 0, kept as row 0


def test_kept_inputs_predict_the_same_before_and_after_save_load(tmp_path):
    model, original, batches, _ = pruned()
    ids = torch.cat([b["input_ids"] for b in batches])
    torch.testing.assert_close(logits(model, ids), logits(original, ids))
    save_compressed(model, str(tmp_path / "p"))
    loaded = load_compressed(str(tmp_path / "p"))
    assert isinstance(loaded.get_input_embeddings(), PrunedEmbedding)
    torch.testing.assert_close(logits(loaded, ids), logits(original, ids))


def test_dropped_id_predicts_as_unk(tmp_path):
    model, original, batches, record = pruned()
    assert 77 not in record["kept_ids"]
    ids = batches[0]["input_ids"].clone()
    ids[:, 3] = 77
    as_unk = ids.clone()
    as_unk[:, 3] = UNK
    torch.testing.assert_close(logits(model, ids), logits(original, as_unk))
    assert not torch.allclose(logits(original, ids), logits(original, as_unk))
    save_compressed(model, str(tmp_path / "p"))
    torch.testing.assert_close(logits(load_compressed(str(tmp_path / "p")), ids),
                               logits(original, as_unk))


def test_saved_model_is_smaller(tmp_path):
    model, original, _, record = pruned()
    save_compressed(model, str(tmp_path / "p"))
    original.save_pretrained(str(tmp_path / "o"))
    size = lambda d: os.path.getsize(tmp_path / d / "model.safetensors")  # noqa: E731
    # rows dropped at 32 fp32 each, minus the 120 int32 map
    assert size("o") - size("p") >= record["bytes_saved_fp32"] - 512
    assert record["bytes_saved_fp32"] == 4 * ((120 - record["kept"]) * 32 - 120) > 0


def test_id_map_rule():
    assert id_map_for([0, 2, 5], 7, unk_row=1).tolist() == [0, 1, 1, 1, 1, 2, 1]


def test_recipe_validates():
    recipe = Recipe.from_dict({"compression": [{"method": "prune_vocab"}]})
    assert recipe.keys.compression == [{"method": "prune_vocab"}]
    with pytest.raises(ValueError, match="unknown field.*valid fields"):
        Recipe.from_dict({"compression": [{"method": "prune_vocab", "keep": 3}]})


def test_refusals():
    with pytest.raises(ValueError, match="prune_vocab.*dataloader"):
        compress_(tiny_bert(), config_from_dict({"method": "prune_vocab"}))
    with pytest.raises(ValueError, match="unk_token_id=500 is outside"):
        compress_(tiny_bert(), config_from_dict({"method": "prune_vocab", "unk_token_id": 500}),
                  CompressionContext(dataloader=data_batches()))
    with pytest.raises(ValueError, match="keep_frequent=-1"):
        config_from_dict({"method": "prune_vocab", "keep_frequent": -1})
    from conftest import tiny_bert_config
    mlm = BertForMaskedLM(tiny_bert_config())
    with pytest.raises(ValueError, match="shares the word-embedding weight"):
        compress_(mlm, config_from_dict({"method": "prune_vocab"}),
                  CompressionContext(dataloader=data_batches()))


def test_quantized_embedding_before_is_refused():
    ctx = CompressionContext(dataloader=data_batches())
    q = {"method": "quantize", "bits": 8, "bucket_size": 32, "quantize_embeddings": True,
         "include": ["*word_embeddings*"]}
    model = tiny_bert()
    compress_(model, config_from_dict(q))
    with pytest.raises(ValueError, match="put prune_vocab before quantize"):
        compress_(model, config_from_dict({"method": "prune_vocab"}), ctx)


def test_quantize_after_prune_vocab_round_trips(tmp_path):
    from distilkit.compress import finalize_

    model, _, batches, _ = pruned()
    compress_(model, config_from_dict({"method": "quantize", "bits": 8, "bucket_size": 32,
                                       "quantize_embeddings": True,
                                       "include": ["*word_embeddings*"]}))
    finalize_(model)
    ids = torch.cat([b["input_ids"] for b in batches])
    save_compressed(model, str(tmp_path / "pq"))
    loaded = load_compressed(str(tmp_path / "pq"))
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids))


def test_the_order_is_checked_at_recipe_time():
    """Quantized embeddings before prune_vocab are refused by recipe validation, before any
    model is loaded."""
    from distilkit.recipe import Recipe

    with pytest.raises(ValueError, match="prune_vocab after quantize"):
        Recipe.from_dict({"compression": [{"method": "quantize", "quantize_embeddings": True},
                                          {"method": "prune_vocab"}]})
    Recipe.from_dict({"compression": [{"method": "prune_vocab"},
                                      {"method": "quantize", "quantize_embeddings": True}]})


def test_the_runs_tokenizer_gives_the_specials_and_its_unk(tmp_path):
    from conftest import tiny_tokenizer

    tok = tiny_tokenizer(str(tmp_path / "tok"))         # [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4
    ctx = CompressionContext(dataloader=[{"input_ids": torch.tensor([[10, 11, 12]])}],
                             tokenizer=tok)
    with pytest.raises(ValueError, match="set unk_token_id: 1"):
        compress_(tiny_bert(), config_from_dict({"method": "prune_vocab", "unk_token_id": 100}),
                  ctx)
    record = compress_(tiny_bert(), config_from_dict({"method": "prune_vocab"}), ctx)
    assert record["unk_token_id"] == 1                  # the tokenizer's, by default
    assert set(tok.all_special_ids) <= set(record["kept_ids"])   # [MASK] is kept, unseen
    assert {10, 11, 12} <= set(record["kept_ids"])
