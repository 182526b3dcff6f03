"""BiLSTM student (Tang et al. 2019): save/load through the Auto classes, padding and pair
handling, teacher embedding init, the word vocabulary, bad inputs, and distillation from a
tiny teacher."""
import random

import pytest
import torch
from conftest import tiny_bert

from distilkit.students.bilstm import (BiLSTMConfig, BiLSTMForSequenceClassification,
                                       build_bilstm_student, check_pair_data, compact_left,
                                       masked_max_pool, pair_features, pca_project)
from distilkit.students.word_vocab import build_word_tokenizer, split_words

TEXTS = ["a good movie .", "a bad , bad film !", "the plot is thin", "great acting and a fine script",
         "dull and boring", "I loved it"]
SMALL = dict(embedding_dim=12, hidden_size=10, mlp_hidden_size=8, dropout=0.0)


def small_student(texts=TEXTS, **kw):
    model, tok = build_bilstm_student(None, None, texts, embedding_init="random", seed=0,
                                      **{**SMALL, **kw})
    return model.eval(), tok


def test_save_load_through_auto_classes_gives_equal_predictions(tmp_path):
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    model, tok = small_student()
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    before = model(**enc).logits
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).model_type == "distilkit-bilstm"
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    tok2 = AutoTokenizer.from_pretrained(tmp_path)
    assert isinstance(loaded, BiLSTMForSequenceClassification)
    enc2 = tok2(TEXTS, padding=True, return_tensors="pt")
    assert torch.equal(enc2["input_ids"], enc["input_ids"])
    assert torch.equal(loaded(**enc2).logits, before)


def test_load_compressed_without_records_uses_registration(tmp_path):
    from distilkit.compress.base import load_compressed

    model, tok = small_student()
    model.save_pretrained(tmp_path)
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    assert torch.equal(load_compressed(str(tmp_path))(**enc).logits, model(**enc).logits)


def test_padding_side_and_batching_do_not_change_logits():
    model, tok = small_student()
    right = model(**tok(TEXTS, padding=True, return_tensors="pt")).logits
    tok.padding_side = "left"
    left = model(**tok(TEXTS, padding=True, return_tensors="pt")).logits
    torch.testing.assert_close(left, right, rtol=0, atol=1e-6)
    for i, t in enumerate(TEXTS):
        one = model(**tok([t], return_tensors="pt")).logits
        torch.testing.assert_close(one, right[i:i + 1], rtol=0, atol=1e-6)


def test_token_type_ids_are_ignored_for_single_sentences_and_loss_is_computed():
    model, tok = small_student()
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    labels = torch.tensor([1, 0, 0, 1, 0, 1])
    out = model(**enc, labels=labels)
    ref = torch.nn.functional.cross_entropy(out.logits, labels)
    torch.testing.assert_close(out.loss, ref)
    enc["token_type_ids"] = torch.ones_like(enc["input_ids"])
    torch.testing.assert_close(model(**enc).logits, out.logits)


def test_masked_max_pool_ignores_padding_and_zeroes_empty_rows():
    states = torch.tensor([[[1.0, -5.0], [9.0, 9.0]], [[-3.0, -2.0], [7.0, 7.0]],
                           [[4.0, 4.0], [4.0, 4.0]]])
    mask = torch.tensor([[1, 0], [1, 0], [0, 0]])
    assert masked_max_pool(states, mask).tolist() == [[1.0, -5.0], [-3.0, -2.0], [0.0, 0.0]]


def test_compact_left_moves_kept_tokens_to_the_front_in_order():
    ids = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 0]])
    keep = torch.tensor([[0, 0, 1, 1], [1, 0, 1, 0]])
    out, mask, lengths = compact_left(ids, keep, pad_id=0)
    assert out.tolist() == [[5, 6], [7, 9]]
    assert mask.tolist() == [[1, 1], [1, 1]] and lengths.tolist() == [2, 2]


def test_pair_features_and_both_pair_input_forms_agree():
    a_texts, b_texts = TEXTS[:3], TEXTS[3:]
    model, tok = small_student(sentence_pair=True)
    assert model.config.feature_size == 8 * SMALL["hidden_size"]
    a = tok(a_texts, padding=True, return_tensors="pt")
    b = tok(b_texts, padding=True, return_tensors="pt")
    explicit = model(input_ids=a["input_ids"], attention_mask=a["attention_mask"],
                     input_ids_b=b["input_ids"], attention_mask_b=b["attention_mask"]).logits
    joint = tok(a_texts, b_texts, padding=True, return_tensors="pt")
    assert joint["token_type_ids"].max() == 1
    torch.testing.assert_close(model(**joint).logits, explicit, rtol=0, atol=1e-6)
    # The classifier sees [h1, h2, h1*h2, |h1-h2|] of the shared encoder's outputs.
    h1 = model.encode(a["input_ids"], a["attention_mask"])
    h2 = model.encode(b["input_ids"], b["attention_mask"])
    feats = pair_features(h1, h2)
    torch.testing.assert_close(feats, torch.cat([h1, h2, h1 * h2, (h1 - h2).abs()], -1))
    manual = model.classifier(torch.relu(model.mlp(feats)))
    torch.testing.assert_close(manual, explicit, rtol=0, atol=1e-6)


def test_pair_student_with_one_text_is_a_clear_error():
    model, tok = small_student(sentence_pair=True)
    with pytest.raises(ValueError, match="text_pair_column"):
        model(**tok(TEXTS, padding=True, return_tensors="pt"))
    with pytest.raises(ValueError, match="text_pair_column"):
        check_pair_data(model.config, None)
    single, _ = small_student()
    with pytest.raises(ValueError, match="sentence_pair"):
        check_pair_data(single.config, "sentence2")
    check_pair_data(model.config, "sentence2")  # consistent: no error


def test_zero_word_vocabulary_and_other_bad_inputs_are_errors():
    with pytest.raises(ValueError, match="no words"):
        build_word_tokenizer(["", "   "])
    with pytest.raises(ValueError, match="zero words"):
        build_word_tokenizer(["one two", "three"], min_frequency=5)
    with pytest.raises(ValueError, match="min_frequency"):
        build_word_tokenizer(TEXTS, min_frequency=0)
    with pytest.raises(ValueError, match="unknown key"):
        build_bilstm_student(None, None, TEXTS, embedding_init="random", hiden_size=3)
    with pytest.raises(ValueError, match="embedding_init"):
        build_bilstm_student(None, None, TEXTS)  # teacher init without a teacher
    with pytest.raises(ValueError, match="hidden_size"):
        BiLSTMConfig(hidden_size=0)
    with pytest.raises(ValueError, match="pad_token_id"):
        BiLSTMConfig(vocab_size=10, pad_token_id=10)


def test_word_vocabulary_limits_and_special_tokens():
    tok = build_word_tokenizer(["b a a c a b", "d"], min_frequency=2)
    vocab = tok.get_vocab()
    assert vocab["[PAD]"] == 0 and vocab["[UNK]"] == 1 and vocab["[MASK]"] == 2
    assert {"a", "b"} <= set(vocab) and "c" not in vocab and "d" not in vocab
    assert tok("a [MASK] zzz")["input_ids"] == [vocab["a"], 2, 1]
    assert split_words("It's GOOD, really.") == ["it", "'", "s", "good", ",", "really", "."]
    capped = build_word_tokenizer(["b a a c a b"], max_size=1)
    assert len(capped) == 4 and "a" in capped.get_vocab()


def _teacher_tokenizer(words):
    from transformers import BertTokenizerFast

    import tempfile, os
    d = tempfile.mkdtemp()
    with open(os.path.join(d, "vocab.txt"), "w") as f:
        f.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words))
    return BertTokenizerFast(os.path.join(d, "vocab.txt"), do_lower_case=True)


def test_embeddings_initialised_from_teacher_keep_its_geometry():
    words = sorted({w for t in TEXTS for w in split_words(t)})
    t_tok = _teacher_tokenizer(words)
    teacher = tiny_bert(vocab=len(t_tok))
    model, tok = build_bilstm_student(teacher, t_tok, TEXTS, seed=0, embedding_dim=48,
                                      hidden_size=8, mlp_hidden_size=8)
    assert model.config.num_labels == teacher.config.num_labels
    ids = [tok.convert_tokens_to_ids(w) for w in words]
    t_ids = [t_tok.convert_tokens_to_ids(w) for w in words]
    s = model.embeddings.weight[ids].detach().double()
    t = teacher.get_input_embeddings().weight[t_ids].detach().double()
    t = t - t.mean(0)
    # Width 48 >= 32: PCA only rotates, so the Gram matrices agree up to one scale factor.
    gs, gt = s @ s.T, t @ t.T
    torch.testing.assert_close(gs / gs.norm(), gt / gt.norm(), rtol=0, atol=1e-5)
    # Teacher's own tokenizer: rows copied, projected to a narrower width.
    model2, tok2 = build_bilstm_student(teacher, t_tok, None, vocabulary="teacher", seed=0,
                                        embedding_dim=8, hidden_size=8, mlp_hidden_size=8)
    assert tok2 is t_tok and model2.config.vocab_size == len(t_tok)
    x = torch.randn(20, 6, dtype=torch.float64)
    p = pca_project(x, 3)
    assert p.shape == (20, 3) and abs(float(p.mean())) < 1e-6


def _synthetic(n, seed):
    rng = random.Random(seed)
    pos, neg = ["good", "great", "fine", "superb"], ["bad", "awful", "dull", "poor"]
    filler = ["the", "movie", "film", "plot", "was", "is", "a", "very", "and", "cast", "it"]
    texts, labels = [], []
    for _ in range(n):
        y = rng.randint(0, 1)
        words = [rng.choice(filler) for _ in range(rng.randint(2, 6))]
        words.insert(rng.randint(0, len(words)), rng.choice(pos if y else neg))
        texts.append(" ".join(words))
        labels.append(y)
    return texts, labels


def _accuracy(model, tok, texts, labels):
    with torch.no_grad():
        logits = model(**tok(texts, padding=True, return_tensors="pt")).logits
    return float((logits.argmax(-1) == torch.tensor(labels)).float().mean())


def test_distillation_from_a_tiny_teacher_improves_the_student(tmp_path):
    from datasets import Dataset

    from distilkit.collate import DistilCollator
    from distilkit.config import DistilConfig
    from distilkit.trainer import DistilTrainer

    torch.manual_seed(0)
    train_x, train_y = _synthetic(256, 0)
    test_x, test_y = _synthetic(128, 1)
    t_tok = build_word_tokenizer(train_x)
    teacher = tiny_bert(vocab=len(t_tok), layers=2)
    teacher.train()
    opt = torch.optim.AdamW(teacher.parameters(), lr=3e-3)
    for step in range(60):  # a quick fine-tune so the teacher knows the task
        idx = [(step * 32 + i) % 256 for i in range(32)]
        enc = t_tok([train_x[i] for i in idx], padding=True, return_tensors="pt")
        loss = teacher(**enc, labels=torch.tensor([train_y[i] for i in idx])).loss
        opt.zero_grad(); loss.backward(); opt.step()
    teacher.eval()
    assert _accuracy(teacher, t_tok, test_x, test_y) > 0.9

    student, s_tok = build_bilstm_student(teacher, t_tok, train_x, seed=0, embedding_dim=16,
                                          hidden_size=16, mlp_hidden_size=16, dropout=0.0)
    student.eval()
    before = _accuracy(student, s_tok, test_x, test_y)
    s_enc, t_enc = s_tok(train_x), t_tok(train_x)
    ds = Dataset.from_dict({"input_ids": s_enc["input_ids"], "attention_mask": s_enc["attention_mask"],
                            "teacher_input_ids": t_enc["input_ids"],
                            "teacher_attention_mask": t_enc["attention_mask"]})
    args = DistilConfig(output_dir=str(tmp_path), max_steps=80, per_device_train_batch_size=32,
                        learning_rate=1e-2, alpha_mse=1.0, alpha_kd=0.0, alpha_ce=0.0,
                        report_to=[], save_strategy="no", logging_steps=1000, use_cpu=True,
                        seed=0, disable_tqdm=True)
    trainer = DistilTrainer(model=student, teacher_model=teacher, args=args, train_dataset=ds,
                            data_collator=DistilCollator(s_tok, teacher_pad_token_id=t_tok.pad_token_id))
    trainer.train()
    student.eval()
    after = _accuracy(student, s_tok, test_x, test_y)
    assert after > 0.85 and after > before + 0.2, (before, after)
