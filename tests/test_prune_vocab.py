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


# --- Model and tokenizer shrunk together at save time ----------------------------------

PIECES = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "film", "play", "##ing", "##in",
          "##g", "playing", "great", "dull", "x", "##y", "##z"]


def piece_tokenizer():
    from transformers import BertTokenizerFast

    return BertTokenizerFast(vocab={w: i for i, w in enumerate(PIECES)}, do_lower_case=True)


def test_shrunk_tokenizer_rule():
    """A word whose original pieces are all kept encodes into exactly those pieces; a word
    with a dropped piece is spelled with the longest kept pieces; [UNK] only where the kept
    pieces cannot spell it."""
    from distilkit.compress.vocab import shrink_tokenizer

    tok = piece_tokenizer()
    ids = {w: i for i, w in enumerate(PIECES)}
    kept = sorted(ids[w] for w in ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "film",
                                   "play", "##in", "##g", "great", "x"])
    small = shrink_tokenizer(tok, kept)
    assert len(small) == len(kept) and small.unk_token_id == kept.index(ids["[UNK]"])
    row = {old: new for new, old in enumerate(kept)}
    # All pieces kept: the same pieces, renumbered (specials included).
    text = "the film great"
    assert small(text)["input_ids"] == [row[i] for i in tok(text)["input_ids"]]
    # "playing" was one piece (dropped); "##ing" too: spelled play ##in ##g from kept pieces.
    assert small.convert_ids_to_tokens(small("playing")["input_ids"]) == \
        ["[CLS]", "play", "##in", "##g", "[SEP]"]
    # "xy": "##y" dropped and nothing else spells it: [UNK] (the whole word, as word-piece does)
    assert small.convert_ids_to_tokens(small("the xy")["input_ids"]) == \
        ["[CLS]", "the", "[UNK]", "[SEP]"]
    # pairs keep their special tokens and type ids
    pair = small("the film", "great")
    assert pair["input_ids"][0] == row[ids["[CLS]"]] and pair["token_type_ids"][-1] == 1


def test_shrink_refuses_what_it_cannot_shrink():
    from distilkit.compress.vocab import shrink_tokenizer

    tok = piece_tokenizer()
    with pytest.raises(ValueError, match="unknown token"):
        shrink_tokenizer(tok, [0, 2, 3, 5])
    with pytest.raises(ValueError, match="not in its vocabulary"):
        shrink_tokenizer(tok, [0, 1, 999])


def shrunk_run(tmp_path, **cfg):
    """A tiny model pruned on the tokenizer's encoding of some sentences, finalized with the
    tokenizer: (pruned model, original model, original tokenizer, shrunk tokenizer, record)."""
    from conftest import tiny_tokenizer

    from distilkit.compress import finalize_

    tok = tiny_tokenizer(str(tmp_path / "tok"))
    model, original = tiny_bert(vocab=tok.vocab_size), tiny_bert(vocab=tok.vocab_size)
    model.load_state_dict(original.state_dict())
    texts = ["the film is great", "a boring movie", "not very good but fun"]
    batch = dict(tok(texts, padding=True, return_tensors="pt"))
    record = compress_(model, config_from_dict({"method": "prune_vocab", **cfg}),
                       CompressionContext(dataloader=[batch], tokenizer=tok))
    small = finalize_(model, tok)
    return model, original, tok, small, record, texts


def test_finalize_shrinks_model_and_tokenizer_together_and_round_trips(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model, original, tok, small, record, texts = shrunk_run(tmp_path)
    emb = model.get_input_embeddings()
    assert type(emb) is torch.nn.Embedding and emb.num_embeddings == record["kept"]
    assert model.config.vocab_size == record["kept"] == len(small) < len(tok)
    assert model.config.pad_token_id == record["kept_ids"].index(0)

    def run(m, t, texts):
        enc = t(texts, padding=True, return_tensors="pt")
        with torch.no_grad():
            return m(**enc).logits

    # Text whose pieces were kept: the shrunk pair computes what the original pair computed.
    torch.testing.assert_close(run(model, small, texts), run(original, tok, texts))
    out = str(tmp_path / "student")
    save_compressed(model, out)
    small.save_pretrained(out)
    loaded_tok = AutoTokenizer.from_pretrained(out)
    assert len(loaded_tok) == record["kept"]
    for loaded in (load_compressed(out), AutoModelForSequenceClassification.from_pretrained(out)):
        assert loaded.get_input_embeddings().num_embeddings == record["kept"]
        torch.testing.assert_close(run(loaded.eval(), loaded_tok, texts),
                                   run(original, tok, texts))
    # smaller on disk than the original: the dropped rows and no id map
    original.save_pretrained(str(tmp_path / "o"))
    size = lambda d: os.path.getsize(os.path.join(d, "model.safetensors"))  # noqa: E731
    assert size(str(tmp_path / "o")) - size(out) >= (len(tok) - record["kept"]) * 32 * 4 - 512


def test_tokenizer_keep_saves_the_id_map_form(tmp_path):
    model, _, tok, small, record, _ = shrunk_run(tmp_path, tokenizer="keep")
    assert small is tok and isinstance(model.get_input_embeddings(), PrunedEmbedding)
    assert not record.get("shrunk")


def test_quantized_table_after_keeps_the_id_map_form(tmp_path, caplog):
    from conftest import tiny_tokenizer

    from distilkit.compress import finalize_

    tok = tiny_tokenizer(str(tmp_path / "tok"))
    model = tiny_bert(vocab=tok.vocab_size)
    ctx = CompressionContext(dataloader=[dict(tok(["the film"], return_tensors="pt"))],
                             tokenizer=tok)
    compress_(model, config_from_dict({"method": "prune_vocab"}), ctx)
    compress_(model, config_from_dict({"method": "quantize", "bits": 8, "bucket_size": 32,
                                       "quantize_embeddings": True,
                                       "include": ["*word_embeddings*"]}))
    assert finalize_(model, tok) is tok
    assert "id-map form" in caplog.text and "quantized" in caplog.text


def test_keep_frequent_keeps_the_most_frequent_tokens_of_the_frequency_file(tmp_path):
    freq = tmp_path / "domain.txt"
    freq.write_text("charming charming charming slow slow mess\n\ncharming slow\n")
    _, _, tok, _, record, _ = shrunk_run(tmp_path, keep_frequent=2, frequency_file=str(freq))
    ids = tok.convert_tokens_to_ids(["charming", "slow", "mess"])
    assert ids[0] in record["kept_ids"] and ids[1] in record["kept_ids"]
    assert ids[2] not in record["kept_ids"] and record["frequent_kept"] == 2
    with pytest.raises(ValueError, match="keep_frequent=2 needs frequency_file"):
        config_from_dict({"method": "prune_vocab", "keep_frequent": 2})
    with pytest.raises(ValueError, match="frequency_file='nowhere.txt' is not a file"):
        config_from_dict({"method": "prune_vocab", "frequency_file": "nowhere.txt"})
    with pytest.raises(ValueError, match="tokenizer='small' is invalid"):
        config_from_dict({"method": "prune_vocab", "tokenizer": "small"})


def test_a_run_saves_the_shrunk_student_and_scores_it(tiny_task):
    import json

    from test_cli import _recipe
    from transformers import AutoTokenizer

    from distilkit.cli import main

    path, run = _recipe(tiny_task, compression=[{"method": "prune_vocab"}])
    assert main(["distill", path, "--no-progress"]) == 0
    student = os.path.join(run, "student")
    rec = json.load(open(os.path.join(student, "compression_config.json")))["records"][0]
    assert rec["shrunk"] and len(AutoTokenizer.from_pretrained(student)) == rec["kept"]
    res = json.load(open(os.path.join(run, "results.json")))
    assert 0.0 <= res["student"]["accuracy"] <= 1.0
    # the export of the shrunk student is a plain graph, checked against PyTorch
    from distilkit.export import export_onnx

    exported = export_onnx(student, os.path.join(run, "onnx"))
    assert exported["files"]["fp32"]["argmax_agreement"] == 1.0


def test_max_tokens_keeps_the_most_frequent_data_tokens_and_the_others_read_unk():
    """max_tokens N keeps the N most frequent tokens of the data (ties by id) and the specials
    whatever N is, so the rows kept at N are a prefix of one list (droppable_ids, which the
    budget search drops from the end); a data token beyond N predicts as [UNK]."""
    from distilkit.compress.vocab import droppable_ids, kept_ids

    batches = data_batches()
    ids = torch.cat([b["input_ids"].flatten() for b in batches])
    counts = torch.bincount(ids, minlength=120)
    ranked = sorted(torch.nonzero(counts).flatten().tolist(), key=lambda i: (-int(counts[i]), i))
    assert int(counts[ranked[0]]) > int(counts[ranked[-1]])   # the order means something
    ctx = CompressionContext(dataloader=batches)
    full_kept, data, unk = droppable_ids(tiny_bert(), config_from_dict(
        {"method": "prune_vocab"}), ctx)
    assert data == ranked and full_kept == sorted(set(ranked) | {0, UNK}) and unk == UNK
    for n in (0, 7, len(ranked), len(ranked) + 5):
        cfg = config_from_dict({"method": "prune_vocab", "max_tokens": n})
        assert kept_ids(tiny_bert(), cfg, ctx)[0] == sorted(set(ranked[:n]) | {0, UNK})
        assert droppable_ids(tiny_bert(), cfg, ctx)[1] == ranked[:n]
    model, original = tiny_bert(), tiny_bert()
    record = compress_(model, config_from_dict({"method": "prune_vocab", "max_tokens": 7}), ctx)
    assert record["kept"] == 7 + 2
    x = batches[0]["input_ids"].clone()
    x[:, 2] = ranked[-1]
    as_unk = torch.where(torch.isin(x, torch.tensor(ranked[:7])), x, torch.tensor(UNK))
    assert (as_unk == UNK).any() and (as_unk != UNK).any()
    torch.testing.assert_close(logits(model, x), logits(original, as_unk))


@pytest.mark.parametrize("bad", [-1, 2.5, True, "many"])
def test_a_bad_max_tokens_is_refused(bad):
    with pytest.raises(ValueError, match=f"max_tokens={bad!r} must be a non-negative integer"):
        config_from_dict({"method": "prune_vocab", "max_tokens": bad})
