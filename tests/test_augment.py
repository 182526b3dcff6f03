"""Transfer-set augmentation (Tang et al. 2019): each rule on known sentences with a fixed
seed, the taggers, determinism, the dataset helper and bad settings."""
import random

import pytest

from distilkit.augment import (AugmentConfig, LexiconTagger, PerceptronTagger, PosTable,
                               TableTagger, augment_config_from, augment_dataset, augment_pairs,
                               augment_texts, augment_words, lexicon_tag, mask_and_replace,
                               ngram_sample, perceptron_weights_path, resolve_tagger,
                               split_words, tagging_form)

SENT = "the movie was good and the acting was great".split()
TAGS = ["DET", "NOUN", "AUX", "ADJ", "CCONJ", "DET", "NOUN", "AUX", "ADJ"]


def test_masking_only_masks_and_follows_the_seeded_draws():
    rng, ref = random.Random(3), random.Random(3)
    out = mask_and_replace(SENT, TAGS, None, rng, p_mask=0.5, p_pos=0.0)
    expected = ["[MASK]" if ref.random() < 0.5 else w for w in SENT]
    assert out == expected
    assert 0 < out.count("[MASK]") < len(SENT)
    assert all(o in (w, "[MASK]") for o, w in zip(out, SENT))
    assert mask_and_replace(SENT, TAGS, None, random.Random(0), 1.0, 0.0) == ["[MASK]"] * 9
    assert mask_and_replace(SENT, TAGS, None, random.Random(0), 0.0, 0.0) == SENT


def test_pos_replacement_draws_same_tag_words_from_the_corpus():
    table = PosTable([(SENT, TAGS), ("a film was dull".split(), ["DET", "NOUN", "AUX", "ADJ"])])
    assert table.words["ADJ"] == ["dull", "good", "great"]
    assert table.words["NOUN"] == ["acting", "film", "movie"]
    out = mask_and_replace(SENT, TAGS, table, random.Random(7), p_mask=0.0, p_pos=1.0)
    for new, old, tag in zip(out, SENT, TAGS):
        assert new in table.words[tag], (new, old, tag)
    # Across many seeds every same-tag word is used, roughly by its corpus frequency.
    seen = {mask_and_replace(["movie"], ["NOUN"], table, random.Random(s), 0.0, 1.0)[0]
            for s in range(200)}
    assert seen == {"acting", "film", "movie"}
    # A tag the corpus never saw leaves the word as it is.
    assert mask_and_replace(["zzz"], ["INTJ"], table, random.Random(0), 0.0, 1.0) == ["zzz"]


def test_ngram_sampling_keeps_a_contiguous_span_of_1_to_5_words():
    lengths = set()
    for seed in range(100):
        g = ngram_sample(SENT, random.Random(seed), 1, 5)
        lengths.add(len(g))
        assert any(SENT[i:i + len(g)] == g for i in range(len(SENT) - len(g) + 1))
    assert lengths == {1, 2, 3, 4, 5}
    assert ngram_sample(["only", "two"], random.Random(0), 5, 5) == ["only", "two"]
    assert ngram_sample([], random.Random(0)) == []


def test_augment_words_makes_n_iter_distinct_new_copies():
    cfg = AugmentConfig(p_mask=0.3, p_pos=0.0, p_ng=0.0, n_iter=10, seed=0)
    copies = augment_words(SENT, TAGS, None, cfg, random.Random(0))
    assert 1 <= len(copies) <= 10
    assert len({tuple(c) for c in copies}) == len(copies)
    assert SENT not in copies
    assert all(len(c) == len(SENT) for c in copies)
    cfg_ng = AugmentConfig(p_mask=0.0, p_pos=0.0, p_ng=1.0, n_iter=10, seed=0)
    assert all(len(c) <= 5 for c in augment_words(SENT, TAGS, None, cfg_ng, random.Random(0)))


def test_augment_texts_is_seeded_and_order_independent():
    texts = ["The movie was good .", "A dull , lifeless film .", "I loved the acting ."]
    cfg = AugmentConfig(p_mask=0.2, p_pos=0.2, p_ng=0.25, n_iter=5, seed=11, pos_tagger="lexicon")
    a = augment_texts(texts, cfg)
    assert a == augment_texts(texts, cfg)
    assert a != augment_texts(texts, AugmentConfig(**{**cfg.__dict__, "seed": 12}))
    assert not set(a) & set(" ".join(split_words(t)) for t in texts)
    # Sentence i's copies depend on (seed, i) only: the first sentence alone gives a prefix.
    first = augment_texts(texts[:1], AugmentConfig(**{**cfg.__dict__, "p_pos": 0.0}))
    assert augment_texts(texts, AugmentConfig(**{**cfg.__dict__, "p_pos": 0.0}))[:len(first)] == first


def test_lexicon_tagger_and_table_tagger():
    words = split_words("The film wasn't really amazing , but she quickly loved the acting .")
    assert "wasn't" in words and "," in words
    tags = LexiconTagger()(words)
    assert dict(zip(words, tags))["The"] == "DET"
    assert dict(zip(words, tags))["quickly"] == "ADV"
    assert dict(zip(words, tags))[","] == "PUNCT"
    assert lexicon_tag("wonderful") == "ADJ" and lexicon_tag("loved") == "VERB"
    assert lexicon_tag("42") == "NUM" and lexicon_tag("kindness") == "NOUN"
    table = TableTagger({"Film": "NOUN", "loved": "VERB"}, default="X")
    assert table(["film", "LOVED", "zzz"]) == ["NOUN", "VERB", "X"]
    assert resolve_tagger({"a": "DET"})(["a", "b"]) == ["DET", "NOUN"]
    assert tagging_form("wasn't") == "was" and tagging_form("it's") == "it"
    with pytest.raises(ValueError, match="empty"):
        TableTagger({})


def test_perceptron_tagger_tags_in_context_or_says_how_to_install_it():
    if perceptron_weights_path() is None:
        with pytest.raises(ImportError, match="denckring-en-pos"):
            PerceptronTagger()
        assert resolve_tagger("auto").name == "lexicon"
        return
    tagger = resolve_tagger("perceptron")
    assert resolve_tagger("auto").name == "perceptron"
    words = split_words("She walks home . The evening walks were long .")
    tags = tagger(words)
    assert tags[1].startswith("VERB") and tags[6].startswith("NOUN")  # "walks" in context
    assert tags[3] == "PUNCT" and tags[0].startswith("PRON")
    assert tagger(["[MASK]", "movie"])[0] == "X"


def test_augment_dataset_appends_unlabelled_rows_and_pairs():
    from datasets import ClassLabel, Dataset, Features, Value

    from distilkit.data import DataSpec

    feats = Features({"text": Value("string"), "label": ClassLabel(names=["neg", "pos"]),
                      "extra": Value("int64")})
    ds = Dataset.from_dict({"text": ["a good film .", "a bad film ."], "label": [1, 0],
                            "extra": [5, 6]}, features=feats)
    out = augment_dataset(ds, {"n_iter": 3, "p_mask": 0.3, "pos_tagger": "lexicon"}, DataSpec(),
                          seed=4)
    assert out.column_names == ["text", "label"]
    assert out["label"][:2] == [1, 0] and set(out["label"][2:]) == {-100}
    assert len(out) > 2 and out["text"][:2] == ["a good film .", "a bad film ."]
    assert augment_config_from({"n_iter": 3}, seed=4).seed == 4
    assert augment_config_from({"n_iter": 3, "seed": 1}, seed=4).seed == 1
    pairs = augment_pairs([("a good film", "it was fine")],
                          AugmentConfig(n_iter=4, p_mask=0.4, pos_tagger="lexicon"))
    assert pairs and all(isinstance(a, str) and isinstance(b, str) for a, b in pairs)


@pytest.mark.parametrize("kw, match", [
    ({"p_mask": -0.1}, "p_mask"), ({"p_pos": 1.5}, "p_pos"), ({"p_ng": 2}, "p_ng"),
    ({"p_mask": 0.7, "p_pos": 0.5}, "sum"), ({"n_iter": 0}, "n_iter"),
    ({"ngram_min": 3, "ngram_max": 2}, "ngram"), ({"pos_tagger": "spacy"}, "pos_tagger"),
])
def test_bad_settings_are_clear_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        AugmentConfig(**kw)


def test_unknown_recipe_key_and_single_string_are_errors():
    with pytest.raises(ValueError, match="unknown key"):
        augment_config_from({"p_masking": 0.1})
    with pytest.raises(TypeError, match="list of sentences"):
        augment_texts("one sentence", AugmentConfig(pos_tagger="lexicon"))
